"""The BPF programs (``*.bpf.c`` and the header they share), their ctypes mirrors with size
checks (types) and their loader (loader: one program per device-model binary, compiled with the
hook's parameters as constants)."""
