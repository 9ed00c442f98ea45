"""The rows ``top`` shows and its columns: one table of fields for the view, the batch text and
the sorting (as xentop's fields table), and the number formats they share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from iotrace.core.filters import FilterError


@dataclass
class Row:
    kind: str                   # domain | vcpu | range | addr
    level: int                  # 0 for domains, 1 for vCPUs and ranges, 2 for addresses
    domid: int
    name: str                   # domain name; "vcpu N"; range name; address in hex
    reqs: int = 0               # totals since the source started
    bytes: int = 0
    req_rate: float | None = None
    byte_rate: float | None = None
    read_rate: float | None = None
    write_rate: float | None = None
    busiest: str = ""           # busiest range (domain, vCPU rows) or address (range rows)
    busiest_share: float | None = None
    p50: float | None = None    # seconds, over the interval
    p95: float | None = None
    avg: float | None = None
    lost: int | None = None     # events lost (per domain when the source knows, else None)
    vcpus: int | None = 0       # None when the source does not know vCPUs
    probes: int | None = None
    expanded: frozenset = frozenset()
    flags: frozenset = frozenset()   # "lost", "slow", "unprobed"
    ident: tuple = ()

    def sort_value(self, attr: str):
        v = getattr(self, attr)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return v


def fmt_count(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if x < 10 and x != int(x):
        return f"{x:.1f}"
    if x < 10000:
        return f"{x:.0f}"
    for div, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G")):
        if x < div * 1000:
            return f"{x / div:.1f}{unit}" if x / div < 100 else f"{x / div:.0f}{unit}"
    return f"{x / 1e12:.0f}T"


def fmt_bytes(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x < 1024:
        return f"{x:.0f}" if x >= 10 or x == int(x) else f"{x:.1f}"
    for unit in "KMGT":
        x /= 1024.0
        if x < 1024 or unit == "T":
            return f"{x:.1f}{unit}" if x < 100 else f"{x:.0f}{unit}"
    return "-"  # pragma: no cover


def fmt_secs(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-6:
        return f"{s * 1e9:.0f}ns"
    if s < 1e-3:
        us = s * 1e6
        return f"{us:.1f}us" if us < 100 else f"{us:.0f}us"
    if s < 1:
        ms = s * 1e3
        return f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"
    return f"{s:.2f}s"


def fmt_busiest(row: Row) -> str:
    if not row.busiest:
        return "-"
    if row.busiest_share is None:
        return row.busiest
    return f"{row.busiest}:{row.busiest_share * 100:.0f}%"


@dataclass(frozen=True)
class Column:
    id: str                   # the Row attribute it shows (and sorts by)
    header: str
    width: int
    right: bool               # right-aligned (numbers)
    wide_only: bool           # shown only when the terminal has room
    get: Callable[[Row], str]
    sort: str | None = None   # its --sort / 's' key name, if rows can be sorted by it
    descending: bool = True   # the sort's default direction
    means: str = ""           # what the sort orders by (shown when it is picked)
    # The raw value, for batch text, CSV and JSON: rate (per second, float), count (int), bytes
    # (int), seconds (float), text. None: unknown. Batch text writes seconds in microseconds.
    kind: str = "text"
    domain_only: bool = False  # a domain row's value only (vCPU, range, address rows: unknown)

    def raw(self, row: Row):
        """The value behind the cell, unformatted (None when unknown)."""
        if self.domain_only and row.kind != "domain":
            return None
        if self.id == "busiest":
            if not row.busiest:
                return None
            return row.busiest if row.busiest_share is None else \
                f"{row.busiest}:{row.busiest_share * 100:.1f}%"
        v = getattr(row, self.id)
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    @property
    def batch_header(self) -> str:
        return self.header + "us" if self.kind == "seconds" else self.header

    @property
    def field(self) -> str:
        """Its name in CSV and JSON (base units: per second, seconds, bytes)."""
        return {"req_rate": "req_per_second", "byte_rate": "bytes_per_second",
                "read_rate": "reads_per_second", "write_rate": "writes_per_second",
                "p50": "p50_seconds", "p95": "p95_seconds", "avg": "avg_seconds",
                "reqs": "reqs_total", "bytes": "bytes_total"}.get(self.id, self.id)


def _label(row: Row) -> str:
    return ("  " * row.level) + row.name


COLUMNS = [
    Column("domid", "ID", 5, True, False,
           lambda r: str(r.domid) if r.kind == "domain" else "", "domid", False, "domain id",
           "count"),
    Column("name", "NAME", 10, False, False, _label, "name", False, "domain name"),
    Column("req_rate", "REQ/s", 7, True, False, lambda r: fmt_count(r.req_rate), "reqs", True,
           "requests/s", "rate"),
    Column("byte_rate", "BYTES/s", 7, True, False, lambda r: fmt_bytes(r.byte_rate), "bytes",
           True, "bytes/s", "rate"),
    Column("read_rate", "RD/s", 6, True, False, lambda r: fmt_count(r.read_rate), "reads", True,
           "reads/s", "rate"),
    Column("write_rate", "WR/s", 6, True, False, lambda r: fmt_count(r.write_rate), "writes",
           True, "writes/s", "rate"),
    Column("busiest", "BUSIEST", 11, False, False, fmt_busiest),
    Column("p50", "P50", 6, True, False, lambda r: fmt_secs(r.p50), "p50", True,
           "service time p50", "seconds"),
    Column("p95", "P95", 6, True, False, lambda r: fmt_secs(r.p95), "p95", True,
           "service time p95", "seconds"),
    Column("lost", "LOST", 4, True, False,
           lambda r: "-" if r.lost is None else fmt_count(r.lost), "lost", True, "lost events",
           "count"),
    Column("reqs", "REQS", 8, True, True, lambda r: fmt_count(r.reqs), "total", True,
           "requests since start", "count"),
    Column("bytes", "BYTES", 7, True, True, lambda r: fmt_bytes(r.bytes), kind="bytes"),
    Column("avg", "AVG", 6, True, True, lambda r: fmt_secs(r.avg), kind="seconds"),
    Column("vcpus", "VCPUS", 5, True, True,
           lambda r: ("-" if r.vcpus is None else str(r.vcpus)) if r.kind == "domain" else "",
           kind="count", domain_only=True),
    Column("probes", "PROBES", 6, True, True,
           lambda r: "" if r.kind != "domain" or r.probes is None else str(r.probes),
           kind="count", domain_only=True),
]


def marker(row: Row) -> str:
    """Two leading characters: '!' for attention (lost events, slow p95), '+'/'-' for expansion."""
    attn = "!" if row.flags else " "
    if row.kind != "domain":
        return attn + " "
    return attn + ("-" if row.expanded else "+")


# The sort keys in the order 's' cycles through them; each is a column's (one table for the
# columns and the sorting, as xentop has).
SORT_ORDER = ["reqs", "bytes", "reads", "writes", "p95", "p50", "total", "lost", "domid", "name"]
# sort key -> (row attribute, descending by default, what it orders by)
SORT_KEYS = {c.sort: (c.id, c.descending, c.means) for c in COLUMNS if c.sort}
assert set(SORT_KEYS) == set(SORT_ORDER), "every sort key is a column's"
SORT_KEYS = {k: SORT_KEYS[k] for k in SORT_ORDER}


def check_sort(key: str) -> str:
    k = key.lower()
    if k not in SORT_KEYS:
        raise FilterError(f"sort: expected one of {', '.join(SORT_ORDER)}, got {key!r}")
    return k


def damage_text(st, skipped: str, truncated: str) -> str:
    """What a source's input damage says on a source line ("" when none): ``skipped`` is
    formatted with the chunks skipped, ``truncated`` added when the input was cut short."""
    damage = getattr(st, "damage", None) or {}
    out = skipped.format(damage["skipped_chunk"]) if damage.get("skipped_chunk") else ""
    return out + (truncated if damage.get("truncated") else "")
