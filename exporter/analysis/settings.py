"""The ``advise:`` section of the ``--config`` YAML file (the same file as the address map).

    advise:
      interval: 60                  # seconds between two analyses (serve and advise)
      agree_intervals: 3            # a change needs this many agreeing intervals in a row ...
      min_history_seconds: 600      # ... and this much history of the domain
      baseline_window_seconds: 3600 # how far back a domain's own baseline looks
      thresholds:
        idle_rate: 1                # req/s below which a domain is idle
        io_wait: 0.10               # I/O wait share from which a domain is I/O-bound
        cpu_bound: 0.80             # domain CPU per vCPU (xl) from which it is CPU-bound
        storm_factor: 10            # storming: rate >= this x its own baseline rate,
        storm_min_rate: 500         #   at least this many requests/s,
        storm_dm_cpu: 0.20          #   and its device model busy this share of a CPU (where known)
        dom0_busy: 0.90             # Dom0 saturated: CPU busy share (steal included) ...
        dom0_pressure: 0.30         #   ... or PSI cpu "some" share at least this
        starved_rise: 2.0           # Dom0-starved: every active domain's p95 >= this x baseline
      xl:                           # credit2 weights (1-65535, default 256)
        min: 32
        max: 4096
        dom0_floor: 256             # Dom0's weight is never set below this
        storm_cap: 50               # with --allow-caps: a storming domain's cap, % of one pCPU
      cgroup:                       # device-model cpu.weight (1-10000, default 100; v1 shares mapped)
        min: 10
        max: 1000
      domains:                      # per domain, by name or UUID
        web:
          exclude: false            # true: advise never changes this domain
          xl: {min: 256, max: 2048}
          cgroup: {min: 50, max: 400}

``iotrace.core.addrmap`` accepts the top-level key ``advise`` and ignores it; this module reads
and validates it. Every problem is a ``ConfigError`` naming ``FILE:LINE: KEY: reason``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from iotrace.core.errors import ConfigError
from iotrace.core.yamlfile import MarkedDict, check_keys, load_yaml, require_mapping

SECTION = "advise"

# The knobs' own ranges and defaults: credit2 (xl(1) sched-credit2: "Legal weights range from 1 to
# 65535 and the default is 256"; the cap is in % of one pCPU, 0 = none) and cgroup v2 cpu.weight
# (Documentation/admin-guide/cgroup-v2.rst: "[1, 10000] with the default at 100").
XL_RANGE = (1, 65535)
XL_DEFAULT = 256
CGROUP_RANGE = (1, 10000)
CGROUP_DEFAULT = 100
KNOBS = ("xl", "cgroup")
KNOB_RANGE = {"xl": XL_RANGE, "cgroup": CGROUP_RANGE}
KNOB_DEFAULT = {"xl": XL_DEFAULT, "cgroup": CGROUP_DEFAULT}
MAX_CAP = 100 * 4096           # % of one pCPU; a cap beyond 4096 pCPUs is a typo


@dataclass(frozen=True)
class Thresholds:
    idle_rate: float = 1.0
    io_wait: float = 0.10
    cpu_bound: float = 0.80
    storm_factor: float = 10.0
    storm_min_rate: float = 500.0
    storm_dm_cpu: float = 0.20
    dom0_busy: float = 0.90
    dom0_pressure: float = 0.30
    starved_rise: float = 2.0


@dataclass(frozen=True)
class Bounds:
    lo: int
    hi: int

    def clamp(self, w: float) -> int:
        return int(min(max(round(w), self.lo), self.hi))


@dataclass(frozen=True)
class DomainRule:
    """What the config says about one domain (by name or UUID)."""
    exclude: bool = False
    bounds: dict = field(default_factory=dict)        # knob -> Bounds


@dataclass(frozen=True)
class AdviseSettings:
    interval: float = 60.0
    agree_intervals: int = 3
    min_history_seconds: float = 600.0
    baseline_window_seconds: float = 3600.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    bounds: dict = field(default_factory=lambda: {"xl": Bounds(32, 4096),
                                                  "cgroup": Bounds(10, 1000)})
    dom0_floor: int = XL_DEFAULT
    storm_cap: int = 50
    domains: dict = field(default_factory=dict)       # name or UUID -> DomainRule

    def rule_for(self, name: str | None, uuid: str | None) -> DomainRule:
        """The config's rule for a domain: by UUID first (it names one domain for good), else by
        name; the default rule when neither is listed."""
        for key in (uuid, name):
            if key and key in self.domains:
                return self.domains[key]
        return DomainRule()

    def bounds_for(self, knob: str, name: str | None, uuid: str | None) -> Bounds:
        return self.rule_for(name, uuid).bounds.get(knob, self.bounds[knob])

    def with_(self, **changes) -> "AdviseSettings":
        return replace(self, **changes)


KEYS = ("interval", "agree_intervals", "min_history_seconds", "baseline_window_seconds",
        "thresholds", "xl", "cgroup", "domains")
THRESHOLD_KEYS = tuple(Thresholds.__dataclass_fields__)
# (lowest, highest) accepted per threshold; shares are 0..1, factors above 1.
THRESHOLD_LIMITS = {
    "idle_rate": (0.0, 1e9), "io_wait": (0.0, 1.0), "cpu_bound": (0.0, 1.0),
    "storm_factor": (1.0, 1e6), "storm_min_rate": (0.0, 1e9), "storm_dm_cpu": (0.0, 1024.0),
    "dom0_busy": (0.0, 1.0), "dom0_pressure": (0.0, 1.0), "starved_rise": (1.0, 1e6),
}
WEEK = 7 * 24 * 3600.0


class _Section:
    """One mapping of the section with its path and key prefix, for one-line errors."""

    def __init__(self, mapping, path: str, where: str, line=None):
        self.m, self.path, self.where = mapping, path, where
        self.line = getattr(mapping, "line", None) or line

    def line_of(self, key):
        return self.m.line_of(key) if isinstance(self.m, MarkedDict) else self.line

    def error(self, key, reason):
        return ConfigError(reason, self.path, self.line_of(key), f"{self.where}{key}")

    def number(self, key, default, lo, hi, *, integer=False, lo_open=False):
        v = self.m.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not
                                                                       isinstance(v, int)):
            raise self.error(key, f"expected {'a whole number' if integer else 'a number'}, "
                                  f"got {v!r}")
        if v != v or v < lo or v > hi or (lo_open and v == lo):
            span = f"{'more than ' if lo_open else ''}{lo:g}..{hi:g}"
            raise self.error(key, f"expected {span}, got {v!r}")
        return int(v) if integer else float(v)

    def sub(self, key):
        v = self.m.get(key)
        if v is None:
            return None
        require_mapping(v, self.path, f"{self.where}{key}", self.line_of(key))
        return _Section(v, self.path, f"{self.where}{key}.", self.line_of(key))


def _bounds(sec: _Section | None, knob: str, default: Bounds, extra=()) -> Bounds:
    if sec is None:
        return default
    check_keys(sec.m, ("min", "max") + tuple(extra), sec.path, sec.where)
    lo_k, hi_k = KNOB_RANGE[knob]
    lo = sec.number("min", default.lo, lo_k, hi_k, integer=True)
    hi = sec.number("max", default.hi, lo_k, hi_k, integer=True)
    if lo > hi:
        raise sec.error("min", f"min {lo} is above max {hi}")
    return Bounds(lo, hi)


def parse_advise(doc, path: str) -> AdviseSettings:
    """Settings from an already parsed config document (None or a mapping)."""
    base = AdviseSettings()
    if doc is None:
        return base
    require_mapping(doc, path, "top level")
    raw = doc.get(SECTION)
    if raw is None:
        return base
    line = doc.line_of(SECTION) if isinstance(doc, MarkedDict) else None
    require_mapping(raw, path, SECTION, line)
    sec = _Section(raw, path, f"{SECTION}.", line)
    check_keys(raw, KEYS, path, sec.where)

    interval = sec.number("interval", base.interval, 0.0, WEEK, lo_open=True)
    agree = sec.number("agree_intervals", base.agree_intervals, 1, 1000, integer=True)
    history = sec.number("min_history_seconds", base.min_history_seconds, 0.0, WEEK)
    window = sec.number("baseline_window_seconds", base.baseline_window_seconds, 0.0, WEEK,
                        lo_open=True)

    th = base.thresholds
    tsec = sec.sub("thresholds")
    if tsec is not None:
        check_keys(tsec.m, THRESHOLD_KEYS, path, tsec.where)
        vals = {k: tsec.number(k, getattr(th, k), *THRESHOLD_LIMITS[k]) for k in THRESHOLD_KEYS}
        th = Thresholds(**vals)

    bounds = dict(base.bounds)
    floor, cap = base.dom0_floor, base.storm_cap
    xsec = sec.sub("xl")
    if xsec is not None:
        bounds["xl"] = _bounds(xsec, "xl", bounds["xl"], extra=("dom0_floor", "storm_cap"))
        floor = xsec.number("dom0_floor", floor, *XL_RANGE, integer=True)
        cap = xsec.number("storm_cap", cap, 1, MAX_CAP, integer=True)
    bounds["cgroup"] = _bounds(sec.sub("cgroup"), "cgroup", bounds["cgroup"])

    domains = {}
    dsec = sec.sub("domains")
    if dsec is not None:
        for name in dsec.m:
            if not isinstance(name, str) or not name.strip():
                raise dsec.error(name, "expected a domain name or UUID")
            one = dsec.sub(name)
            if one is None:
                raise dsec.error(name, "expected a mapping (exclude, xl, cgroup)")
            check_keys(one.m, ("exclude",) + KNOBS, path, one.where)
            exclude = one.m.get("exclude", False)
            if not isinstance(exclude, bool):
                raise one.error("exclude", f"expected true or false, got {exclude!r}")
            per = {k: _bounds(one.sub(k), k, bounds[k]) for k in KNOBS if one.m.get(k) is not None}
            domains[name] = DomainRule(exclude, per)
    return AdviseSettings(interval, agree, history, window, th, bounds, floor, cap, domains)


def load_advise(path: str | None) -> AdviseSettings:
    """Settings from the ``--config`` file (defaults when no file is given)."""
    if not path:
        return AdviseSettings()
    return parse_advise(load_yaml(path), path)
