"""The real-Xen gate and the Xen host fixture.

Tests marked ``xen`` boot Xen 4.17 with a Debian 12 Dom0 under QEMU TCG (minutes): they run only
when IOTRACE_XEN=1 (``make test-xen`` sets it), as root, and are skipped otherwise.

    xen_host   (session scope: one boot for every module) a booted Xen host
               (tests/xen/dom0.Dom0) with the project at /mnt/project (read-only), a scratch
               directory at /mnt/out (read-write; ``.out`` on the host), this folder at
               /mnt/xenharness, the guests bs1 and bs2 created and paused (tests unpause them
               inside their windows: tests/xen/window.py), Dom0's network up with its port
               EXPORTER_PORT reachable from the host at 127.0.0.1:``exporter_port``; shut down
               (guests destroyed, QEMU killed) at the end of the run, whatever the tests did
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from vm.image import ensure
from vm.machine import Share

from support import REPO
from support.prometheus import free_port
from xen.dom0 import Dom0
from xen.dom0_image import DOM0_SPEC, hypervisor
from xen.guests import GUESTS, build_disk

COSTS: list[str] = []     # printed at the end of the run (what each part took)
XEN_ENABLED = os.environ.get("IOTRACE_XEN") == "1"
HERE = Path(__file__).resolve().parent
GUEST_DIR = "/var/tmp/iotrace-guests"          # in Dom0: disks, configurations, serial logs
GUEST_START_TIMEOUT = 120.0         # xl create to the loop's first bytes on the serial log
BOOT_GUESTS = ("bs1", "bs2")        # created at boot; the others by the tests that need them
EXPORTER_PORT = 9878                # in Dom0: what iotrace serve listens on, forwarded to the host


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xen") is None:
            continue
        if not XEN_ENABLED:
            item.add_marker(pytest.mark.skip(reason="boots Xen under QEMU: make test-xen "
                                                    "(IOTRACE_XEN=1)"))
        elif os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (debootstrap, QEMU, BCC in Dom0)"))


class XenHost(Dom0):
    out: Path
    exporter_port: int              # on the host's 127.0.0.1: Dom0's EXPORTER_PORT

    def start_guest(self, name: str) -> int:
        g = GUESTS[name]
        cfg = f"{GUEST_DIR}/{name}.cfg"
        cin, cout, log = g.com1_in(GUEST_DIR), g.com1_out(GUEST_DIR), g.serial_log(GUEST_DIR)
        # COM1's output copied into the serial log by a cat that ends with the device model
        self.sh(f"mkdir -p {GUEST_DIR} && cp /mnt/out/{name}.img {g.disk(GUEST_DIR)} && "
                f"rm -f {log} {cin} {cout} && mkfifo -m 666 {cin} {cout} && : > {log} && "
                f"{{ nohup setsid cat {cout} >> {log} 2> /dev/null < /dev/null & }} && "
                f"cat > {cfg} <<'CFG'\n{g.config(GUEST_DIR)}CFG")
        self.xl_create(cfg)
        t0 = time.monotonic()
        # the loop runs once its bytes keep coming (SeaBIOS prints first)
        self.wait_until(f"test $(tr -cd {loop_class(g.loop_bytes)} < {g.serial_log(GUEST_DIR)} "
                        f"| wc -c) -ge 20", GUEST_START_TIMEOUT, f"guest {name}'s loop running")
        # paused until a test's window: a looping guest takes the one pCPU from Dom0 (xl create
        # of a second guest did not finish in 80 s with the first one looping)
        self.sh(f"xl pause {name}")
        COSTS.append(f"xen: guest {name} created and looping in {time.monotonic() - t0:.1f} s")
        return self.domid(name)

    def serial_bytes(self, name: str) -> int:
        return int(self.sh(f"stat -c %s {GUESTS[name].serial_log(GUEST_DIR)}").strip())


def loop_class(b: bytes) -> str:
    """tr(1)'s set for a loop's bytes (shell-quoted)."""
    return "'" + b.decode().replace("\n", "\\n") + "'"


@pytest.fixture(scope="session")
def xen_host():
    out = Path(tempfile.mkdtemp(prefix="iotrace-xen-out-"))
    host = None
    try:
        t0 = time.monotonic()
        image = ensure(DOM0_SPEC)
        xen = hypervisor(image)
        COSTS.append(f"xen: image {image.dir.name} ready in {time.monotonic() - t0:.1f} s "
                     f"(kernel {image.kernel_release})")
        for g in GUESTS.values():
            build_disk(g, out)
        t0 = time.monotonic()
        port = free_port()
        dom0 = Dom0.boot(image, xen, shares=[Share(REPO, "project"), Share(HERE, "xenharness"),
                                             Share(out, "out", readonly=False)],
                         forwards=[(port, EXPORTER_PORT)])
        host = XenHost(dom0.m)
        host.out, host.exporter_port = out, port
        COSTS.append(f"xen: booted to the Dom0 agent in {dom0.m.boot_seconds:.1f} s")
        t0 = time.monotonic()
        host.wait_toolstack()
        COSTS.append(f"xen: toolstack ready {time.monotonic() - t0:.1f} s later")
        host.up_network()
        for name in BOOT_GUESTS:
            host.start_guest(name)
        yield host
    finally:
        if host is not None:
            host.shutdown()
        shutil.rmtree(out, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if COSTS:
        terminalreporter.section("Xen harness costs")
        for line in COSTS:
            terminalreporter.write_line(line)
