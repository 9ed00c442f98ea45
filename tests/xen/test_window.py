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
from xen.window import STOP_AND_GO, STOP_AND_GO_XEN, Window

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
    with Window(xen_host, list(WINDOW_GUESTS), W, exact=True) as w:
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


VGA_TEXT = (0xB8000, 0xB8FFF)        # bs2's text writes walk this page: summed at its start


def of_domain(c: Counter, domid: int) -> Counter:
    """One domain's requests keyed (vcpu, type, dir, addr); VGA text writes summed."""
    out = Counter()
    for (d, v, t, r, a), n in c.items():
        if d == domid:
            out[(v, t, r, VGA_TEXT[0] if t == MMIO and VGA_TEXT[0] <= a <= VGA_TEXT[1] else a)] += n
    return out


def expected(guest: str, n: int, source: str, found: dict) -> Counter:
    """Every request ``guest`` made over an exact window of ``n`` iterations, as ``source``
    ("qemu" or "xentrace") sees it, keyed as ``of_domain``'s. What Xen does with them (Xen 4.17,
    xen/arch/x86/hvm/emulate.c and io.c): ports it emulates itself (RTC, PIT, its PIC) never
    reach qemu; a 0xcfc read becomes an IOREQ_TYPE_PCI_CONFIG at BDF << 32 | register for a
    device qemu registered, and Xen's null handler answers the others (all ones); the VGA text
    writes go buffered (qemu: no vCPU); xentrace records every port and MMIO access on the vCPU,
    port 0x80 not at all (no exit)."""
    xen = source == "xentrace"
    c = Counter(STOP_AND_GO)
    if xen:
        c.update(STOP_AND_GO_XEN)
    c[(0, PIO, RD, 0x3fd)] += n
    c[(0, PIO, WR, 0x3f8)] += n
    if guest == "bs2":
        c[(0, PIO, WR, 0xCF8)] += n
        c[(0, PIO, RD, 0xCFC) if xen else (0, PCI, RD, 0)] += n          # 00:00.0 register 0
        c[(0 if xen else -1, MMIO, WR, VGA_TEXT[0])] += n
        c[(0, PIO, WR, 0x3FF)] += n                     # rep outsb x4: one request of 4
        if xen:
            for port, dir_, per in ((0x70, WR, 1), (0x71, RD, 1), (0x43, WR, 1), (0x40, RD, 2)):
                c[(0, PIO, dir_, port)] += per * n
    elif guest == "bs5":
        c[(0, PIO, WR, 0xCF8)] += SCAN_DEVICES * n
        if xen:
            c[(0, PIO, RD, 0xCFC)] += SCAN_DEVICES * n
        else:
            for dev in found["devices"]:
                c[(0, PCI, RD, dev << 35)] += n
        reg = found["bar2"] + BAR_REGISTER
        c[(0, MMIO, WR, reg)] += n
        c[(0, MMIO, RD, reg)] += n
    return c


def differences(got: Counter, want: Counter) -> dict:
    return {k: (got[k], want[k]) for k in set(got) | set(want) if got[k] != want[k]}


@pytest.mark.parametrize("guest", WINDOW_GUESTS)
def test_every_request_of_the_window_is_counted_exactly_in_both_sources(window, guest):
    """Per domain and vCPU, each source's counts of every (type, dir, address) are exactly what
    the guest did: its loop count (the serial bytes it printed between its stop and go) times
    each request of its loop, plus the one go and one stop."""
    d, n = window["domid"][guest], window["truth"][guest]
    assert n > {"bs1": 10, "bs2": 5, "bs5": 0.3}[guest] * WINDOW_SECONDS, \
        f"{guest} ran only {n} iterations in {WINDOW_SECONDS} s"
    for source in ("qemu", "xentrace"):
        got = of_domain(counts(window, source), d)
        want = expected(guest, n, source, window["bs5_found"])
        assert got == want, f"{guest} ({n} iterations), {source} (got, want): " \
                            f"{differences(got, want)}"


def test_forwarded_requests_equal_between_the_sources(window):
    """What the device model served is what Xen traced, request for request, for every port and
    address both see (PCI config: qemu's per-device requests sum to Xen's 0xcfc reads of the
    devices qemu has)."""
    for guest in WINDOW_GUESTS:
        d = window["domid"][guest]
        q, x = of_domain(counts(window, "qemu"), d), of_domain(counts(window, "xentrace"), d)
        for (v, t, r, a), n in q.items():
            if t == PIO:
                assert x[(v, t, r, a)] == n, (guest, hex(a), n, x[(v, t, r, a)])
            elif t == MMIO:
                assert x[(0, t, r, a)] == n, (guest, hex(a), n, x[(0, t, r, a)])


def test_pci_scan_found_the_host_bridge_and_the_stdvga_bar_above_1mib(window):
    devices, bar2 = window["bs5_found"]["devices"], window["bs5_found"]["bar2"]
    # the host bridge (00:00.0) and the stdvga (whose BAR the guest read) answered; the BAR is
    # one hvmloader put above 1 MiB, in the PCI hole below 4 GiB
    assert 0 in devices and 1 < len(devices) < SCAN_DEVICES, devices
    assert (1 << 20) <= bar2 < (1 << 32) and bar2 % 0x1000 == 0, hex(bar2)
    # and the device model got no config request for a device it does not have
    q = counts(window, "qemu")
    asked = {a >> 35 for (d, _v, t, _r, a) in q if d == window["domid"]["bs5"] and t == PCI}
    assert asked == set(devices), (asked, devices)


def test_report_on_the_real_capture_and_recording_counts_each_serial_write(window):
    """``iotrace report`` in Dom0: per domain and vCPU, COM1 writes = the guest's truth, in the
    xentrace capture and in the recording alike."""
    for f, rep in window["report"].items():
        rows = {(r["domid"], r["vcpu"]): r["count"] for r in rep["io"] if r["addr"] == 0x3f8}
        # each loop byte and the stop's '!'
        want = {(window["domid"][g], 0): n + STOP_AND_GO[(0, PIO, WR, 0x3F8)]
                for g, n in window["truth"].items()}
        assert rows == want, (f, rows, want)
        assert rep["lost_records"] == 0 and rep["decode_errors"] == 0, (f, rep)
