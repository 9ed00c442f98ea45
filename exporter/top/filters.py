"""Which traffic ``top`` shows: domains (id or name glob), vCPUs, range globs, request types.

``make_filter`` builds one from the command-line options, ``parse_filter_spec`` from what the
operator types at the view's filter prompt (``domain=web vcpu=0,1 range=com* type=pio``).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable

from iotrace.core.aggregate import Key
from iotrace.core.events import TYPE_CODES, TYPE_NAMES, type_name


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
