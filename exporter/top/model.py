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

from iotrace.core.aggregate import N_SLOTS, Cell, Key, hist_quantile_ns
from iotrace.core.events import DIR_READ, DIR_WRITE, TYPE_CODES, TYPE_NAMES, type_name
from iotrace.core.source import DomainInfo, SourceStats

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
    scrape = getattr(src, "scrape", None)     # iotrace.sources.remote.RemoteSource
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


@dataclass
class _G:
    """Sums over a group of keys: totals since start, the interval's deltas, service stats."""
    reqs: int = 0
    bytes: int = 0
    d_count: int = 0
    d_bytes: int = 0
    reads: int = 0             # requests in the interval, by direction
    writes: int = 0
    svc_n: int = 0             # the interval's service times
    svc_sum: int = 0
    hist: np.ndarray | None = None
    svc_min: float = math.inf  # exact extremes since start, where the source keeps them
    svc_max: float = -math.inf


class _Frame:
    """A snapshot's totals as columns (one row per Key), with the deltas to the previous frame.

    Grouping is column-wise (``np.unique`` + ``bincount``/``reduceat``), so a refresh costs a few
    NumPy passes over all keys rather than Python work per key and group.
    """

    def __init__(self, totals: dict[Key, Cell], prev: "_Frame | None"):
        keys = list(totals)
        cells = [totals[k] for k in keys]
        n = len(keys)
        same_keys = prev is not None and prev.keys == keys   # the usual case between refreshes
        if same_keys:
            self.keys, self.index, self.range_names = prev.keys, prev.index, prev.range_names
            self.domid, self.vcpu, self.type = prev.domid, prev.vcpu, prev.type
            self.dir, self.range, self.addr = prev.dir, prev.range, prev.addr
        else:
            self.keys = keys
            self.index = {k: i for i, k in enumerate(keys)}
            self.range_names = sorted({k.range for k in keys})
            rix = {r: i for i, r in enumerate(self.range_names)}
            cols = np.array([(k.domid, k.vcpu, k.type, k.dir, rix[k.range]) for k in keys],
                            dtype=np.int64).reshape(n, 5)
            self.domid, self.vcpu, self.type, self.dir, self.range = \
                (cols[:, i] for i in range(5))
            self.addr = np.array([k.addr for k in keys], dtype=np.uint64)
        nums = np.array([(c.count, c.bytes, c.service_n, c.service_sum_ns) for c in cells],
                        dtype=np.int64).reshape(n, 4)
        self.count, self.bytes, self.svc_n, self.svc_sum = (nums[:, i] for i in range(4))
        self.hist = np.stack([c.hist for c in cells]).astype(np.int64) if n else \
            np.zeros((0, N_SLOTS), dtype=np.int64)
        self.svc_min = np.array([math.inf if getattr(c, "service_min_ns", None) is None
                                 else c.service_min_ns for c in cells], dtype=np.float64)
        self.svc_max = np.array([-math.inf if getattr(c, "service_max_ns", None) is None
                                 else c.service_max_ns for c in cells], dtype=np.float64)
        # Deltas: cur - prev per key; a key whose counters went down restarts from zero.
        if prev is None:
            self.has_prev = False
            self.d_count = np.zeros(n, dtype=np.int64)
            self.d_bytes = np.zeros(n, dtype=np.int64)
            self.d_svc_n = np.zeros(n, dtype=np.int64)
            self.d_svc_sum = np.zeros(n, dtype=np.int64)
            self.d_hist = np.zeros_like(self.hist)
            return
        self.has_prev = True
        j = np.arange(n, dtype=np.int64) if same_keys else \
            np.array([prev.index.get(k, -1) for k in keys], dtype=np.int64)
        had = j >= 0
        jj = np.where(had, j, 0)

        def sub(cur, old):
            if not len(old):
                return cur.copy()
            return cur - np.where(had.reshape((-1,) + (1,) * (cur.ndim - 1)), old[jj], 0)
        self.d_count = sub(self.count, prev.count)
        self.d_bytes = sub(self.bytes, prev.bytes)
        self.d_svc_n = sub(self.svc_n, prev.svc_n)
        self.d_svc_sum = sub(self.svc_sum, prev.svc_sum)
        self.d_hist = sub(self.hist, prev.hist)
        reset = (self.d_count < 0) | (self.d_bytes < 0) | (self.d_svc_n < 0)
        if len(self.d_hist):
            reset |= (self.d_hist < 0).any(axis=1)
        if reset.any():
            self.d_count[reset] = self.count[reset]
            self.d_bytes[reset] = self.bytes[reset]
            self.d_svc_n[reset] = self.svc_n[reset]
            self.d_svc_sum[reset] = self.svc_sum[reset]
            self.d_hist[reset] = self.hist[reset]

    def group(self, idx: np.ndarray, cols: list[np.ndarray], service: bool = True) -> dict:
        """Sums of the rows ``idx`` grouped by the given key columns: {tuple: _G}."""
        if not len(idx):
            return {}
        # One int64 code per row (mixed radix over each column's distinct values), so a single
        # 1-D np.unique does the grouping.
        code = np.zeros(len(idx), dtype=np.int64)
        levels = []
        for c in cols:
            vals, pos = np.unique(c[idx], return_inverse=True)
            levels.append(vals)
            code = code * len(vals) + pos.reshape(-1)
        ucode, inv = np.unique(code, return_inverse=True)
        inv = inv.reshape(-1)
        g = len(ucode)
        parts = []
        rest = ucode
        for vals in reversed(levels):
            parts.append(vals[rest % len(vals)])
            rest = rest // len(vals)
        uniq_cols = [p.tolist() for p in reversed(parts)]

        def bsum(arr):
            return np.bincount(inv, weights=arr[idx].astype(np.float64), minlength=g)
        reqs, nbytes = bsum(self.count), bsum(self.bytes)
        d_count, d_bytes = bsum(self.d_count), bsum(self.d_bytes)
        d_read = np.where(self.dir == DIR_READ, self.d_count, 0)
        d_write = np.where(self.dir == DIR_WRITE, self.d_count, 0)
        reads, writes = bsum(d_read), bsum(d_write)
        if service:
            svc_n, svc_sum = bsum(self.d_svc_n), bsum(self.d_svc_sum)
            order = np.argsort(inv, kind="stable")
            starts = np.searchsorted(inv[order], np.arange(g))
            rows = idx[order]
            hist = np.add.reduceat(self.d_hist[rows], starts, axis=0)
            smin = np.minimum.reduceat(self.svc_min[rows], starts)
            smax = np.maximum.reduceat(self.svc_max[rows], starts)
        out = {}
        for i, u in enumerate(zip(*uniq_cols)):
            gr = _G(int(reqs[i]), int(nbytes[i]), int(d_count[i]), int(d_bytes[i]),
                    int(reads[i]), int(writes[i]))
            if service:
                gr.svc_n, gr.svc_sum, gr.hist = int(svc_n[i]), int(svc_sum[i]), hist[i]
                gr.svc_min, gr.svc_max = float(smin[i]), float(smax[i])
            out[u] = gr
        return out


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
    # domid -> why its device model is not probed (DomainInfo.probe_error), domains shown only
    unprobed: dict[int, str] = field(default_factory=dict)


class Model:
    """Keeps the previous snapshot and turns each new one into rows."""

    def __init__(self, slow_p95: float = 1e-3, sort: str = "reqs", reverse: bool = False,
                 filt: Filter | None = None, per_vcpu_service: bool = True):
        self.prev: Snapshot | None = None
        self.cur: Snapshot | None = None
        self.frame: _Frame | None = None
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
        self.frame = _Frame(snap.totals, self.frame if self.prev is not None else None)

    @property
    def elapsed(self) -> float | None:
        if self.prev is None or self.cur is None:
            return None
        dt = self.cur.t - self.prev.t
        return dt if dt > 0 else None

    @staticmethod
    def _set(s: set[str], what: str, on: bool) -> None:
        """Turn one expansion on or off, with its implication: addresses live inside ranges."""
        if on:
            s.add(what)
            if what == "addr":
                s.add("range")
        else:
            s.discard(what)
            if what == "range":
                s.discard("addr")

    def toggle(self, domid: int, what: str) -> None:
        if what not in EXPANSIONS:
            raise ValueError(what)
        s = self.expanded.setdefault(domid, set(self.expand_all))
        self._set(s, what, what not in s)

    def toggle_all(self, what: str) -> None:
        on = what not in self.expand_all
        self._set(self.expand_all, what, on)
        for s in self.expanded.values():
            self._set(s, what, on)

    def expansion(self, domid: int) -> set[str]:
        return self.expanded.get(domid, self.expand_all)

    def cycle_sort(self, step: int = 1) -> None:
        i = SORT_ORDER.index(self.sort)
        self.sort = SORT_ORDER[(i + step) % len(SORT_ORDER)]

    # -- rows ----------------------------------------------------------------------------------
    def _rate(self, n: int) -> float | None:
        dt = self.elapsed
        return n / dt if dt else None

    def _fill(self, row: Row, g: _G) -> Row:
        row.reqs, row.bytes = g.reqs, g.bytes
        row.req_rate = self._rate(g.d_count)
        row.byte_rate = self._rate(g.d_bytes)
        row.read_rate = self._rate(g.reads)
        row.write_rate = self._rate(g.writes)
        if g.svc_n and g.hist is not None:
            lo = g.svc_min if g.svc_min != math.inf else 0.0
            hi = g.svc_max if g.svc_max != -math.inf else math.inf
            row.p50 = min(max(hist_quantile_ns(g.hist, 0.50), lo), hi) / 1e9
            row.p95 = min(max(hist_quantile_ns(g.hist, 0.95), lo), hi) / 1e9
            row.avg = g.svc_sum / g.svc_n / 1e9
        flags = set(row.flags)
        if row.p95 is not None and row.p95 >= self.slow_p95:
            flags.add("slow")
        row.flags = frozenset(flags)
        return row

    @staticmethod
    def _busiest(groups: dict, label=lambda k: str(k)) -> tuple[str, float | None]:
        """The group with the most requests in the interval (else since start), and its share."""
        best, best_n, total = None, -1, 0
        use_delta = any(a.d_count for a in groups.values())
        for k, a in groups.items():
            n = a.d_count if use_delta else a.reqs
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
        snap, fr = self.cur, self.frame
        if snap is None or fr is None:
            raise RuntimeError("no snapshot yet")
        filt = self.filter
        lost_by_dom: dict[int, int] = {}
        for st in snap.stats:
            for d, n in (st.extra.get("lost_by_domid") or {}).items():
                lost_by_dom[int(d)] = lost_by_dom.get(int(d), 0) + int(n)
        names = {d: info.name for d, info in snap.domains.items()}
        # Per-domain probe counts mean something only for sources that attach probes.
        has_probes = any(st.probes_attached or st.probes_failed for st in snap.stats)

        # Which keys pass the filter (column-wise; names and globs once per distinct value).
        sel = np.ones(len(fr.keys), dtype=bool)
        if filt.domains:
            doms = np.unique(fr.domid)
            ok = [d for d in doms.tolist()
                  if filt.match_domain(d, names.get(d, _default_name(d)))]
            sel &= np.isin(fr.domid, ok)
        if filt.vcpus:
            sel &= np.isin(fr.vcpu, list(filt.vcpus))
        if filt.types:
            sel &= np.isin(fr.type, list(filt.types))
        if filt.ranges:
            ok = [i for i, r in enumerate(fr.range_names)
                  if any(fnmatch.fnmatchcase(r, p) for p in filt.ranges)]
            sel &= np.isin(fr.range, ok)
        idx = np.nonzero(sel)[0]
        with_reqs = idx[fr.count[idx] > 0]   # service-only cells (remote) carry no vCPU/address

        by_dom = {k[0]: g for k, g in fr.group(idx, [fr.domid]).items()}
        dom_range = fr.group(idx, [fr.domid, fr.range], service=False)
        tot = _G()
        for g in by_dom.values():
            for f in ("reqs", "bytes", "d_count", "d_bytes", "reads", "writes"):
                setattr(tot, f, getattr(tot, f) + getattr(g, f))
        domids = set(by_dom)
        if not filt.traffic_filtered():
            domids |= {d for d, info in snap.domains.items() if filt.match_domain(d, info.name)}

        rname = fr.range_names
        ranges_of: dict[int, dict] = {}
        for (d, r), g in dom_range.items():
            ranges_of.setdefault(d, {})[rname[r]] = g
        tops: list[Row] = []
        for domid in domids:
            g = by_dom.get(domid, _G())
            info = snap.domains.get(domid)
            exp = self.expansion(domid)
            row = Row("domain", 0, domid, info.name if info else _default_name(domid),
                      ident=("domain", domid),
                      probes=info.probes_attached if info and has_probes else None,
                      lost=lost_by_dom.get(domid) if lost_by_dom else None,
                      expanded=frozenset(exp))
            if row.lost:
                row.flags = frozenset({"lost"})
            if info is not None and info.probe_error:
                row.flags = row.flags | {"unprobed"}
            self._fill(row, g)
            row.busiest, row.busiest_share = self._busiest(ranges_of.get(domid, {}))
            tops.append(row)

        # Children, only for the domains that are expanded.
        expanded = {r.domid: self.expansion(r.domid) for r in tops if self.expansion(r.domid)}
        vcpus_of: dict[int, int] = {}
        mine = with_reqs[np.isin(fr.domid[with_reqs], list(expanded))] if expanded else with_reqs[:0]
        vc = fr.group(mine, [fr.domid, fr.vcpu])
        for (d, v) in vc:
            vcpus_of[d] = vcpus_of.get(d, 0) + (v >= 0)
        nv = fr.group(with_reqs, [fr.domid, fr.vcpu], service=False)
        counts_v: dict[int, int] = {}
        for (d, v) in nv:
            if v >= 0:
                counts_v[d] = counts_v.get(d, 0) + 1
        per_vcpu = not any(st.extra.get("no_vcpu_label") for st in snap.stats)
        for r in tops:
            r.vcpus = counts_v.get(r.domid, 0) if per_vcpu else None
        want_v = [d for d, e in expanded.items() if "vcpu" in e]
        want_r = [d for d, e in expanded.items() if "range" in e]
        vr = fr.group(mine[np.isin(fr.domid[mine], want_v)], [fr.domid, fr.vcpu, fr.range],
                      service=False) if want_v else {}
        rg = fr.group(idx[np.isin(fr.domid[idx], want_r)], [fr.domid, fr.range]) \
            if want_r else {}
        ad = fr.group(mine[np.isin(fr.domid[mine], want_r) & (fr.addr[mine] != 0)],
                      [fr.domid, fr.range, fr.type, fr.addr]) if want_r else {}

        vc_of: dict[int, list] = {}
        for k in vc:
            vc_of.setdefault(k[0], []).append(k)
        vr_of: dict[tuple, dict] = {}
        for (d, v, r), g in vr.items():
            vr_of.setdefault((d, v), {})[rname[r]] = g
        rg_of: dict[int, list] = {}
        for k, g in rg.items():
            rg_of.setdefault(k[0], []).append((k, g))
        ad_of: dict[tuple, dict] = {}
        for x, g in ad.items():
            ad_of.setdefault((x[0], x[1]), {})[x] = g
        children: dict[int, list[Row]] = {}
        for domid, exp in expanded.items():
            kids: list[Row] = []
            if "vcpu" in exp:
                vkeys = sorted(vc_of.get(domid, []), key=lambda k: (k[1] < 0, k[1]))
                for k in vkeys:
                    v = k[1]
                    r = Row("vcpu", 1, domid, f"vcpu {v}" if v >= 0 else "vcpu ?",
                            ident=("vcpu", domid, v))
                    self._fill(r, vc[k])
                    r.busiest, r.busiest_share = self._busiest(vr_of.get((domid, v), {}))
                    kids.append(r)
            if "range" in exp:
                rrows = []
                addr_rows: dict[int, dict] = {}
                for k, g in rg_of.get(domid, []):
                    r = Row("range", 1, domid, rname[k[1]], ident=("range", domid, rname[k[1]]))
                    self._fill(r, g)
                    addrs = ad_of.get((domid, k[1]), {})
                    r.busiest, r.busiest_share = self._busiest(
                        addrs, lambda x: f"{int(x[3]) & 0xFFFFFFFFFFFFFFFF:#x}")
                    addr_rows[k[1]] = addrs
                    rrows.append(r)
                rix = {n: i for i, n in enumerate(rname)}
                for r in self._sorted(rrows):
                    kids.append(r)
                    if "addr" in exp:
                        arows = []
                        for x, ga in addr_rows[rix[r.name]].items():
                            a_ = int(x[3]) & 0xFFFFFFFFFFFFFFFF
                            ar = Row("addr", 2, domid, f"{a_:#x}",
                                     ident=("addr", domid, r.name, int(x[2]), a_))
                            self._fill(ar, ga)
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
        unprobed = {r.domid: snap.domains[r.domid].probe_error for r in tops
                    if "unprobed" in r.flags}
        return View(rows, snap, self.elapsed, self._rate(tot.d_count),
                    self._rate(tot.d_bytes), self._rate(tot.reads), self._rate(tot.writes),
                    tot.reqs, lost_delta, len(tops), unprobed)


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
           lambda r: ("-" if r.vcpus is None else str(r.vcpus)) if r.kind == "domain" else ""),
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
    from iotrace.core.aggregate import N_SLOTS
    h = np.zeros(N_SLOTS, dtype=np.int64)
    for k, n in counts.items():
        h[k] += n
    return h
