"""probes/bpf"""
