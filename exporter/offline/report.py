"""Offline report rendering: the operator's table, the JSON contract other tools consume, and
the per-request listing.

JSON contract (``"schema": 2``; new keys may be added, existing ones never change meaning)::

    {"schema": 2, "by": "range" | "rip",
     "source": "xentrace" | "recording",
     "records": <records decoded>, "lost_records": <n>, "decode_errors": <n>,
     "skipped_chunks": <n>, "truncated": true | false,
     "domains": {"<domid>": "<name>", ...},
     "io": [{"domid": int, "vcpu": int, "type": "pio" | "mmio" | "pci_config" | ...,
             "dir": "read" | "write", "addr": int, "range": str, "count": int,
             "service_seconds": {"avg": float, "p50": float, "p95": float} | null,
             "rip": int}, ...]}          # "rip" only with "by": "rip" (0: not known)

Schema 1 (no "schema" key) is schema 2 without "schema", "by" and "rip". The xentrace core keeps
at most 65536 distinct keys exactly (a warning says when a capture has more): requests of further
keys count in rows whose ``addr`` (and ``rip``) is 2**64-1, "other", per vCPU, then with
``domid``/``vcpu`` -2; totals stay exact. ``by`` names the
grouping: "range" (the default) gives one ``io`` row per (domid, vcpu, type, dir, addr), its
range named by the address map; "rip" one row per (domid, vcpu, rip, type, dir, addr): which
guest instruction (the RIP of the VM exit, xentrace only) made which requests. ``decode_errors``:
records that could not be decoded (a recording: those of its chunks skipped as damaged);
``skipped_chunks``: a recording's damaged chunks (or runs of bytes) skipped; ``truncated``: the
input ends inside a record, or a recording has no end chunk (its writer was killed). Rows are sorted
by their key fields. ``service_seconds`` is null where the source did not time the request;
p50/p95 are read off log2 histograms. Service time: see the README ("Service time").

Groupings are named tuples of key fields (``GROUPINGS``); the table and the JSON are written
from whichever is chosen, so a new grouping is one entry.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from iotrace.core.events import dir_name, type_name
from iotrace.offline.capture import CaptureSummary
from iotrace.offline.cells import CellTable

SCHEMA = 2
# grouping -> key fields of one row (domid, vcpu first: the table's sections)
GROUPINGS = {
    "range": ("domid", "vcpu", "range", "type", "dir", "addr"),
    "rip": ("domid", "vcpu", "rip", "range", "type", "dir", "addr"),
}
NEEDS_RIP = {"rip"}


def grouped(summary: CaptureSummary, by: str, addrmap) -> CellTable:
    return summary.cells.group(GROUPINGS[by], addrmap)


def _service(t: CellTable, i: int):
    if not t.svc_n[i]:
        return None
    return {"avg": t.avg_seconds(i), "p50": t.quantile_seconds(i, 0.50),
            "p95": t.quantile_seconds(i, 0.95)}


def _value(t: CellTable, i: int, f: str):
    v = t.key(i, f)
    if f == "type":
        return type_name(v)
    if f == "dir":
        return dir_name(v)
    return v


def _row_order(t: CellTable, by: str):
    cols = [t.keys[f] for f in ("domid", "vcpu", "rip", "type", "dir", "addr")
            if f in GROUPINGS[by]]
    return np.lexsort(cols[::-1]).tolist() if len(t) else []


def iter_io_rows(t: CellTable, by: str):
    """The ``io`` rows, one dict at a time, sorted by their key fields."""
    with_rip = "rip" in GROUPINGS[by]
    for i in _row_order(t, by):
        row = {"domid": t.key(i, "domid"), "vcpu": t.key(i, "vcpu"),
               "type": _value(t, i, "type"), "dir": _value(t, i, "dir"),
               "addr": t.key(i, "addr"), "range": t.key(i, "range"),
               "count": int(t.count[i]), "service_seconds": _service(t, i)}
        if with_rip:
            row["rip"] = t.key(i, "rip")
        yield row


def io_rows(t: CellTable, by: str) -> list[dict]:
    return list(iter_io_rows(t, by))


def _head(summary: CaptureSummary, by: str) -> dict:
    return {
        "schema": SCHEMA,
        "by": by,
        "source": summary.source,
        "records": summary.records,
        "lost_records": summary.lost_records,
        "decode_errors": summary.decode_errors,
        "skipped_chunks": summary.skipped_chunks,
        "truncated": summary.truncated,
        "domains": {str(d): n for d, n in sorted(summary.domain_names.items())},
    }


def write_json(out, summary: CaptureSummary, t: CellTable, by: str = "range") -> None:
    """The JSON document, written row by row (the same text as ``json.dumps(doc, indent=1)``:
    a report of many keys never holds them all as objects or as one string)."""
    head = json.dumps(_head(summary, by), indent=1)
    out.write(head[:-2] + ',\n "io": [')
    first = True
    for row in iter_io_rows(t, by):
        text = json.dumps(row, indent=1).replace("\n", "\n  ")
        out.write(("\n  " if first else ",\n  ") + text)
        first = False
    out.write("\n ]\n}\n" if not first else "]\n}\n")


def to_json(summary: CaptureSummary, t: CellTable, by: str = "range") -> str:
    doc = _head(summary, by)
    doc["io"] = io_rows(t, by)
    return json.dumps(doc, indent=1) + "\n"


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


def _domain_label(domid: int, names: dict[int, str]) -> str:
    if domid == -2:
        return "other domains (keys beyond the bound, see the warning)"
    if domid < 0:
        return "unknown domain (records before the pCPU's first runstate record)"
    name = names.get(domid)
    return f"domain {domid}" + (f" ({name})" if name else "")


def _vcpu_label(vcpu: int) -> str:
    return "vCPU ?" if vcpu < 0 else f"vCPU {vcpu}"


KEY_OTHER = (1 << 64) - 1    # addr / rip of the rows gathering keys beyond the core's bound


def _num(v: int, width: int, zero: str | None = None) -> str:
    if v == KEY_OTHER:
        return f"{'other':>{width}}"
    if zero is not None and v == 0:
        return f"{zero:>{width}}"
    return f"{v:>#{width}x}"


# column: (header, width, format of a value)
_COLUMNS = {
    "rip": ("RIP", 18, lambda v: _num(v, 18, "?")),
    "range": ("RANGE", 18, lambda v: f"{v:<18.18}"),
    "type": ("TYPE", 6, lambda v: f"{v:<6}"),
    "dir": ("DIR", 5, lambda v: f"{v:<5}"),
    "addr": ("ADDR", 12, lambda v: _num(v, 12)),
}


def columns(by: str) -> str:
    cells = []
    for f in GROUPINGS[by][2:]:
        head, width, _ = _COLUMNS[f]
        cells.append(f"{head:>{width}}" if f in ("rip", "addr") else f"{head:<{width}}")
    return " ".join(cells) + f" {'COUNT':>9} {'SHARE':>7} {'AVG':>8} {'P50':>8} {'P95':>8}"


COLUMNS = columns("range")


def to_table(summary: CaptureSummary, t: CellTable, by: str = "range",
             top: int | None = None) -> str:
    """perf-kvm-stat-like text: per domain and vCPU, rows of the grouping, busiest first (by
    the first row field's total - the range, the RIP - then the row's own count)."""
    total = int(t.count.sum())
    damage = ""
    if summary.skipped_chunks:
        damage += f", {summary.skipped_chunks} damaged chunk(s) skipped"
    if summary.truncated:
        damage += ", truncated"
    out = [f"{summary.path}: {summary.source}, {summary.records} records decoded, "
           f"{total} I/O requests, {summary.lost_records} lost records, "
           f"{summary.decode_errors} decode errors{damage}"]
    for w in summary.warnings:
        out.append(f"warning: {w}")
    if not total:
        out.append("no I/O requests in this capture")
        return "\n".join(out) + "\n"
    fields = GROUPINGS[by][2:]
    lead = fields[0]
    tie = [f for f in ("range", "addr", "type", "dir") if f in fields and f != lead]
    per_vcpu: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in range(len(t)):
        per_vcpu[(t.key(i, "domid"), t.key(i, "vcpu"))].append(i)
    dom_totals: dict[int, int] = defaultdict(int)
    for (domid, _), rows in per_vcpu.items():
        dom_totals[domid] += int(sum(t.count[i] for i in rows))

    head = "    " + columns(by)
    for domid in sorted(dom_totals, key=lambda d: (-dom_totals[d], d)):
        n = dom_totals[domid]
        out.append("")
        out.append(f"{_domain_label(domid, summary.domain_names)}: {n} requests "
                   f"({100.0 * n / total:.1f}% of all)")
        for (d, vcpu) in sorted((k for k in per_vcpu if k[0] == domid), key=lambda k: k[1]):
            rows = per_vcpu[(d, vcpu)]
            vn = int(sum(t.count[i] for i in rows))
            out.append(f"  {_vcpu_label(vcpu)}: {vn} requests")
            out.append(head)
            lead_total: dict = defaultdict(int)
            for i in rows:
                lead_total[t.key(i, lead)] += int(t.count[i])
            rows.sort(key=lambda i: (-lead_total[t.key(i, lead)], t.key(i, lead),
                                     -int(t.count[i]), *(t.key(i, f) for f in tie)))
            for i in rows[:top] if top else rows:
                cells = [_COLUMNS[f][2](_value(t, i, f)) for f in fields]
                c = int(t.count[i])
                out.append("    " + " ".join(cells) +
                           f" {c:>9} {100.0 * c / vn:>6.1f}% "
                           f"{fmt_seconds(t.avg_seconds(i)):>8} "
                           f"{fmt_seconds(t.quantile_seconds(i, 0.5)):>8} "
                           f"{fmt_seconds(t.quantile_seconds(i, 0.95)):>8}")
    return "\n".join(out) + "\n"


# ---- the per-request listing (iotrace report --events), snoop's columns plus the RIP

EVENT_HEADER = (f"{'TIME_S':>14} {'DOMAIN':<12} {'VCPU':>4} {'TYPE':<10} {'DIR':<5} "
                f"{'ADDRESS':>18} {'RANGE':<16} {'DATA':>18} {'SVC_US':>9} {'RIP':>18}")


class EventLister:
    """Formats event batches as lines (``table``) or JSON objects, one per request. TIME_S is
    seconds since the first request listed (xentrace: TSC / --cpu-hz)."""

    def __init__(self, addrmap, names: dict[int, str] | None = None, fmt: str = "table"):
        self.addrmap, self.names, self.fmt = addrmap, dict(names or {}), fmt
        self.t0: int | None = None
        self.count = 0

    def header(self) -> str | None:
        return EVENT_HEADER if self.fmt == "table" else None

    def lines(self, batch):
        if not len(batch):
            return
        if self.t0 is None:
            self.t0 = int(batch["ts_ns"][0])
        rng = self.addrmap.lookup(batch["type"], batch["addr"])
        names = self.addrmap.names
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
                   f"{type_name(typ):<10} {dir_name(d):<5} {addr:>#18x} {names[r][:16]:<16} "
                   f"{val:>18} {svc_s:>9} {rip_s:>18}")
