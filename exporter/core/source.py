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
from operator import attrgetter
from typing import Protocol

import numpy as np

from iotrace.core.addrmap import AddressMap
from iotrace.core.aggregate import N_SLOTS, Aggregator, Cell, Key


@dataclass
class DomainInfo:
    domid: int
    name: str                      # xenstore name, else -name, else "dom<N>"
    pid: int | None = None         # device model process, where one is known
    probes_attached: int = 0       # uprobes attached on its behalf (qemu source)
    first_seen: float = 0.0        # wall-clock time the domain was first seen
    last_seen: float = 0.0         # wall-clock time it was last known alive
    probe_error: str | None = None  # why its device model is not probed (qemu source; None: it is)


# What ``SourceStats.damage`` counts (the ``kind`` label of iotrace_input_damage_total): recording
# chunks (or runs of bytes) skipped as damaged; an input that ends inside a record, or a recording
# without its end chunk (1 or 0).
DAMAGE_KINDS = ("skipped_chunk", "truncated")


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
    damage: dict = field(default_factory=dict)     # DAMAGE_KINDS -> count, for input files
    warnings: list = field(default_factory=list)   # about the input, one line each, in order


@dataclass
class TotalsColumns:
    """The same totals as ``Source.totals()``, as columns: row ``i`` is the cell of ``keys[i]``.

    For sinks that sum many cells at once (the exporter's scrape): NumPy group sums instead of one
    Python step per cell. Counts are int64 (2^63 requests or ns are out of reach).
    """
    keys: list                     # Key per row (immutable tuples, may be the source's own)
    count: np.ndarray              # int64 (n,)
    bytes: np.ndarray              # int64 (n,)
    service_n: np.ndarray          # int64 (n,)
    service_sum_ns: np.ndarray     # int64 (n,)
    hist: np.ndarray               # int64 (n, N_SLOTS), the slots of iotrace.core.aggregate

    def __len__(self) -> int:
        return len(self.keys)


_CELL_FIELDS = tuple(attrgetter(f) for f in ("count", "bytes", "service_n", "service_sum_ns"))


def columns_of(cells: dict[Key, Cell]) -> TotalsColumns:
    """Columns of a ``{Key: Cell}`` dict (copies: the result does not change with ``cells``)."""
    keys = list(cells)
    vals = list(cells.values())
    n = len(vals)
    scalars = [np.fromiter(map(get, vals), dtype=np.int64, count=n) for get in _CELL_FIELDS]
    hists = [c.hist for c in vals]
    hist = None
    try:
        # One copy of all histograms through the buffer protocol (several times faster than
        # np.stack): valid when every histogram is N_SLOTS contiguous 8-byte integers, as the
        # Aggregator's own are; anything else takes the general path below.
        if n and {h.dtype for h in hists} == {np.dtype(np.int64)}:
            raw = b"".join(hists)
            if len(raw) == n * N_SLOTS * 8:
                hist = np.frombuffer(raw, dtype=np.int64).reshape(n, N_SLOTS)
    except (TypeError, ValueError, BufferError):
        hist = None
    if hist is None:
        hist = np.zeros((n, N_SLOTS), dtype=np.int64)
        for i, h in enumerate(hists):
            hist[i] = h
    return TotalsColumns(keys, *scalars, hist)


def totals_columns(src) -> TotalsColumns:
    """``src``'s totals as columns: its own ``totals_columns()`` where it declares ``columnar``
    (see ``Source``), else built from ``totals()`` (any ``Source``)."""
    if getattr(src, "columnar", False):
        return src.totals_columns()
    return columns_of(src.totals())


class Source(Protocol):
    """What a sink may call. Optional capabilities, declared as class attributes:

    * ``columnar = True``: ``totals_columns()`` returns the same totals as ``totals()``, as
      columns (the exporter's fast scrape path; ``EventSource`` has it; a subclass that overrides
      ``totals()`` must override ``totals_columns()`` too or declare ``columnar = False``);
    * ``has_probes = True``: its domains carry ``probes_attached`` (the qemu uprobes): the
      exporter exports ``iotrace_probes_attached`` for them;
    * ``totals_predate_start = True``: its first totals include what happened before ``start()``
      (a remote exporter's counters), so ``top`` takes them as its baseline;
    * ``scrape()``: called by ``top`` before each read (a remote source fetches its page).
    """
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def totals(self) -> dict[Key, Cell]: ...
    def domains(self) -> dict[int, DomainInfo]: ...
    def stats(self) -> SourceStats: ...


class EventSource:
    """Base for batch-producing sources: aggregation under a lock, copies for readers."""

    name = "events"
    columnar = True
    has_probes = False

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

    def totals_columns(self) -> TotalsColumns:
        """The same as ``totals()``, as columns (the ``columnar`` capability, see ``Source``): one
        pass over the cells under the lock."""
        with self._lock:
            return columns_of(self._agg.cells)

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
