"""Which traffic a view shows: domains (id or name glob), vCPUs, range globs, request types,
directions - one definition for ``top`` and ``report`` (both are sinks; this sits below them).

``make_filter`` builds one from the command-line options (``-D/--domain``, ``--vcpu``,
``--range``, ``--type``, ``--dir``), ``parse_filter_spec`` from what the operator types at the
view's filter prompt (``domain=web vcpu=0,1 range=com* type=pio dir=read``). ``Filter.mask``
applies one to key columns (NumPy), matching names and globs once per distinct value.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from iotrace.core.aggregate import Key
from iotrace.core.domains import display_name
from iotrace.core.events import DIR_CODES, TYPE_CODES, TYPE_NAMES, dir_name, type_name


@dataclass
class Filter:
    """Which traffic to show. Empty sets mean 'all'. Domains match by id or by name (glob)."""
    domains: list[str] = field(default_factory=list)
    vcpus: set[int] = field(default_factory=set)
    ranges: list[str] = field(default_factory=list)     # glob patterns on range names
    types: set[int] = field(default_factory=set)
    dirs: set[int] = field(default_factory=set)          # DIR_READ / DIR_WRITE

    def active(self) -> bool:
        return bool(self.domains or self.vcpus or self.ranges or self.types or self.dirs)

    def traffic_filtered(self) -> bool:
        """True when something other than the domain is filtered (idle domains are then hidden)."""
        return bool(self.vcpus or self.ranges or self.types or self.dirs)

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
        if self.dirs and key.dir not in self.dirs:
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
        if self.dirs:
            parts.append("dir=" + ",".join(dir_name(d) for d in sorted(self.dirs)))
        return " ".join(parts)

    def mask(self, domid: np.ndarray, vcpu: np.ndarray, type_: np.ndarray, dir_: np.ndarray,
             range_idx: np.ndarray, range_names: Sequence[str],
             domain_names: Mapping[int, str] | None = None) -> np.ndarray:
        """Which rows of these key columns pass (a bool array). Domains match by id or by
        ``display_name`` (glob), ranges by ``range_names[range_idx]`` (glob), each distinct
        value tested once."""
        sel = np.ones(len(domid), dtype=bool)
        if self.domains:
            ok = [d for d in np.unique(domid).tolist()
                  if self.match_domain(d, display_name(d, domain_names))]
            sel &= np.isin(domid, ok)
        if self.vcpus:
            sel &= np.isin(vcpu, list(self.vcpus))
        if self.types:
            sel &= np.isin(type_, list(self.types))
        if self.dirs:
            sel &= np.isin(dir_, list(self.dirs))
        if self.ranges:
            ok = [i for i, r in enumerate(range_names)
                  if any(fnmatch.fnmatchcase(r, p) for p in self.ranges)]
            sel &= np.isin(range_idx, ok)
        return sel


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


def parse_dirs(values: Iterable[str]) -> set[int]:
    out = set()
    for v in _split(values):
        name = {"r": "read", "w": "write", "rd": "read", "wr": "write"}.get(v.lower(), v.lower())
        if name not in DIR_CODES:
            raise FilterError(f"dir: expected read or write, got {v!r}")
        out.add(DIR_CODES[name])
    return out


def make_filter(domains=(), vcpus=(), ranges=(), types=(), dirs=()) -> Filter:
    return Filter(_split(domains), parse_vcpus(vcpus), _split(ranges), parse_types(types),
                  parse_dirs(dirs))


def parse_filter_spec(text: str, base: Filter | None = None) -> Filter:
    """Parse what the operator types at the filter prompt:
    ``domain=web vcpu=0,1 range=com* type=pio dir=read``.

    A bare word is a domain. ``field=`` with nothing clears that field. Unknown fields are errors.
    """
    f = Filter(list(base.domains), set(base.vcpus), list(base.ranges), set(base.types),
               set(base.dirs)) if base else Filter()
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
        elif name in ("dir", "direction"):
            f.dirs = parse_dirs([value])
        else:
            raise FilterError(f"unknown filter field {name!r} "
                              "(use domain=, vcpu=, range=, type=, dir=)")
    return f
