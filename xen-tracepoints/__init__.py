"""The xentrace source: Xen's trace records decoded into the event model.

catalogue (event ids and their fields, checked against Xen's sources), decoder (files and streams,
with a C record walk), live (a running ``xentrace`` on a pipe), testing (the synthetic generator).
"""
