"""What every live or replayed source offers to the sinks (serve, top): totals read on demand.

A source runs on its own (thread, kernel maps, child process) after ``start()``; sinks read it at
scrape/refresh time through ``totals()``, ``domains()`` and ``stats()``, which must be cheap and
must not block on the source's own I/O (copy under a lock, or read kernel maps).

``EventSource`` is the base for sources that produce event batches (xentrace, replay): a thread
calls ``self.feed(batch)``; totals are kept by one ``Aggregator`` behind a lock.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .aggregate import Aggregator, Cell, Key
from .addrmap import AddressMap


@dataclass
class DomainInfo:
    domid: int
    name: str                      # xenstore name, else -name, else "dom<N>"
    pid: int | None = None         # device model process, where one is known
    probes_attached: int = 0       # uprobes attached on its behalf (qemu source)
    first_seen: float = 0.0        # wall-clock time the domain was first seen
    last_seen: float = 0.0         # wall-clock time it was last known alive


@dataclass
class SourceStats:
    name: str                      # "qemu" | "xentrace" | "replay"
    up: bool = False
    events: int = 0                # requests seen
    lost: int = 0                  # events lost (ring buffer overruns, TRC_LOST_RECORDS)
    decode_errors: int = 0         # records that could not be decoded
    records: int = 0               # raw records read (xentrace)
    probes_attached: int = 0
    probes_failed: int = 0
    error: str | None = None       # last run-time error, for the log and the self-metrics
    extra: dict = field(default_factory=dict)


class Source(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def totals(self) -> dict[Key, Cell]: ...
    def domains(self) -> dict[int, DomainInfo]: ...
    def stats(self) -> SourceStats: ...


class EventSource:
    """Base for batch-producing sources: aggregation under a lock, copies for readers."""

    name = "events"

    def __init__(self, addrmap: AddressMap | None = None, keep_addr: bool = False):
        self._lock = threading.Lock()
        self._agg = Aggregator(addrmap, keep_addr=keep_addr)
        self._domains: dict[int, DomainInfo] = {}
        self._stats = SourceStats(self.name)

    def feed(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        with self._lock:
            self._agg.add_batch(batch)
            self._stats.events += len(batch)

    def totals(self) -> dict[Key, Cell]:
        with self._lock:
            # Field-wise copy: same result as deepcopy, ~10x cheaper (scrape-time cost, see
            # bench/exporter_scrape.py).
            return {k: Cell(c.count, c.bytes, c.service_n, c.service_sum_ns, c.hist.copy())
                    for k, c in self._agg.cells.items()}

    def domains(self) -> dict[int, DomainInfo]:
        with self._lock:
            return dict(self._domains)

    def stats(self) -> SourceStats:
        with self._lock:
            return copy.deepcopy(self._stats)

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        pass
