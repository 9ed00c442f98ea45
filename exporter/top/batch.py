"""``iotrace top -b``: plain text, CSV or JSON for logs and pipes, one table per interval.

Like ``xentop -b`` and ``kvm_stat -l``: no terminal control, raw numbers (no unit suffixes), every
table complete on its own.

* ``table`` (default): a header line (time, host, the period the rates and latencies cover,
  totals), a source line, the column header, one line per row, a blank line. Columns are as wide
  as their longest value (nothing is cut, everything stays aligned); fields never contain spaces,
  so ``awk``/``split()`` see one field per column. Rates are per second, BYTES in bytes, P50us P95us
  AVGus in microseconds; REQS and BYTES count since the source started, the other columns cover
  the interval. Child rows (vCPUs, ranges, addresses) repeat their domain id and show their level as
  leading dots in NAME; FLAGS is ``-`` or ``!lost,slow``. The source line adds
  ``decode_errors=N``, ``skipped_chunks=N`` and ``truncated`` where a replayed file is damaged.
* ``csv``: one header row, then one row per table row with the time and host, base units
  (per second, seconds, bytes); empty where unknown.
* ``json``: one JSON object per table and line (JSON Lines): the header facts, the sources and the
  rows, base units, null where unknown.
"""
from __future__ import annotations

import csv
import io
import json
import time

from iotrace.top.columns import COLUMNS, damage_text
from iotrace.top.model import View

FORMATS = ("table", "csv", "json")


def _fmt(kind: str, v) -> str:
    """A raw value of a column of ``kind`` as batch text."""
    if v is None or v == "":
        return "-"
    if kind == "seconds":
        return f"{v * 1e6:.1f}"
    if kind == "rate":
        return f"{v:.1f}".rstrip("0").rstrip(".") if v else "0"
    if kind in ("count", "bytes"):
        return str(int(v))
    return str(v).replace(" ", "")


def source_line(view: View) -> str:
    parts = []
    for st in view.snapshot.stats:
        state = "up" if st.up else "DOWN"
        s = f"{st.name}={state} events={st.events} lost={st.lost}"
        if st.probes_attached or st.probes_failed:
            s += f" probes={st.probes_attached}"
            if st.probes_failed:
                s += f" failed={st.probes_failed}"
        if st.decode_errors:
            s += f" decode_errors={st.decode_errors}"
        s += damage_text(st, " skipped_chunks={}", " truncated")
        if st.error and not st.up:
            s += f" error={st.error!r}"
        parts.append(s)
    for domid, why in sorted(view.unprobed.items()):
        info = view.snapshot.domains.get(domid)
        parts.append(f"unprobed={domid}:{info.name if info else domid} reason={why!r}")
    return "sources: " + ("; ".join(parts) if parts else "none")


def _when(view: View) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view.snapshot.wall))


def header_line(view: View, sort: str, filt_desc: str) -> str:
    el = f"{view.elapsed:.2f}s" if view.elapsed else "-"
    line = (f"iotrace top {_when(view)} host={view.snapshot.host} interval={el} "
            f"domains={view.domains_shown} req/s={_fmt('rate', view.total_req_rate)} "
            f"bytes/s={_fmt('rate', view.total_byte_rate)} reqs={view.total_reqs} "
            f"sort={sort}")
    if filt_desc:
        line += f" filter={filt_desc.replace(' ', ';')}"
        if not view.rows:
            line += " (matches-nothing)"
    return line


def _cells(view: View) -> list[list[str]]:
    out = []
    for row in view.rows:
        cells = []
        for c in COLUMNS:
            v = c.raw(row)
            if c.id == "name":
                # Indentation of child rows with dots keeps the field free of spaces.
                v = ("." * (2 * row.level)) + row.name.replace(" ", "")
            cells.append(_fmt(c.kind, v))
        cells.append(("!" + ",".join(sorted(row.flags))) if row.flags else "-")
        out.append(cells)
    return out


def format_table(view: View, sort: str = "reqs", filt_desc: str = "") -> list[str]:
    """The lines of one batch table (without the trailing blank line)."""
    heads = [c.batch_header for c in COLUMNS] + ["FLAGS"]
    right = [c.right for c in COLUMNS] + [False]
    cells = _cells(view)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]

    def line(vals):
        return " ".join(v.rjust(w) if r else v.ljust(w)
                        for v, w, r in zip(vals, widths, right)).rstrip()
    return [header_line(view, sort, filt_desc), source_line(view), line(heads)] + \
        [line(r) for r in cells]


CSV_FIELDS = ["time", "host", "interval_seconds", "kind", "level"] + \
    [c.field for c in COLUMNS] + ["flags"]


def _record(view: View, row) -> dict:
    rec = {"kind": row.kind, "level": row.level}
    for c in COLUMNS:
        rec[c.field] = c.raw(row)
    rec["flags"] = sorted(row.flags)
    return rec


def format_csv(view: View, header: bool) -> list[str]:
    """CSV rows of one table (the header row first when ``header``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(CSV_FIELDS)
    for row in view.rows:
        rec = _record(view, row)
        rec.update(time=_when(view), host=view.snapshot.host, interval_seconds=view.elapsed,
                   flags=",".join(rec["flags"]))
        w.writerow(["" if rec[f] is None else rec[f] for f in CSV_FIELDS])
    return buf.getvalue().splitlines()


def format_json(view: View, sort: str, filt_desc: str) -> str:
    """One table as one line of JSON."""
    doc = {
        "time": view.snapshot.wall, "host": view.snapshot.host,
        "interval_seconds": view.elapsed, "sort": sort, "filter": filt_desc or None,
        "filter_matches": bool(view.rows) or not filt_desc,
        "totals": {"domains": view.domains_shown, "req_per_second": view.total_req_rate,
                   "bytes_per_second": view.total_byte_rate, "reqs_total": view.total_reqs},
        "sources": [{"name": st.name, "up": st.up, "events": st.events, "lost": st.lost,
                     "probes_attached": st.probes_attached, "probes_failed": st.probes_failed,
                     "decode_errors": st.decode_errors,
                     "damage": dict(getattr(st, "damage", None) or {}),
                     "error": st.error} for st in view.snapshot.stats],
        "rows": [_record(view, r) for r in view.rows],
    }
    return json.dumps(doc, separators=(",", ":"))
