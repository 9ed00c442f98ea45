"""Rendering a collection as text, on one long-lived thread, shared by concurrent scrapes.

``Renderer(snapshot)`` turns the families that ``snapshot()`` returns (``iotrace.serve.exposition.
Family``) into the text format 0.0.4 in pieces of about 1 MB, so a gzip scrape compresses one
piece while the next is made (zlib lets go of the GIL). Scrapes that arrive while a rendering is
under way share it: many scrapers cost one collection. The rendering runs on one thread (started on
demand, ended after ``IDLE_SECONDS`` without work): the HTTP server runs each scrape on a new
thread, and glibc gives threads their own malloc arenas, each keeping the freed megabytes of the
renderings done there (the RSS grew with the scrape threads). A daemon: a stuck source cannot hold
up the exit.
"""
from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from contextlib import contextmanager

from iotrace.serve.exposition import (
    Family,
    escape_help,
    fmt_value,
    fmt_values,
    hist_prefixes,
    line_prefix,
)

log = logging.getLogger("iotrace.serve")

IDLE_SECONDS = 60.0

_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = True


@contextmanager
def no_gc():
    """Pause the cyclic GC while a scrape allocates its ~10^5 short-lived objects.

    Without this, generation-2 collections triggered by those allocations walk every live object
    (all the cells of all sources) and triple the scrape time. Reference counting still frees
    everything; cycles are collected when the pause ends. Re-entrant across scrape threads.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


class Pending:
    """One rendering in progress, shared by the scrapes that arrive meanwhile: its chunks as
    they are made, then whether it finished or failed."""

    __slots__ = ("cond", "chunks", "finished", "error")

    def __init__(self):
        self.cond = threading.Condition()
        self.chunks: list[bytes] = []
        self.finished = False
        self.error: BaseException | None = None

    def put(self, chunk: bytes) -> None:
        with self.cond:
            self.chunks.append(chunk)
            self.cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            self.finished, self.error = True, error
            self.cond.notify_all()

    def stream(self):
        """The chunks, each as soon as it is made; raises the rendering's error if it failed."""
        i = 0
        while True:
            with self.cond:
                while i == len(self.chunks) and not self.finished:
                    self.cond.wait()
                new = self.chunks[i:]
                if not new:
                    if self.error is not None:
                        raise RuntimeError(f"rendering failed: {self.error}") from self.error
                    return
            i += len(new)
            yield from new

    def result(self) -> list[bytes]:
        with self.cond:
            while not self.finished:
                self.cond.wait()
        if self.error is not None:
            raise RuntimeError(f"rendering failed: {self.error}") from self.error
        return self.chunks


class Renderer:
    """Renders ``snapshot()`` (a callable returning the families of one collection) as text."""

    def __init__(self, snapshot):
        self._snapshot = snapshot
        self.last_render_cpu = 0.0       # CPU seconds the last rendering took (all of it)
        self._render_lock = threading.Lock()
        self._prefixes: dict[str, dict] = {}
        self._pending_lock = threading.Lock()
        self._pending: Pending | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The rendering thread while it runs (it ends after IDLE_SECONDS without work)."""
        return self._worker

    def job(self) -> Pending:
        """The rendering under way, else a new one.

        The big families are built column-wise (``iotrace.serve.layout``): per series, the label
        part of its lines is cached between scrapes (series are stable), so a scrape sums columns
        with NumPy and formats numbers only.

        Scrapes that arrive while a rendering is under way share it instead of starting their
        own: many concurrent scrapers cost one collection, not one each (CPU and memory).
        """
        with self._pending_lock:
            job = self._pending
            if job is None:
                job = self._pending = Pending()
                self._jobs.put(job)
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="iotrace-render",
                                                    daemon=True)
                    self._worker.start()
            return job

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._pending_lock:        # job() queues and checks under this lock
                    if self._jobs.empty():
                        self._worker = None
                        return
                continue
            self._run(job)

    def _run(self, job: Pending) -> None:
        error = None
        try:
            with no_gc():
                self.render_into(job.put)
        except Exception as exc:  # a collector bug: the scrapes answer 500, the next ones retry
            log.exception("rendering the metrics failed")
            error = exc
        finally:
            with self._pending_lock:
                if self._pending is job:
                    self._pending = None
            job.finish(error)

    def render_into(self, put) -> None:
        """Render one collection, handing each piece of text to ``put`` as soon as it is made."""
        c0 = time.thread_time()
        fams = self._snapshot()
        first = True
        with self._render_lock:
            for f in fams:
                # Every line starts with "\n" (kept in the cached prefixes): a family's lines are
                # one "".join of alternating prefixes and values; the body ends with "\n".
                tname = f.name + "_total" if f.type == "counter" else f.name
                head = f"# HELP {tname} {escape_help(f.help)}\n# TYPE {tname} {f.type}"
                if not first:
                    head = "\n" + head
                first = False
                if f.rows:
                    head += self._render_rows(f, tname)
                put(head.encode())
                for block in f.blocks:
                    for piece in block.render():
                        put(piece.encode())
                del f.rows, f.blocks          # free each family once it is encoded (peak memory)
        self.last_render_cpu = time.thread_time() - c0
        put(b"\n")

    def _render_rows(self, f: Family, tname: str) -> str:
        """The lines of a family's (few) rows, through the per-family prefix cache."""
        old = self._prefixes.get(f.name, {})
        new = {}
        parts = []
        if f.type == "histogram":
            for labels, (buckets, n, total) in f.rows:
                pre = old.get(labels)
                if pre is None:
                    pre = hist_prefixes(f.name, f.labelnames, labels)
                new[labels] = pre
                vals = list(map(str, buckets))
                vals += (str(n), str(n), fmt_value(total))
                for p, v in zip(pre, vals):
                    parts += (p, v)
        else:
            pres = []
            for labels, _ in f.rows:
                pre = old.get(labels)
                if pre is None:
                    pre = "\n" + line_prefix(tname, f.labelnames, labels)
                new[labels] = pre
                pres.append(pre)
            values = [v for _, v in f.rows]
            # counts are ints (exact, and str() is the fast path); gauges may be floats
            parts = [None] * (2 * len(pres))
            parts[0::2] = pres
            parts[1::2] = list(map(str, values)) if f.type == "counter" else fmt_values(values)
        self._prefixes[f.name] = new    # only the series of this scrape: bounded
        return "".join(parts)
