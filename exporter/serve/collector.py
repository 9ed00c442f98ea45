"""The Prometheus collector of ``iotrace serve``: reads its sources at scrape time.

Like client_python's process collector, it is given what it reads (the sources) as parameters and
is registered on a private ``CollectorRegistry``. Every scrape reads each source's totals once
(``iotrace.core.source.totals_columns``: the source's ``totals_columns()`` where it has one, else
``totals()``), ``domains()`` and ``stats()`` — cheap copies of running totals — so the cost of a
scrape depends on the number of series, never on the request rate of the guests (metrics mode
reads totals; it does not replay events).

Scrape cost (issue #4, bench/exporter_scrape.py): the totals arrive as NumPy columns and are summed
per series with group sums; which cells make which series, and the label text of every line, are
kept between scrapes (``_Layout``, rebuilt when the source's keys or domain names change), so a
scrape formats numbers and joins strings. The text is made on one long-lived thread, in pieces a
scraper can compress while the next ones are made.

Label values are bounded by construction: ``range`` comes from the address map (``other`` for the
rest), ``type``/``dir`` from fixed tables (unknown type codes become ``other``), ``vcpu`` from the
domain's vCPUs (``-1`` for buffered/unknown). Guest data values (ioreq ``data``) are never read
here. Series of a domain that went away disappear ``domain_grace_seconds`` after it was last
known alive. The metric contract is documented in docs/metrics.md.
"""
from __future__ import annotations

import copy
import gc
import logging
import queue
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from iotrace import __version__
from iotrace.core.addrmap import OTHER, TYPE_RANGE_NAMES, AddressMap
from iotrace.core.aggregate import N_SLOTS
from iotrace.core.events import DIR_NAMES, TYPE_NAMES
from iotrace.core.source import totals_columns
from iotrace.serve.settings import ExporterSettings

log = logging.getLogger("iotrace.serve")

# Histogram buckets: le = 2^k ns for k = 10, 12, ..., 34 (1.024 us .. 17.18 s), from the log2
# histograms of iotrace.core.aggregate, where slot k holds durations in [2^(k-1), 2^k) ns: the
# cumulative count of slots 0..k is the number of durations < 2^k ns. (A duration of exactly 2^k ns
# lands in slot k+1, so it is counted from the next bucket on: the error is at most one slot.)
BUCKET_EXPONENTS = tuple(range(10, 35, 2))
BUCKET_BOUNDS_SECONDS = tuple((2 ** k) / 1e9 for k in BUCKET_EXPONENTS)

UNKNOWN_DOMAIN = "unknown"
RENDER_THREAD_IDLE_SECONDS = 60.0


def domain_label(domid: int, names: dict[int, str] | None = None) -> str:
    if names and domid in names and names[domid]:
        return names[domid]
    return UNKNOWN_DOMAIN if domid < 0 else f"dom{domid}"


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = True


@contextmanager
def _no_gc():
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


class _Pending:
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


class _SourceView:
    """What one collection read from one source (or why it could not)."""

    __slots__ = ("name", "columns", "domains", "stats", "error")

    def __init__(self, name):
        self.name = name
        self.columns = None        # iotrace.core.source.TotalsColumns
        self.domains = {}
        self.stats = None
        self.error = None


class IotraceCollector(Collector):
    """Collector over ``sources`` (objects of the ``iotrace.core.source.Source`` protocol).

    ``clock`` gives wall-clock seconds (for the domain grace period and first-seen times).
    """

    def __init__(self, sources: Sequence, settings: ExporterSettings | None = None,
                 clock=time.time, version: str = __version__):
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"two sources share a name: {names}")
        self.sources = list(sources)
        self.settings = settings or ExporterSettings()
        self.clock = clock
        self.version = version
        self._lock = threading.Lock()
        # (source, domid) -> wall time the source last listed the domain in domains()
        self._listed_at: dict[tuple[str, int], float] = {}
        # (source, domid, range) -> wall time the collector first saw the range touched
        self._first_seen: dict[tuple[str, int, str], float] = {}
        self._hidden_logged: set[tuple[str, int]] = set()
        self.last_duration = 0.0
        self.last_render_cpu = 0.0       # CPU seconds the last text rendering took (all of it)
        self._render_lock = threading.Lock()
        self._prefixes: dict[str, dict] = {}
        self._keycache: dict[str, dict] = {}     # source -> {Key: (count key, service key)}
        self._pcache: dict[str, dict] = {}       # source -> {sample: {labels: line prefix}}
        self._layouts: dict[str, _Layout] = {}   # source -> its layout of the last scrape
        self._pending_lock = threading.Lock()
        self._pending: _Pending | None = None
        # The one thread that renders (started on demand, ends after a minute without work):
        # the HTTP server runs each scrape on a new thread, and glibc gives threads their own
        # malloc arenas, each keeping the freed megabytes of the renderings done there (the RSS
        # grew with the scrape threads). A daemon: a stuck source cannot hold up the exit.
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    # -- reading the sources ---------------------------------------------------------------------
    def _read(self, src) -> _SourceView:
        view = _SourceView(src.name)
        try:
            view.stats = src.stats()
            view.domains = src.domains()
            view.columns = totals_columns(src)
        except Exception as exc:  # a broken source must not break the scrape of the others
            view.error = f"{type(exc).__name__}: {exc}"
            log.warning("source %s: cannot read totals: %s", src.name, view.error)
        return view

    def _visible(self, src: str, domid: int, view: _SourceView, now: float) -> bool:
        grace = self.settings.domain_grace_seconds
        info = view.domains.get(domid)
        if info is not None:
            last = info.last_seen or now
            alive = now - last <= grace
        elif (src, domid) in self._listed_at:
            alive = now - self._listed_at[(src, domid)] <= grace
        else:
            # Never listed by the source (unknown domid -1, or a source without a domain list,
            # such as a replay): its totals are all there is, keep them.
            alive = True
        if not alive and (src, domid) not in self._hidden_logged:
            self._hidden_logged.add((src, domid))
            log.info("source %s: domain %d gone for more than %gs: its series are dropped",
                     src, domid, grace)
        elif alive:
            self._hidden_logged.discard((src, domid))
        return alive

    # -- collection ------------------------------------------------------------------------------
    def snapshot(self) -> list["Family"]:
        """Read every source once and return the metric families with their rows."""
        with _no_gc():
            return self._snapshot()

    def _snapshot(self) -> list["Family"]:
        t0 = time.perf_counter()
        vcpu_label = self.settings.vcpu_label
        io_labels = ("source", "domain", "domid") + (("vcpu",) if vcpu_label else ()) + \
            ("type", "dir", "range")
        fam = {f.name: f for f in (
            Family("iotrace_ioreqs", "counter", io_labels,
                   "I/O requests HVM guests sent to emulated devices (port I/O, MMIO, PCI config), "
                   "by domain, vCPU (-1: buffered or unknown), request type, direction and named "
                   "address range. source=qemu: requests that reached qemu-dm; source=xentrace: "
                   "requests Xen's trace points saw (including those Xen emulates itself)."),
            Family("iotrace_ioreq_bytes", "counter", io_labels,
                   "Bytes moved by guest I/O requests (access size x repeat count), where the "
                   "source knows the access size (the qemu probes do; xentrace does not record "
                   "it)."),
            Family("iotrace_ioreq_service_seconds", "histogram",
                   ("source", "domain", "domid", "type", "range"),
                   "Time to serve one guest I/O request: emulation time in the device model "
                   "(qemu) or VM exit to VM entry (xentrace)."),
            Family("iotrace_domain_info", "gauge", ("domid", "domain", "source"),
                   "Always 1: the name of each domain a source reports (join on domid)."),
            Family("iotrace_domain_ranges_seen", "gauge", ("source", "domain", "domid"),
                   "Distinct named address ranges the domain has touched since it was first "
                   "seen."),
            Family("iotrace_range_first_seen_timestamp_seconds", "gauge",
                   ("source", "domain", "domid", "range"),
                   "Unix time at which the domain first touched the named address range (device "
                   "probing shows up as new ranges)."),
            Family("iotrace_source_up", "gauge", ("source",),
                   "1 while the event source runs and counts all it was asked to (qemu: every "
                   "device-model binary's probe programs loaded by the kernel and attached), 0 "
                   "otherwise (the reason is in the log)."),
            Family("iotrace_probes_attached", "gauge", ("source", "domain", "domid"),
                   "Uprobes attached to the domain's device model process."),
            Family("iotrace_probe_attach_failures", "counter", ("source",),
                   "Probe attachments that failed (missing symbol, no permission, process "
                   "gone)."),
            Family("iotrace_events_lost", "counter", ("source",),
                   "Events the source lost (BPF ring buffer overruns, xentrace lost records)."),
            Family("iotrace_decode_errors", "counter", ("source",),
                   "Records the source could not decode."),
            Family("iotrace_source_events", "counter", ("source",),
                   "I/O requests the source has delivered to iotrace."),
            Family("iotrace_build_info", "gauge", ("version",),
                   "Always 1: the version of the iotrace exporter."),
            Family("iotrace_scrape_duration_seconds", "gauge", (),
                   "Time the last collection took to read the sources and build the metrics."),
        )}

        views = [self._read(s) for s in self.sources]
        now = self.clock()
        with self._lock:
            for src, view in zip(self.sources, views):
                self._collect_source(src, view, now, vcpu_label, fam)
                st = view.stats
                n = (view.name,)
                fam["iotrace_source_up"].add(n, 1 if (st is not None and st.up and
                                                     view.error is None) else 0)
                fam["iotrace_probe_attach_failures"].add(n, st.probes_failed if st else 0)
                fam["iotrace_events_lost"].add(n, st.lost if st else 0)
                fam["iotrace_decode_errors"].add(n, st.decode_errors if st else 0)
                fam["iotrace_source_events"].add(n, st.events if st else 0)
        fam["iotrace_build_info"].add((self.version,), 1)
        self.last_duration = time.perf_counter() - t0
        fam["iotrace_scrape_duration_seconds"].add((), self.last_duration)
        return list(fam.values())

    def collect(self) -> Iterable[Metric]:
        """prometheus_client families (used by the registry: OpenMetrics, tests)."""
        for f in self.snapshot():
            m = Metric(f.name, f.help, f.type)
            m.samples = [Sample(name, dict(zip(names, values)), float(value))
                         for name, names, values, value in f.iter_samples()]
            yield m

    def render_text(self) -> bytes:
        """The same metrics as ``collect()``, in the text format 0.0.4, fast."""
        return b"".join(self.render_chunks())

    def render_chunks(self) -> list[bytes]:
        """``render_text()`` in pieces (to write or compress one after the other, without the
        copy that joins them)."""
        return self._job().result()

    def iter_chunks(self):
        """``render_chunks()``, each piece as soon as it is made: a scraper can compress the
        first families (zlib lets go of the GIL) while the next ones are rendered."""
        return self._job().stream()

    def _job(self) -> _Pending:
        """The rendering under way, else a new one.

        The big families are built column-wise (``_Layout``): per series, the label part of its
        lines is cached between scrapes (series are stable), so a scrape sums columns with NumPy
        and formats numbers only.

        Scrapes that arrive while a rendering is under way share it instead of starting their
        own: many concurrent scrapers cost one collection, not one each (CPU and memory).
        """
        with self._pending_lock:
            job = self._pending
            if job is None:
                job = self._pending = _Pending()
                self._jobs.put(job)
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="iotrace-render",
                                                    daemon=True)
                    self._worker.start()
            return job

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=RENDER_THREAD_IDLE_SECONDS)
            except queue.Empty:
                with self._pending_lock:        # _job() queues and checks under this lock
                    if self._jobs.empty():
                        self._worker = None
                        return
                continue
            self._run(job)

    def _run(self, job: _Pending) -> None:
        error = None
        try:
            with _no_gc():
                self._render_chunks(job.put)
        except Exception as exc:  # a collector bug: the scrapes answer 500, the next ones retry
            log.exception("rendering the metrics failed")
            error = exc
        finally:
            with self._pending_lock:
                if self._pending is job:
                    self._pending = None
            job.finish(error)

    def _render_chunks(self, put) -> None:
        c0 = time.thread_time()
        fams = self._snapshot()
        first = True
        with self._render_lock:
            for f in fams:
                # Every line starts with "\n" (kept in the cached prefixes): a family's lines are
                # one "".join of alternating prefixes and values; the body ends with "\n".
                tname = f.name + "_total" if f.type == "counter" else f.name
                head = f"# HELP {tname} {_escape_help(f.help)}\n# TYPE {tname} {f.type}"
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

    def _render_rows(self, f: "Family", tname: str) -> str:
        """The lines of a family's (few) rows, through the per-family prefix cache."""
        old = self._prefixes.get(f.name, {})
        new = {}
        parts = []
        if f.type == "histogram":
            for labels, (buckets, n, total) in f.rows:
                pre = old.get(labels)
                if pre is None:
                    pre = _hist_prefixes(f.name, f.labelnames, labels)
                new[labels] = pre
                vals = list(map(str, buckets))
                vals += (str(n), str(n), _fmt(total))
                for p, v in zip(pre, vals):
                    parts += (p, v)
        else:
            pres = []
            for labels, _ in f.rows:
                pre = old.get(labels)
                if pre is None:
                    pre = "\n" + _line_prefix(tname, f.labelnames, labels)
                new[labels] = pre
                pres.append(pre)
            values = [v for _, v in f.rows]
            # counts are ints (exact, and str() is the fast path); gauges may be floats
            parts = [None] * (2 * len(pres))
            parts[0::2] = pres
            parts[1::2] = list(map(str, values)) if f.type == "counter" else _fmt_many(values)
        self._prefixes[f.name] = new    # only the series of this scrape: bounded
        return "".join(parts)

    def _layout(self, name: str, keys: list, names: dict, vcpu_label: bool):
        """The layout for these keys, and None or the order to read the columns in."""
        lay = self._layouts.get(name)
        same = lay is not None and lay.vcpu_label == vcpu_label and lay.labels_hold(names)
        if same:
            if lay.keys == keys:          # identity first: the same Key objects compare fast
                return lay, None
            order = lay.order_of(keys)
            if order is not None:
                return lay, order
        kcache = self._keycache.setdefault(name, {})
        if len(kcache) > 4 * len(keys) + 1024:
            kcache.clear()
        pcache = self._pcache.setdefault(name, {})
        if same and len(keys) > len(lay.keys) and keys[:len(lay.keys)] == lay.keys:
            lay = lay.extended(keys, kcache, names)     # new keys come after the old ones
        else:
            lay = _Layout(name, names, vcpu_label, pcache).extended(keys, kcache, names)
        self._layouts[name] = lay
        return lay, None

    def _collect_source(self, src, view, now, vcpu_label, fam):
        name = view.name
        for domid in view.domains:
            self._listed_at[(name, domid)] = now
        names = {d: i.name for d, i in view.domains.items()}
        visible: dict[int, bool] = {}

        def is_visible(domid):
            v = visible.get(domid)
            if v is None:
                v = visible[domid] = self._visible(name, domid, view, now)
            return v

        src_first = getattr(src, "range_first_seen", None)
        src_first = src_first() if callable(src_first) and view.error is None else {}
        cols = view.columns
        n_ranges: dict[int, int] = {}      # visible domain with cells -> ranges it touched
        if cols is not None and len(cols):
            lay, order = self._layout(name, cols.keys, names, vcpu_label)
            view.columns = None
            touched = self._fold(lay, cols, order, is_visible, fam)
            del cols                  # the columns are summed: free them before rendering
            # first-seen time of every (domain, range) touched
            first = self._first_seen
            values = []
            for domid, rng in _gather(lay.dr_pairs, touched):
                t = src_first.get((domid, rng)) if src_first else None
                if t is None:
                    t = first.setdefault((name, domid, rng), now)
                values.append(float(t))
            fam[_FIRST].blocks.append(_RowsBlock(lay, _FIRST, touched, values))
            per_dom = np.bincount(lay.dr_domi if touched is None else lay.dr_domi[touched],
                                  minlength=len(lay.domids))
            n_ranges = {d: n for d, n in zip(lay.domids, per_dom.tolist()) if n}

        # Domains: those the source lists plus those that only appear in the totals.
        has_probes = getattr(src, "has_probes", name == "qemu")
        for domid in sorted(set(view.domains) | set(n_ranges)):
            if not is_visible(domid):
                for k in [k for k in self._first_seen if k[0] == name and k[1] == domid]:
                    del self._first_seen[k]
                continue
            dn, ds = domain_label(domid, names), str(domid)
            fam["iotrace_domain_info"].add((ds, dn, name), 1)
            fam["iotrace_domain_ranges_seen"].add((name, dn, ds), n_ranges.get(domid, 0))
            if has_probes and domid in view.domains:
                fam["iotrace_probes_attached"].add((name, dn, ds),
                                                   view.domains[domid].probes_attached)

    @staticmethod
    def _fold(lay: "_Layout", cols, order, is_visible, fam: dict):
        """Sum the cells of one source into its series (all NumPy, no step per cell).

        Returns the (domain, range) pairs (``lay.dr_pairs`` indices, None for all) the visible
        domains touched."""
        count, nbytes, sn, ssum = cols.count, cols.bytes, cols.service_n, cols.service_sum_ns
        # per cell: the counts of the slots between two bucket bounds (13 columns, not 64)
        seg = np.add.reduceat(cols.hist, _SEG_STARTS, axis=1)[:, :len(_BUCKET_LE)]
        if order is not None:           # the layout's row order
            count, nbytes, sn, ssum, seg = count[order], nbytes[order], sn[order], ssum[order], \
                seg[order]
        # cells with neither requests nor service times make no series
        active = (count != 0) | (sn != 0)
        if active.all():
            g_act = None
        else:
            count = np.where(active, count, 0)
            nbytes = np.where(active, nbytes, 0)
            g_act = lay.c.sum(active.astype(np.int64)) > 0
        g_count = lay.c.sum(count)
        g_bytes = lay.c.sum(nbytes)
        g_touch = lay.c.sum((count != 0).astype(np.int64)) > 0
        # histogram: slot segments summed per series, then cumulated: durations < 2^k ns
        svc = sn != 0
        if svc.all():
            g_svc = None
        else:
            sn, ssum = np.where(svc, sn, 0), np.where(svc, ssum, 0)
            seg[~svc] = 0
            g_svc = lay.s.sum(svc.astype(np.int64)) > 0
        g_sn = lay.s.sum(sn)
        g_sum = lay.s.sum(ssum) / 1e9
        g_cum = np.cumsum(lay.s.sum(seg), axis=1)
        del seg

        vis = np.fromiter(map(is_visible, lay.domids), dtype=bool, count=len(lay.domids))
        all_vis = bool(vis.all())
        c_vis = None if all_vis else vis[lay.c_domi]
        s_vis = None if all_vis else vis[lay.s_domi]

        rows = _select(g_act, c_vis)
        fam["iotrace_ioreqs"].blocks.append(
            _CounterBlock(lay, "iotrace_ioreqs_total", rows, g_count))
        fam["iotrace_ioreq_bytes"].blocks.append(
            _CounterBlock(lay, "iotrace_ioreq_bytes_total", _select(g_bytes > 0, c_vis),
                          g_bytes))
        rows = _select(g_svc, s_vis)
        if rows is None or len(rows):
            fam["iotrace_ioreq_service_seconds"].blocks.append(
                _HistBlock(lay, rows, g_cum, g_sn, g_sum))

        # ranges touched per visible domain
        t = g_touch if c_vis is None else g_touch & c_vis
        pairs = np.zeros(len(lay.dr_pairs), dtype=bool)
        pairs[lay.c_dr[t]] = True
        return _select(pairs, None)


_TYPE_LABEL = dict(TYPE_NAMES)
_DIR_LABEL = dict(DIR_NAMES)
_BUCKET_LE = tuple(repr(b) for b in BUCKET_BOUNDS_SECONDS)
_BUCKET_COLS = [min(k, N_SLOTS - 1) for k in BUCKET_EXPONENTS]
# Slot segments [0, c0], (c0, c1], ... (c11, c12] of the log2 histogram (and the rest): their
# cumulative sums are the bucket counts (slots 0..c_j).
_SEG_STARTS = np.array([0] + [c + 1 for c in _BUCKET_COLS], dtype=np.intp)
assert _SEG_STARTS[-1] < N_SLOTS and (np.diff(_SEG_STARTS) > 0).all()


def _select(mask, vis):
    """Row indices where ``mask`` (None: all) and ``vis`` (None: all) hold; None for all rows."""
    if mask is None:
        mask = vis
    elif vis is not None:
        mask = mask & vis
    if mask is None or mask.all():
        return None
    return np.flatnonzero(mask)


class _Groups:
    """Rows of a column summed per group (``gid``: group index of each row, 0..n_groups-1)."""

    __slots__ = ("identity", "order", "starts")

    def __init__(self, gid: np.ndarray, n_groups: int):
        n = len(gid)
        self.identity = n == n_groups and bool((gid == np.arange(n)).all())
        self.order = self.starts = None
        if not self.identity:
            self.order = np.argsort(gid, kind="stable")
            s = gid[self.order]
            self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])

    def sum(self, col: np.ndarray) -> np.ndarray:
        if self.identity:
            return col
        return np.add.reduceat(col[self.order], self.starts, axis=0)


class _Layout:
    """How one source's cells fold into series, with the label strings of every series: kept
    while the source's keys and domain names stay the same, extended (as a new object: blocks
    of earlier scrapes may still read the old one) when keys are added, rebuilt otherwise."""

    def __init__(self, name, names, vcpu_label, pcache):
        self.name, self.names, self.vcpu_label = name, names, vcpu_label
        self._pcache = pcache
        self.keys: list = []
        self._cidx: dict = {}        # count key -> count group (series of the counters)
        self._sidx: dict = {}        # service key -> service group (histogram series)
        self._dri: dict = {}         # (domid, range) -> pair
        self._domi: dict = {}        # domid -> index in domids
        self._dlab: dict = {}        # domid -> (source, domain, domid) label values
        self._vcpus: dict = {}       # vcpu -> its label value
        self._cg = self._sg = np.zeros(0, dtype=np.int64)    # group of every key
        self.c_labels, self.s_labels, self.dr_labels = [], [], []
        self.domids, self.dr_pairs = [], []
        self.c_domi = self.s_domi = self.c_dr = self.dr_domi = np.zeros(0, dtype=np.intp)
        self.io_labelnames = ("source", "domain", "domid") + \
            (("vcpu",) if vcpu_label else ()) + ("type", "dir", "range")
        self._prefix_lists: dict[str, list] = {}
        self._row: dict | None = None            # Key -> row, for order_of()
        self.c = self.s = None

    def labels_hold(self, names: dict) -> bool:
        """Whether the domains of this layout keep their domain labels under ``names``."""
        return names == self.names or all(domain_label(d, names) == lab[1]
                                          for d, lab in self._dlab.items())

    def extended(self, keys: list, kcache: dict, names: dict) -> "_Layout":
        """A new layout for ``keys``, which start with ``self.keys``: this one's series plus
        those of the keys after them (work in proportion to the new keys only). ``names``:
        domain names, under which this layout's labels hold."""
        new = copy.copy(self)
        new.names = names
        for attr in ("_cidx", "_sidx", "_dri", "_domi", "_dlab", "_vcpus", "c_labels",
                     "s_labels", "dr_labels", "domids", "dr_pairs", "_prefix_lists"):
            setattr(new, attr, copy.copy(getattr(self, attr)))
        new._row = None
        new._add(keys[len(self.keys):], kcache)
        new.keys = keys
        return new

    def _add(self, keys, kcache) -> None:
        vcpu_label = self.vcpu_label
        # Key -> (count key, service key): label work done once per key.
        pairs = []
        for key in keys:
            kc = kcache.get(key)
            if kc is None:
                tlabel = _TYPE_LABEL.get(key.type) or OTHER
                kc = kcache[key] = (
                    (key.domid, key.vcpu if vcpu_label else None, tlabel,
                     _DIR_LABEL.get(key.dir) or OTHER, key.range),
                    (key.domid, tlabel, key.range))
            pairs.append(kc)
        cidx, sidx, dri, domi = self._cidx, self._sidx, self._dri, self._domi
        nc0, ns0, nd0, ndom0 = len(cidx), len(sidx), len(dri), len(domi)
        n = len(pairs)
        cg = np.fromiter((cidx.setdefault(ck, len(cidx)) for ck, _ in pairs), np.int64, n)
        sg = np.fromiter((sidx.setdefault(sk, len(sidx)) for _, sk in pairs), np.int64, n)
        self._cg = np.concatenate([self._cg, cg])
        self._sg = np.concatenate([self._sg, sg])
        self.c = _Groups(self._cg, len(cidx))
        self.s = _Groups(self._sg, len(sidx))
        new_c = list(cidx)[nc0:]
        new_s = list(sidx)[ns0:]
        # (source, domain, domid) labels per domain, vcpu label strings: made once
        dlab, vcpus, name = self._dlab, self._vcpus, self.name
        for d in {ck[0] for ck in new_c} | {sk[0] for sk in new_s}:
            if d not in dlab:
                dlab[d] = (name, domain_label(d, self.names), str(d))
                domi[d] = len(domi)
        if vcpu_label:
            for v in {ck[1] for ck in new_c} - vcpus.keys():
                vcpus[v] = str(v)
        c_labels = [dlab[d] + ((vcpus[v], tl, dl, rng) if vcpu_label else (tl, dl, rng))
                    for d, v, tl, dl, rng in new_c]
        s_labels = [dlab[d] + (tl, rng) for d, tl, rng in new_s]
        self.c_labels += c_labels
        self.s_labels += s_labels
        c_dr = np.fromiter((dri.setdefault((ck[0], ck[4]), len(dri)) for ck in new_c),
                           np.intp, len(new_c))
        new_dr = list(dri)[nd0:]
        self.c_domi = np.concatenate([self.c_domi, np.fromiter(
            (domi[ck[0]] for ck in new_c), np.intp, len(new_c))])
        self.s_domi = np.concatenate([self.s_domi, np.fromiter(
            (domi[sk[0]] for sk in new_s), np.intp, len(new_s))])
        self.c_dr = np.concatenate([self.c_dr, c_dr])
        self.dr_domi = np.concatenate([self.dr_domi, np.fromiter(
            (domi[d] for d, _ in new_dr), np.intp, len(new_dr))])
        self.domids += list(domi)[ndom0:]
        self.dr_pairs += new_dr
        self.dr_labels += [dlab[d] + (rng,) for d, rng in new_dr]
        # label text of the new series, where the old ones' was made already
        for sample, lst in self._prefix_lists.items():
            self._prefix_lists[sample] = lst + self._make_prefixes(
                sample, {_HIST: s_labels, _FIRST: self.dr_labels[nd0:]}.get(sample, c_labels),
                {})

    def order_of(self, keys: list):
        """For the same keys in another order (a source that lists its cells in map order,
        with new Key objects), the rows of ``keys`` to take, in this layout's order; None when
        ``keys`` are not the same set."""
        n = len(self.keys)
        if len(keys) != n:
            return None
        if self._row is None:
            self._row = {k: i for i, k in enumerate(self.keys)}
        try:
            rows = np.fromiter(map(self._row.__getitem__, keys), np.intp, n)
        except KeyError:
            return None
        if n and np.bincount(rows, minlength=n).max() != 1:
            return None
        order = np.empty(n, dtype=np.intp)
        order[rows] = np.arange(n)
        return order

    def prefixes(self, sample: str) -> list:
        """The "\\n<sample>{labels} " of every series of ``sample`` (16 per histogram series:
        13 buckets, +Inf, _count, _sum), made on first use and kept with the layout."""
        out = self._prefix_lists.get(sample)
        if out is not None:
            return out
        labels = {_HIST: self.s_labels, _FIRST: self.dr_labels}.get(sample, self.c_labels)
        new: dict = {}
        out = self._make_prefixes(sample, labels, self._pcache.get(sample, {}), new)
        self._pcache[sample] = new     # only the series of this layout: bounded
        self._prefix_lists[sample] = out
        return out

    def _make_prefixes(self, sample, all_labels, old, new=None) -> list:
        out = []
        if sample == _HIST:
            for labels in all_labels:
                pre = old.get(labels)
                if pre is None:
                    pre = _hist_prefixes(_HIST, _HIST_LABELS, labels)
                if new is not None:
                    new[labels] = pre
                out.extend(pre)
        else:
            labelnames = _FIRST_LABELS if sample == _FIRST else self.io_labelnames
            for labels in all_labels:
                pre = old.get(labels)
                if pre is None:
                    pre = "\n" + _line_prefix(sample, labelnames, labels)
                if new is not None:
                    new[labels] = pre
                out.append(pre)
        return out


_HIST = "iotrace_ioreq_service_seconds"
_FIRST = "iotrace_range_first_seen_timestamp_seconds"
_FIRST_LABELS = ("source", "domain", "domid", "range")
_HIST_LABELS = ("source", "domain", "domid", "type", "range")
_HIST_LINES = len(_BUCKET_LE) + 3                  # buckets, +Inf, _count, _sum


def _hist_prefixes(name, labelnames, labels) -> tuple:
    le_names = labelnames + ("le",)
    return tuple("\n" + _line_prefix(name + "_bucket", le_names, labels + (le,))
                 for le in _BUCKET_LE + ("+Inf",)) + \
        ("\n" + _line_prefix(name + "_count", labelnames, labels),
         "\n" + _line_prefix(name + "_sum", labelnames, labels))


def _gather(items: list, rows) -> list:
    if rows is None:
        return items
    rows = rows.tolist()
    if not rows:
        return []
    return [items[i] for i in rows]


_PIECE_LINES = 8192       # ~1 MB of text: the scraper compresses a piece while the next is made


def _pieces(prefixes: list, values: list):
    """The lines prefix+value, as strings of up to _PIECE_LINES lines."""
    for i in range(0, len(prefixes), _PIECE_LINES):
        pre = prefixes[i:i + _PIECE_LINES]
        parts = [None] * (2 * len(pre))
        parts[0::2] = pre
        parts[1::2] = values[i:i + _PIECE_LINES]
        yield "".join(parts)


class _CounterBlock:
    """The series of one counter family from one source: values of the layout's count groups
    (``rows``: the groups to export, None for all)."""

    __slots__ = ("lay", "sample", "rows", "values")

    def __init__(self, lay, sample, rows, values):
        self.lay, self.sample, self.rows = lay, sample, rows
        self.values = values if rows is None else values[rows]

    def iter_samples(self, names):
        labels = _gather(self.lay.c_labels, self.rows)
        for lab, v in zip(labels, self.values.tolist()):
            yield self.sample, names, lab, v

    def render(self):
        pre = self.lay.prefixes(self.sample)
        if self.rows is not None:
            pre = _gather(pre, self.rows)
        return _pieces(pre, list(map(str, self.values.tolist())))


class _RowsBlock:
    """Gauge values of the layout's (domain, range) pairs (``rows``: the pairs to export, None
    for all), ``values`` in that order."""

    __slots__ = ("lay", "sample", "rows", "values")

    def __init__(self, lay, sample, rows, values):
        self.lay, self.sample, self.rows, self.values = lay, sample, rows, values

    def iter_samples(self, names):
        for lab, v in zip(_gather(self.lay.dr_labels, self.rows), self.values):
            yield self.sample, names, lab, v

    def render(self):
        return _pieces(_gather(self.lay.prefixes(self.sample), self.rows),
                       _fmt_many(self.values))


class _HistBlock:
    """The histogram series of one source: cumulative bucket counts, count and sum per service
    group of the layout (``rows``: the groups to export, None for all)."""

    __slots__ = ("lay", "rows", "cum", "n", "sums")

    def __init__(self, lay, rows, cum, n, sums):
        self.lay, self.rows = lay, rows
        if rows is not None:
            cum, n, sums = cum[rows], n[rows], sums[rows]
        self.cum, self.n, self.sums = cum, n, sums

    def iter_samples(self, names):
        b, c, s = _HIST + "_bucket", _HIST + "_count", _HIST + "_sum"
        le_names = names + ("le",)
        labels = _gather(self.lay.s_labels, self.rows)
        for lab, buckets, n, total in zip(labels, self.cum.tolist(), self.n.tolist(),
                                          self.sums.tolist()):
            for le, v in zip(_BUCKET_LE, buckets):
                yield b, le_names, lab + (le,), v
            yield b, le_names, lab + ("+Inf",), n
            yield c, names, lab, n
            yield s, names, lab, total

    def render(self):
        k = len(self.n)
        pre = self.lay.prefixes(_HIST)
        if self.rows is not None:
            pre = _gather(pre, (self.rows[:, None] * _HIST_LINES +
                                np.arange(_HIST_LINES)).ravel())
        nb = len(_BUCKET_LE)
        ints = np.empty((k, nb + 2), dtype=np.int64)
        ints[:, :nb] = self.cum
        ints[:, nb] = ints[:, nb + 1] = self.n           # +Inf bucket and _count
        istr = list(map(str, ints.ravel().tolist()))
        del ints
        vals = [None] * (k * _HIST_LINES)
        for j in range(nb + 2):
            vals[j::_HIST_LINES] = istr[j::nb + 2]
        del istr
        vals[nb + 2::_HIST_LINES] = _fmt_many(self.sums.tolist())
        return _pieces(pre, vals)


class Family:
    """One metric family of a snapshot: rows of (label values, value), and blocks (column-wise
    series of one source, see ``_CounterBlock``/``_HistBlock``).

    Histogram rows hold (cumulative bucket counts, count, sum) as their value.
    """

    __slots__ = ("name", "type", "labelnames", "help", "rows", "blocks")

    def __init__(self, name, typ, labelnames, help_text):
        self.name, self.type, self.labelnames, self.help = name, typ, tuple(labelnames), help_text
        self.rows: list = []
        self.blocks: list = []

    def add(self, labels: tuple, value) -> None:
        self.rows.append((labels, value))

    def iter_samples(self):
        """(sample name, label names, label values, value) in exposition order."""
        names = self.labelnames
        if self.type == "counter":
            sname = self.name + "_total"
            for labels, value in self.rows:
                yield sname, names, labels, value
        elif self.type == "histogram":
            bname, cname, sname = (self.name + "_bucket", self.name + "_count",
                                   self.name + "_sum")
            le_names = names + ("le",)
            for labels, (buckets, n, total) in self.rows:
                for le, v in zip(_BUCKET_LE, buckets):
                    yield bname, le_names, labels + (le,), v
                yield bname, le_names, labels + ("+Inf",), n
                yield cname, names, labels, n
                yield sname, names, labels, total
        else:
            for labels, value in self.rows:
                yield self.name, names, labels, value
        for block in self.blocks:
            yield from block.iter_samples(names)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line_prefix(name, names, values) -> str:
    if not names:
        return name + " "
    return name + "{" + ",".join(f'{n}="{_escape_value(v)}"' for n, v in zip(names, values)) \
        + "} "


def _fmt(value) -> str:
    if type(value) is int:
        return str(value)
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def _fmt_many(values: list) -> list[str]:
    """``[_fmt(v) for v in values]``, with NumPy finding the few values repr() does not write
    as _fmt does (integral, NaN, infinite)."""
    if not values:
        return []
    a = np.asarray(values, dtype=np.float64)
    out = list(map(repr, a.tolist()))      # Python floats (whatever numbers came in)
    with np.errstate(invalid="ignore"):
        special = ~np.isfinite(a) | (a == np.trunc(a))
    for i in np.flatnonzero(special).tolist():
        out[i] = _fmt(values[i])
    return out


def worst_case_series_per_domain(addrmap: AddressMap, vcpus: int,
                                 vcpu_label: bool = True) -> dict[str, int]:
    """Upper bound of the series one domain can create in one source, per metric.

    Type and range are tied: a port range only appears with type pio, a MMIO range with mmio,
    a PCI device name with pci_config; the other request types have one range name each, and
    unknown type codes are exported as type "other", range "other".
    """
    kinds = {"pio": set(), "mmio": set(), "pci_config": set()}
    for e in addrmap.entries:
        kinds[e.kind].add(e.name)
    pairs = (len(kinds["pio"]) + 1) + (len(kinds["mmio"]) + 1) + \
        (len(kinds["pci_config"]) + 1)                  # + other / + "pci-config"
    pairs += len(TYPE_RANGE_NAMES) - 1                # vmware-port, timeoffset, invalidate
    pairs += 1                                        # type other, range other
    ranges = len(set(addrmap.names))
    vcpu_values = (vcpus + 1) if vcpu_label else 1    # + "-1" (buffered / unknown)
    io = vcpu_values * len(DIR_NAMES) * pairs
    hist = pairs * (len(BUCKET_EXPONENTS) + 1 + 2)    # buckets, +Inf, _sum, _count
    out = {
        "iotrace_ioreqs_total": io,
        "iotrace_ioreq_bytes_total": io,
        "iotrace_ioreq_service_seconds": hist,
        "iotrace_domain_info": 1,
        "iotrace_domain_ranges_seen": 1,
        "iotrace_range_first_seen_timestamp_seconds": ranges,
        "iotrace_probes_attached": 1,
    }
    out["total"] = sum(out.values())
    return out
