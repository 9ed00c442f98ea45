"""The HVM test guests: boot sectors assembled here (``as``/``ld``), their xl configurations, and
what their serial output says they did.

Each guest is a 1 MiB raw disk whose MBR is one of guests/*.S; SeaBIOS (through hvmloader) boots
it. Each loop iteration prints exactly one byte on COM1, so the bytes a guest printed between two
``xl pause`` points are its iteration count over that window: its own truth. COM1 is a qemu
``pipe:`` chardev: Dom0 copies its output (``com1_out``) into the serial log and writes commands
into ``com1_in`` ('S' stop, 'G' go, read by the guest between two iterations: guests/hold.inc).

    GUESTS["bs1"]   guests/com1_loop.S   IN 0x3fd, OUT 0x3f8, OUT 0x80 per iteration
    GUESTS["bs2"]   guests/mixed_loop.S  RTC, PIT, PCI config, VGA text, rep outsb, COM1 per
                    iteration
    GUESTS["bs3"], GUESTS["bs4"]   bs1's loop again: guests created (and destroyed) while
                    iotrace serve runs (tests/xen/test_serve.py)
    GUESTS["bs5"]   guests/pci_bar_loop.S   a PCI config scan of bus 0 (32 devices), an MMIO
                    write and read in the stdvga's BAR 2, COM1 per iteration; it prints what it
                    found first (``discovery``)
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DISK_BYTES = 1 << 20


@dataclass(frozen=True)
class Guest:
    name: str
    source: str
    vga: str                       # "none", or "stdvga" for the VGA text writes
    # per iteration: (type, dir, port) -> requests; type "pio"/"pci_config"/"mmio"
    per_iteration: tuple[tuple[str, str, int, int], ...]
    loop_bytes: bytes              # what one iteration prints (one of these)

    def disk(self, dom0_dir: str) -> str:
        return f"{dom0_dir}/{self.name}.img"

    def serial_log(self, dom0_dir: str) -> str:
        return f"{dom0_dir}/{self.name}-serial.log"

    def com1_pipe(self, dom0_dir: str) -> str:
        """qemu's ``pipe:`` path: it reads COM1's input from PATH.in, writes its output to
        PATH.out (FIFOs made before xl create)."""
        return f"{dom0_dir}/{self.name}-com1"

    def com1_in(self, dom0_dir: str) -> str:
        return self.com1_pipe(dom0_dir) + ".in"

    def com1_out(self, dom0_dir: str) -> str:
        return self.com1_pipe(dom0_dir) + ".out"

    def config(self, dom0_dir: str) -> str:
        """The xl configuration (HVM, the Debian device model, COM1 on a pipe in Dom0)."""
        return "\n".join([
            f'name = "{self.name}"', 'type = "hvm"', "memory = 32", "vcpus = 1",
            f"disk = [ 'format=raw, vdev=hda, access=rw, target={self.disk(dom0_dir)}' ]",
            'boot = "c"', f'serial = "pipe:{self.com1_pipe(dom0_dir)}"',
            "vnc = 0", "sdl = 0", "nographic = 1", f'vga = "{self.vga}"',
            'on_crash = "preserve"', 'device_model_version = "qemu-xen"', ""])


GUESTS = {
    "bs1": Guest("bs1", "com1_loop.S", "none",
                 (("pio", "read", 0x3fd, 1), ("pio", "write", 0x3f8, 1),
                  ("pio", "write", 0x80, 1)), b".\n"),
    "bs2": Guest("bs2", "mixed_loop.S", "stdvga",
                 (("pio", "write", 0x70, 1), ("pio", "read", 0x71, 1),
                  ("pio", "write", 0x43, 1), ("pio", "read", 0x40, 2),
                  ("pio", "write", 0xcf8, 1), ("pio", "read", 0xcfc, 1),
                  ("mmio", "write", 0xb8000, 1),
                  ("pio", "write", 0x3ff, 1),        # rep outsb x4: one request
                  ("pio", "read", 0x3fd, 1), ("pio", "write", 0x3f8, 1)), b"+\n"),
}
for _late in ("bs3", "bs4"):
    GUESTS[_late] = Guest(_late, "com1_loop.S", "none", GUESTS["bs1"].per_iteration, b".\n")
SCAN_DEVICES = 32                   # bs5 reads 00:00.0 .. 00:1f.0 per iteration
BAR_REGISTER = 0x500                # bs5's MMIO offset in the BAR: the Bochs VBE ID register
GUESTS["bs5"] = Guest("bs5", "pci_bar_loop.S", "stdvga",
                      (("pio", "write", 0xcf8, SCAN_DEVICES), ("pio", "read", 0xcfc, SCAN_DEVICES),
                       # at BAR 2 + BAR_REGISTER, the address the guest prints (discovery)
                       ("mmio", "write", -1, 1), ("mmio", "read", -1, 1),
                       ("pio", "read", 0x3fd, 1), ("pio", "write", 0x3f8, 1)), b"*\n")


@dataclass(frozen=True)
class Discovery:
    """What bs5 found on its PCI bus before its loop: the devices that answered config reads
    (bus 0, function 0) and the stdvga's BAR 2."""
    devices: tuple[int, ...]
    bar2: int


DISCOVERY = re.compile(rb"P([0-9A-F]{8}) B([0-9A-F]{8})\n")


def discovery(serial: bytes) -> Discovery:
    """bs5's first line, ``P<device mask> B<BAR 2>`` (8 hex digits each), from its serial log
    (SeaBIOS may have printed before it)."""
    m = DISCOVERY.search(serial)
    if m is None:
        raise ValueError(f"no discovery line in {serial[:200]!r}")
    mask, bar2 = int(m.group(1), 16), int(m.group(2), 16)
    return Discovery(tuple(d for d in range(SCAN_DEVICES) if mask >> d & 1), bar2)


def build_disk(guest: Guest, outdir: Path) -> Path:
    """Assemble guests/<source> into a boot sector and a 1 MiB disk image in ``outdir``."""
    src = HERE / "guests" / guest.source
    obj, binary, disk = (outdir / f"{guest.name}{ext}" for ext in (".o", ".bin", ".img"))
    subprocess.run(["as", "--32", "-I", str(src.parent), "-o", str(obj), str(src)], check=True,
                   capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
                    "-o", str(binary), str(obj)], check=True, capture_output=True)
    sector = binary.read_bytes()
    if len(sector) != 512 or sector[510:] != b"\x55\xaa":
        raise RuntimeError(f"{src}: not a 512-byte boot sector ({len(sector)} bytes)")
    disk.write_bytes(sector + bytes(DISK_BYTES - 512))
    return disk
