"""The VM harness: Debian images built with debootstrap (``vm.image``), QEMU TCG guests driven through
an agent (``vm.machine``, ``guest/agent.py``). See tests/vm/README.md."""
