"""The data behind ``iotrace top``: rates from successive totals, filters, sorting, expansion.

Pure (no terminal, no clock of its own): the view and the batch printer feed it ``Snapshot`` s taken
from a source (``iotrace.top.snapshot``) and render the ``Row`` s it builds (``iotrace.top.columns``).
Everything here is testable with hand-made totals.

Rates are differences of successive cumulative totals divided by the wall time between the two
reads, as Prometheus' ``rate()`` does; a counter that went down (source restarted, domain dropped
and re-created) counts from zero again instead of giving a negative rate (``iotrace.top.frame``).
Service-time quantiles (p50/p95) are read off the log-linear histogram of the *interval* (the difference
of the two cumulative histograms), so they describe what happened since the last refresh; with no
request served in the interval they show as unknown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from iotrace.core.aggregate import hist_quantile_ns
from iotrace.core.domains import fallback_name
from iotrace.core.events import format_address
from iotrace.core.filters import Filter
from iotrace.top.columns import SORT_KEYS, SORT_ORDER, Row, check_sort
from iotrace.top.frame import Frame, Group
from iotrace.top.snapshot import Snapshot

# How many addresses an expanded range lists (the busiest ones).
ADDR_ROWS = 5

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
        self.frame: Frame | None = None
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
        self.frame = Frame(snap.totals, self.frame if self.prev is not None else None)

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

    def _fill(self, row: Row, g: Group) -> Row:
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
        """The group with the most requests in the interval, and its share; none when the
        interval had no requests (no stale name from earlier traffic)."""
        best, best_n, total = None, -1, 0
        for k, a in groups.items():
            n = a.d_count
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
        """The rows of the latest snapshot, in display order, with the header's facts."""
        snap, fr = self.cur, self.frame
        if snap is None or fr is None:
            raise RuntimeError("no snapshot yet")
        names = {d: info.name for d, info in snap.domains.items()}
        idx = self._selected(fr, names)
        with_reqs = idx[fr.count[idx] > 0]   # service-only cells (remote) carry no vCPU/address
        tops, tot = self._domain_rows(snap, fr, idx)
        expanded = {r.domid: self.expansion(r.domid) for r in tops if self.expansion(r.domid)}
        mine = with_reqs[np.isin(fr.domid[with_reqs], list(expanded))] if expanded \
            else with_reqs[:0]
        vc = fr.group(mine, [fr.domid, fr.vcpu])
        self._count_vcpus(snap, fr, with_reqs, tops)
        children = {domid: self._vcpu_rows(fr, mine, vc, domid) if "vcpu" in exp else []
                    for domid, exp in expanded.items()}
        want_r = [d for d, e in expanded.items() if "range" in e]
        if want_r:
            rg = fr.group(idx[np.isin(fr.domid[idx], want_r)], [fr.domid, fr.range])
            ad = fr.group(mine[np.isin(fr.domid[mine], want_r) & (fr.addr[mine] != 0)],
                          [fr.domid, fr.range, fr.type, fr.addr])
            for domid in want_r:
                children[domid] += self._range_rows(fr, rg, ad, domid, expanded[domid])
        rows: list[Row] = []
        for top in self._sorted(tops):
            rows.append(top)
            rows.extend(children.get(top.domid, []))
        unprobed = {r.domid: snap.domains[r.domid].probe_error for r in tops
                    if "unprobed" in r.flags}
        return View(rows, snap, self.elapsed, self._rate(tot.d_count),
                    self._rate(tot.d_bytes), self._rate(tot.reads), self._rate(tot.writes),
                    tot.reqs, self._lost_delta(snap), len(tops), unprobed)

    # -- the steps of view() -------------------------------------------------------------------
    def _selected(self, fr: Frame, names: dict[int, str]) -> np.ndarray:
        """The rows of ``fr`` that pass the filter (column-wise; names and globs once per
        distinct value)."""
        sel = self.filter.mask(fr.domid, fr.vcpu, fr.type, fr.dir, fr.range, fr.range_names,
                               names)
        return np.nonzero(sel)[0]

    def _domain_rows(self, snap: Snapshot, fr: Frame, idx: np.ndarray) -> tuple[list[Row], Group]:
        """One row per domain shown (with traffic, or listed by a source when only domains are
        filtered), and the totals over all of them."""
        filt = self.filter
        lost_by_dom: dict[int, int] = {}
        for st in snap.stats:
            for d, n in (st.extra.get("lost_by_domid") or {}).items():
                lost_by_dom[int(d)] = lost_by_dom.get(int(d), 0) + int(n)
        # Per-domain probe counts mean something only for sources that attach probes.
        has_probes = any(st.probes_attached or st.probes_failed for st in snap.stats)
        by_dom = {k[0]: g for k, g in fr.group(idx, [fr.domid]).items()}
        ranges_of: dict[int, dict] = {}
        for (d, r), g in fr.group(idx, [fr.domid, fr.range], service=False).items():
            ranges_of.setdefault(d, {})[fr.range_names[r]] = g
        tot = Group()
        for g in by_dom.values():
            for f in ("reqs", "bytes", "d_count", "d_bytes", "reads", "writes"):
                setattr(tot, f, getattr(tot, f) + getattr(g, f))
        domids = set(by_dom)
        if not filt.traffic_filtered():
            domids |= {d for d, info in snap.domains.items() if filt.match_domain(d, info.name)}
        tops = []
        for domid in domids:
            info = snap.domains.get(domid)
            row = Row("domain", 0, domid, info.name if info else fallback_name(domid),
                      ident=("domain", domid),
                      probes=info.probes_attached if info and has_probes else None,
                      lost=lost_by_dom.get(domid) if lost_by_dom else None,
                      expanded=frozenset(self.expansion(domid)))
            if row.lost:
                row.flags = frozenset({"lost"})
            if info is not None and info.probe_error:
                row.flags = row.flags | {"unprobed"}
            self._fill(row, by_dom.get(domid, Group()))
            row.busiest, row.busiest_share = self._busiest(ranges_of.get(domid, {}))
            tops.append(row)
        return tops, tot

    @staticmethod
    def _count_vcpus(snap: Snapshot, fr: Frame, with_reqs: np.ndarray, tops: list[Row]) -> None:
        """Each domain row's VCPUS: the vCPUs (not -1) that sent requests; None when the source
        does not know vCPUs (a remote exporter without the vcpu label)."""
        per_vcpu = not any(st.extra.get("no_vcpu_label") for st in snap.stats)
        counts_v: dict[int, int] = {}
        for (d, v) in fr.group(with_reqs, [fr.domid, fr.vcpu], service=False):
            if v >= 0:
                counts_v[d] = counts_v.get(d, 0) + 1
        for r in tops:
            r.vcpus = counts_v.get(r.domid, 0) if per_vcpu else None

    def _vcpu_rows(self, fr: Frame, mine: np.ndarray, vc: dict, domid: int) -> list[Row]:
        """An expanded domain's vCPU rows (unknown vCPU last), each with its busiest range."""
        rows_d = mine[fr.domid[mine] == domid]
        busiest_of: dict[int, dict] = {}
        for (_, v, r), g in fr.group(rows_d, [fr.domid, fr.vcpu, fr.range],
                                     service=False).items():
            busiest_of.setdefault(v, {})[fr.range_names[r]] = g
        out = []
        for k in sorted((k for k in vc if k[0] == domid), key=lambda k: (k[1] < 0, k[1])):
            v = k[1]
            r = Row("vcpu", 1, domid, f"vcpu {v}" if v >= 0 else "vcpu ?", ident=("vcpu", domid, v))
            self._fill(r, vc[k])
            r.busiest, r.busiest_share = self._busiest(busiest_of.get(v, {}))
            out.append(r)
        return out

    def _range_rows(self, fr: Frame, rg: dict, ad: dict, domid: int, exp: set[str]) -> list[Row]:
        """An expanded domain's range rows (sorted), each with its busiest address, and under
        each the busiest ADDR_ROWS addresses when addresses are expanded too."""
        rname = fr.range_names
        addrs_of: dict[int, dict] = {}
        for x, g in ad.items():
            if x[0] == domid:
                addrs_of.setdefault(x[1], {})[x] = g
        rrows, rix = [], {}
        for k, g in rg.items():
            if k[0] != domid:
                continue
            r = Row("range", 1, domid, rname[k[1]], ident=("range", domid, rname[k[1]]))
            self._fill(r, g)
            r.busiest, r.busiest_share = self._busiest(addrs_of.get(k[1], {}), _addr_label)
            rix[r.name] = k[1]
            rrows.append(r)
        out = []
        for r in self._sorted(rrows):
            out.append(r)
            if "addr" in exp:
                arows = []
                for x, ga in addrs_of.get(rix[r.name], {}).items():
                    a_ = int(x[3]) & 0xFFFFFFFFFFFFFFFF
                    ar = Row("addr", 2, domid, format_address(int(x[2]), a_),
                             ident=("addr", domid, r.name, int(x[2]), a_))
                    self._fill(ar, ga)
                    arows.append(ar)
                out.extend(self._sorted(arows)[:ADDR_ROWS])
        return out

    def _lost_delta(self, snap: Snapshot) -> dict[str, int]:
        """Events each source lost since the previous snapshot."""
        prev_lost = {s.name: s.lost for s in self.prev.stats} if self.prev else {}
        return {st.name: max(0, st.lost - prev_lost.get(st.name, st.lost)) for st in snap.stats}


def _addr_label(x: tuple) -> str:
    """(domid, range, type, addr) -> the address as it reads: PCI config as BDF + register."""
    return format_address(int(x[2]), int(x[3]) & 0xFFFFFFFFFFFFFFFF)
