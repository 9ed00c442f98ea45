"""Both sources on the same real traffic, offline: ``xentrace`` and ``iotrace record`` (uprobes on
Debian 12's real device model) over one exact window, against what the guests themselves did.

Per domain and vCPU: every forwarded request counted by the qemu source equals the xentrace
count and the guest's own loop count (serial bytes printed in the window); the ports Xen emulates
itself appear only in xentrace; port 0x80 appears in neither (Xen does not intercept it for HVM
guests: no exit at all); the domain names come from xenstore. bs5 scans PCI config space: the
device model answers the devices it has (one PCI config request each, at its BDF), Xen itself the
absent ones; its MMIO accesses to the stdvga's BAR reach the device model at the address the
guest found.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from iotrace.core import events as E
from xen.conftest import COSTS, GUEST_DIR
from xen.guests import BAR_REGISTER, GUESTS, SCAN_DEVICES, discovery
from xen.window import Window, near

# The first test pays for the boot (about 2 min), the guests and BCC compiling in Dom0 (1-2 min).
pytestmark = [pytest.mark.xen, pytest.mark.timeout(1500)]
# IOTRACE_XEN_KEEP=DIR keeps the capture and its counts (a fixture: tests/data/xen/README.md);
# its window is shorter, to keep the file small.
WINDOW_SECONDS = 2 if os.environ.get("IOTRACE_XEN_KEEP") else 10
W = "/var/tmp/iotrace-window"
PIO, MMIO, PCI = E.TYPE_PIO, E.TYPE_MMIO, E.TYPE_PCI_CONFIG
RD, WR = E.DIR_READ, E.DIR_WRITE
IOTRACE = "python3 /mnt/harness/iotrace_env.py /mnt/project --"
WINDOW_GUESTS = ("bs1", "bs2", "bs5")


def counts(doc, source) -> Counter:
    c = Counter()
    for k, n in doc[source].items():
        d, v, t, r, a = k.split()
        c[(int(d), int(v), int(t), int(r), int(a, 16))] += n
    return c


def pick(c: Counter, domid=None, vcpu=None, typ=None, dir_=None, lo=None, hi=None) -> int:
    return sum(n for (d, v, t, r, a), n in c.items()
               if (domid is None or d == domid) and (vcpu is None or v == vcpu)
               and (typ is None or t == typ) and (dir_ is None or r == dir_)
               and (lo is None or lo <= a <= (hi if hi is not None else lo)))


@pytest.fixture(scope="module")
def window(xen_host):
    xen_host.start_guest("bs5")          # created (and paused) here; destroyed at the end
    found = discovery(xen_host.run(f"cat {GUESTS['bs5'].serial_log(GUEST_DIR)}").stdout.encode())
    with Window(xen_host, list(WINDOW_GUESTS), W) as w:
        # record first (BCC compiles for a minute or two), then xentrace: its capture holds
        # little more than the window
        w.spawn("record", f"{IOTRACE} record -o {W}/q.iotrec",
                ready="grep -q 'uprobe(s) on' record.log")
        w.spawn("xentrace", f"xentrace -D -S 256 -e hvm -e sched {W}/x.bin",
                ready="test -e x.bin && sleep 2")
        w.run(WINDOW_SECONDS)
        w.stop_all()
    out = xen_host.sh(f"python3 /mnt/xenharness/inside/window_counts.py /mnt/project "
                      f"--xentrace {W}/x.bin --recording {W}/q.iotrec", timeout=300)
    doc = json.loads(out)
    doc["truth"] = w.truth
    doc["domid"] = {g: xen_host.domid(g) for g in WINDOW_GUESTS}
    doc["bs5_found"] = {"devices": list(found.devices), "bar2": found.bar2}
    xen_host.sh("xl destroy bs5")
    doc["logs"] = xen_host.sh(f"tail -n 3 {W}/record.log {W}/xentrace.log")
    # iotrace report on both files, as an operator runs it in Dom0
    doc["report"] = {f: json.loads(xen_host.sh(
        f"{IOTRACE} report --format json --by domain,vcpu,addr --type pio --dir write "
        f"--range com1 {W}/{f}", timeout=300)) for f in ("x.bin", "q.iotrec")}
    print(json.dumps({k: doc[k] for k in ("truth", "domid", "lost", "names", "bs5_found")}))
    COSTS.append(f"xen: window {w.seconds:.1f} s (asked {WINDOW_SECONDS} s): iterations "
                 f"{w.truth}; bs5 found devices {list(found.devices)}, BAR 2 {found.bar2:#x}")
    keep = os.environ.get("IOTRACE_XEN_KEEP")
    if keep:        # the capture and its counts, for a fixture (tests/data/xen/README.md)
        xen_host.sh(f"gzip -9 -c {W}/x.bin > /mnt/out/window.bin.gz")
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(xen_host.out / "window.bin.gz", Path(keep) / "window.bin.gz")
        (Path(keep) / "window.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def test_nothing_lost_and_names_from_xenstore(window):
    assert window["lost"] == {"xentrace": 0, "qemu": 0}, window["logs"]
    assert window["decode_errors"] == 0
    names = window["names"]
    assert names.get(str(window["domid"]["bs1"])) == "bs1"
    assert names.get(str(window["domid"]["bs2"])) == "bs2"


def test_com1_loop_qemu_equals_xentrace_equals_guest(window):
    q, x = counts(window, "qemu"), counts(window, "xentrace")
    d, n = window["domid"]["bs1"], window["truth"]["bs1"]
    assert n > 10 * WINDOW_SECONDS, f"bs1 ran only {n} iterations in {WINDOW_SECONDS} s"
    # the serial write: exact in both; the line-status read: within the window's edges
    assert (pick(q, d, 0, PIO, WR, 0x3f8), pick(x, d, 0, PIO, WR, 0x3f8)) == (n, n)
    got = (pick(q, d, 0, PIO, RD, 0x3fd), pick(x, d, 0, PIO, RD, 0x3fd))
    assert all(near(g, n) for g in got), f"bs1 0x3fd: (qemu, xentrace) = {got}, guest {n}"
    # port 0x80: no exit at all under Xen (the HVM I/O bitmap lets it through)
    assert pick(q, d, lo=0x80) == 0 and pick(x, d, lo=0x80) == 0
    # nothing else from bs1 on any vCPU
    assert near(sum(n2 for k, n2 in q.items() if k[0] == d) - n, n)
    assert near(sum(n2 for k, n2 in x.items() if k[0] == d) - n, n)


def test_mixed_loop_forwarded_equal_internal_only_in_xentrace(window):
    q, x = counts(window, "qemu"), counts(window, "xentrace")
    d, n = window["domid"]["bs2"], window["truth"]["bs2"]
    assert n > 5 * WINDOW_SECONDS, f"bs2 ran only {n} iterations in {WINDOW_SECONDS} s"
    # COM1 (forwarded): the serial write exact in all three, the rest within the window's edges
    assert (pick(q, d, 0, PIO, WR, 0x3f8), pick(x, d, 0, PIO, WR, 0x3f8)) == (n, n)
    want = {"qemu 0x3fd": pick(q, d, 0, PIO, RD, 0x3fd), "xentrace 0x3fd": pick(x, d, 0, PIO, RD, 0x3fd),
            # PCI config: the 0xcf8 write reaches qemu as port I/O, the 0xcfc read as an
            # IOREQ_TYPE_PCI_CONFIG (address: bus/dev/fn/reg of 00:00.0 reg 0 = 0)
            "qemu 0xcf8": pick(q, d, 0, PIO, WR, 0xcf8), "xentrace 0xcf8": pick(x, d, 0, PIO, WR, 0xcf8),
            "qemu pci_config": pick(q, d, 0, PCI, RD, 0), "xentrace 0xcfc": pick(x, d, 0, PIO, RD, 0xcfc),
            # VGA text memory: one write per iteration (buffered towards qemu: no vCPU there)
            "qemu vga": pick(q, d, typ=MMIO, dir_=WR, lo=0xb8000, hi=0xb8fff),
            "xentrace vga": pick(x, d, 0, MMIO, WR, 0xb8000, 0xb8fff),
            # string I/O: rep outsb x4 from guest memory is one request (data_is_ptr, count 4)
            "qemu 0x3ff": pick(q, d, 0, PIO, WR, 0x3ff), "xentrace 0x3ff": pick(x, d, 0, PIO, WR, 0x3ff)}
    assert all(near(v, n) for v in want.values()), f"bs2, guest {n}: {want}"
    # writes are traced by Xen before dispatch and served at once by qemu: equal in both
    for w in ("0xcf8", "vga", "0x3ff"):
        assert want[f"qemu {w}"] == want[f"xentrace {w}"], want
    assert pick(q, d, typ=PIO, lo=0xcfc, hi=0xcff) == 0
    # emulated in Xen: only in xentrace
    for dir_, port, per in ((WR, 0x70, 1), (RD, 0x71, 1), (WR, 0x43, 1), (RD, 0x40, 2)):
        assert near(pick(x, d, 0, PIO, dir_, port), per * n), f"bs2 port {port:#x}"
        assert pick(q, d, lo=port) == 0, f"bs2 port {port:#x} reached the device model"


def test_pci_scan_and_bar_mmio_reach_the_device_model_for_devices_it_has(window):
    q, x = counts(window, "qemu"), counts(window, "xentrace")
    d, n = window["domid"]["bs5"], window["truth"]["bs5"]
    devices, bar2 = window["bs5_found"]["devices"], window["bs5_found"]["bar2"]
    reg = bar2 + BAR_REGISTER
    # the host bridge (00:00.0) and the stdvga (whose BAR the guest read) answered; the BAR is
    # one hvmloader put above 1 MiB, in the PCI hole below 4 GiB
    assert 0 in devices and len(devices) < SCAN_DEVICES, devices
    assert (1 << 20) <= bar2 < (1 << 32) and bar2 % 0x1000 == 0, hex(bar2)
    assert n >= 3, f"bs5 ran only {n} iterations in {WINDOW_SECONDS} s"
    assert (pick(q, d, 0, PIO, WR, 0x3f8), pick(x, d, 0, PIO, WR, 0x3f8)) == (n, n)
    # the address writes reach qemu as port I/O, all 32 an iteration, the same in both sources
    cf8 = (pick(q, d, 0, PIO, WR, 0xcf8), pick(x, d, 0, PIO, WR, 0xcf8))
    assert cf8[0] == cf8[1] and near(cf8[0], n, SCAN_DEVICES), (cf8, n)
    # the data reads: Xen sees every one as port I/O at 0xcfc; qemu gets a PCI config request
    # (address: BDF << 32 | register) only for the devices it has: Xen answers the others
    assert near(pick(x, d, 0, PIO, RD, 0xcfc), n, SCAN_DEVICES), (pick(x, d, 0, PIO, RD, 0xcfc), n)
    per_dev = {dev: pick(q, d, 0, PCI, RD, dev << 35) for dev in range(SCAN_DEVICES)}
    assert all(near(per_dev[dev], n) for dev in devices), (per_dev, n)
    assert all(per_dev[dev] == 0 for dev in range(SCAN_DEVICES) if dev not in devices), per_dev
    assert pick(q, d, typ=PCI) == sum(per_dev.values())
    # the BAR: the write equal in both sources (traced before dispatch), the read within the edges
    wr = (pick(q, d, 0, MMIO, WR, reg), pick(x, d, 0, MMIO, WR, reg))
    rd = (pick(q, d, 0, MMIO, RD, reg), pick(x, d, 0, MMIO, RD, reg))
    assert wr[0] == wr[1] and near(wr[0], n), (wr, n, hex(reg))
    assert all(near(v, n) for v in rd), (rd, n, hex(reg))
    # nothing else from bs5, in either source
    expected = {(PIO, WR, 0xcf8), (PIO, RD, 0xcfc), (MMIO, WR, reg), (MMIO, RD, reg),
                (PIO, RD, 0x3fd), (PIO, WR, 0x3f8)}
    assert {(t, r, a) for (dd, _v, t, r, a) in x if dd == d} == expected, x
    assert {(t, r, a) for (dd, _v, t, r, a) in q if dd == d} == \
        (expected - {(PIO, RD, 0xcfc)}) | {(PCI, RD, dev << 35) for dev in devices}, q


def test_report_on_the_real_capture_and_recording_counts_each_serial_write(window):
    """``iotrace report`` in Dom0: per domain and vCPU, COM1 writes = the guest's truth, in the
    xentrace capture and in the recording alike."""
    for f, rep in window["report"].items():
        rows = {(r["domid"], r["vcpu"]): r["count"] for r in rep["io"] if r["addr"] == 0x3f8}
        want = {(window["domid"][g], 0): n for g, n in window["truth"].items()}
        assert rows == want, (f, rows, want)
        assert rep["lost_records"] == 0 and rep["decode_errors"] == 0, (f, rep)
