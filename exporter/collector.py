"""The Prometheus collector of ``iotrace serve``: reads its sources at scrape time.

Like client_python's process collector, it is given what it reads (the sources) as parameters and
is registered on a private ``CollectorRegistry``. Every scrape calls ``Source.totals()``,
``domains()`` and ``stats()`` — cheap copies of running totals — so the cost of a scrape depends on
the number of series, never on the request rate of the guests (metrics mode reads totals; it does
not replay events).

Label values are bounded by construction: ``range`` comes from the address map (``other`` for the
rest), ``type``/``dir`` from fixed tables (unknown type codes become ``other``), ``vcpu`` from the
domain's vCPUs (``-1`` for buffered/unknown). Guest data values (ioreq ``data``) are never read
here. Series of a domain that went away disappear ``domain_grace_seconds`` after it was last
known alive. The metric contract is documented in docs/metrics.md.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from . import __version__
from .addrmap import OTHER, TYPE_RANGE_NAMES, AddressMap
from .aggregate import N_SLOTS
from .events import DIR_NAMES, TYPE_NAMES
from .settings import ExporterSettings

log = logging.getLogger("iotrace.serve")

# Histogram buckets: le = 2^k ns for k = 10, 12, ..., 34 (1.024 us .. 17.18 s), from the log2
# histograms of iotrace.aggregate, where slot k holds durations in [2^(k-1), 2^k) ns: the
# cumulative count of slots 0..k is the number of durations < 2^k ns. (A duration of exactly 2^k ns
# lands in slot k+1, so it is counted from the next bucket on: the error is at most one slot.)
BUCKET_EXPONENTS = tuple(range(10, 35, 2))
BUCKET_BOUNDS_SECONDS = tuple((2 ** k) / 1e9 for k in BUCKET_EXPONENTS)

UNKNOWN_DOMAIN = "unknown"


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
    """One rendering in progress, shared by the scrapes that arrive meanwhile."""

    __slots__ = ("done", "body")

    def __init__(self):
        self.done = threading.Event()
        self.body: bytes | None = None


class _SourceView:
    """What one collection read from one source (or why it could not)."""

    __slots__ = ("name", "totals", "domains", "stats", "error")

    def __init__(self, name):
        self.name = name
        self.totals = {}
        self.domains = {}
        self.stats = None
        self.error = None


class IotraceCollector(Collector):
    """Collector over ``sources`` (objects of the ``iotrace.source.Source`` protocol).

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
        self._render_lock = threading.Lock()
        self._prefixes: dict[str, dict] = {}
        self._keycache: dict[str, dict] = {}
        self._labelcache: dict[str, dict] = {}
        self._pending_lock = threading.Lock()
        self._pending: _Pending | None = None

    # -- reading the sources ---------------------------------------------------------------------
    def _read(self, src) -> _SourceView:
        view = _SourceView(src.name)
        try:
            view.stats = src.stats()
            view.domains = src.domains()
            view.totals = src.totals()
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
                   "1 if the event source is running and readable, 0 if it failed (see the "
                   "log)."),
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
        """The same metrics as ``collect()``, in the text format 0.0.4, fast.

        Rendering ~10^5 samples through prometheus_client costs seconds; here the label part of
        every line is cached between scrapes (series are stable), so a scrape formats numbers only.

        Scrapes that arrive while a rendering is under way share its result instead of starting
        their own: many concurrent scrapers cost one collection, not one each (CPU and memory).
        """
        while True:
            with self._pending_lock:
                job = self._pending
                mine = job is None
                if mine:
                    job = self._pending = _Pending()
            if not mine:
                job.done.wait()
                if job.body is not None:
                    return job.body
                continue                       # that rendering failed: do our own
            try:
                with _no_gc():
                    job.body = self._render_text()
                return job.body
            finally:
                with self._pending_lock:
                    self._pending = None
                job.done.set()

    def _render_text(self) -> bytes:
        fams = self._snapshot()
        out = []
        with self._render_lock:
            for f in fams:
                tname = f.name + "_total" if f.type == "counter" else f.name
                out.append(f"# HELP {tname} {_escape_help(f.help)}\n# TYPE {tname} {f.type}")
                if not f.rows:
                    continue
                old = self._prefixes.get(f.name, {})
                new = {}
                if f.type == "histogram":
                    bname, cname, sname = (f.name + "_bucket", f.name + "_count",
                                           f.name + "_sum")
                    le_names = f.labelnames + ("le",)
                    for labels, (buckets, n, total) in f.rows:
                        pre = old.get(labels)
                        if pre is None:
                            pre = tuple(_line_prefix(bname, le_names, labels + (le,))
                                        for le in _BUCKET_LE + ("+Inf",)) + \
                                (_line_prefix(cname, f.labelnames, labels),
                                 _line_prefix(sname, f.labelnames, labels))
                        new[labels] = pre
                        vals = list(map(str, buckets))
                        vals += (str(n), str(n), _fmt(total))
                        out.append("\n".join(map(str.__add__, pre, vals)))
                else:
                    sname = tname
                    prefixes = []
                    for labels, _ in f.rows:
                        pre = old.get(labels)
                        if pre is None:
                            pre = _line_prefix(sname, f.labelnames, labels)
                        new[labels] = pre
                        prefixes.append(pre)
                    values = [v for _, v in f.rows]
                    # counts are ints (exact, and str() is the fast path); gauges may be floats
                    fmt = str if f.type == "counter" else _fmt
                    out.extend(map(str.__add__, prefixes, map(fmt, values)))
                self._prefixes[f.name] = new    # only the series of this scrape: bounded
        out.append("")
        text = "\n".join(out)
        del out, fams          # free the lines before the bytes copy is made (peak memory)
        return text.encode("utf-8")

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

        counts: dict[tuple, list] = {}
        svc: dict[tuple, list] = {}          # service key -> [n, sum_ns, row]
        svc_row: list[int] = []               # per cell with service times: its row
        svc_hist: list = []                   # ... and its log2 histogram
        touched: dict[int, set] = {}
        # Key -> (count key, service key): label work done once per key, not once per scrape.
        kcache = self._keycache.setdefault(name, {})
        if len(kcache) > 4 * len(view.totals) + 1024:
            kcache.clear()
        for key, cell in view.totals.items():
            if not cell.count and not cell.service_n:
                continue
            kc = kcache.get(key)
            if kc is None:
                tlabel = _TYPE_LABEL.get(key.type) or OTHER
                kc = kcache[key] = (
                    (key.domid, key.vcpu if vcpu_label else None, tlabel,
                     _DIR_LABEL.get(key.dir) or OTHER, key.range),
                    (key.domid, tlabel, key.range))
            ck, sk = kc
            domid = ck[0]
            v = visible.get(domid)
            if v is None:
                v = is_visible(domid)
            if not v:
                continue
            acc = counts.get(ck)
            if acc is None:
                counts[ck] = [cell.count, cell.bytes]
            else:
                acc[0] += cell.count
                acc[1] += cell.bytes
            if cell.service_n:
                # histograms are summed below in one NumPy pass (no per-cell array arithmetic)
                sacc = svc.get(sk)
                if sacc is None:
                    sacc = svc[sk] = [0, 0, len(svc)]
                sacc[0] += cell.service_n
                sacc[1] += cell.service_sum_ns
                svc_row.append(sacc[2])
                svc_hist.append(cell.hist)
            if cell.count:
                t = touched.get(domid)
                if t is None:
                    t = touched[domid] = set()
                t.add(ck[4])
        view.totals = {}      # the copy is folded in: free it before rendering (peak memory)

        dom_labels = {}

        def dlabels(domid):
            d = dom_labels.get(domid)
            if d is None:
                d = dom_labels[domid] = (domain_label(domid, names), str(domid))
            return d

        io_rows = fam["iotrace_ioreqs"].rows
        byte_rows = fam["iotrace_ioreq_bytes"].rows
        # The same label tuple object every scrape (while the domain keeps its name): the text
        # renderer's prefix cache then matches by identity instead of comparing strings.
        lcache = self._labelcache.setdefault(name, {})
        if len(lcache) > 2 * len(counts) + 1024:
            lcache.clear()
        for ck, (count, b) in counts.items():
            ent = lcache.get(ck)
            dn = names.get(ck[0]) if names else None
            if ent is None or ent[0] != dn:
                domid, vcpu, tl, dl, rng = ck
                dname, ds = dlabels(domid)
                labels = (name, dname, ds) + ((str(vcpu),) if vcpu_label else ()) + \
                    (tl, dl, rng)
                ent = lcache[ck] = (dn, labels)
            labels = ent[1]
            io_rows.append((labels, count))
            if b > 0:
                byte_rows.append((labels, b))

        if svc:
            # cumulative count of slots 0..k = durations < 2^k ns, per cell, then summed per row
            cum = np.cumsum(np.stack(svc_hist), axis=1)[:, _BUCKET_COLS]
            rows = np.asarray(svc_row, dtype=np.int64)
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            per_row = np.add.reduceat(cum[order], starts, axis=0).tolist()
            hist_rows = fam["iotrace_ioreq_service_seconds"].rows
            for (domid, tl, rng), (n, sum_ns, i) in svc.items():
                dn, ds = dlabels(domid)
                hist_rows.append(((name, dn, ds, tl, rng), (per_row[i], n, sum_ns / 1e9)))

        # Domains: those the source lists plus those that only appear in the totals.
        src_first = getattr(src, "range_first_seen", None)
        src_first = src_first() if callable(src_first) and view.error is None else {}
        has_probes = getattr(src, "has_probes", name == "qemu")
        for domid in sorted(set(view.domains) | set(touched)):
            if not is_visible(domid):
                for k in [k for k in self._first_seen if k[0] == name and k[1] == domid]:
                    del self._first_seen[k]
                continue
            dn, ds = dlabels(domid)
            fam["iotrace_domain_info"].add((ds, dn, name), 1)
            rngs = touched.get(domid, set())
            fam["iotrace_domain_ranges_seen"].add((name, dn, ds), len(rngs))
            for rng in sorted(rngs):
                t = src_first.get((domid, rng)) if src_first else None
                if t is None:
                    t = self._first_seen.setdefault((name, domid, rng), now)
                fam["iotrace_range_first_seen_timestamp_seconds"].add((name, dn, ds, rng),
                                                                      float(t))
            if has_probes and domid in view.domains:
                fam["iotrace_probes_attached"].add((name, dn, ds),
                                                   view.domains[domid].probes_attached)


_TYPE_LABEL = dict(TYPE_NAMES)
_DIR_LABEL = dict(DIR_NAMES)
_BUCKET_LE = tuple(repr(b) for b in BUCKET_BOUNDS_SECONDS)
_BUCKET_COLS = [min(k, N_SLOTS - 1) for k in BUCKET_EXPONENTS]


class Family:
    """One metric family of a snapshot: rows of (label values, value).

    Histogram rows hold (cumulative bucket counts, count, sum) as their value.
    """

    __slots__ = ("name", "type", "labelnames", "help", "rows")

    def __init__(self, name, typ, labelnames, help_text):
        self.name, self.type, self.labelnames, self.help = name, typ, tuple(labelnames), help_text
        self.rows: list = []

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
