"""The live qemu source: BCC uprobes on the device models' ``handle_ioreq``.

bpf (the programs and their loader), hook (where to attach in a binary), discovery (device-model
processes -> domains), live (``QemuProbeSource``: metrics in kernel maps, or events through a ring
buffer), cli (the probe verbs), standin (the stand-in device model the tests and the demo run).
"""
