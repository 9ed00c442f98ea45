"""Offline report rendering: the operator's table (with biolatency-style histograms), CSV, the
JSON contract other tools consume, and the per-request listing.

All three summary formats are written from one ``Rollup`` (``iotrace.offline.rollup``: the
grouping, filter, sort and cut), so they always show the same rows.

JSON contract (``"schema": 3``; new keys may be added, existing ones never change meaning)::

    {"schema": 3, "by": ["range"], "key": ["domid", "range", "type"],
     "source": "xentrace" | "recording", "compressed": bool,
     "records": <records decoded>, "lost_records": <n>, "decode_errors": <n>,
     "skipped_chunks": <n>, "truncated": true | false,
     "span_seconds": float | null,        # first to last timestamp of the capture
     "cpu_hz": float | null,              # xentrace: the TSC rate times were converted at
     "requests": <n passing the filter>, "requests_seen": <n in the capture>,
     "filter": {"domain": [...], "vcpu": [...], "range": [...], "type": [...],
                "dir": [...]} | null,
     "sort": "count" | "share" | "avg" | "p95" | "bytes", "top": int | null,
     "rows_total": <rows of the grouping before the cut>,
     "domains": {"<domid>": "<name>", ...},           # names the capture carries
     "domain_totals": [<row keyed by domid>, ...],    # busiest first
     "io": [<row>, ...]}                              # sorted, cut to "top"

    row: the key fields of the grouping - "domid" (with "domain", its display name), "vcpu",
         "rip", "range", "type" ("pio" | "mmio" | "pci_config" | ...), "dir" ("read" |
         "write"), "addr" (with "addr_text": hex, or BDF + register for pci_config) - then
         "count", "rate" (per second, null without a span), "share" (0..1 of "requests"),
         "bytes" (null for xentrace: it records no sizes),
         "service_seconds": {"n", "avg", "p50", "p95", "min", "max"} | null,
         and with --hist "histogram": [[lower_seconds, upper_seconds, count], ...] (the
         non-empty slots).

Schema 3 changed from 2: rows carry the grouping's key fields only (``by`` is a list of
levels; the old default, one row per (domid, vcpu, type, dir, addr), is ``--by vcpu,addr``,
the old ``--by rip`` is ``--by vcpu,rip,addr``); rows are in the report's order (``sort``),
not by key; new keys listed above. Schema 2 was schema 3's old default rows with "by": "range"
or "rip". The xentrace core keeps at most 65536 distinct keys exactly (a warning says when a
capture has more): requests of further keys count in rows whose ``addr`` (and ``rip``) is
2**64-1, "other", per vCPU, then with ``domid``/``vcpu`` -2; totals stay exact. Service time:
see the README ("Service time"); p50/p95 are read off the histograms. ``decode_errors``:
records that could not be decoded (a recording: those of its chunks skipped as damaged);
``skipped_chunks``: a recording's damaged chunks (or runs of bytes) skipped; ``truncated``: the
input ends inside a record, or a recording has no end chunk (its writer was killed).
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np

from iotrace.core.aggregate import SLOT_LOWER_NS, SLOT_UPPER_NS
from iotrace.core.events import dir_name, format_address, type_name
from iotrace.offline import histogram
from iotrace.offline.rollup import DOMID_OTHER, KEY_OTHER, Rollup

SCHEMA = 3


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-6:
        return f"{s * 1e9:.0f}ns"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def _fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{r:.1f}"


def _filter_doc(r: Rollup):
    f = r.filter
    if not f.active():
        return None
    return {"domain": list(f.domains), "vcpu": sorted(f.vcpus), "range": list(f.ranges),
            "type": [type_name(t) for t in sorted(f.types)],
            "dir": [dir_name(d) for d in sorted(f.dirs)]}


def _row_doc(r: Rollup, v: dict, hist_of=None) -> dict:
    doc = {k: v[k] for k in v if k != "service"}
    doc["service_seconds"] = v["service"]
    if hist_of is not None:
        doc["histogram"] = hist_of
    return doc


def _hist_doc(h: np.ndarray) -> list:
    return [[float(SLOT_LOWER_NS[k]) / 1e9, float(SLOT_UPPER_NS[k]) / 1e9, int(h[k])]
            for k in np.flatnonzero(h)]


def _head(r: Rollup) -> dict:
    s = r.summary
    return {
        "schema": SCHEMA, "by": list(r.by), "key": list(r.fields),
        "source": s.source, "compressed": s.compressed,
        "records": s.records, "lost_records": s.lost_records, "decode_errors": s.decode_errors,
        "skipped_chunks": s.skipped_chunks, "truncated": s.truncated,
        "span_seconds": s.span_seconds, "cpu_hz": s.cpu_hz,
        "requests": r.requests, "requests_seen": r.requests_seen,
        "filter": _filter_doc(r), "sort": r.sort, "top": r.top, "rows_total": len(r.table),
        "domains": {str(d): n for d, n in sorted(s.domain_names.items())},
        "domain_totals": [_row_doc(r, v) for v in r.domain_rows()],
    }


def _row_json(r: Rollup, i: int, hist: bool) -> str:
    v = r.values(r.table, i)
    return json.dumps(_row_doc(r, v, _hist_doc(r.table.hist[i]) if hist else None),
                      separators=(", ", ": "))


def write_json(out, r: Rollup, hist: bool = False) -> None:
    """The JSON document, written row by row: the head indented, then one ``io`` row per line
    (a report of many keys never holds them all as objects or as one string)."""
    head = json.dumps(_head(r), indent=1)
    out.write(head[:-2] + ',\n "io": [')
    first = True
    for i in r.order:
        out.write(("\n  " if first else ",\n  ") + _row_json(r, i, hist))
        first = False
    out.write("\n ]\n}\n" if not first else "]\n}\n")


def to_json(r: Rollup, hist: bool = False) -> str:
    """``write_json``'s text as one string."""
    buf = io.StringIO()
    write_json(buf, r, hist)
    return buf.getvalue()


# ---- CSV: one header row, one line per row shown, raw numbers (base units, empty = unknown)

_CSV_KEYS = {"domid": ["domid", "domain"], "vcpu": ["vcpu"], "rip": ["rip"],
             "range": ["range"], "type": ["type"], "dir": ["dir"], "addr": ["addr"]}
CSV_VALUES = ["count", "rate_per_second", "share", "bytes", "service_count",
              "service_avg_seconds", "service_p50_seconds", "service_p95_seconds",
              "service_min_seconds", "service_max_seconds"]


def csv_header(r: Rollup) -> list[str]:
    return [c for f in r.fields for c in _CSV_KEYS[f]] + CSV_VALUES


def _csv_cells(r: Rollup, v: dict) -> list:
    cells = []
    for f in r.fields:
        if f == "domid":
            cells += [v["domid"], v["domain"]]
        elif f == "addr":
            cells.append(v["addr_text"])
        elif f == "rip":
            cells.append("other" if v["rip"] == KEY_OTHER else f"{v['rip']:#x}")
        else:
            cells.append(v[f])
    svc = v["service"] or {}
    cells += [v["count"], v["rate"], v["share"], v["bytes"], svc.get("n", 0),
              svc.get("avg"), svc.get("p50"), svc.get("p95"), svc.get("min"), svc.get("max")]
    return ["" if c is None else repr(c) if isinstance(c, float) else c for c in cells]


def write_csv(out, r: Rollup) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(csv_header(r))
    for i in r.order:
        w.writerow(_csv_cells(r, r.values(r.table, i)))


# ---- the table

_HEADS = {"vcpu": "VCPU", "rip": "RIP", "range": "RANGE", "type": "TYPE", "dir": "DIR",
          "addr": "ADDR"}
_RIGHT = {"DOMID", "VCPU", "RIP", "ADDR", "REQS", "REQ/S", "SHARE", "BYTES", "AVG", "P50",
          "P95", "MIN", "MAX"}
_LABELS = {"vcpu": "vCPU ", "rip": "RIP "}       # before a key's value in running text
_NUM_HEADS = ["REQS", "REQ/S", "SHARE", "BYTES", "AVG", "P50", "P95", "MIN", "MAX"]


def _key_text(f: str, v: dict) -> str:
    x = v[f]
    if f == "vcpu":
        return "other" if x == DOMID_OTHER else "?" if x < 0 else str(x)
    if f == "rip":
        return "other" if x == KEY_OTHER else "?" if x == 0 else f"{x:#x}"
    if f == "addr":
        return v["addr_text"]
    return str(x)


def _num_cells(v: dict) -> list[str]:
    svc = v["service"] or {}
    share = v["share"]
    return [str(v["count"]), _fmt_rate(v["rate"]),
            "-" if share is None else f"{100.0 * share:.1f}%",
            "-" if v["bytes"] is None else str(v["bytes"])] + \
        [fmt_seconds(svc.get(k)) for k in ("avg", "p50", "p95", "min", "max")]


def _domain_cells(v: dict) -> list[str]:
    d = v["domid"]
    return ["other" if d == DOMID_OTHER else "?" if d < 0 else str(d), v["domain"]]


def _aligned(heads: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    """Columns as wide as their longest value: nothing is cut, long names stay aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]

    def line(vals):
        return indent + " ".join(x.rjust(w) if h in _RIGHT else x.ljust(w)
                                 for x, w, h in zip(vals, widths, heads)).rstrip()
    return [line(heads)] + [line(r) for r in rows]


def header_lines(r: Rollup) -> list[str]:
    s = r.summary
    kind = "xentrace capture" if s.source == "xentrace" else "iotrace recording"
    if s.compressed:
        kind = "gzip-compressed " + kind
    damage = ""
    if s.skipped_chunks:
        damage += f", {s.skipped_chunks} damaged chunk(s) skipped"
    if s.truncated:
        damage += ", truncated"
    out = [f"{s.path}: {kind}, {s.records} records decoded, {s.lost_records} lost records, "
           f"{s.decode_errors} decode errors{damage}"]
    span = s.span_seconds
    if span is None:
        when = "span unknown (fewer than two timestamps): no rates"
    else:
        base = (f"first to last record; TSC at {s.cpu_hz / 1e9:g} GHz, --cpu-hz"
                if s.source == "xentrace" else "first to last request")
        when = f"span {span:.3f} s ({base})"
    rate = r.rate(r.requests_seen)
    out.append(f"{when}: {r.requests_seen} I/O requests"
               + (f", {rate:.1f} req/s" if rate is not None else ""))
    if r.filter.active():
        out.append(f"filter: {r.filter.describe()}: {r.requests} of {r.requests_seen} requests"
                   + (" (matches nothing)" if not r.requests else ""))
    for w in s.warnings:
        out.append(f"warning: {w}")
    return out


def _grouping_text(r: Rollup) -> str:
    names = {"domid": "domain", "vcpu": "vCPU", "rip": "guest RIP", "range": "range",
             "dir": "direction", "addr": "address"}
    return ", ".join(names[f] for f in r.fields if f in names)


def to_table(r: Rollup, hist: bool = False) -> str:
    """perf-kvm-stat-like text: the header (span, rates, filter), the per-domain totals, then
    the rows of the grouping in sort order (and with ``hist`` a histogram per row shown)."""
    out = header_lines(r)
    if not r.requests_seen:
        out.append("no I/O requests in this capture")
        return "\n".join(out) + "\n"
    if not r.requests:
        return "\n".join(out) + "\n"
    if r.fields != ("domid",):
        out += ["", "per domain:"]
        out += _aligned(["DOMID", "DOMAIN"] + _NUM_HEADS,
                        [_domain_cells(v) + _num_cells(v) for v in r.domain_rows()], "  ")
    shown, total = len(r.order), len(r.table)
    order = "busiest first" if r.sort in ("count", "share") else f"by {r.sort}, largest first"
    cut = f"top {shown} of {total} rows" if shown < total else \
        f"{total} row" + ("s" if total != 1 else "")
    out += ["", f"per {_grouping_text(r)} ({cut}, {order}):"]
    keys = [f for f in r.fields if f != "domid"]
    rows = []
    for v in r.rows():
        rows.append(_domain_cells(v) + [_key_text(f, v) for f in keys] + _num_cells(v))
    out += _aligned(["DOMID", "DOMAIN"] + [_HEADS[f] for f in keys] + _NUM_HEADS, rows, "  ")
    if hist:
        out += ["", "service time histograms (per row above; biolatency-style, powers of two "
                    "of ns):"]
        for i in r.order:
            v = r.values(r.table, i)
            name = " ".join([v["domain"]] + [_LABELS.get(f, "") + _key_text(f, v)
                                             for f in keys])
            svc = v["service"]
            out.append("")
            if not svc:
                out.append(f"  {name}: {v['count']} requests, no service times")
                continue
            out.append(f"  {name}: {v['count']} requests, {svc['n']} timed: "
                       f"min {fmt_seconds(svc['min'])} avg {fmt_seconds(svc['avg'])} "
                       f"p50 {fmt_seconds(svc['p50'])} p95 {fmt_seconds(svc['p95'])} "
                       f"max {fmt_seconds(svc['max'])}")
            out += histogram.render(r.table.hist[i], indent="    ")
    return "\n".join(out) + "\n"


# ---- the per-request listing (iotrace report --events), snoop's columns plus the RIP

EVENT_HEADER = (f"{'TIME_S':>14} {'DOMAIN':<12} {'VCPU':>4} {'TYPE':<10} {'DIR':<5} "
                f"{'ADDRESS':>18} {'RANGE':<16} {'DATA':>18} {'SVC_US':>9} {'RIP':>18}")


class EventLister:
    """Formats event batches as lines (``table``) or JSON objects, one per request. TIME_S is
    seconds since the first request listed (xentrace: TSC / --cpu-hz)."""

    def __init__(self, addrmap, names: dict[int, str] | None = None, fmt: str = "table",
                 filt=None):
        self.addrmap, self.names, self.fmt = addrmap, dict(names or {}), fmt
        self.filter = filt if filt is not None and filt.active() else None
        self.t0: int | None = None
        self.count = 0

    def header(self) -> str | None:
        return EVENT_HEADER if self.fmt == "table" else None

    def lines(self, batch):
        if not len(batch):
            return
        if self.t0 is None:
            self.t0 = int(batch["ts_ns"][0])       # time 0: the first request, shown or not
        rng = self.addrmap.lookup(batch["type"], batch["addr"])
        names = self.addrmap.names
        if self.filter is not None:
            keep = self.filter.mask(batch["domid"], batch["vcpu"], batch["type"], batch["dir"],
                                    rng, names, self.names)
            batch, rng = batch[keep], rng[keep]
        for e, r in zip(batch.tolist(), rng.tolist()):
            ts, dom, vcpu, typ, d, dip, _df, _size, _count, addr, data, svc, rip = e
            self.count += 1
            if self.fmt == "json":
                yield json.dumps({"ts_ns": ts, "domid": dom, "vcpu": vcpu,
                                  "type": type_name(typ), "dir": dir_name(d), "addr": addr,
                                  "range": names[r], "data": data, "data_is_ptr": bool(dip),
                                  "service_ns": svc if svc >= 0 else None, "rip": rip})
                continue
            dname = self.names.get(dom) or (f"dom{dom}" if dom >= 0 else "?")
            val = f"*{data:#x}" if dip else f"{data:#x}"
            svc_s = "-" if svc < 0 else f"{svc / 1000:.1f}"
            rip_s = f"{rip:#x}" if rip else "?"
            yield (f"{(ts - self.t0) / 1e9:>14.9f} {dname[:12]:<12} {vcpu:>4} "
                   f"{type_name(typ):<10} {dir_name(d):<5} {format_address(typ, addr):>18} "
                   f"{names[r][:16]:<16} "
                   f"{val:>18} {svc_s:>9} {rip_s:>18}")
