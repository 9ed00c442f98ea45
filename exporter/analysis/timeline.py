"""A capture's own timeline, interval by interval: what a live source's totals would have been.

``iotrace advise --replay FILE`` evaluates a recording or xentrace capture offline with this:
the events are folded into one ``Aggregator`` window by window (``interval`` seconds of the
capture's own clock, from its first event), and after each window the cumulative totals are
handed out, as a live source's ``totals()`` would have been at that moment. Host samples a
recording may carry in its metadata (``host_samples``: ``iotrace.analysis.host.HostSample``
objects on the same clock, seconds) go with the window they fall in: the latest one at or
before the window's end.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iotrace.analysis.host import HostSample
from iotrace.core.addrmap import AddressMap
from iotrace.core.aggregate import Aggregator
from iotrace.core.errors import InputError


@dataclass
class Window:
    t: float                  # end of the window, seconds on the capture's clock
    totals: dict              # cumulative {Key: Cell} up to t (valid until the next window)
    host: HostSample | None   # the latest host sample at or before t
    events: int               # events in this window


def host_samples_from_meta(meta: dict, path: str) -> list[HostSample]:
    """A recording's ``host_samples`` (time order); InputError naming the file when malformed."""
    raw = (meta or {}).get("host_samples")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InputError(f"{path}: metadata host_samples is not a list")
    out = []
    for i, obj in enumerate(raw):
        try:
            out.append(HostSample.from_json(obj))
        except ValueError as exc:
            raise InputError(f"{path}: metadata host_samples[{i}]: {exc}") from None
    return sorted(out, key=lambda s: s.t)


def windows(events: np.ndarray, interval: float, addrmap: AddressMap | None = None,
            host_samples: list[HostSample] | None = None, start: float | None = None):
    """Yield a ``Window`` every ``interval`` seconds of the events' clock: the first one at
    ``start`` (default: the first event's time) with nothing in it, as a live source's totals
    are empty when it starts, then one per interval until the last event is in."""
    if interval <= 0:
        raise ValueError("interval must be positive")
    agg = Aggregator(addrmap, keep_addr=False)
    samples = list(host_samples or [])
    ts = events["ts_ns"] if len(events) else np.zeros(0, dtype=np.int64)
    if len(ts) > 1 and np.any(np.diff(ts) < 0):
        order = np.argsort(ts, kind="stable")
        events, ts = events[order], ts[order]
    t0 = start if start is not None else (float(ts[0]) / 1e9 if len(ts) else 0.0)
    end = float(ts[-1]) / 1e9 if len(ts) else t0
    si = 0

    def host_at(t):
        nonlocal si
        while si + 1 < len(samples) and samples[si + 1].t <= t + 1e-9:
            si += 1
        return samples[si] if samples and samples[si].t <= t + 1e-9 else None

    yield Window(t0, {}, host_at(t0), 0)
    pos, k = 0, 1
    while True:
        t = t0 + k * interval
        stop = int(np.searchsorted(ts, int(round(t * 1e9)), side="right"))
        if stop > pos:
            agg.add_batch(events[pos:stop])
        n, pos = stop - pos, stop
        yield Window(t, dict(agg.cells), host_at(t), n)
        if t >= end:
            return
        k += 1
