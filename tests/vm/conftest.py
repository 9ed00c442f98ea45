"""Fixtures of the VM harness, and its gate.

Tests marked ``vm`` boot guests under QEMU TCG (minutes each): they run only when IOTRACE_VM=1
(``make test-kernels`` sets it), as root, and are skipped otherwise, so ``make test`` stays quick.
The harness's own unit tests (no guest booted) are not marked and run everywhere.

    guest_for(name)      a started Machine booting the cached image SPECS[name] (built if missing),
                         the project shared read-only at /mnt/project, a scratch directory shared
                         read-write at /mnt/out; shut down at the end of the module
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from support import REPO
from vm.image import SPECS, ensure
from vm.machine import Machine, Share
from vm.report import COSTS

VM_ENABLED = os.environ.get("IOTRACE_VM") == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("vm") is None:
            continue
        if not VM_ENABLED:
            item.add_marker(pytest.mark.skip(reason="boots QEMU guests: make test-kernels "
                                                    "(IOTRACE_VM=1)"))
        elif os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (debootstrap, BCC in the guest)"))


class Guests:
    """Machines started for a module, shut down by its finalizer (whatever the tests did)."""

    def __init__(self):
        self.machines: dict[str, Machine] = {}
        self.out = Path(tempfile.mkdtemp(prefix="iotrace-vm-out-"))

    def get(self, name: str) -> Machine:
        m = self.machines.get(name)
        if m is None or not m.running():
            t0 = time.monotonic()
            image = ensure(SPECS[name])
            COSTS.append(f"image {image.dir.name}: ready in {time.monotonic() - t0:.1f} s "
                         f"(kernel {image.kernel_release})")
            m = Machine.for_image(image, shares=[Share(REPO, "project"),
                                                 Share(self.out, "out", readonly=False)])
            self.machines[name] = m
            m.start()
            COSTS.append(f"{name}: booted to the agent in {m.boot_seconds:.1f} s")
        return m

    def close(self):
        for m in self.machines.values():
            m.shutdown()
        shutil.rmtree(self.out, ignore_errors=True)


@pytest.fixture(scope="module")
def guests():
    g = Guests()
    try:
        yield g
    finally:
        g.close()


def pytest_terminal_summary(terminalreporter):
    if COSTS:
        terminalreporter.section("VM harness costs")
        for line in COSTS:
            terminalreporter.write_line(line)
