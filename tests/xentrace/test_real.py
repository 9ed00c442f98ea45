"""The decoder on a real xentrace capture (xentrace-hvm-real.bin, see docs/data.md):
every port I/O record found, and the xenalyze-compatible mode against the real xenalyze."""
from __future__ import annotations

import re
import subprocess
from collections import Counter

import numpy as np
import pytest

from iotrace.core import events as E
from iotrace.xentrace import decoder as D
from iotrace.xentrace.testing import reference
from support import require_tool


def _by(ev, *fields):
    return Counter(tuple(int(e[f]) for f in fields) for e in ev)


def test_every_port_io_record_is_found(real_xentrace):
    res = D.decode_file(real_xentrace)
    ev = res.events
    assert len(ev) == 105
    assert (ev["type"] == E.TYPE_PIO).all()
    assert _by(ev, "dir") == {(E.DIR_READ,): 94, (E.DIR_WRITE,): 11}
    assert _by(ev, "domid", "vcpu") == {(14, 1): 17, (14, 2): 72, (14, 3): 16}
    # 27 wrap records and no lost records (README); nothing undecodable, nothing cut
    assert res.lost_records == 0 and res.decode_errors == 0 and res.truncated_at is None
    assert res.warnings == []
    assert np.all(np.diff(ev["ts_ns"]) >= 0)
    # every I/O of this capture happens inside an exit of its vCPU that is later resumed
    assert (ev["service_ns"] > 0).all()


def test_same_result_in_any_chunking_and_with_the_reference_model(real_xentrace):
    ref = D.decode_file(real_xentrace).events
    for chunk in (4093, 65536):
        got = D.decode_file(real_xentrace, chunk_bytes=chunk).events
        assert (np.sort(got, order=["ts_ns", "addr"])
                == np.sort(ref, order=["ts_ns", "addr"])).all()
    model = reference.decode_bytes(real_xentrace.read_bytes()).events
    assert (np.sort(model, order=["ts_ns", "addr"]) == np.sort(ref, order=["ts_ns", "addr"])).all()


def xenalyze_pio(path):
    """{(domid, vcpu, dir, port): (count, total cycles)} from xenalyze's IO address summary."""
    exe = require_tool("xenalyze")
    cmd = [exe, "--summary", "--with-pio-enumeration", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    dom = vcpu = None
    in_io = False
    got = {}
    for line in out.splitlines():
        m = re.match(r"\|-- Domain (\d+) --\|", line)
        if m:
            dom, vcpu, in_io = int(m.group(1)), None, False
            continue
        m = re.match(r"-- v(\d+) --", line)
        if m:
            vcpu, in_io = int(m.group(1)), False
            continue
        if line.startswith("IO address summary"):
            in_io = True
            continue
        # PRINT_SUMMARY: "%8x:[r]  count  secs  pct%  avg cyc {p5|p50|p95}"
        m = re.match(r"\s*([0-9a-f]+):\[([rw])\]\s+(\d+)\s+([\d.]+)s\s+[\d.]+%\s+(\d+) cyc", line)
        if in_io and m:
            d = E.DIR_READ if m.group(2) == "r" else E.DIR_WRITE
            got[(dom, vcpu, d, int(m.group(1), 16))] = (int(m.group(3)), int(m.group(5)))
        elif in_io:
            in_io = False
    return got


@pytest.mark.integration
def test_compat_mode_matches_real_xenalyze(real_xentrace):
    xa = xenalyze_pio(real_xentrace)
    assert sum(c for c, _ in xa.values()) == 12          # as the data README says
    res = D.decode_file(real_xentrace, xenalyze_compat=True)
    ev = res.events
    counts = _by(ev, "domid", "vcpu", "dir", "addr")
    assert {k: c for k, (c, _) in xa.items()} == dict(counts)
    # service times are xenalyze's arc_cycles: compare the average cycles per key
    hz = 2.4e9
    for key, (_n, avg_cyc) in xa.items():
        sel = ev[(ev["domid"] == key[0]) & (ev["vcpu"] == key[1]) & (ev["dir"] == key[2])
                 & (ev["addr"] == key[3])]
        ours = np.mean(sel["service_ns"]) * hz / 1e9
        assert abs(ours - avg_cyc) <= 2 + 1e-6 * avg_cyc, key


def test_compat_mode_in_small_chunks(real_xentrace):
    whole = D.decode_file(real_xentrace, xenalyze_compat=True).events
    small = D.decode_file(real_xentrace, xenalyze_compat=True, chunk_bytes=5000).events
    assert (np.sort(whole, order=["ts_ns", "addr"]) == np.sort(small, order=["ts_ns", "addr"])).all()


@pytest.mark.integration
def test_default_mode_service_times_are_xenalyzes(real_xentrace):
    """One definition of service time: the default mode counts every record, but a request
    that both modes count is timed the same way - xenalyze's arc_cycles, VMEXIT until the
    request was answered (the vCPU's VMENTRY, or its wake-up when it waited for qemu). Every
    write is counted by both (xenalyze drops only waited reads): compare each one's average."""
    xa = xenalyze_pio(real_xentrace)
    ev = D.decode_file(real_xentrace).events
    writes = {k: v for k, v in xa.items() if k[2] == E.DIR_WRITE}
    assert sum(c for c, _ in writes.values()) == 11
    hz = 2.4e9
    for key, (n, avg_cyc) in writes.items():
        sel = ev[(ev["domid"] == key[0]) & (ev["vcpu"] == key[1]) & (ev["dir"] == key[2])
                 & (ev["addr"] == key[3])]
        assert len(sel) == n
        ours = np.mean(sel["service_ns"]) * hz / 1e9
        assert abs(ours - avg_cyc) <= 2 + 1e-6 * avg_cyc, key

