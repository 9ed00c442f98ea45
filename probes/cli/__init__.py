"""probes/cli"""
