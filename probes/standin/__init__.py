"""probes/standin"""
