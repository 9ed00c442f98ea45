"""What the unit tests feed the sinks with: one hand-fed source and the event-batch builders.

``FedSource`` is a real ``iotrace.core.source.EventSource`` (the same aggregation under a lock as
the replay and xentrace sources) whose state the test sets through public methods: up/down with an
error, named domains, lost events. Nothing here imitates a program that can run for real: the BPF
probes, xentrace, Prometheus and the stand-in device model are run as themselves by the
integration tests.

Batch builders (``iotrace.core.events.EVENT_DTYPE``):

* ``batch(n, domid, vcpu, type, addr, dir, size, service_ns, ts_ns, dt_ns)``: ``n`` equal
  requests, their timestamps ``dt_ns`` apart from ``ts_ns``;
* ``rows_batch(rows)``: one request per tuple (domid, vcpu, type, dir, addr, size, count, service_ns);
* ``dict_batch(dicts)``: one request per dict of field values;
* ``random_batch(rng, n, domains)``: a mixed batch for property-style tests.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from iotrace.core import events
from iotrace.core.source import DomainInfo, EventSource


class FedSource(EventSource):
    """An ``EventSource`` the test drives: ``feed()`` batches, set its state with the methods below."""

    def __init__(self, name: str = "qemu", *, has_probes: bool | None = None, **kw):
        self.name = name
        # like the qemu source unless told otherwise: its domains carry probes_attached
        self.has_probes = name == "qemu" if has_probes is None else has_probes
        super().__init__(**kw)

    def start(self) -> None:
        self.set_up(True)

    def stop(self) -> None:
        self.set_up(False)

    def set_up(self, up: bool, error: str | None = None) -> None:
        with self._lock:
            self._stats.up = up
            self._stats.error = error

    def add_domain(self, domid: int, name: str, last_seen: float = 0.0, probes: int = 0,
                   pid: int | None = None) -> None:
        with self._lock:
            self._domains[domid] = DomainInfo(domid, name, pid, probes_attached=probes,
                                              last_seen=last_seen)

    def remove_domain(self, domid: int) -> None:
        with self._lock:
            self._domains.pop(domid, None)

    def add_cell(self, key, cell) -> None:
        """Pre-aggregated totals, as a map-reading source would have them."""
        with self._lock:
            self._agg.add_cell(key, cell)

    def set_stats(self, **fields) -> None:
        """Set fields of its ``SourceStats`` (lost=, decode_errors=, probes_failed=, extra=, ...)."""
        with self._lock:
            for k, v in fields.items():
                if not hasattr(self._stats, k):
                    raise AttributeError(f"SourceStats has no field {k!r}")
                setattr(self._stats, k, v)

    def add_lost(self, n: int, by_domid: dict[int, int] | None = None) -> None:
        with self._lock:
            self._stats.lost += n
            if by_domid:
                per = self._stats.extra.setdefault("lost_by_domid", {})
                for d, k in by_domid.items():
                    per[d] = per.get(d, 0) + k


def batch(n: int, domid: int, vcpu: int, type: int, addr: int, dir: int = 0, size: int = 0,
          service_ns: int = -1, ts_ns: int = 0, dt_ns: int = 0, *, count: int = 1,
          data: int = 0) -> np.ndarray:
    """``n`` equal requests; their timestamps start at ``ts_ns``, ``dt_ns`` apart."""
    b = events.empty(n)
    b["ts_ns"] = ts_ns + dt_ns * np.arange(n)
    b["domid"], b["vcpu"], b["type"], b["addr"], b["dir"] = domid, vcpu, type, addr, dir
    b["size"], b["count"], b["service_ns"], b["data"] = size, count, service_ns, data
    return b


def rows_batch(rows: Iterable[tuple], data: int = 0) -> np.ndarray:
    """One request per (domid, vcpu, type, dir, addr, size, count, service_ns) tuple."""
    rows = list(rows)
    b = events.empty(len(rows))
    for i, (d, v, t, dr, a, sz, c, svc) in enumerate(rows):
        b[i]["domid"], b[i]["vcpu"], b[i]["type"], b[i]["dir"] = d, v, t, dr
        b[i]["addr"], b[i]["size"], b[i]["count"], b[i]["service_ns"] = a, sz, c, svc
        b[i]["data"] = data
    return b


def dict_batch(rows: Iterable[dict]) -> np.ndarray:
    """One request per dict of field values (the other fields at their 'unknown' values)."""
    rows = list(rows)
    b = events.empty(len(rows))
    for i, r in enumerate(rows):
        for k, v in r.items():
            b[k][i] = v
    return b


def random_batch(rng: np.random.Generator, n: int, domains=(1, 2, 3)) -> np.ndarray:
    """Mixed requests: several domains, vCPUs (-1 too), types (an unknown one too), addresses,
    sizes, counts and service times (30% unknown)."""
    b = events.empty(n)
    b["domid"] = rng.choice(domains, n)
    b["vcpu"] = rng.integers(-1, 3, n)
    b["type"] = rng.choice([0, 1, 2, 3, 42], n)
    b["dir"] = rng.integers(0, 2, n)
    b["addr"] = rng.choice([0x3f8, 0x60, 0x1f0, 0x5555, 0xa0000, 0xfee00000, 0], n)
    b["size"] = rng.choice([0, 1, 4], n)
    b["count"] = rng.integers(1, 4, n)
    b["service_ns"] = np.where(rng.random(n) < 0.3, -1, rng.integers(0, 2 ** 36, n))
    return b
