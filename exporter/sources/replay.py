"""``ReplaySource``: a recording or a xentrace capture fed through the live pipeline.

``iotrace serve --replay FILE [--speed X]`` uses it in place of the live sources, so a capture can
be looked at in Prometheus/Grafana exactly as the live host would be. The file is decoded once
(``iotrace.offline.capture.load_capture``, at ``start()``, so a bad file is an error before serving).

* speed 0: every event is aggregated at once; the totals are then served unchanged.
* speed X > 0: events are fed on their own timestamps, X times real time (2 = twice as fast),
  in small batches from a thread; once the end is reached the totals stay as they are.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from iotrace.core.addrmap import AddressMap
from iotrace.core.domains import display_name
from iotrace.core.errors import InputError, UserError
from iotrace.core.source import DomainInfo, EventSource
from iotrace.offline.capture import load_capture

# How often the replay thread wakes up when events are due (seconds of wall time).
TICK = 0.05


class ReplaySource(EventSource):
    name = "replay"

    def __init__(self, path: str, speed: float = 0.0, addrmap: AddressMap | None = None,
                 cpu_hz: float | None = None, clock=time.time, keep_addr: bool = False):
        if speed < 0 or speed != speed:
            raise UserError(f"--speed must be 0 (all at once) or a positive factor, got {speed}")
        if not os.path.isfile(path):
            # checked here, before the port is bound; decoding errors come at start()
            raise InputError(f"{path}: no such file" if not os.path.exists(path)
                             else f"{path}: not a regular file")
        super().__init__(addrmap, keep_addr=keep_addr)
        self.path = path
        self.speed = float(speed)
        self.cpu_hz = cpu_hz
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[tuple[int, str], float] = {}
        self.capture = None
        self.finished = threading.Event()

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            cap = load_capture(self.path, cpu_hz=self.cpu_hz)   # InputError: one line, exit 2
        except ImportError as exc:
            raise InputError(f"{self.path}: cannot decode it here: {exc} (the decoder or "
                             f"recording module is missing from this installation)") from None
        self.capture = cap
        events = cap.events
        if len(events) > 1 and np.any(np.diff(events["ts_ns"]) < 0):
            events = events[np.argsort(events["ts_ns"], kind="stable")]
        now = self.clock()
        with self._lock:
            self._stats.up = True
            self._stats.records = cap.records
            self._stats.lost = cap.lost_records
            self._stats.decode_errors = cap.decode_errors
            self._stats.extra = {"kind": cap.source, "path": cap.path,
                                 "events_in_file": int(len(events))}
            for domid in np.unique(events["domid"]).tolist() if len(events) else []:
                if domid < 0:
                    continue
                name = display_name(domid, cap.domain_names)
                self._domains[domid] = DomainInfo(domid, name, first_seen=now, last_seen=now)
        if self.speed == 0 or len(events) == 0:
            self._feed(events)
            self.finished.set()
            return
        self._thread = threading.Thread(target=self._run, args=(events,), name="replay",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._stats.up = False

    # -- feeding ---------------------------------------------------------------------------------
    def _feed(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        now = self.clock()
        rng = self._agg.addrmap.lookup(batch["type"], batch["addr"])
        pairs = np.unique(np.stack([batch["domid"].astype(np.int64), rng.astype(np.int64)]),
                          axis=1)
        names = self._agg.addrmap.names
        with self._lock:
            for domid, idx in pairs.T.tolist():
                self._first.setdefault((domid, names[idx]), now)
        self.feed(batch)

    def _run(self, events: np.ndarray) -> None:
        ts = events["ts_ns"]
        t0_ns = int(ts[0])
        start = time.monotonic()
        pos = 0
        n = len(events)
        try:
            while pos < n and not self._stop.is_set():
                elapsed_ns = (time.monotonic() - start) * 1e9 * self.speed
                end = int(np.searchsorted(ts, t0_ns + elapsed_ns, side="right"))
                if end > pos:
                    self._feed(events[pos:end])
                    pos = end
                if pos < n:
                    wait = (int(ts[pos]) - t0_ns) / 1e9 / self.speed - (time.monotonic() - start)
                    self._stop.wait(min(max(wait, 0.0), TICK))
        except Exception as exc:  # reported through iotrace_source_up and the log
            with self._lock:
                self._stats.up = False
                self._stats.error = f"replay failed: {type(exc).__name__}: {exc}"
            return
        if pos >= n:
            self.finished.set()

    # -- reading ---------------------------------------------------------------------------------
    def domains(self) -> dict[int, DomainInfo]:
        # The domains of a capture are "alive" for as long as the capture is being served.
        now = self.clock()
        with self._lock:
            out = {}
            for domid, info in self._domains.items():
                out[domid] = DomainInfo(info.domid, info.name, info.pid, info.probes_attached,
                                        info.first_seen, now)
            return out

    def range_first_seen(self) -> dict[tuple[int, str], float]:
        """(domid, range) -> wall time the replay first fed a request to that range."""
        with self._lock:
            return dict(self._first)

    def progress(self) -> tuple[int, int]:
        """(events fed, events in the file)."""
        st = self.stats()
        return st.events, int(st.extra.get("events_in_file", 0))
