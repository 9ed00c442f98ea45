"""probes/hook"""
