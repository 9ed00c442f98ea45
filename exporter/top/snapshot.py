"""What ``top`` reads from its sources at each refresh: a ``Snapshot`` of totals, domains, stats.

``Sampler`` takes snapshots that survive a source failing at run time (it keeps that source's last
totals, so its rates do not spike when it comes back, and shows it as down with the error). A
source with the ``scrape()`` capability (``iotrace.sources.remote``) is scraped first.
"""
from __future__ import annotations

import copy
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from iotrace.core.aggregate import Cell, Key
from iotrace.core.source import DomainInfo, SourceStats


@dataclass
class Snapshot:
    t: float                              # monotonic seconds when it was read
    wall: float                           # time.time() when it was read
    totals: dict[Key, Cell]
    domains: dict[int, DomainInfo]
    stats: list[SourceStats]
    host: str = ""


def _read(src) -> tuple[dict[Key, Cell], dict[int, DomainInfo], SourceStats]:
    scrape = getattr(src, "scrape", None)     # the scrape() capability (iotrace.core.source)
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
