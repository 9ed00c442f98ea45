"""The table's lines at a given terminal width: which columns fit, and how a row is written.

Pure functions of a width and rows (``iotrace.top.columns``), shared by the full-screen view and
tested without a terminal: below 80 columns the columns on the right are dropped; on wider
terminals NAME and BUSIEST grow first, then the wide-only columns appear.
"""
from __future__ import annotations

from iotrace.top.columns import COLUMNS, Column, Row, marker


def layout(width: int) -> list[tuple[Column, int]]:
    """Columns that fit in ``width`` (incl. the 2-char marker), widening NAME and BUSIEST first."""
    usable = width - 1 - 2          # never write the last column (curses scrolls on it)
    base = [c for c in COLUMNS if not c.wide_only]
    cols = [(c, c.width) for c in base]
    used = sum(w for _, w in cols) + len(cols) - 1
    if used > usable:                # narrower than 80: drop columns from the right
        while cols and used > usable:
            c, w = cols.pop()
            used -= w + 1
        return cols
    # Wide terminal: more room for names, then the wide-only columns, then more for names again.
    used = _grow(cols, {"name": 16, "busiest": 18}, usable, used)
    for c in COLUMNS:
        if c.wide_only and used + 1 + c.width <= usable:
            cols.append((c, c.width))
            used += 1 + c.width
    _grow(cols, {"name": 28, "busiest": 28}, usable, used)
    return cols


def _grow(cols: list, limits: dict[str, int], usable: int, used: int) -> int:
    """Widen the columns named in ``limits`` up to those widths while room is left; new ``used``."""
    for i, (c, w) in enumerate(cols):
        if c.id in limits:
            extra = min(limits[c.id] - w, usable - used)
            if extra > 0:
                cols[i] = (c, w + extra)
                used += extra
    return used


def fit(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[:max(0, width - 1)] + "~" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def _cell(c: Column, row: Row, width: int) -> str:
    if c.id == "busiest" and row.busiest and row.busiest_share is not None:
        full = c.get(row)
        if len(full) > width:               # keep the share: cut the name ("vga-lo~:42%")
            share = full[len(row.busiest):]
            room = width - len(share)
            if room >= 3:
                return fit(row.busiest[:room - 1] + "~" + share, width, c.right)
        return fit(full, width, c.right)
    return fit(c.get(row), width, c.right)


def render_row(row: Row, cols) -> str:
    """One table line. Child rows (vCPUs, ranges, addresses) have no ID, so their indented label
    takes the ID and NAME columns together (longer range names fit in 80 columns)."""
    if row.kind != "domain" and len(cols) >= 2 and cols[0][0].id == "domid" \
            and cols[1][0].id == "name":
        label = "  " * row.level + row.name
        first = fit(label, cols[0][1] + 1 + cols[1][1], False)
        rest = [_cell(c, row, w) for c, w in cols[2:]]
        return marker(row) + " ".join([first] + rest)
    return marker(row) + " ".join(_cell(c, row, w) for c, w in cols)


def render_header(cols) -> str:
    return "  " + " ".join(fit(c.header, w, c.right) for c, w in cols)
