"""``iotrace top -b``: plain-text tables for logs and pipes, one per interval.

Like ``xentop -b`` and ``kvm_stat -l``: no terminal control, every table starts with a timestamp
line, then a source line, a column header and one line per row; a blank line ends the table. All
columns are printed at widths that keep them aligned (values longer than a column push the line
out rather than being cut, so nothing is lost in a log); fields never contain spaces, so
``awk``/``split()`` see one field per column. Child rows (vCPUs, ranges, addresses) repeat their
domain id and show their level as leading dots in NAME; FLAGS is ``-`` or ``!lost,slow``.
"""
from __future__ import annotations

import time

from iotrace.top.model import COLUMNS, View, fmt_bytes, fmt_count

# Wider than the 80-column view: a log has room, and names should not be cut.
BATCH_WIDTHS = {"name": 16, "busiest": 20}


def source_line(view: View) -> str:
    parts = []
    for st in view.snapshot.stats:
        state = "up" if st.up else "DOWN"
        s = f"{st.name}={state} events={st.events} lost={st.lost}"
        if st.probes_attached or st.probes_failed:
            s += f" probes={st.probes_attached}"
            if st.probes_failed:
                s += f" failed={st.probes_failed}"
        if st.error and not st.up:
            s += f" error={st.error!r}"
        parts.append(s)
    for domid, why in sorted(view.unprobed.items()):
        info = view.snapshot.domains.get(domid)
        parts.append(f"unprobed={domid}:{info.name if info else domid} reason={why!r}")
    return "sources: " + ("; ".join(parts) if parts else "none")


def header_line(view: View, sort: str, filt_desc: str) -> str:
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view.snapshot.wall))
    el = f"{view.elapsed:.2f}s" if view.elapsed else "-"
    line = (f"iotrace top {ts} host={view.snapshot.host} interval={el} "
            f"domains={view.domains_shown} req/s={fmt_count(view.total_req_rate)} "
            f"bytes/s={fmt_bytes(view.total_byte_rate)} reqs={view.total_reqs} sort={sort}")
    if filt_desc:
        line += f" filter={filt_desc.replace(' ', ';')}"
    return line


def format_table(view: View, sort: str = "reqs", filt_desc: str = "") -> list[str]:
    """The lines of one batch table (without the trailing blank line)."""
    cols = COLUMNS
    widths = [BATCH_WIDTHS.get(c.id, c.width) for c in cols]
    head = " ".join(c.header.rjust(w) if c.right else c.header.ljust(w)
                    for c, w in zip(cols, widths)) + " FLAGS"
    lines = [header_line(view, sort, filt_desc), source_line(view), head.rstrip()]
    for row in view.rows:
        cells = []
        for c, w in zip(cols, widths):
            v = c.get(row)
            if c.id == "domid":
                v = str(row.domid)  # on child rows too, so grep by domain works
            elif c.id == "name":
                # Indentation of child rows with dots keeps the field free of spaces.
                v = ("." * (2 * row.level)) + row.name.replace(" ", "")
            v = v or "-"
            cells.append(v.rjust(w) if c.right else v.ljust(w))
        flags = ("!" + ",".join(sorted(row.flags))) if row.flags else "-"
        lines.append(" ".join(cells) + " " + flags)
    return lines
