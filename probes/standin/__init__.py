"""The stand-in device model: a C program a uprobe cannot tell from qemu-dm (standin.c), its
build and process handling (runner), and the request streams it replays (stream)."""
