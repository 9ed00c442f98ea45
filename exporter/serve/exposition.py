"""The Prometheus text format (0.0.4) of iotrace's metrics, written fast.

``Family`` is one metric family of a collection: a few rows of (label values, value) and
column-wise blocks of series (``iotrace.serve.layout``). The helpers here write label sets and
numbers the way prometheus_client's text encoder does (tests/serve compare both), so a cached
line prefix plus a formatted value is a whole line.
"""
from __future__ import annotations

import numpy as np

from iotrace.core.metrics import BUCKET_BOUNDS_SECONDS, BY_NAME

HIST = "iotrace_ioreq_service_seconds"
FIRST = "iotrace_range_first_seen_timestamp_seconds"
FIRST_LABELS = BY_NAME[FIRST].labels
HIST_LABELS = BY_NAME[HIST].labels
BUCKET_LE = tuple(repr(b) for b in BUCKET_BOUNDS_SECONDS)
HIST_LINES = len(BUCKET_LE) + 3                  # buckets, +Inf, _count, _sum
PIECE_LINES = 8192       # ~1 MB of text: the scraper compresses a piece while the next is made


def hist_prefixes(name, labelnames, labels) -> tuple:
    """The line prefixes of one histogram series: its buckets, +Inf, _count and _sum."""
    le_names = labelnames + ("le",)
    return tuple("\n" + line_prefix(name + "_bucket", le_names, labels + (le,))
                 for le in BUCKET_LE + ("+Inf",)) + \
        ("\n" + line_prefix(name + "_count", labelnames, labels),
         "\n" + line_prefix(name + "_sum", labelnames, labels))


def pieces(prefixes: list, values: list):
    """The lines prefix+value, as strings of up to PIECE_LINES lines."""
    for i in range(0, len(prefixes), PIECE_LINES):
        pre = prefixes[i:i + PIECE_LINES]
        parts = [None] * (2 * len(pre))
        parts[0::2] = pre
        parts[1::2] = values[i:i + PIECE_LINES]
        yield "".join(parts)


class Family:
    """One metric family of a snapshot: rows of (label values, value), and blocks (column-wise
    series of one source, see ``_CounterBlock``/``_HistBlock``).

    Histogram rows hold (cumulative bucket counts, count, sum) as their value.
    """

    __slots__ = ("name", "type", "labelnames", "help", "rows", "blocks")

    def __init__(self, name, typ, labelnames, help_text):
        self.name, self.type, self.labelnames, self.help = name, typ, tuple(labelnames), help_text
        self.rows: list = []
        self.blocks: list = []

    def add(self, labels: tuple, value) -> None:
        self.rows.append((labels, value))

    def iter_samples(self):
        """(sample name, label names, label values, value) in exposition order."""
        names = self.labelnames
        if self.type == "counter":
            sname = self.name + "_total"
            for labels, value in self.rows:
                yield sname, names, labels, value
        elif self.type == "histogram":
            bname, cname, sname = (self.name + "_bucket", self.name + "_count",
                                   self.name + "_sum")
            le_names = names + ("le",)
            for labels, (buckets, n, total) in self.rows:
                for le, v in zip(BUCKET_LE, buckets):
                    yield bname, le_names, labels + (le,), v
                yield bname, le_names, labels + ("+Inf",), n
                yield cname, names, labels, n
                yield sname, names, labels, total
        else:
            for labels, value in self.rows:
                yield self.name, names, labels, value
        for block in self.blocks:
            yield from block.iter_samples(names)


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def line_prefix(name, names, values) -> str:
    if not names:
        return name + " "
    return name + "{" + ",".join(f'{n}="{escape_value(v)}"' for n, v in zip(names, values)) \
        + "} "


def fmt_value(value) -> str:
    if type(value) is int:
        return str(value)
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def fmt_values(values: list) -> list[str]:
    """``[fmt_value(v) for v in values]``, with NumPy finding the few values repr() does not write
    as fmt_value does (integral, NaN, infinite)."""
    if not values:
        return []
    a = np.asarray(values, dtype=np.float64)
    out = list(map(repr, a.tolist()))      # Python floats (whatever numbers came in)
    with np.errstate(invalid="ignore"):
        special = ~np.isfinite(a) | (a == np.trunc(a))
    for i in np.flatnonzero(special).tolist():
        out[i] = fmt_value(values[i])
    return out
