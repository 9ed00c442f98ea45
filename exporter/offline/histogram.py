"""Service-time histograms as text, in the style of bcc's biolatency (print_log2_hist):
one line per power of two from the lowest to the highest non-empty one, the count, and a bar
of ``*`` scaled to the largest count (40 wide)::

         service time      : count    distribution
       8.19us -> 16.4us    : 12       |****                                    |
       16.4us -> 32.8us    : 101      |****************************************|

Lines are powers of two of nanoseconds, [lower, upper): the histogram's own slots folded into
them (``iotrace.core.aggregate``'s slots never straddle a power of two), so the lines are
biolatency's whatever the slots' resolution; the quantiles a report prints are read off the
slots themselves.
"""
from __future__ import annotations

import numpy as np

from iotrace.core.aggregate import SLOT_LOWER_NS

BAR_WIDTH = 40


def fmt_bound(ns: float) -> str:
    """A bucket bound in ns as a short duration: 512ns, 1.02us, 16.4us, 131us, 1.05ms."""
    if ns < 1000:
        return f"{ns:.0f}ns"
    for div, unit in ((1e3, "us"), (1e6, "ms"), (1e9, "s")):
        v = ns / div
        if v < 1000 or unit == "s":
            return f"{v:.{2 if v < 10 else 1 if v < 100 else 0}f}{unit}"
    return f"{ns:.0f}ns"  # pragma: no cover


def power_rows(hist: np.ndarray) -> list[tuple[int, int, int]]:
    """(lower_ns, upper_ns, count) per power of two, from the lowest non-empty to the highest
    (empty ones between kept); [] for an empty histogram. Row p covers [2^(p-1), 2^p) ns
    (p = 0: [0, 1))."""
    hist = np.asarray(hist, dtype=np.int64)
    power = np.array([int(lo).bit_length() for lo in SLOT_LOWER_NS], dtype=np.int64)
    per = np.bincount(power, weights=hist, minlength=int(power.max()) + 1).astype(np.int64)
    nz = np.flatnonzero(per)
    if not len(nz):
        return []
    return [(0 if p == 0 else 1 << (p - 1), 1 << p, int(per[p]))
            for p in range(int(nz[0]), int(nz[-1]) + 1)]


def render(hist: np.ndarray, indent: str = "    ", label: str = "service time") -> list[str]:
    """biolatency-style lines for one histogram (no lines when it is empty)."""
    rows = power_rows(hist)
    if not rows:
        return []
    los = [fmt_bound(lo) for lo, _, _ in rows]
    his = [fmt_bound(hi) for _, hi, _ in rows]
    wl, wh = max(len(x) for x in los), max(len(x) for x in his)
    labels = [f"{lo:>{wl}} -> {hi:<{wh}}" for lo, hi in zip(los, his)]
    width = max(len(label), wl + 4 + wh)
    top = max(c for _, _, c in rows)
    out = [f"{indent}{label:>{width}} : count    distribution"]
    for text, (_, _, c) in zip(labels, rows):
        stars = int(round(c * BAR_WIDTH / top)) if top else 0
        if c and not stars:
            stars = 1                     # a non-empty bucket always shows
        out.append(f"{indent}{text:>{width}} : {c:<8d} |{'*' * stars:<{BAR_WIDTH}}|")
    return out
