"""The VM harness itself, on a real guest (QEMU TCG, the bookworm image): commands and their
results, bounded waits, failures that read like the guest's story, and no QEMU left behind.

Marked ``vm``: runs in ``make test-kernels`` (IOTRACE_VM=1), before the kernel matrix reuses the
image. Each boot costs ~30 s of TCG.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support import REPO
from vm.image import SPECS, ensure
from vm.machine import Machine, MachineError

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def guest(guests):
    return guests.get("bookworm")


def test_the_image_is_what_its_spec_says(guest):
    """Its kernel booted, its setup ran (no documentation left), its /boot copied out."""
    img = ensure(SPECS["bookworm"])
    assert guest.check("uname -r").stdout.strip() == img.kernel_release
    assert guest.check("ls /usr/share/doc | wc -l").stdout.strip() == "0"
    assert guest.check("dpkg-query -W -f='${Status}' python3-bpfcc").stdout == \
        "install ok installed"
    assert img.boot_file(f"vmlinuz-{img.kernel_release}").read_bytes() == img.kernel.read_bytes()


def test_command_results(guest):
    r = guest.run("echo out; echo err >&2; exit 3")
    assert (r.rc, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)
    r = guest.run(["sh", "-c", 'cat; echo "$X" "$(pwd)"'], stdin=b"in\n", env={"X": "x"},
                  cwd="/tmp")
    assert r.ok and r.stdout == "in\nx /tmp\n"
    assert guest.run(["/nonexistent"]).rc == 127
    assert guest.hello["uname"].split()[2] == ensure(SPECS["bookworm"]).kernel_release


def test_the_guest_looks_like_a_dom0(guest):
    """tracefs and debugfs mounted (BCC's uprobe cleanup needs tracefs), the project read-only at
    /mnt/project, the scratch share writable and seen on the host."""
    r = guest.check("mount")
    assert "tracefs on /sys/kernel/tracing" in r.stdout and "/sys/kernel/debug" in r.stdout
    assert guest.run("touch /mnt/project/x").rc != 0
    assert guest.check("cat /mnt/project/pyproject.toml").stdout == \
        (REPO / "pyproject.toml").read_text()
    out = [s for s in guest.shares if s.tag == "out"][0].path
    guest.check("echo from-guest > /mnt/out/hello.txt")
    assert (out / "hello.txt").read_text() == "from-guest\n"


def test_a_command_past_its_timeout_is_killed_and_the_guest_goes_on(guest):
    t0 = time.monotonic()
    r = guest.run("sleep 300; echo never", timeout=3)
    assert r.timed_out and r.rc == -9 and "never" not in r.stdout
    assert time.monotonic() - t0 < 30
    assert guest.run("pgrep -x sleep").rc == 1            # its whole session was killed
    assert guest.ping()


def test_a_daemon_left_running_does_not_hold_the_answer(guest):
    t0 = time.monotonic()
    r = guest.check("sleep 120 & echo started")
    assert r.stdout == "started\n" and time.monotonic() - t0 < 20
    guest.check("pkill -x sleep; true")


def test_a_failing_command_reads_like_the_guest_story(guest):
    guest.check("echo 'iotrace-test: something the console saw' > /dev/console")
    with pytest.raises(MachineError) as ei:
        guest.check("echo 'python3: cannot load thing' >&2; exit 5")
    msg = str(ei.value)
    assert "exited 5" in msg and "python3: cannot load thing" in msg
    assert "iotrace-test: something the console saw" in msg     # the console's lines
    guest.failed = False       # an expected failure: the module's guest is fine


def test_boot_failure_is_bounded_and_shows_the_panic(tmp_path):
    """No initrd: the kernel cannot mount its root (virtio_blk is a module) and panics; QEMU
    exits (panic=-1, -no-reboot). The error says so with the console's panic lines."""
    img = ensure(SPECS["bookworm"])
    m = Machine(img.kernel, append="root=/dev/vda console=ttyS0 panic=-1", disks=[img.rootfs],
                name="no-initrd", boot_timeout=240, workdir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(MachineError) as ei:
        m.start()
    msg = str(ei.value)
    assert "QEMU exited" in msg and "Kernel panic" in msg, msg
    assert time.monotonic() - t0 < 240
    assert not m.running()


def test_boot_timeout_is_bounded(tmp_path):
    img = ensure(SPECS["bookworm"])
    m = Machine.for_image(img, name="impatient", boot_timeout=5, workdir=tmp_path)
    t0 = time.monotonic()
    with pytest.raises(MachineError, match="no the agent's hello within the time allowed"):
        m.start()
    assert time.monotonic() - t0 < 30 and not m.running()


def test_qemu_dies_with_the_process_that_started_it(tmp_path):
    """SIGKILL to the owner (no finalizer, no atexit can run): PR_SET_PDEATHSIG ends QEMU."""
    img = ensure(SPECS["bookworm"])
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "tests")!r})
        from vm.machine import Machine
        from vm.image import Image, SPECS
        from pathlib import Path
        m = Machine.for_image(Image(SPECS["bookworm"], Path({str(img.dir)!r})), agent=False,
                              workdir={str(tmp_path)!r})
        m.start()
        print(m.proc.pid, flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        qemu_pid = int(owner.stdout.readline())
        assert os.path.exists(f"/proc/{qemu_pid}")
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{qemu_pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{qemu_pid}"), "QEMU outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
