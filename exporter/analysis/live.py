"""The analysis running beside ``iotrace serve``: one ``Analyzer`` per source, stepped every
interval on a thread of its own, the latest result of each kept for the collector.

The collector (``iotrace.serve.collector``) only reads ``latest()``: a scrape never waits for an
analysis, and an analysis never waits for a scrape. The host is sampled once per step for all
sources (``iotrace.analysis.host.LocalHost``) when they watch this host; a replay has none.
"""
from __future__ import annotations

import logging
import threading
import time

from iotrace.analysis.analyzer import Analysis, Analyzer
from iotrace.analysis.settings import AdviseSettings

log = logging.getLogger("iotrace.analysis")


class LiveAnalysis:
    def __init__(self, sources, settings: AdviseSettings | None = None, host=None,
                 clock=time.monotonic):
        self.sources = list(sources)
        self.settings = settings or AdviseSettings()
        self.host = host
        self.clock = clock
        self._analyzers = {s.name: Analyzer(self.settings, dm_wait_counts=s.name != "xentrace")
                           for s in self.sources}
        self._latest: dict[str, Analysis] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def latest(self) -> dict[str, Analysis]:
        """source name -> its last analysis (empty until two steps were taken)."""
        with self._lock:
            return dict(self._latest)

    def step(self) -> None:
        """Read every source once and step its analyzer (the thread calls this each interval)."""
        t = self.clock()
        pids = {}
        reads = []
        for src in self.sources:
            try:
                doms = src.domains()
                totals = src.totals()
            except Exception as exc:  # a broken source must not stop the others' analysis
                log.warning("analysis: source %s: cannot read totals: %s", src.name, exc)
                continue
            pids.update({d: i.pid for d, i in doms.items() if i.pid})
            reads.append((src.name, totals, {d: i.name for d, i in doms.items()}))
        sample = None
        if self.host is not None:
            try:
                sample = self.host.sample(t, pids or None)
            except Exception as exc:  # the host's figures are a bonus, never a reason to stop
                log.warning("analysis: cannot sample the host: %s", exc)
        for name, totals, names in reads:
            a = self._analyzers[name].step(t, totals, names, sample)
            if a is not None:
                with self._lock:
                    self._latest[name] = a

    def _run(self) -> None:
        next_t = self.clock() + self.settings.interval
        while not self._stop.wait(max(0.0, next_t - self.clock())):
            next_t += self.settings.interval
            try:
                self.step()
            except Exception as exc:  # logged, and the next interval tries again
                log.error("analysis failed: %s: %s", type(exc).__name__, exc)

    def start(self) -> None:
        """Take the starting point now, then step every interval on a daemon thread."""
        self.step()
        self._thread = threading.Thread(target=self._run, name="analysis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
