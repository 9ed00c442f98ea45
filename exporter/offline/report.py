"""Offline report rendering: the operator's table and the JSON contract other tools consume.

JSON contract (stable; new keys may be added, existing ones never change meaning)::

    {"source": "xentrace" | "recording",
     "records": <records decoded>, "lost_records": <n>, "decode_errors": <n>,
     "domains": {"<domid>": "<name>", ...},
     "io": [{"domid": int, "vcpu": int, "type": "pio" | "mmio" | "pci_config" | ...,
             "dir": "read" | "write", "addr": int, "range": str, "count": int,
             "service_seconds": {"avg": float, "p50": float, "p95": float} | null}, ...]}

One ``io`` row per (domid, vcpu, type, dir, addr), sorted by those fields. ``service_seconds`` is
null where the source did not time the request. p50/p95 are read off log2 histograms.
"""
from __future__ import annotations

import json
from collections import defaultdict

from iotrace.core.aggregate import Aggregator, Cell, Key
from iotrace.core.events import dir_name, type_name
from iotrace.offline.capture import Capture


def _service(cell: Cell):
    if not cell.service_n:
        return None
    return {"avg": cell.service_avg_seconds(),
            "p50": cell.service_quantile_seconds(0.50),
            "p95": cell.service_quantile_seconds(0.95)}


def io_rows(agg: Aggregator) -> list[dict]:
    rows = []
    for key, cell in agg.rows():
        rows.append({"domid": key.domid, "vcpu": key.vcpu, "type": type_name(key.type),
                     "dir": dir_name(key.dir), "addr": key.addr, "range": key.range,
                     "count": cell.count, "service_seconds": _service(cell)})
    return rows


def to_json(capture: Capture, agg: Aggregator) -> str:
    doc = {
        "source": capture.source,
        "records": capture.records,
        "lost_records": capture.lost_records,
        "decode_errors": capture.decode_errors,
        "domains": {str(d): n for d, n in sorted(capture.domain_names.items())},
        "io": io_rows(agg),
    }
    return json.dumps(doc, indent=1) + "\n"


def _fmt_seconds(s: float | None) -> str:
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
    if domid < 0:
        return "unknown domain (records before the pCPU's first runstate record)"
    name = names.get(domid)
    return f"domain {domid}" + (f" ({name})" if name else "")


def _vcpu_label(vcpu: int) -> str:
    return "vCPU ?" if vcpu < 0 else f"vCPU {vcpu}"


COLUMNS = f"{'RANGE':<18} {'TYPE':<6} {'DIR':<5} {'ADDR':>12} {'COUNT':>9} {'SHARE':>7}" \
          f" {'AVG':>8} {'P50':>8} {'P95':>8}"


def to_table(capture: Capture, agg: Aggregator, top: int | None = None) -> str:
    """perf-kvm-stat-like text: per domain and vCPU, by range then address, busiest first."""
    total = sum(c.count for c in agg.cells.values())
    out = [f"{capture.path}: {capture.source}, {capture.records} records decoded, "
           f"{total} I/O requests, {capture.lost_records} lost records, "
           f"{capture.decode_errors} decode errors"]
    for w in capture.warnings:
        out.append(f"warning: {w}")
    if not total:
        out.append("no I/O requests in this capture")
        return "\n".join(out) + "\n"

    per_vcpu: dict[tuple[int, int], list[tuple[Key, Cell]]] = defaultdict(list)
    for key, cell in agg.cells.items():
        per_vcpu[(key.domid, key.vcpu)].append((key, cell))
    dom_totals: dict[int, int] = defaultdict(int)
    for (domid, _), items in per_vcpu.items():
        dom_totals[domid] += sum(c.count for _, c in items)

    for domid in sorted(dom_totals, key=lambda d: (-dom_totals[d], d)):
        n = dom_totals[domid]
        out.append("")
        out.append(f"{_domain_label(domid, capture.domain_names)}: {n} requests "
                   f"({100.0 * n / total:.1f}% of all)")
        for (d, vcpu) in sorted((k for k in per_vcpu if k[0] == domid), key=lambda k: k[1]):
            items = per_vcpu[(d, vcpu)]
            vn = sum(c.count for _, c in items)
            out.append(f"  {_vcpu_label(vcpu)}: {vn} requests")
            out.append("    " + COLUMNS)
            # Busiest range first, then its busiest addresses.
            by_range: dict[str, int] = defaultdict(int)
            for k, c in items:
                by_range[k.range] += c.count
            items.sort(key=lambda kc: (-by_range[kc[0].range], kc[0].range, -kc[1].count,
                                       kc[0].addr, kc[0].type, kc[0].dir))
            for k, c in items[:top] if top else items:
                out.append(
                    f"    {k.range:<18.18} {type_name(k.type):<6} {dir_name(k.dir):<5} "
                    f"{k.addr:>#12x} {c.count:>9} {100.0 * c.count / vn:>6.1f}% "
                    f"{_fmt_seconds(c.service_avg_seconds()):>8} "
                    f"{_fmt_seconds(c.service_quantile_seconds(0.5)):>8} "
                    f"{_fmt_seconds(c.service_quantile_seconds(0.95)):>8}")
    return "\n".join(out) + "\n"
