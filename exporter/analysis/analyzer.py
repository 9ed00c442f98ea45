"""The analysis over time: per-domain history, baselines, classes, and the hysteresis.

``Analyzer.step(t, totals, names, host)`` is called once per interval with the sources' current
totals (cumulative) and a host sample; it returns an ``Analysis`` of the interval since the
previous call (None on the first call, which only sets the starting point).

Each domain is followed by its *identity* (``iotrace.analysis.signals.identity_of``): its UUID
where Xen tells it, else its device-model process (pid and start time), else its domid. A domid
that comes back with another identity is a new domain: its history (baselines, streaks) starts
again. Histories keep ``baseline_window_seconds`` of intervals; a domain's baseline rate is the
median rate of its earlier intervals that were not storming, its baseline p95 the median p95 of
its intervals that were neither storming nor Dom0-starved.

Hysteresis (as operators expect from VPA-style recommenders): a domain's ``settled`` class
changes only when the new class held ``agree_intervals`` intervals in a row and the domain has
been followed for ``min_history_seconds``; until then it stays ``normal`` (no action). A signal
that flaps never settles.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from iotrace.analysis import classify as C
from iotrace.analysis.host import HostSample
from iotrace.analysis.settings import AdviseSettings
from iotrace.analysis.signals import (
    DomainSignals,
    HostSignals,
    Rollup,
    domain_signals,
    host_signals,
    rollup,
)
from iotrace.core.domains import DOMID_FIRST_RESERVED, display_name

DOM0_NAME = "Domain-0"        # xl's name for it


@dataclass
class _Point:
    t: float
    rate: float
    p95: float | None
    cls: str


@dataclass
class History:
    identity: str
    domid: int
    first_t: float
    last_t: float
    points: deque = field(default_factory=deque)
    cls: str | None = None
    streak: int = 0
    settled: str = C.NORMAL
    settled_t: float | None = None
    settled_reason: str = ""
    max_vcpu: int = -1

    def base_rate(self) -> float | None:
        rates = [p.rate for p in self.points if p.cls != C.STORMING]
        return statistics.median(rates) if len(rates) >= 2 else None

    def base_p95(self) -> float | None:
        vals = [p.p95 for p in self.points
                if p.p95 is not None and p.cls not in (C.STORMING, C.DOM0_STARVED)]
        return statistics.median(vals) if len(vals) >= 2 else None


@dataclass
class DomainReport:
    signals: DomainSignals
    verdict: C.Verdict
    history_s: float
    streak: int               # intervals in a row with this class
    settled: str              # the class the hysteresis settled on
    settled_t: float | None   # when it settled
    settled_reason: str = ""  # the reasons of the latest interval of the settled class
    base_rate: float | None = None
    base_p95: float | None = None

    @property
    def cls(self) -> str:
        return self.verdict.cls

    def as_dict(self) -> dict:
        return {"domid": self.signals.domid, "domain": self.signals.name,
                "identity": self.signals.identity, "uuid": self.signals.uuid,
                "class": self.cls, "reasons": list(self.verdict.reasons),
                "streak": self.streak, "settled": self.settled,
                "settled_reason": self.settled_reason,
                "history_s": round(self.history_s, 3), "baseline_rate": self.base_rate,
                "baseline_p95_s": self.base_p95,
                "signals": {k: v for k, v in self.signals.as_dict().items()
                            if k not in ("domid", "name", "identity", "uuid")}}


@dataclass
class Analysis:
    t: float
    interval_s: float
    host: HostSignals
    saturated: bool | None
    domains: dict            # domid -> DomainReport (guests)
    dom0: DomainReport

    def as_dict(self) -> dict:
        h = self.host
        return {"t": self.t, "interval_s": self.interval_s,
                "dom0": {"busy_ratio": h.busy_ratio, "steal_ratio": h.steal_ratio,
                         "pressure_ratio": h.pressure_ratio, "ncpu": h.ncpu,
                         "saturated": self.saturated, **self.dom0.as_dict()},
                "domains": [r.as_dict() for _, r in sorted(self.domains.items())]}


class Analyzer:
    """``dm_wait_counts``: the source times service in the device model (qemu, and what is
    derived from it): its run delay is waiting too (``iotrace.analysis.signals``); False for
    xentrace."""

    def __init__(self, settings: AdviseSettings | None = None, dm_wait_counts: bool = True):
        self.settings = settings or AdviseSettings()
        self.dm_wait_counts = dm_wait_counts
        self._prev: Rollup | None = None
        self._prev_host: HostSample | None = None
        self._prev_t: float | None = None
        self._hist: dict[str, History] = {}       # identity -> history
        self._ident_of: dict[int, str] = {}        # domid -> current identity

    # -- history -----------------------------------------------------------------------------
    def _history(self, sig: DomainSignals, start: float, t: float) -> History:
        old = self._ident_of.get(sig.domid)
        if old is not None and old != sig.identity:
            self._hist.pop(old, None)          # a reused domid is a new domain
        self._ident_of[sig.domid] = sig.identity
        h = self._hist.get(sig.identity)
        if h is None:
            h = self._hist[sig.identity] = History(sig.identity, sig.domid, start, t)
        return h

    def _record(self, h: History, sig: DomainSignals, verdict, t: float) -> None:
        cls = verdict.cls
        s = self.settings
        h.points.append(_Point(t, sig.rate, sig.p95_s, cls))
        while h.points and h.points[0].t < t - s.baseline_window_seconds:
            h.points.popleft()
        h.last_t = t
        if cls == h.cls:
            h.streak += 1
        else:
            h.cls, h.streak = cls, 1
        if (h.settled != cls and h.streak >= s.agree_intervals
                and t - h.first_t >= s.min_history_seconds):
            h.settled, h.settled_t = cls, t
        if h.settled == cls:
            h.settled_reason = verdict.reason()

    def _prune(self, t: float) -> None:
        horizon = t - self.settings.baseline_window_seconds
        for ident in [i for i, h in self._hist.items() if h.last_t < horizon]:
            h = self._hist.pop(ident)
            if self._ident_of.get(h.domid) == ident:
                del self._ident_of[h.domid]

    # -- one interval ------------------------------------------------------------------------
    def step(self, t: float, totals: dict, names: dict | None = None,
             host: HostSample | None = None) -> Analysis | None:
        cur = rollup(totals)
        prev, prev_host, prev_t = self._prev, self._prev_host, self._prev_t
        self._prev, self._prev_host, self._prev_t = cur, host, t
        if prev_t is None or t <= prev_t:
            return None
        dt = t - prev_t
        th = self.settings.thresholds
        names = names or {}

        domids = cur.domids() | set(names)
        if host is not None and host.xen:
            domids |= set(host.xen)
        domids = {d for d in domids if 0 < d < DOMID_FIRST_RESERVED}
        sigs, hists = {}, {}
        for domid in sorted(domids):
            name = names.get(domid) or (host.xen[domid].name if host is not None and host.xen
                                        and domid in host.xen else None)
            name = display_name(domid, {domid: name} if name else None)
            h_prev = self._hist.get(self._ident_of.get(domid, ""))
            seen = max(cur.max_vcpu.get(domid, -1), h_prev.max_vcpu if h_prev else -1)
            sig = domain_signals(domid, name, prev, cur, dt, prev_host, host,
                                 seen + 1 if seen >= 0 else None, self.dm_wait_counts)
            h = self._history(sig, prev_t, t)
            h.max_vcpu = max(h.max_vcpu, seen)
            sigs[domid], hists[domid] = sig, h

        hsig = host_signals(prev_host, host, dt)
        saturated = hsig.saturated(th.dom0_busy, th.dom0_pressure)

        # 1: storming, against each domain's own baseline (before this interval counts in it)
        verdicts = {}
        for domid, sig in sigs.items():
            v = C.storm_verdict(sig, hists[domid].base_rate(), th,
                                sticky=hists[domid].settled == C.STORMING)
            if v is not None:
                verdicts[domid] = v
        # 2: Dom0-starved, across every active domain that is not storming
        rising = {}
        h0 = self._hist.get(self._dom0_identity(host))
        sticky = h0 is not None and h0.settled == C.DOM0_STARVED
        for domid, sig in sigs.items():
            if domid in verdicts or not C.is_active(sig, th):
                continue
            base = hists[domid].base_p95()
            r = C.rose(sig, base, th, sticky)
            if r is not None:
                rising[domid] = (sig.name, sig.p95_s, base, r)
        starved = C.starved_verdict(hsig, rising, th)
        for domid, sig in sigs.items():
            if domid in verdicts:
                continue
            if starved is not None and C.is_active(sig, th):
                verdicts[domid] = C.Verdict(C.DOM0_STARVED, list(starved.reasons))
            else:
                verdicts[domid] = C.plain_verdict(sig, th,
                                                  sticky_io=hists[domid].settled == C.IO_BOUND)

        reports = {}
        for domid, sig in sigs.items():
            h = hists[domid]
            base_rate, base_p95 = h.base_rate(), h.base_p95()
            self._record(h, sig, verdicts[domid], t)
            reports[domid] = DomainReport(sig, verdicts[domid], t - h.first_t, h.streak,
                                          h.settled, h.settled_t, h.settled_reason, base_rate,
                                          base_p95)
        dom0 = self._dom0_report(prev_t, t, dt, host, hsig, saturated, starved)
        self._prune(t)
        return Analysis(t, dt, hsig, saturated, reports, dom0)

    @staticmethod
    def _dom0_identity(host) -> str:
        xen = host.xen.get(0) if host is not None and host.xen else None
        return f"uuid:{xen.uuid}" if xen is not None and xen.uuid else "dom0"

    def _dom0_report(self, start, t, dt, host, hsig, saturated, starved) -> DomainReport:
        xen = host.xen.get(0) if host is not None and host.xen else None
        uuid = xen.uuid if xen is not None else None
        sig = DomainSignals(0, xen.name if xen is not None else DOM0_NAME,
                            self._dom0_identity(host), uuid, dt,
                            vcpus=hsig.ncpu, vcpus_from="proc" if hsig.ncpu else None)
        if starved is not None:
            verdict = C.Verdict(C.DOM0_STARVED, list(starved.reasons))
        else:
            what = f"Dom0 CPU {C.pct(hsig.busy_ratio)} busy" if hsig.busy_ratio is not None \
                else "Dom0 CPU unknown"
            if saturated:
                what += " (saturated, but service times are not up for every domain)"
            verdict = C.Verdict(C.NORMAL, [what])
        h = self._hist.get(sig.identity)
        if h is None:
            h = self._hist[sig.identity] = History(sig.identity, 0, start, t)
        self._record(h, sig, verdict, t)
        return DomainReport(sig, verdict, t - h.first_t, h.streak, h.settled, h.settled_t,
                            h.settled_reason)
