"""The data behind ``iotrace top``: rates from successive totals, filters, sorting, expansion.

Pure (no terminal, no clock of its own): the view and the batch printer feed it ``Snapshot`` s taken
from a source (``take_snapshot``) and render the ``Row`` s it builds. Everything here is testable
with hand-made totals.

Rates are differences of successive cumulative totals divided by the wall time between the two
reads, as Prometheus' ``rate()`` does; a counter that went down (source restarted, domain dropped
and re-created) counts from zero again instead of giving a negative rate. Service-time quantiles
(p50/p95) are read off the log2 histogram of the *interval* (the difference of the two cumulative
histograms), so they describe what happened since the last refresh; with no request served in the
interval they show as unknown.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .aggregate import Cell, Key
from .events import DIR_READ, DIR_WRITE, TYPE_CODES, TYPE_NAMES, type_name
from .source import DomainInfo, SourceStats

# How many addresses an expanded range lists (the busiest ones).
ADDR_ROWS = 5


# -- snapshots -----------------------------------------------------------------------------------
@dataclass
class Snapshot:
    t: float                              # monotonic seconds when it was read
    wall: float                           # time.time() when it was read
    totals: dict[Key, Cell]
    domains: dict[int, DomainInfo]
    stats: list[SourceStats]
    host: str = ""


def _read(src) -> tuple[dict[Key, Cell], dict[int, DomainInfo], SourceStats]:
    scrape = getattr(src, "scrape", None)     # iotrace.metrics_client.RemoteSource
    if scrape is not None:
        scrape()
    return src.totals(), src.domains(), src.stats()


def _merge(parts, clock, host) -> Snapshot:
    totals: dict[Key, Cell] = {}
    domains: dict[int, DomainInfo] = {}
    stats: list[SourceStats] = []
    for src_totals, src_domains, src_stats in parts:
        for key, cell in src_totals.items():
            mine = totals.get(key)
            if mine is None:
                totals[key] = copy.deepcopy(cell)
            else:
                mine.add(cell)
        for domid, info in src_domains.items():
            domains.setdefault(domid, info)
        stats.append(src_stats)
    return Snapshot(clock(), time.time(), totals, domains, stats,
                    host if host is not None else socket.gethostname())


def take_snapshot(sources: Iterable, clock: Callable[[], float] = time.monotonic,
                  host: str | None = None) -> Snapshot:
    """Read totals, domains and stats of every source (remote ones are scraped first)."""
    return _merge([_read(src) for src in sources], clock, host)


class Sampler:
    """``take_snapshot`` that survives a source failing at run time: that source keeps its last
    totals (so no rate spike when it comes back) and shows as down with the error."""

    def __init__(self, sources, clock: Callable[[], float] = time.monotonic,
                 host: str | None = None):
        self.sources = list(sources)
        self.clock, self.host = clock, host
        self._last: dict[int, tuple] = {}

    def __call__(self) -> Snapshot:
        parts = []
        for i, src in enumerate(self.sources):
            try:
                part = _read(src)
            except Exception as exc:  # a bug or a dead source must not take the view down
                totals, domains, st = self._last.get(
                    i, ({}, {}, SourceStats(getattr(src, "name", "?"))))
                st = copy.deepcopy(st)
                st.up = False
                st.error = f"reading the source failed: {type(exc).__name__}: {exc}"
                part = (totals, domains, st)
            else:
                self._last[i] = part
            parts.append(part)
        return _merge(parts, self.clock, self.host)


def delta_cell(cur: Cell, prev: Cell | None) -> Cell:
    """cur - prev, restarting from zero where a counter went down (a reset, as in rate())."""
    if prev is None or cur.count < prev.count or cur.service_n < prev.service_n \
            or cur.bytes < prev.bytes:
        return Cell(cur.count, cur.bytes, cur.service_n, cur.service_sum_ns, cur.hist.copy())
    hist = cur.hist - prev.hist
    if (hist < 0).any():
        hist = cur.hist.copy()
    return Cell(cur.count - prev.count, cur.bytes - prev.bytes, cur.service_n - prev.service_n,
                cur.service_sum_ns - prev.service_sum_ns, hist)


# -- filters -------------------------------------------------------------------------------------
@dataclass
class Filter:
    """Which traffic to show. Empty sets mean 'all'. Domains match by id or by name (glob)."""
    domains: list[str] = field(default_factory=list)
    vcpus: set[int] = field(default_factory=set)
    ranges: list[str] = field(default_factory=list)     # glob patterns on range names
    types: set[int] = field(default_factory=set)

    def active(self) -> bool:
        return bool(self.domains or self.vcpus or self.ranges or self.types)

    def traffic_filtered(self) -> bool:
        """True when something other than the domain is filtered (idle domains are then hidden)."""
        return bool(self.vcpus or self.ranges or self.types)

    def match_domain(self, domid: int, name: str) -> bool:
        if not self.domains:
            return True
        for pat in self.domains:
            if pat == str(domid) or fnmatch.fnmatchcase(name, pat):
                return True
        return False

    def match_key(self, key: Key) -> bool:
        if self.vcpus and key.vcpu not in self.vcpus:
            return False
        if self.types and key.type not in self.types:
            return False
        if self.ranges and not any(fnmatch.fnmatchcase(key.range, p) for p in self.ranges):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.domains:
            parts.append("domain=" + ",".join(self.domains))
        if self.vcpus:
            parts.append("vcpu=" + ",".join(str(v) for v in sorted(self.vcpus)))
        if self.ranges:
            parts.append("range=" + ",".join(self.ranges))
        if self.types:
            parts.append("type=" + ",".join(type_name(t) for t in sorted(self.types)))
        return " ".join(parts)


class FilterError(ValueError):
    """A filter the operator typed is malformed; str() is the one line to show."""


def _split(values: Iterable[str]) -> list[str]:
    out = []
    for v in values:
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return out


def parse_vcpus(values: Iterable[str]) -> set[int]:
    out = set()
    for v in _split(values):
        try:
            n = int(v, 0)
        except ValueError:
            raise FilterError(f"vcpu: expected a vCPU number (or -1 for unknown), got {v!r}") from None
        if n < -1:
            raise FilterError(f"vcpu: expected a vCPU number (or -1 for unknown), got {v!r}")
        out.add(n)
    return out


def parse_types(values: Iterable[str]) -> set[int]:
    out = set()
    for v in _split(values):
        name = v.lower().replace("-", "_")
        if name in ("copy", "mem"):
            name = "mmio"
        if name not in TYPE_CODES:
            raise FilterError(f"type: expected one of {', '.join(TYPE_NAMES.values())}, got {v!r}")
        out.add(TYPE_CODES[name])
    return out


def make_filter(domains=(), vcpus=(), ranges=(), types=()) -> Filter:
    return Filter(_split(domains), parse_vcpus(vcpus), _split(ranges), parse_types(types))


def parse_filter_spec(text: str, base: Filter | None = None) -> Filter:
    """Parse what the operator types at the filter prompt: ``domain=web vcpu=0,1 range=com* type=pio``.

    A bare word is a domain. ``field=`` with nothing clears that field. Unknown fields are errors.
    """
    f = Filter(list(base.domains), set(base.vcpus), list(base.ranges), set(base.types)) \
        if base else Filter()
    for word in text.split():
        name, eq, value = word.partition("=")
        if not eq:
            name, value = "domain", word
        name = name.lower()
        if name in ("d", "dom", "domain"):
            f.domains = _split([value])
        elif name in ("v", "vcpu"):
            f.vcpus = parse_vcpus([value])
        elif name in ("r", "range"):
            f.ranges = _split([value])
        elif name in ("t", "type"):
            f.types = parse_types([value])
        else:
            raise FilterError(f"unknown filter field {name!r} (use domain=, vcpu=, range=, type=)")
    return f


# -- sorting -------------------------------------------------------------------------------------
# sort key -> (row attribute, descending by default, description)
SORT_KEYS = {
    "reqs": ("req_rate", True, "requests/s"),
    "bytes": ("byte_rate", True, "bytes/s"),
    "reads": ("read_rate", True, "reads/s"),
    "writes": ("write_rate", True, "writes/s"),
    "p95": ("p95", True, "service time p95"),
    "p50": ("p50", True, "service time p50"),
    "total": ("reqs", True, "requests since start"),
    "lost": ("lost", True, "lost events"),
    "domid": ("domid", False, "domain id"),
    "name": ("name", False, "domain name"),
}
SORT_ORDER = list(SORT_KEYS)


def check_sort(key: str) -> str:
    k = key.lower()
    if k not in SORT_KEYS:
        raise FilterError(f"sort: expected one of {', '.join(SORT_ORDER)}, got {key!r}")
    return k


# -- rows ----------------------------------------------------------------------------------------
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
    vcpus: int = 0
    probes: int | None = None
    expanded: frozenset = frozenset()
    flags: frozenset = frozenset()   # "lost", "slow"
    ident: tuple = ()

    def sort_value(self, attr: str):
        v = getattr(self, attr)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        return v


@dataclass
class _Acc:
    total: Cell = field(default_factory=Cell)
    delta: Cell = field(default_factory=Cell)
    reads: int = 0
    writes: int = 0


def _acc_add(acc: _Acc, key: Key, total: Cell, delta: Cell) -> None:
    acc.total.add(total)
    acc.delta.add(delta)
    if key.dir == DIR_READ:
        acc.reads += delta.count
    elif key.dir == DIR_WRITE:
        acc.writes += delta.count


EXPANSIONS = ("vcpu", "range", "addr")


@dataclass
class View:
    """What one refresh shows: the rows in display order plus header facts."""
    rows: list[Row]
    snapshot: Snapshot
    elapsed: float | None
    total_req_rate: float | None
    total_byte_rate: float | None
    total_read_rate: float | None
    total_write_rate: float | None
    total_reqs: int
    lost_delta: dict[str, int]
    domains_shown: int


class Model:
    """Keeps the previous snapshot and turns each new one into rows."""

    def __init__(self, slow_p95: float = 1e-3, sort: str = "reqs", reverse: bool = False,
                 filt: Filter | None = None, per_vcpu_service: bool = True):
        self.prev: Snapshot | None = None
        self.cur: Snapshot | None = None
        self.deltas: dict[Key, Cell] = {}
        self.slow_p95 = slow_p95
        self.sort = check_sort(sort)
        self.reverse = reverse
        self.filter = filt or Filter()
        self.expanded: dict[int, set[str]] = {}   # domid -> subset of EXPANSIONS
        self.expand_all: set[str] = set()

    # -- state ---------------------------------------------------------------------------------
    def update(self, snap: Snapshot) -> None:
        """Take a new snapshot; rates are computed against the previous one."""
        self.prev, self.cur = self.cur, snap
        prev_totals = self.prev.totals if self.prev else {}
        if self.prev is None:
            self.deltas = {}
        else:
            self.deltas = {k: delta_cell(c, prev_totals.get(k)) for k, c in snap.totals.items()}

    @property
    def elapsed(self) -> float | None:
        if self.prev is None or self.cur is None:
            return None
        dt = self.cur.t - self.prev.t
        return dt if dt > 0 else None

    def toggle(self, domid: int, what: str) -> None:
        if what not in EXPANSIONS:
            raise ValueError(what)
        s = self.expanded.setdefault(domid, set(self.expand_all))
        if what in s:
            s.discard(what)
            if what == "range":
                s.discard("addr")
        else:
            s.add(what)
            if what == "addr":
                s.add("range")

    def toggle_all(self, what: str) -> None:
        on = what not in self.expand_all
        targets = set(self.expanded)
        if on:
            self.expand_all.add(what)
            if what == "addr":
                self.expand_all.add("range")
        else:
            self.expand_all.discard(what)
            if what == "range":
                self.expand_all.discard("addr")
        for domid in targets:
            s = self.expanded[domid]
            if on:
                s.add(what)
                if what == "addr":
                    s.add("range")
            else:
                s.discard(what)
                if what == "range":
                    s.discard("addr")

    def expansion(self, domid: int) -> set[str]:
        return self.expanded.get(domid, self.expand_all)

    def cycle_sort(self, step: int = 1) -> None:
        i = SORT_ORDER.index(self.sort)
        self.sort = SORT_ORDER[(i + step) % len(SORT_ORDER)]

    # -- rows ----------------------------------------------------------------------------------
    def _rate(self, n: int) -> float | None:
        dt = self.elapsed
        return n / dt if dt else None

    def _fill(self, row: Row, acc: _Acc, service: bool = True) -> Row:
        row.reqs, row.bytes = acc.total.count, acc.total.bytes
        row.req_rate = self._rate(acc.delta.count)
        row.byte_rate = self._rate(acc.delta.bytes)
        row.read_rate = self._rate(acc.reads)
        row.write_rate = self._rate(acc.writes)
        if service and acc.delta.service_n:
            row.p50 = acc.delta.service_quantile_seconds(0.50)
            row.p95 = acc.delta.service_quantile_seconds(0.95)
            row.avg = acc.delta.service_avg_seconds()
        flags = set(row.flags)
        if row.p95 is not None and row.p95 >= self.slow_p95:
            flags.add("slow")
        row.flags = frozenset(flags)
        return row

    @staticmethod
    def _busiest(groups: dict, label=lambda k: str(k)) -> tuple[str, float | None]:
        """The group with the most requests in the interval (else since start), and its share."""
        best, best_n, total = None, -1, 0
        use_delta = any(a.delta.count for a in groups.values())
        for k, a in groups.items():
            n = a.delta.count if use_delta else a.total.count
            total += n
            if n > best_n or (n == best_n and best is not None and label(k) < label(best)):
                best, best_n = k, n
        if best is None or best_n <= 0:
            return "", None
        return label(best), best_n / total if total else None

    def _sorted(self, rows: list[Row], attr: str | None = None, desc: bool | None = None):
        if attr is None:
            attr, desc, _ = SORT_KEYS[self.sort]
            if self.reverse:
                desc = not desc
        present = [r for r in rows if r.sort_value(attr) is not None]
        missing = [r for r in rows if r.sort_value(attr) is None]
        # Ties: busier since start first, then by id/name, so the order is stable between refreshes.
        present.sort(key=lambda r: (r.domid, r.name))
        present.sort(key=lambda r: r.reqs, reverse=True)
        present.sort(key=lambda r: r.sort_value(attr), reverse=bool(desc))
        missing.sort(key=lambda r: (r.domid, r.name))
        missing.sort(key=lambda r: r.reqs, reverse=True)
        return present + missing

    def view(self) -> View:
        snap = self.cur
        if snap is None:
            raise RuntimeError("no snapshot yet")
        filt = self.filter
        empty = Cell()
        lost_by_dom: dict[int, int] = {}
        for st in snap.stats:
            for d, n in (st.extra.get("lost_by_domid") or {}).items():
                lost_by_dom[int(d)] = lost_by_dom.get(int(d), 0) + int(n)

        names = {d: info.name for d, info in snap.domains.items()}
        # Per-domain probe counts mean something only for sources that attach probes.
        has_probes = any(st.probes_attached or st.probes_failed for st in snap.stats)
        per_dom: dict[int, dict[Key, tuple[Cell, Cell]]] = {}
        for key, cell in snap.totals.items():
            name = names.get(key.domid, _default_name(key.domid))
            if not filt.match_domain(key.domid, name) or not filt.match_key(key):
                continue
            d = self.deltas.get(key, empty) if self.prev is not None else empty
            per_dom.setdefault(key.domid, {})[key] = (cell, d)
        if not filt.traffic_filtered():
            for domid, info in snap.domains.items():
                if filt.match_domain(domid, info.name):
                    per_dom.setdefault(domid, {})

        tops: list[Row] = []
        children: dict[int, list[Row]] = {}
        tot = _Acc()
        for domid, cells in per_dom.items():
            acc = _Acc()
            by_vcpu: dict[int, _Acc] = {}
            by_range: dict[str, _Acc] = {}
            by_addr: dict[tuple, _Acc] = {}
            for key, (total, delta) in cells.items():
                _acc_add(acc, key, total, delta)
                _acc_add(tot, key, total, delta)
                if total.count:      # service-only cells (remote histograms) carry no vCPU
                    _acc_add(by_vcpu.setdefault(key.vcpu, _Acc()), key, total, delta)
                _acc_add(by_range.setdefault(key.range, _Acc()), key, total, delta)
                if key.addr and total.count:
                    _acc_add(by_addr.setdefault((key.range, key.type, key.addr), _Acc()),
                             key, total, delta)
            info = snap.domains.get(domid)
            name = info.name if info else _default_name(domid)
            row = Row("domain", 0, domid, name, ident=("domain", domid),
                      vcpus=len([v for v in by_vcpu if v >= 0]),
                      probes=info.probes_attached if info and has_probes else None,
                      lost=lost_by_dom.get(domid) if lost_by_dom else None,
                      expanded=frozenset(self.expansion(domid)))
            if row.lost:
                row.flags = frozenset({"lost"})
            self._fill(row, acc)
            row.busiest, row.busiest_share = self._busiest(by_range)
            tops.append(row)

            exp = self.expansion(domid)
            kids: list[Row] = []
            if "vcpu" in exp:
                vrows = []
                for v, a in by_vcpu.items():
                    r = Row("vcpu", 1, domid, f"vcpu {v}" if v >= 0 else "vcpu ?",
                            ident=("vcpu", domid, v))
                    self._fill(r, a)
                    ranges_v: dict[str, _Acc] = {}
                    for key, (total, delta) in cells.items():
                        if key.vcpu == v and total.count:
                            _acc_add(ranges_v.setdefault(key.range, _Acc()), key, total, delta)
                    r.busiest, r.busiest_share = self._busiest(ranges_v)
                    vrows.append(r)
                vrows.sort(key=lambda r: (r.name == "vcpu ?", int(r.name.split()[1])
                                          if r.name != "vcpu ?" else 0))
                kids.extend(vrows)
            if "range" in exp:
                rrows = []
                for rng, a in by_range.items():
                    r = Row("range", 1, domid, rng, ident=("range", domid, rng))
                    self._fill(r, a)
                    addrs = {k: v for k, v in by_addr.items() if k[0] == rng}
                    r.busiest, r.busiest_share = self._busiest(addrs, lambda k: f"{k[2]:#x}")
                    r.addr_rows = addrs  # type: ignore[attr-defined]
                    rrows.append(r)
                for r in self._sorted(rrows):
                    kids.append(r)
                    if "addr" in exp:
                        arows = []
                        for (rng, typ, addr), a in r.addr_rows.items():  # type: ignore
                            ar = Row("addr", 2, domid, f"{addr:#x}",
                                     ident=("addr", domid, rng, typ, addr))
                            self._fill(ar, a)
                            arows.append(ar)
                        kids.extend(self._sorted(arows)[:ADDR_ROWS])
            children[domid] = kids

        rows: list[Row] = []
        for top in self._sorted(tops):
            rows.append(top)
            rows.extend(children.get(top.domid, []))

        lost_delta = {}
        prev_lost = {s.name: s.lost for s in self.prev.stats} if self.prev else {}
        for st in snap.stats:
            lost_delta[st.name] = max(0, st.lost - prev_lost.get(st.name, st.lost))
        return View(rows, snap, self.elapsed, self._rate(tot.delta.count),
                    self._rate(tot.delta.bytes), self._rate(tot.reads), self._rate(tot.writes),
                    tot.total.count, lost_delta, len(tops))


def _default_name(domid: int) -> str:
    if domid < 0:
        return "unknown"
    if domid == 32767:
        return "idle"
    return f"dom{domid}"


# -- formatting (shared by the curses view and the batch printer) -------------------------------
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
    id: str
    header: str
    width: int
    right: bool               # right-aligned (numbers)
    wide_only: bool           # shown only when the terminal has room
    get: Callable[[Row], str]


def _label(row: Row) -> str:
    return ("  " * row.level) + row.name


COLUMNS = [
    Column("domid", "ID", 5, True, False,
           lambda r: str(r.domid) if r.kind == "domain" else ""),
    Column("name", "NAME", 10, False, False, _label),
    Column("req_rate", "REQ/s", 7, True, False, lambda r: fmt_count(r.req_rate)),
    Column("byte_rate", "BYTES/s", 7, True, False, lambda r: fmt_bytes(r.byte_rate)),
    Column("read_rate", "RD/s", 6, True, False, lambda r: fmt_count(r.read_rate)),
    Column("write_rate", "WR/s", 6, True, False, lambda r: fmt_count(r.write_rate)),
    Column("busiest", "BUSIEST", 11, False, False, fmt_busiest),
    Column("p50", "P50", 6, True, False, lambda r: fmt_secs(r.p50)),
    Column("p95", "P95", 6, True, False, lambda r: fmt_secs(r.p95)),
    Column("lost", "LOST", 4, True, False,
           lambda r: "-" if r.lost is None else fmt_count(r.lost)),
    Column("reqs", "REQS", 8, True, True, lambda r: fmt_count(r.reqs)),
    Column("bytes", "BYTES", 7, True, True, lambda r: fmt_bytes(r.bytes)),
    Column("avg", "AVG", 6, True, True, lambda r: fmt_secs(r.avg)),
    Column("vcpus", "VCPUS", 5, True, True,
           lambda r: str(r.vcpus) if r.kind == "domain" else ""),
    Column("probes", "PROBES", 6, True, True,
           lambda r: "" if r.kind != "domain" or r.probes is None else str(r.probes)),
]


def marker(row: Row) -> str:
    """Two leading characters: '!' for attention (lost events, slow p95), '+'/'-' for expansion."""
    attn = "!" if row.flags else " "
    if row.kind != "domain":
        return attn + " "
    return attn + ("-" if row.expanded else "+")


def np_hist(counts: dict[int, int]) -> np.ndarray:
    """A log2 histogram from {slot: count} (helper for tests and remote sources)."""
    from .aggregate import N_SLOTS
    h = np.zeros(N_SLOTS, dtype=np.int64)
    for k, n in counts.items():
        h[k] += n
    return h
