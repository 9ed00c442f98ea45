"""`iotrace report` at scale (issue #13): roll-ups, --top, --sort, the filters, CSV, the time
span and rates, per-domain totals, --hist, PCI BDF addresses - every output checked line by line
against a truth computed here, independently of the report's code:

* a recording of requests drawn here (known domains, ranges, sizes, service times);
* the real xentrace capture, whose requests come from the plain-Python reference model of the
  decoder (iotrace.xentrace.testing.reference) and whose time span from a record walk below.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import struct
import subprocess
from collections import defaultdict

import numpy as np
import pytest

from iotrace.cli.main import main
from iotrace.core import aggregate, events
from iotrace.core.events import DIR_READ, DIR_WRITE, TYPE_MMIO, TYPE_PCI_CONFIG, TYPE_PIO
from iotrace.offline.recording import RecordingWriter
from iotrace.xentrace.testing import reference

# ---------------------------------------------------------------------------- the truth

# the PC default map's names for the addresses used here (exporter/core/data/pc-default.yaml)
RANGES = [(TYPE_PIO, 0x1F0, 0x1F7, "ide-primary"), (TYPE_PIO, 0x3F6, 0x3F6, "ide-primary"),
          (TYPE_PIO, 0x3F8, 0x3FF, "com1"), (TYPE_PIO, 0x60, 0x60, "i8042"),
          (TYPE_PIO, 0x402, 0x402, "qemu-debug"), (TYPE_PIO, 0xCF8, 0xCFB, "pci-conf-addr"),
          (TYPE_PIO, 0xC000, 0xFFFF, "pci-bar-io"), (TYPE_MMIO, 0xA0000, 0xBFFFF, "vga-lowmem"),
          (TYPE_MMIO, 0xFED00000, 0xFED003FF, "hpet")]


def range_of(typ: int, addr: int) -> str:
    if typ == TYPE_PCI_CONFIG:
        return "pci-config"
    for t, lo, hi, name in RANGES:
        if t == typ and lo <= addr <= hi:
            return name
    return "other"


def bdf(bus, dev, fn, reg):
    return (bus << 40) | (dev << 35) | (fn << 32) | reg


# (domid, vcpu, type, dir, addr, size, requests, median service ns or None)
PLAN = [
    (3, 0, TYPE_PIO, DIR_WRITE, 0x3F8, 1, 900, 6_000),
    (3, 0, TYPE_PIO, DIR_READ, 0x3FD, 1, 700, 5_000),
    (3, 1, TYPE_PIO, DIR_READ, 0x1F0, 2, 410, 40_000),
    (3, 1, TYPE_PIO, DIR_WRITE, 0x1F7, 1, 95, 25_000),
    (3, 0, TYPE_PIO, DIR_WRITE, 0xCF8, 4, 330, 3_000),
    (3, 0, TYPE_PCI_CONFIG, DIR_READ, bdf(0, 1, 1, 0x3C), 4, 120, 9_000),
    (3, 1, TYPE_PCI_CONFIG, DIR_WRITE, bdf(0, 3, 0, 0x10), 4, 41, 11_000),
    (3, -1, TYPE_MMIO, DIR_WRITE, 0xA0000, 2, 260, None),         # buffered: no time
    (3, -1, TYPE_MMIO, DIR_WRITE, 0xA8000, 1, 180, None),
    (3, 0, TYPE_PIO, DIR_WRITE, 0x402, 1, 57, 2_000),
    (5, 0, TYPE_PIO, DIR_READ, 0x60, 1, 530, 15_000),
    (5, 0, TYPE_PIO, DIR_WRITE, 0x3F8, 1, 222, 7_000),
    (5, 1, TYPE_MMIO, DIR_READ, 0xFED000F0, 4, 150, 1_500),
    (5, 1, TYPE_PIO, DIR_READ, 0xC010, 2, 77, 120_000),
    (5, 0, TYPE_PIO, DIR_WRITE, 0x5555, 1, 13, 900),
    (5, 0, TYPE_MMIO, DIR_READ, 0x1234_5000, 8, 9, 300_000),
]
NAMES = {3: "web", 5: "db"}


def plan_events(seed: int = 13) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for dom, vcpu, typ, d, addr, size, n, median in PLAN:
        b = events.empty(n)
        b["domid"], b["vcpu"], b["type"], b["dir"], b["addr"], b["size"] = \
            dom, vcpu, typ, d, addr, size
        b["count"] = np.where(rng.random(n) < 0.1, 4, 1) if typ == TYPE_PIO else 1
        if median is not None:
            b["service_ns"] = np.maximum(1, rng.lognormal(math.log(median), 0.6, n)).astype(int)
        parts.append(b)
    ev = np.concatenate(parts)
    ev = ev[rng.permutation(len(ev))]
    ev["ts_ns"] = np.sort(rng.integers(1_000_000, 2_501_000_000, len(ev)))
    return ev


def write_recording(path, ev, chunks: int = 7):
    w = RecordingWriter(path, {"source": "qemu", "domains": NAMES}, chunk_records=500)
    for part in np.array_split(ev, chunks):
        w.write(part)
    w.close()


class Truth:
    """Rows of a grouping computed from the events, the plain way."""

    def __init__(self, ev, names=None, sizes=True):
        self.ev, self.names, self.sizes = ev, names or {}, sizes
        ts = ev["ts_ns"].astype(np.int64)
        self.span = (int(ts.max()) - int(ts.min())) / 1e9

    def rows(self, fields, keep=None):
        out = defaultdict(lambda: {"count": 0, "bytes": 0, "svc": []})
        for e in self.ev.tolist():
            ts, dom, vcpu, typ, d, _dip, _df, size, cnt, addr, _data, svc, rip = e
            rec = {"domid": dom, "vcpu": vcpu, "type": typ, "dir": d, "addr": addr,
                   "range": range_of(typ, addr), "rip": rip}
            if keep is not None and not keep(rec):
                continue
            row = out[tuple(rec[f] for f in fields)]
            row["count"] += 1
            row["bytes"] += size * cnt
            if svc >= 0:
                row["svc"].append(svc)
        return dict(out)

    def total(self, keep=None):
        return sum(r["count"] for r in self.rows(("domid",), keep).values())


def exact_quantile(values, q):
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)]


def check_quantile(got_seconds, values, q):
    """The report's quantile against the exact one, within the bound the histogram layout
    states (aggregate.QUANTILE_RELATIVE_ERROR)."""
    want = exact_quantile(values, q) / 1e9
    assert abs(got_seconds - want) <= aggregate.QUANTILE_RELATIVE_ERROR * want + 1e-12, \
        (q, got_seconds, want)


def parse_csv(text):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


CSV_TAIL = ["count", "rate_per_second", "share", "bytes", "service_count",
            "service_avg_seconds", "service_p50_seconds", "service_p95_seconds",
            "service_min_seconds", "service_max_seconds"]


def check_csv_row(row, key, want, truth, total, sizes=True):
    """One CSV line against its truth: raw numbers (no units, no 'K'), every column."""
    assert int(row["count"]) == want["count"], key
    assert float(row["rate_per_second"]) == pytest.approx(want["count"] / truth.span, rel=1e-9)
    assert float(row["share"]) == pytest.approx(want["count"] / total, rel=1e-12)
    assert row["bytes"] == (str(want["bytes"]) if sizes else "")
    svc = want["svc"]
    assert int(row["service_count"]) == len(svc)
    if not svc:
        assert [row[c] for c in CSV_TAIL[5:]] == [""] * 5
        return
    assert float(row["service_avg_seconds"]) == pytest.approx(sum(svc) / len(svc) / 1e9,
                                                               rel=1e-9)
    assert float(row["service_min_seconds"]) == min(svc) / 1e9
    assert float(row["service_max_seconds"]) == max(svc) / 1e9
    check_quantile(float(row["service_p50_seconds"]), svc, 0.50)
    check_quantile(float(row["service_p95_seconds"]), svc, 0.95)


def busiest(rows, n=None):
    """Truth rows busiest first (no ties in PLAN's counts per grouping used below)."""
    order = sorted(rows.items(), key=lambda kv: -kv[1]["count"])
    counts = [r["count"] for _, r in order]
    assert len(set(counts)) == len(counts), "the test needs distinct counts"
    return order[:n] if n else order


def report(capsys, *args):
    assert main(["report", *map(str, args)]) == 0
    return capsys.readouterr()


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    ev = plan_events()
    path = tmp_path_factory.mktemp("rec") / "plan.iotrec"
    write_recording(path, ev)
    return path, Truth(ev, NAMES)


# ---------------------------------------------------------------------------- a recording

RANGE_HEADER = ["domid", "domain", "range", "type"] + CSV_TAIL


def test_csv_top5_by_range_on_a_recording(rec, capsys):
    path, truth = rec
    header, rows = parse_csv(report(capsys, "--by", "range", "--top", "5", "--format", "csv",
                                    path).out)
    assert header == RANGE_HEADER
    want = busiest(truth.rows(("domid", "range", "type")), 5)
    assert len(rows) == 5
    total = truth.total()
    for row, ((dom, rng, typ), w) in zip(rows, want):
        assert (int(row["domid"]), row["domain"], row["range"], row["type"]) == \
            (dom, NAMES[dom], rng, events.type_name(typ))
        check_csv_row(row, (dom, rng), w, truth, total)


@pytest.mark.parametrize("flags, keep", [
    (["-D", "web"], lambda r: r["domid"] == 3),
    (["-D", "5"], lambda r: r["domid"] == 5),
    (["-D", "w*,d?"], lambda r: True),
    (["-D", "db", "--vcpu", "1"], lambda r: r["domid"] == 5 and r["vcpu"] == 1),
    (["--vcpu", "-1"], lambda r: r["vcpu"] == -1),
    (["--type", "mmio"], lambda r: r["type"] == TYPE_MMIO),
    (["--dir", "read", "--type", "pio,pci_config"],
     lambda r: r["dir"] == DIR_READ and r["type"] in (TYPE_PIO, TYPE_PCI_CONFIG)),
    (["--range", "com*", "--range", "ide-*"], lambda r: r["range"] in ("com1", "ide-primary")),
])
def test_filters_select_the_requests_and_the_totals_follow(rec, capsys, flags, keep):
    path, truth = rec
    _, rows = parse_csv(report(capsys, "--by", "range", "--top", "5", "--format", "csv",
                               *flags, path).out)
    want = busiest(truth.rows(("domid", "range", "type"), keep), 5)
    total = truth.total(keep)
    assert [(int(r["domid"]), r["range"]) for r in rows] == [(k[0], k[1]) for k, _ in want]
    for row, (key, w) in zip(rows, want):
        check_csv_row(row, key, w, truth, total)       # shares of the filtered total


@pytest.mark.parametrize("by, fields", [
    ("domain", ("domid",)), ("vcpu", ("domid", "vcpu")),
    ("addr", ("domid", "range", "type", "dir", "addr")),
    ("vcpu,addr", ("domid", "vcpu", "range", "type", "dir", "addr")),
])
def test_every_grouping_sums_its_keys(rec, capsys, by, fields):
    path, truth = rec
    doc = json.loads(report(capsys, "--by", by, "--format", "json", path).out)
    assert tuple(doc["key"]) == fields and doc["rows_total"] == len(doc["io"])
    want = truth.rows(fields)
    got = {}
    for r in doc["io"]:
        key = tuple(r[f] if f not in ("type", "dir") else
                    (events.TYPE_CODES[r[f]] if f == "type" else events.DIR_CODES[r[f]])
                    for f in fields)
        got[key] = r
        assert set(r) >= {"count", "rate", "share", "bytes", "service_seconds", "domain"}
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key]["count"] == w["count"] and got[key]["bytes"] == w["bytes"]
        svc = got[key]["service_seconds"]
        assert (svc is None) == (not w["svc"])
        if svc:
            assert svc["n"] == len(w["svc"]) and svc["max"] == max(w["svc"]) / 1e9
    counts = [r["count"] for r in doc["io"]]
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("sort", ["avg", "bytes", "p95", "share"])
def test_sort_orders_largest_first_untimed_last(rec, capsys, sort):
    path, truth = rec
    doc = json.loads(report(capsys, "--sort", sort, "--format", "json", path).out)
    assert doc["sort"] == sort
    rows = doc["io"]
    want = truth.rows(("domid", "range", "type"))

    def value(r):
        if sort == "bytes":
            return r["bytes"]
        if sort == "share":
            return r["count"]
        s = r["service_seconds"]
        return None if s is None else s[sort]
    vals = [value(r) for r in rows]
    timed = [v for v in vals if v is not None]
    assert vals == timed + [None] * (len(vals) - len(timed)), "rows without the value last"
    assert timed == sorted(timed, reverse=True)
    if sort == "avg":              # exact values: the very order of the truth
        exp = sorted((k for k in want if want[k]["svc"]),
                     key=lambda k: -sum(want[k]["svc"]) / len(want[k]["svc"]))
        assert [(r["domid"], r["range"]) for r in rows[:len(exp)]] == [k[:2] for k in exp]


def test_top_cuts_after_sorting_and_says_so(rec, capsys):
    path, truth = rec
    out = report(capsys, "--sort", "p95", "--top", "3", path).out.splitlines()
    n = len(truth.rows(("domid", "range", "type")))
    i = out.index(f"per domain, range (top 3 of {n} rows, by p95, largest first):")
    assert out[i + 1].split()[:4] == ["DOMID", "DOMAIN", "RANGE", "TYPE"]
    assert len(out) == i + 5          # header + 3 rows, nothing after


def test_table_header_span_rates_and_per_domain_totals(rec, capsys):
    path, truth = rec
    lines = report(capsys, path).out.splitlines()
    n = truth.total()
    assert lines[0] == (f"{path}: iotrace recording, {n} records decoded, 0 lost records, "
                        "0 decode errors")
    assert lines[1] == (f"span {truth.span:.3f} s (first to last request): {n} I/O requests, "
                        f"{n / truth.span:.1f} req/s")
    i = lines.index("per domain:")
    head = lines[i + 1].split()
    assert head == ["DOMID", "DOMAIN", "REQS", "REQ/S", "SHARE", "BYTES", "AVG", "P50", "P95",
                    "MIN", "MAX"]
    doms = busiest(truth.rows(("domid",)))
    for line, ((dom,), w) in zip(lines[i + 2:i + 4], doms):
        cells = line.split()
        assert cells[:6] == [str(dom), NAMES[dom], str(w["count"]),
                             f"{w['count'] / truth.span:.1f}", f"{100 * w['count'] / n:.1f}%",
                             str(w["bytes"])]
    assert lines[i + 4] == ""
    # the rows: every (domain, range), busiest first, columns aligned (one width per column)
    rows = busiest(truth.rows(("domid", "range", "type")))
    j = lines.index(f"per domain, range ({len(rows)} rows, busiest first):")
    table = lines[j + 1:j + 2 + len(rows)]
    assert len({len(x) for x in table}) == 1 or all(x.rstrip() == x for x in table)
    starts = [table[0].index(h) for h in ("RANGE", "REQS")]
    for line, ((dom, rng, _), w) in zip(table[1:], rows):
        cells = line.split()
        assert cells[:5] == [str(dom), NAMES[dom], rng, cells[3], str(w["count"])]
        assert line[starts[0]:].startswith(rng)


def test_hist_draws_biolatency_histograms_with_min_max(rec, capsys):
    path, truth = rec
    lines = report(capsys, "--hist", "--top", "4", path).out.splitlines()
    i = lines.index("service time histograms (per row above; biolatency-style, powers of two "
                    "of ns):")
    want = busiest(truth.rows(("domid", "range", "type")), 4)
    blocks = "\n".join(lines[i + 1:]).strip("\n").split("\n\n")
    assert len(blocks) == 4
    from iotrace.offline.report import fmt_seconds
    for block, ((dom, rng, typ), w) in zip(blocks, want):
        head, *body = block.strip("\n").splitlines()
        name = f"{NAMES[dom]} {rng} {events.type_name(typ)}"
        svc = w["svc"]
        if not svc:
            assert head.strip() == f"{name}: {w['count']} requests, no service times"
            assert not body
            continue
        assert head.strip().startswith(f"{name}: {w['count']} requests, {len(svc)} timed: "
                                       f"min {fmt_seconds(min(svc) / 1e9)} ")
        assert head.strip().endswith(f" max {fmt_seconds(max(svc) / 1e9)}")
        assert body[0].split() == ["service", "time", ":", "count", "distribution"]
        powers = defaultdict(int)
        for v in svc:
            powers[int(v).bit_length()] += 1
        lo_p, hi_p = min(powers), max(powers)
        assert len(body) - 1 == hi_p - lo_p + 1, "one line per power of two, lowest to highest"
        top = max(powers.values())
        for line, p in zip(body[1:], range(lo_p, hi_p + 1)):
            label, rest = line.split(" : ")
            count, bar = rest.split(None, 1)
            assert int(count) == powers.get(p, 0), (name, p, line)
            stars = bar.strip("|").rstrip()
            assert set(stars) <= {"*"} and len(bar) == 42
            assert len(stars) == (round(40 * int(count) / top) or (1 if int(count) else 0))
            lo_s, hi_s = (x.strip() for x in label.split("->"))
            assert (lo_s, hi_s) == (_bound(1 << (p - 1)), _bound(1 << p))


def _bound(ns):
    from iotrace.offline.histogram import fmt_bound
    return fmt_bound(ns)


def test_json_histogram_slots_hold_the_right_requests(rec, capsys):
    path, truth = rec
    doc = json.loads(report(capsys, "--hist", "--by", "addr", "--format", "json", path).out)
    want = truth.rows(("domid", "range", "type", "dir", "addr"))
    for r in doc["io"]:
        svc = want[(r["domid"], r["range"], events.TYPE_CODES[r["type"]],
                    events.DIR_CODES[r["dir"]], r["addr"])]["svc"]
        assert sum(c for _, _, c in r["histogram"]) == len(svc)
        for lo, hi, c in r["histogram"]:
            assert c == sum(1 for v in svc if lo * 1e9 - 1e-6 <= v < hi * 1e9 - 1e-6)


def test_pci_config_addresses_read_as_bdf_and_register(rec, capsys):
    path, _ = rec
    out = report(capsys, "--by", "addr", "--type", "pci_config", path).out
    assert "00:01.1+0x3c" in out and "00:03.0+0x10" in out and "0x800000000" not in out
    _, rows = parse_csv(report(capsys, "--by", "addr", "--type", "pci_config", "--format",
                               "csv", path).out)
    assert sorted(r["addr"] for r in rows) == ["00:01.1+0x3c", "00:03.0+0x10"]
    doc = json.loads(report(capsys, "--by", "addr", "--type", "pci_config", "--format", "json",
                            path).out)
    assert {(r["addr"], r["addr_text"]) for r in doc["io"]} == \
        {(bdf(0, 1, 1, 0x3C), "00:01.1+0x3c"), (bdf(0, 3, 0, 0x10), "00:03.0+0x10")}


def test_quantiles_are_within_the_stated_bound_on_many_samples(tmp_path, capsys):
    """50 000 service times per row from three shapes: p50/p95 off the histogram within
    aggregate.QUANTILE_RELATIVE_ERROR of the exact ones."""
    rng = np.random.default_rng(5)
    shapes = {0x3F8: rng.lognormal(math.log(6_200), 0.15, 50_000),          # narrow (com1)
              0x1F0: rng.lognormal(math.log(40_000), 1.0, 50_000),          # wide (ide)
              0x60: rng.uniform(4_000, 16_000, 50_000)}                      # the 4-16 us case
    parts = []
    for addr, vals in shapes.items():
        b = events.empty(len(vals))
        b["domid"], b["vcpu"], b["addr"] = 1, 0, addr
        b["service_ns"] = vals.astype(np.int64)
        b["ts_ns"] = np.arange(len(vals)) * 1000
        parts.append(b)
    write_recording(tmp_path / "q.iotrec", np.concatenate(parts), chunks=3)
    _, rows = parse_csv(report(capsys, "--by", "addr", "--format", "csv",
                               tmp_path / "q.iotrec").out)
    assert len(rows) == 3
    for r in rows:
        vals = shapes[int(r["addr"], 16)].astype(np.int64).tolist()
        check_quantile(float(r["service_p50_seconds"]), vals, 0.50)
        check_quantile(float(r["service_p95_seconds"]), vals, 0.95)


def test_gzip_recording_reads_the_same_from_a_file_and_a_pipe(rec, tmp_path, iotrace_exe):
    path, _ = rec
    gz = tmp_path / "plan.iotrec.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    args = ["report", "--by", "range", "--top", "5", "--format", "csv"]
    plain = subprocess.run([iotrace_exe, *args, str(path)], capture_output=True, text=True)
    packed = subprocess.run([iotrace_exe, *args, str(gz)], capture_output=True, text=True)
    with open(gz, "rb") as fh:
        piped = subprocess.run([iotrace_exe, *args, "-"], stdin=fh, capture_output=True,
                               text=True)
    assert plain.returncode == packed.returncode == piped.returncode == 0, packed.stderr
    assert plain.stdout == packed.stdout == piped.stdout and packed.stderr == ""
    table = subprocess.run([iotrace_exe, "report", str(gz)], capture_output=True, text=True)
    assert table.stdout.splitlines()[0].startswith(f"{gz}: gzip-compressed iotrace recording,")


# ---------------------------------------------------------------------------- the real capture

def capture_span_seconds(data: bytes, cpu_hz: float = 2.4e9) -> float:
    """First to last record TSC of a xentrace file, walked here (tools/xentrace/xentrace.c:
    windows of a 12-byte TRC_TRACE_CPU_CHANGE header and that many bytes of records; a record
    is a u32 header, bit 31 a TSC of two words, bits 28-30 its extra words)."""
    off, lo, hi = 0, None, None
    while off + 12 <= len(data):
        head, _cpu, nbytes = struct.unpack_from("<IiI", data, off)
        assert head == 0x2001F003
        off += 12
        end = off + nbytes
        while off < end:
            (h,) = struct.unpack_from("<I", data, off)
            if h >> 31:
                tsc = struct.unpack_from("<Q", data, off + 4)[0]
                lo, hi = tsc if lo is None else min(lo, tsc), tsc if hi is None else max(hi, tsc)
            off += 4 * (1 + 2 * (h >> 31) + ((h >> 28) & 7))
    return (int(hi * 1e9 / cpu_hz) - int(lo * 1e9 / cpu_hz)) / 1e9


@pytest.fixture(scope="module")
def real(request):
    from support import REAL_XENTRACE, require_shared
    path = require_shared(REAL_XENTRACE)
    data = path.read_bytes()
    truth = Truth(reference.decode_bytes(data).events, sizes=False)
    truth.span = capture_span_seconds(data)
    return path, truth


@pytest.mark.parametrize("flags", [[], ["-D", "14"], ["-D", "dom14"], ["-D", "dom1?"]])
def test_real_capture_csv_top5_ranges_and_addresses(real, capsys, flags):
    path, truth = real
    assert truth.span == pytest.approx(3.4945, abs=1e-3)      # the capture's README: 3.49 s
    for by, fields in (("range", ("domid", "range", "type")),
                       ("addr", ("domid", "range", "type", "dir", "addr"))):
        header, rows = parse_csv(report(capsys, "--by", by, "--top", "5", "--format", "csv",
                                        *flags, path).out)
        assert header[:len(fields) + 1] == ["domid", "domain"] + list(fields[1:])
        want = sorted(truth.rows(fields).items(), key=lambda kv: -kv[1]["count"])
        assert len(rows) == min(5, len(want))
        assert [int(r["count"]) for r in rows] == [w["count"] for _, w in want[:5]]
        by_key = dict(want)
        for r in rows:
            key = (int(r["domid"]), r["range"], events.TYPE_CODES[r["type"]])
            if by == "addr":
                key += (events.DIR_CODES[r["dir"]], int(r["addr"], 16))
            assert r["domain"] == "dom14"
            check_csv_row(r, key, by_key[key], truth, 105, sizes=False)


def test_real_capture_filter_matching_nothing_says_so(real, capsys):
    path, _ = real
    res = report(capsys, "-D", "7", "--format", "csv", path)
    assert res.out.splitlines() == [",".join(RANGE_HEADER)]
    assert res.err.strip() == (f"iotrace report: the filter domain=7 matches none of the 105 "
                               f"requests of {path}")
    table = report(capsys, "-D", "7", path).out.splitlines()
    assert table[-1] == "filter: domain=7: 0 of 105 requests (matches nothing)"


def test_real_capture_hist_and_header(real, capsys):
    path, truth = real
    out = report(capsys, "--hist", path).out.splitlines()
    assert out[1] == (f"span {truth.span:.3f} s (first to last record; TSC at 2.4 GHz, "
                      f"--cpu-hz): 105 I/O requests, {105 / truth.span:.1f} req/s")
    i = out.index("service time histograms (per row above; biolatency-style, powers of two "
                  "of ns):")
    svc = truth.rows(("domid", "range", "type"))[(14, "pci-bar-io", TYPE_PIO)]["svc"]
    block = out[i + 2:]
    assert block[0].startswith("  dom14 pci-bar-io pio: 72 requests, 72 timed: min ")
    counts = defaultdict(int)
    for v in svc:
        counts[v.bit_length()] += 1
    got = [int(x.split(" : ")[1].split()[0]) for x in block[2:2 + len(counts)]]
    assert got == [counts[p] for p in sorted(counts)]


def test_events_take_the_filters(real, iotrace_exe):
    path, _ = real
    res = subprocess.run([iotrace_exe, "report", "--events", "-D", "14", "--vcpu", "2",
                          "--dir", "read", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()[1:]
    assert lines and all(x.split()[1:3] == ["dom14", "2"] and x.split()[4] == "read"
                         for x in lines)
    reads_v2 = Truth(reference.decode_bytes(path.read_bytes()).events).total(
        lambda r: r["vcpu"] == 2 and r["dir"] == DIR_READ)
    assert len(lines) == reads_v2


@pytest.mark.parametrize("args, words", [
    (["--top", "0"], ["--top", "1 or more"]),
    (["--top", "-1"], ["--top"]),
    (["--by", "disk"], ["--by", "domain, vcpu, range, addr, rip"]),
    (["--sort", "fast"], ["--sort"]),
    (["--dir", "sideways"], ["dir: expected read or write"]),
    (["--type", "disk"], ["type: expected one of"]),
    (["--events", "--top", "3"], ["--top applies to the summary"]),
    (["--events", "--format", "csv"], ["--events"]),
    (["--hist", "--format", "csv"], ["--hist"]),
])
def test_bad_options_are_one_line(real, iotrace_exe, args, words):
    path, _ = real
    res = subprocess.run([iotrace_exe, "report", *args, str(path)], capture_output=True,
                         text=True)
    assert res.returncode == 2, (res.stdout, res.stderr)
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in last, last


def test_events_of_a_recording_filtered_by_domain_name(rec, capsys):
    path, truth = rec
    out = report(capsys, "--events", "-D", "web", "--type", "mmio", path).out.splitlines()
    head, *lines = out
    assert head.split()[:3] == ["TIME_S", "DOMAIN", "VCPU"]
    assert len(lines) == truth.total(lambda r: r["domid"] == 3 and r["type"] == TYPE_MMIO)
    assert all(x.split()[1] == "web" and x.split()[3] == "mmio" for x in lines)
