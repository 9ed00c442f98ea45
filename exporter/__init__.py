"""iotrace: every I/O request Xen HVM guests send to their emulated devices, seen from Dom0."""
__version__ = "0.1.0"
