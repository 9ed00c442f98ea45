"""Priorities: the factor each settled class calls for, per knob, and the target weight.

Shared by ``advise`` (which applies them, ``iotrace.advise.policy``) and ``serve`` (which exports
``iotrace_advised_weight``). A target is a factor of the domain's *original* weight:

    class           xl (credit2 weight)                cgroup (device-model cpu.weight)
    storming        x1/4  (its vCPUs issue fewer)      x1/4  (its requests are served last)
    io-bound        x2    (its vCPUs run sooner)       x2    (its requests are served first)
    dom0-starved    x1 for guests, x2 for Dom0         x2    (device models before Dom0's other work)
    cpu-bound, idle, normal: x1 (back to the original, exactly)

A changed target is clamped to the domain's bounds and the knob's range; Dom0's xl target is
never below ``dom0_floor``. A step moves a weight at most x2 (or /2) towards its target.
"""
from __future__ import annotations

import math

from iotrace.analysis import classify as C
from iotrace.analysis.settings import KNOB_DEFAULT, KNOB_RANGE, AdviseSettings, Bounds

MAX_STEP = 2.0
FACTORS = {
    "xl": {C.STORMING: 0.25, C.IO_BOUND: 2.0, C.DOM0_STARVED: 1.0},
    "cgroup": {C.STORMING: 0.25, C.IO_BOUND: 2.0, C.DOM0_STARVED: 2.0},
}
DOM0_FACTORS = {"xl": {C.DOM0_STARVED: 2.0}, "cgroup": {}}
NO_CAP = 0


def factor(knob: str, domid: int, settled: str) -> float:
    table = DOM0_FACTORS[knob] if domid == C.DOM0 else FACTORS[knob]
    return table.get(settled, 1.0)


def target_weight(knob: str, domid: int, settled: str, original: int, bounds: Bounds,
                  dom0_floor: int | None = None) -> int:
    """Where the weight should go for the settled class (see the module docstring)."""
    f = factor(knob, domid, settled)
    if f == 1.0:
        return int(original)
    lo_k, hi_k = KNOB_RANGE[knob]
    t = bounds.clamp(original * f)
    if knob == "xl" and domid == C.DOM0 and dom0_floor is not None:
        t = max(t, dom0_floor)
    return int(min(max(t, lo_k), hi_k))


def step_towards(current: int, target: int) -> int:
    """One step from ``current`` towards ``target``: at most x2 up or /2 down."""
    current = max(int(current), 1)
    if target > current:
        return int(min(target, current * MAX_STEP))
    if target < current:
        return int(max(target, math.ceil(current / MAX_STEP)))
    return current


def advised_weight(knob: str, report, settings: AdviseSettings) -> int:
    """The weight the settled class calls for, on the knob's default scale (what ``serve``
    exports as ``iotrace_advised_weight``: advise applies the same factor to each domain's
    original weight)."""
    sig = report.signals
    rule = settings.rule_for(sig.name, sig.uuid)
    if rule.exclude:
        return KNOB_DEFAULT[knob]
    return target_weight(knob, sig.domid, report.settled, KNOB_DEFAULT[knob],
                         settings.bounds_for(knob, sig.name, sig.uuid), settings.dom0_floor)
