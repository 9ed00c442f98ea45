"""``ReplaySource``: a recording or a xentrace capture fed through the live pipeline.

``iotrace serve --replay FILE [--speed X]`` (and ``top --replay``) use it in place of the live
sources, so a capture can be looked at in Prometheus/Grafana exactly as the live host would be.
The file is read once, batch by batch (``iotrace.offline.capture.CaptureStream``): memory is the
totals, not the events, whatever the file's length. A file that is no capture at all, or a
recording whose header is damaged beyond repair, is an error of ``start()``, before serving.

* speed 0: ``start()`` aggregates every event; the totals are then served unchanged.
* speed X > 0: events are fed on their own timestamps, X times real time (2 = twice as fast),
  in small batches from a thread, read from the file as they are due; once the end is reached
  the totals stay as they are.

Damage met on the way is surfaced as it is found, never hidden: ``stats().decode_errors``
(records that could not be decoded; a recording: those of the chunks skipped as damaged),
``stats().damage`` (``skipped_chunk``: chunks skipped; ``truncated``: 1 once the file ended
inside a record or without a recording's end chunk), ``stats().warnings`` (each problem, one
line naming the file and the offset) and ``warn(line)`` for each as it comes (serve logs them).
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
from iotrace.offline.capture import CaptureStream

# How often the replay thread wakes up when events are due (seconds of wall time).
TICK = 0.05


class _Stopped(Exception):
    pass


class ReplaySource(EventSource):
    name = "replay"

    def __init__(self, path: str, speed: float = 0.0, addrmap: AddressMap | None = None,
                 cpu_hz: float | None = None, clock=time.time, keep_addr: bool = False,
                 warn=None):
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
        self.warn = warn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[tuple[int, str], float] = {}
        self._said = 0                     # warnings of the stream passed on so far
        self.stream: CaptureStream | None = None
        self.finished = threading.Event()

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            stream = CaptureStream(self.path, cpu_hz=self.cpu_hz)   # InputError: one line
        except ImportError as exc:
            raise InputError(f"{self.path}: cannot decode it here: {exc} (the decoder or "
                             f"recording module is missing from this installation)") from None
        self.stream = stream
        batches = stream.batches()
        first = next(batches, None)        # a file that is no capture at all fails here
        with self._lock:
            self._stats.up = True
            self._stats.extra = {"kind": stream.source, "path": stream.path}
        self._sync()
        if self.speed == 0 or first is None:
            for batch in ([] if first is None else [first]):
                self._feed(batch)
            for batch in batches:
                self._feed(batch)
            self._sync()
            self.finished.set()
            return
        self._thread = threading.Thread(target=self._run, args=(first, batches), name="replay",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._stats.up = False

    # -- feeding ---------------------------------------------------------------------------------
    def _sync(self) -> None:
        """The stream's counters into the stats; new warnings passed on (file named once)."""
        s = self.stream
        new = s.warnings[self._said:]
        self._said += len(new)
        lines = [f"{s.path}: {w}" for w in new]
        with self._lock:
            st = self._stats
            st.records = s.records
            st.lost = s.lost_records
            st.decode_errors = s.decode_errors
            st.damage = {"skipped_chunk": s.skipped_chunks, "truncated": int(s.truncated)}
            st.warnings = st.warnings + lines
            st.extra["events_read"] = s.events
            names = s.domain_names
            for domid, info in self._domains.items():
                if names.get(domid) and info.name != names[domid]:
                    info.name = names[domid]
        if self.warn is not None:
            for line in lines:
                self.warn(line)

    def _feed(self, batch: np.ndarray) -> None:
        if not len(batch):
            return
        now = self.clock()
        rng = self._agg.addrmap.lookup(batch["type"], batch["addr"])
        pairs = np.unique(np.stack([batch["domid"].astype(np.int64), rng.astype(np.int64)]),
                          axis=1)
        names = self._agg.addrmap.names
        known = self.stream.domain_names
        with self._lock:
            for domid, idx in pairs.T.tolist():
                self._first.setdefault((domid, names[idx]), now)
                if domid >= 0 and domid not in self._domains:
                    self._domains[domid] = DomainInfo(domid, display_name(domid, known),
                                                      first_seen=now, last_seen=now)
        self.feed(batch)

    def _run(self, first: np.ndarray, batches) -> None:
        start = time.monotonic()
        t0_ns = int(first["ts_ns"].min())
        try:
            try:
                self._pace(first, start, t0_ns)
                for batch in batches:
                    self._pace(batch, start, t0_ns)
            except _Stopped:
                batches.close()                   # closes the file
                return
            self._sync()
            self.finished.set()
        except Exception as exc:  # reported through iotrace_source_up and the log
            self._sync()
            with self._lock:
                self._stats.up = False
                self._stats.error = f"replay failed: {type(exc).__name__}: {exc}"

    def _pace(self, batch: np.ndarray, start: float, t0_ns: int) -> None:
        """Feed ``batch`` as its events fall due (raises _Stopped on stop())."""
        self._sync()
        if len(batch) > 1 and np.any(np.diff(batch["ts_ns"]) < 0):
            batch = batch[np.argsort(batch["ts_ns"], kind="stable")]
        ts = batch["ts_ns"]
        pos, n = 0, len(batch)
        while pos < n:
            if self._stop.is_set():
                raise _Stopped
            elapsed_ns = (time.monotonic() - start) * 1e9 * self.speed
            end = int(np.searchsorted(ts, t0_ns + elapsed_ns, side="right"))
            if end > pos:
                self._feed(batch[pos:end])
                pos = end
            if pos < n:
                wait = (int(ts[pos]) - t0_ns) / 1e9 / self.speed - (time.monotonic() - start)
                self._stop.wait(min(max(wait, 0.0), TICK))

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
        """(events fed, events read from the file so far)."""
        st = self.stats()
        return st.events, int(st.extra.get("events_read", 0))
