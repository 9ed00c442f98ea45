"""The plan of one interval: which knob of which domain moves, by how much, and why (or why not).

Targets come from ``iotrace.analysis.priorities`` (a factor of each domain's *original* weight,
the one it had when advise first saw it, recorded in the audit log). The safety rails:

* nothing acts before the analysis settled a class (``agree_intervals`` agreeing intervals and
  ``min_history_seconds`` of the domain: ``iotrace.analysis.analyzer``);
* Dom0 comes first: its decision is listed (and applied) before the guests', and its xl target
  is never below ``dom0_floor``;
* a target is clamped to the domain's bounds (config ``xl``/``cgroup`` ``min``/``max``, per
  domain under ``domains:``), except a return to the original, which restores it exactly;
* each step moves a weight at most x2 (or /2) towards its target, and the next step of the same
  domain waits ``agree_intervals`` intervals;
* domains the config excludes are never changed;
* ``storm_cap`` (% of one pCPU) caps a storming domain's vCPUs only with ``--allow-caps``, and
  only once its weight has reached its target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from iotrace.analysis import classify as C
from iotrace.analysis.priorities import FACTORS, NO_CAP, step_towards, target_weight
from iotrace.analysis.settings import AdviseSettings


@dataclass
class Decision:
    """What the plan says for one domain and one knob this interval."""
    knob: str                  # "xl-weight" | "xl-cap" | "cgroup-weight"
    domid: int
    name: str
    identity: str
    uuid: str | None
    cls: str                   # this interval's class
    settled: str               # the class acted upon
    current: int
    original: int
    target: int
    new: int
    reason: str                # why it changes, or why it does not (yet)
    signals: dict = field(default_factory=dict)

    @property
    def changes(self) -> bool:
        return self.new != self.current

    def as_dict(self) -> dict:
        return {"knob": self.knob, "domid": self.domid, "domain": self.name,
                "identity": self.identity, "uuid": self.uuid, "class": self.cls,
                "settled": self.settled, "current": self.current, "original": self.original,
                "target": self.target, "new": self.new, "reason": self.reason}


@dataclass
class KnobState:
    """One domain's knob as advise knows it: read now, and as it was first seen."""
    current: int
    original: int
    cap: int | None = None            # xl cap now (None: not read / not xl)
    original_cap: int | None = None


class Policy:
    """Plans changes for one knob ("xl" or "cgroup") from an ``Analysis``."""

    def __init__(self, settings: AdviseSettings, knob: str, allow_caps: bool = False):
        if knob not in FACTORS:
            raise ValueError(f"unknown knob {knob!r}")
        self.settings, self.knob, self.allow_caps = settings, knob, allow_caps
        self._since_change: dict[str, int] = {}     # identity -> intervals since its last step

    def note_interval(self, reports) -> None:
        """Count one more interval for every domain (called once per analysis)."""
        for r in reports:
            ident = r.signals.identity
            if ident in self._since_change:
                self._since_change[ident] += 1

    def note_changed(self, identity: str) -> None:
        self._since_change[identity] = 0

    def forget(self, identity: str) -> None:
        self._since_change.pop(identity, None)

    def plan(self, analysis, states: dict) -> list[Decision]:
        """Decisions for every domain with a known knob state (``states``: domid -> KnobState),
        Dom0 first. ``note_interval`` must have been called for this analysis."""
        reports = [analysis.dom0] + [r for _, r in sorted(analysis.domains.items())]
        out = []
        for r in reports:
            st = states.get(r.signals.domid)
            if st is None:
                continue
            out.append(self._weight(r, st))
            if self.knob == "xl" and self.allow_caps and st.cap is not None:
                cap = self._cap(r, st, out[-1])
                if cap is not None:
                    out.append(cap)
        return out

    def _weight(self, r, st: KnobState) -> Decision:
        s, sig = self.settings, r.signals
        knob = f"{self.knob}-weight"
        bounds = s.bounds_for(self.knob, sig.name, sig.uuid)
        target = target_weight(self.knob, sig.domid, r.settled, st.original, bounds,
                               s.dom0_floor)
        d = Decision(knob, sig.domid, sig.name, sig.identity, sig.uuid, r.cls, r.settled,
                     st.current, st.original, target, st.current, "",
                     {k: v for k, v in sig.as_dict().items()
                      if k in ("rate", "sync_rate", "io_wait_ratio", "p95_s", "dm_cpu_ratio",
                               "cpu_ratio", "vcpus")})
        rule = s.rule_for(sig.name, sig.uuid)
        if rule.exclude:
            d.target, d.reason = st.current, "excluded by the config (advise.domains)"
            return d
        pending = self._pending(r)
        if target == st.current:
            d.reason = pending or (f"{r.settled}: at its target"
                                   if r.settled not in C.NEUTRAL else f"{r.cls}: no change")
            return d
        since = self._since_change.get(sig.identity)
        if since is not None and since < s.agree_intervals:
            d.reason = (f"{r.settled}: next step after {s.agree_intervals} intervals since the "
                        f"last one ({since} so far)")
            return d
        d.new = step_towards(st.current, target)
        if r.settled in C.NEUTRAL:
            d.reason = f"{r.settled}: back towards its original {st.original}"
        elif r.cls == r.settled:
            d.reason = f"{r.settled} for {r.streak} intervals: {r.verdict.reason()}"
        else:
            d.reason = (f"{r.settled} (settled; this interval {r.cls}): "
                        f"{r.settled_reason}")
        return d

    def _pending(self, r) -> str:
        """Why this interval's class does not act yet (empty when it is the settled one)."""
        s = self.settings
        if r.cls == r.settled or (r.cls in C.NEUTRAL and r.settled in C.NEUTRAL):
            return ""
        if r.history_s < s.min_history_seconds:
            return (f"{r.cls} ({r.verdict.reason()}): history {r.history_s:.0f} s of the "
                    f"{s.min_history_seconds:.0f} s needed")
        return (f"{r.cls} ({r.verdict.reason()}) for {r.streak} of {s.agree_intervals} "
                "intervals")

    def _cap(self, r, st: KnobState, weight: Decision) -> Decision | None:
        s, sig = self.settings, r.signals
        orig = st.original_cap if st.original_cap is not None else NO_CAP
        if sig.domid == C.DOM0:
            return None
        if r.settled == C.STORMING:
            target = s.storm_cap
            ready = weight.new == weight.target and not weight.changes
        else:
            target, ready = orig, True
        d = Decision("xl-cap", sig.domid, sig.name, sig.identity, sig.uuid, r.cls, r.settled,
                     st.cap, orig, target, st.cap, "")
        if s.rule_for(sig.name, sig.uuid).exclude or target == st.cap:
            d.target, d.reason = st.cap, "no change"
            return d
        if not ready:
            d.reason = "storming: the cap waits until the weight has reached its target"
            return d
        d.new = target
        d.reason = (f"storming: cap {target}% of one pCPU (--allow-caps)" if r.settled == C.STORMING
                    else "back to its original cap")
        return d
