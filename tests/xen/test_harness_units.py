"""The Xen harness's parts that need no Xen (in the normal ``make test``): the guests' boot
sectors and configurations, the Dom0 image spec, QEMU's command line for Xen."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from vm.image import Image

from support import require_tool
from support.procs import terminate, wait_until
from xen import dom0
from xen.dom0_image import DOM0_SPEC, XEN_VERSION
from xen.guests import DISK_BYTES, GUESTS, Discovery, build_disk, discovery
from xen.window import paused


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_boot_sector_assembles_with_its_port_io(name, tmp_path):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) not installed")
    disk = build_disk(GUESTS[name], tmp_path).read_bytes()
    assert len(disk) == DISK_BYTES and disk[510:512] == b"\x55\xaa"
    code = disk[:510]
    # COM1: mov $0x3fd,%dx; inb (%dx) and mov $0x3f8,%dx; outb (%dx)
    assert b"\xba\xfd\x03\xec" in code and b"\xba\xf8\x03\xee" in code
    # hold.inc: the line status kept (mov %al,%bl), IVT[0x0c] set, IRQ4 only, STI; HLT
    assert b"\x88\xc3" in code and b"\xc7\x06\x30\x00" in code and b"\xe6\x21" in code
    assert b"\xfb\xf4" in code
    if GUESTS[name].source == "com1_loop.S":
        assert b"\xe6\x80" in code                             # outb %al, $0x80
    elif GUESTS[name].source == "pci_bar_loop.S":
        assert b"\x66\xef" in code and b"\x66\xed" in code     # outl/inl (%dx): 0xcf8/0xcfc
        assert b"\x0f\x01\x16" in code                         # lgdt: unreal mode
        assert b"\x64\x67\xc7\x06\xc5\xb0" in code             # movw $0xb0c5, %fs:(%esi)
        assert b"\x64\x67\x8b\x06" in code                     # movw %fs:(%esi), %ax
    else:
        for op in (b"\xe6\x70", b"\xe4\x71", b"\xe6\x43", b"\xe4\x40"):   # RTC, PIT
            assert op in code
        assert b"\x66\xef" in code and b"\x66\xed" in code     # outl/inl (%dx): 0xcf8/0xcfc
        assert b"\x26\xc7\x05" in code                         # movw $imm, %es:(%di): VGA text
        assert b"\xf3\x6e" in code                             # rep outsb


def test_guest_config_is_hvm_with_its_serial_log_in_dom0():
    cfg = GUESTS["bs2"].config("/var/tmp/iotrace-guests")
    assert 'type = "hvm"' in cfg and 'vga = "stdvga"' in cfg
    # COM1 on qemu's pipe chardev: PATH.in for commands, PATH.out copied into the serial log
    assert 'serial = "pipe:/var/tmp/iotrace-guests/bs2-com1"' in cfg
    g = GUESTS["bs2"]
    assert (g.com1_in("/d"), g.com1_out("/d"), g.serial_log("/d")) == \
        ("/d/bs2-com1.in", "/d/bs2-com1.out", "/d/bs2-serial.log")
    assert "target=/var/tmp/iotrace-guests/bs2.img" in cfg
    assert 'vga = "none"' in GUESTS["bs1"].config("/var/tmp")
    # one byte per loop iteration: what the window's truth counts
    assert all(len(g.loop_bytes) == 2 and b"\n" in g.loop_bytes for g in GUESTS.values())


def test_discovery_reads_bs5s_first_line_after_the_bios():
    log = b"SeaBIOS (version 1.16.2)\nBooting from Hard Disk...\nP0000000F BF1000000\n****\n"
    assert discovery(log) == Discovery((0, 1, 2, 3), 0xF1000000)
    assert discovery(b"P80000001 B00000000\n*") == Discovery((0, 31), 0)
    for bad in (b"", b"P0000000F\n", b"P0000000f Bf1000000\n", b"P0000000F BF10000\n"):
        with pytest.raises(ValueError):
            discovery(bad)


def test_dom0_spec_has_xen_its_device_model_and_bcc():
    pk = set(DOM0_SPEC.packages)
    assert {f"xen-hypervisor-{XEN_VERSION}-amd64", f"xen-utils-{XEN_VERSION}", "qemu-system-xen",
            "python3-bpfcc", "linux-headers-amd64", "systemd-sysv"} <= pk
    assert "iotrace-vm-agent.service" in DOM0_SPEC.setup
    assert DOM0_SPEC.key() == DOM0_SPEC.key() and len(DOM0_SPEC.key()) == 16


def test_qemu_command_boots_xen_with_dom0_as_multiboot_modules(tmp_path):
    img = Image(DOM0_SPEC, tmp_path)
    m = dom0.machine(img, tmp_path / "xen", shares=[dom0.Share(tmp_path, "project")])
    argv = m.command()
    opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}
    assert opt["-kernel"] == str(tmp_path / "xen")
    assert opt["-cpu"] == "EPYC,+svm,+npt,-smap,-monitor,-xsave" and opt["-smp"] == "1"
    assert "sched=credit2" in opt["-append"].split() and "console=com1" in opt["-append"]
    mods = opt["-initrd"].split(",")
    assert mods[0].startswith(f"{img.kernel} ") and "console=hvc0" in mods[0]
    assert mods[1] == str(img.initrd)
    assert any("mount_tag=project" in a for a in argv) and any("virtserialport" in a for a in argv)
    assert "-netdev" not in argv              # no NIC unless asked for
    shutil.rmtree(m.workdir)          # never started: nothing else to clean


def test_forwards_are_loopback_only_on_a_restricted_user_network(tmp_path):
    img = Image(DOM0_SPEC, tmp_path)
    m = dom0.machine(img, tmp_path / "xen", forwards=[(19878, 9878), (19879, 22)])
    argv = m.command()
    net = argv[argv.index("-netdev") + 1]
    assert net == ("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:19878-:9878,"
                   "hostfwd=tcp:127.0.0.1:19879-:22")
    assert argv[argv.index("-device", argv.index("-netdev")) + 1] == "virtio-net-pci,netdev=n0"
    shutil.rmtree(m.workdir)


def test_paused_reads_xl_lists_state_column():
    assert paused("bs1") == "xl list bs1 | awk 'NR == 2 {print $5}' | grep -q p"


def test_guest_sources_exist_beside_the_harness():
    here = Path(dom0.__file__).parent
    assert {g.source for g in GUESTS.values()} <= {p.name for p in (here / "guests").glob("*.S")}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["bs1", "bs2", "bs5"])
def test_stop_and_go_between_iterations_on_plain_qemu(name, tmp_path):
    """The guests' COM1 commands (guests/hold.inc) under plain QEMU (TCG, SeaBIOS, the same
    16550 and chardev as the Xen device model): 'S' ends with a '!' after a whole iteration and
    nothing more is printed while the guest holds; 'G' makes it loop again."""
    qemu = require_tool("qemu-system-x86_64")
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) not installed")
    g = GUESTS[name]
    disk = build_disk(g, tmp_path)
    pipe, log = tmp_path / "com1", tmp_path / "serial.log"
    for end in (".in", ".out"):
        os.mkfifo(f"{pipe}{end}")
    with open(log, "wb") as out:
        cat = subprocess.Popen(["cat", f"{pipe}.out"], stdout=out)
    vm = subprocess.Popen([qemu, "-accel", "tcg", "-m", "32", "-display", "none", "-vga", "std",
                           "-monitor", "none", "-drive", f"file={disk},format=raw,if=ide",
                           "-serial", f"pipe:{pipe}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    loop = set(g.loop_bytes)

    def text() -> bytes:
        return log.read_bytes()

    def tell(command: bytes) -> None:
        with open(f"{pipe}.in", "wb") as f:
            f.write(command)

    def held(n: int):
        t = text()
        return t.endswith(b"!") and t.count(b"!") == n

    try:
        assert wait_until(lambda: sum(b in loop for b in text()) >= 20, 60), text()[-200:]
        if name == "bs5":       # plain QEMU has the stdvga too; SeaBIOS places its BAR
            found = discovery(text())
            assert 0 in found.devices and found.bar2 >= 1 << 20, found
        tell(b"S")
        assert wait_until(lambda: held(1), 30), text()[-200:]
        first = len(text())
        time.sleep(1.0)
        assert len(text()) == first                      # holding: nothing at all
        tell(b"G")
        assert wait_until(lambda: len(text()) > first + 20, 30)
        tell(b"S")
        assert wait_until(lambda: held(2), 30), text()[-200:]
        between = text()[first:-1]
        assert between and set(between) <= loop, between[:100]
        tell(b"GS")                                      # from holding: go, then hold again
        assert wait_until(lambda: held(3), 30), text()[-200:]
    finally:
        terminate(vm, 10)
        terminate(cat, 10)
