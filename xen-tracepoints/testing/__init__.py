"""xen-tracepoints/testing"""
