"""The Prometheus collector of ``iotrace serve``: reads its sources at scrape time.

Like client_python's process collector, it is given what it reads (the sources) as parameters and
is registered on a private ``CollectorRegistry``. Every scrape reads each source's totals once
(``iotrace.core.source.totals_columns``: columns where the source offers them, else built from
``totals()``), ``domains()`` and ``stats()`` — cheap copies of running totals — so the cost of a
scrape depends on the number of series, never on the request rate of the guests (metrics mode
reads totals; it does not replay events).

The families and their labels come from the one metric table, ``iotrace.core.metrics``. The work
is split in steps of their own: ``iotrace.serve.layout`` folds a source's cells into series
column-wise (kept between scrapes, bench/exporter_scrape.py), ``iotrace.serve.exposition`` writes
the text format, ``iotrace.serve.render`` renders on one long-lived thread in pieces a scraper can
compress while the next ones are made. This module decides what is exported: the sources' rows,
which domains are still visible, first-seen times, self-metrics.

The per-domain analysis (``iotrace.analysis``: I/O wait share, class, device-model CPU, the weight
advise targets, Dom0's CPU) comes from an optional ``analysis`` object (``LiveAnalysis``: its
``latest()`` results, read without waiting) and its ``settings`` (bounds of the advised weights).

Label values are bounded by construction: ``range`` comes from the address map (``other`` for the
rest), ``type``/``dir`` from fixed tables (unknown type codes become ``other``), ``vcpu`` from the
domain's vCPUs (``-1`` for buffered/unknown), ``class`` and ``knob`` from fixed lists. Guest
data values (ioreq ``data``) are never read here. Series of a domain that went away disappear
``domain_grace_seconds`` after it was last known alive. The metric contract is documented in docs/metrics.md.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Sequence

import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from iotrace import __version__
from iotrace.analysis.classify import CLASSES
from iotrace.analysis.priorities import advised_weight
from iotrace.core.addrmap import TYPE_RANGE_NAMES, AddressMap
from iotrace.core.domains import display_name
from iotrace.core.events import DIR_NAMES
from iotrace.core.metrics import BUCKET_BOUNDS_NS, BUCKET_BOUNDS_SECONDS, METRICS  # noqa: F401
from iotrace.core.source import DAMAGE_KINDS, totals_columns
from iotrace.serve.exposition import FIRST, Family
from iotrace.serve.layout import Layout, RowsBlock, fold, gather
from iotrace.serve.render import Renderer, no_gc
from iotrace.serve.settings import ExporterSettings

log = logging.getLogger("iotrace.serve")


class SourceView:
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
                 clock=time.time, version: str = __version__, analysis=None):
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"two sources share a name: {names}")
        self.sources = list(sources)
        self.settings = settings or ExporterSettings()
        self.clock = clock
        self.version = version
        self.analysis = analysis
        self._lock = threading.Lock()
        # (source, domid) -> wall time the source last listed the domain in domains()
        self._listed_at: dict[tuple[str, int], float] = {}
        # (source, domid, range) -> wall time the collector first saw the range touched
        self._first_seen: dict[tuple[str, int, str], float] = {}
        self._hidden_logged: set[tuple[str, int]] = set()
        self.last_duration = 0.0
        self._keycache: dict[str, dict] = {}     # source -> {Key: (count key, service key)}
        self._pcache: dict[str, dict] = {}       # source -> {sample: {labels: line prefix}}
        self._layouts: dict[str, Layout] = {}    # source -> its layout of the last scrape
        self.renderer = Renderer(self._snapshot)

    # -- reading the sources ---------------------------------------------------------------------
    def _read(self, src) -> SourceView:
        view = SourceView(src.name)
        try:
            view.stats = src.stats()
            view.domains = src.domains()
            view.columns = totals_columns(src)
        except Exception as exc:  # a broken source must not break the scrape of the others
            view.error = f"{type(exc).__name__}: {exc}"
            log.warning("source %s: cannot read totals: %s", src.name, view.error)
        return view

    def _visible(self, src: str, domid: int, view: SourceView, now: float) -> bool:
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
    def snapshot(self) -> list[Family]:
        """Read every source once and return the metric families with their rows."""
        with no_gc():
            return self._snapshot()

    def _snapshot(self) -> list[Family]:
        t0 = time.perf_counter()
        vcpu_label = self.settings.vcpu_label
        dropped = () if vcpu_label else ("vcpu",)
        fam = {m.name: Family(m.name, m.type, m.labels_without(dropped), m.help) for m in METRICS}

        views = [self._read(s) for s in self.sources]
        now = self.clock()
        hidden: set[tuple[str, int]] = set()       # (source, domid) past the grace period
        with self._lock:
            for src, view in zip(self.sources, views):
                hidden |= self._collect_source(src, view, now, vcpu_label, fam)
                st = view.stats
                n = (view.name,)
                fam["iotrace_source_up"].add(n, 1 if (st is not None and st.up and
                                                     view.error is None) else 0)
                fam["iotrace_probe_attach_failures"].add(n, st.probes_failed if st else 0)
                fam["iotrace_events_lost"].add(n, st.lost if st else 0)
                fam["iotrace_decode_errors"].add(n, st.decode_errors if st else 0)
                damage = getattr(st, "damage", None) or {}
                for kind in DAMAGE_KINDS:
                    fam["iotrace_input_damage"].add((view.name, kind), damage.get(kind, 0))
                fam["iotrace_source_events"].add(n, st.events if st else 0)
        if self.analysis is not None:
            self._collect_analysis(fam, hidden)
        fam["iotrace_build_info"].add((self.version,), 1)
        self.last_duration = time.perf_counter() - t0
        fam["iotrace_scrape_duration_seconds"].add((), self.last_duration)
        return list(fam.values())

    def _collect_analysis(self, fam, hidden=frozenset()) -> None:
        """The analysis' latest per-domain results (see iotrace.analysis.live), except for the
        domains whose series went with the grace period (``hidden``: (source, domid)): a source
        keeps a gone domain's totals, and so the analysis keeps analysing it."""
        busy = None
        settings = self.analysis.settings
        for name, a in sorted(self.analysis.latest().items()):
            if busy is None:
                busy = a.host.busy_ratio
            for r in [a.dom0] + [r for _, r in sorted(a.domains.items())]:
                sig = r.signals
                if (name, sig.domid) in hidden:
                    continue
                labels = (name, sig.name, str(sig.domid))
                for cls in CLASSES:
                    if sig.domid == 0 and cls not in ("dom0-starved", "normal"):
                        continue
                    fam["iotrace_domain_class"].add(labels + (cls,), 1 if r.cls == cls else 0)
                fam["iotrace_advised_weight"].add(labels + ("xl",),
                                                  advised_weight("xl", r, settings))
                if sig.domid == 0:
                    continue
                fam["iotrace_advised_weight"].add(labels + ("cgroup",),
                                                  advised_weight("cgroup", r, settings))
                if sig.io_wait_ratio is not None:
                    fam["iotrace_domain_io_wait_ratio"].add(labels, sig.io_wait_ratio)
                if sig.dm_cpu_ratio is not None:
                    fam["iotrace_domain_device_model_cpu_ratio"].add(labels, sig.dm_cpu_ratio)
        if busy is not None:
            fam["iotrace_dom0_cpu_busy_ratio"].add((), busy)

    def collect(self) -> Iterable[Metric]:
        """prometheus_client families (used by the registry: OpenMetrics, tests)."""
        for f in self.snapshot():
            m = Metric(f.name, f.help, f.type)
            m.samples = [Sample(name, dict(zip(names, values)), float(value))
                         for name, names, values, value in f.iter_samples()]
            yield m

    @property
    def last_render_cpu(self) -> float:
        """CPU seconds the last text rendering took (all of it)."""
        return self.renderer.last_render_cpu

    def layout_of(self, source: str) -> Layout | None:
        """The series layout the last scrape of ``source`` used (kept while its keys hold)."""
        return self._layouts.get(source)

    def render_text(self) -> bytes:
        """The same metrics as ``collect()``, in the text format 0.0.4, fast."""
        return b"".join(self.render_chunks())

    def render_chunks(self) -> list[bytes]:
        """``render_text()`` in pieces (to write or compress one after the other, without the
        copy that joins them)."""
        return self.renderer.job().result()

    def iter_chunks(self):
        """``render_chunks()``, each piece as soon as it is made: a scraper can compress the
        first families (zlib lets go of the GIL) while the next ones are rendered."""
        return self.renderer.job().stream()

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
            lay = Layout(name, names, vcpu_label, pcache).extended(keys, kcache, names)
        self._layouts[name] = lay
        return lay, None

    def _collect_source(self, src, view, now, vcpu_label, fam) -> set[tuple[str, int]]:
        """The source's rows into ``fam``; returns the (source, domid) pairs it hid."""
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
            touched = fold(lay, cols, order, is_visible, fam)
            del cols                  # the columns are summed: free them before rendering
            # first-seen time of every (domain, range) touched
            first = self._first_seen
            values = []
            for domid, rng in gather(lay.dr_pairs, touched):
                t = src_first.get((domid, rng)) if src_first else None
                if t is None:
                    t = first.setdefault((name, domid, rng), now)
                values.append(float(t))
            fam[FIRST].blocks.append(RowsBlock(lay, FIRST, touched, values))
            per_dom = np.bincount(lay.dr_domi if touched is None else lay.dr_domi[touched],
                                  minlength=len(lay.domids))
            n_ranges = {d: n for d, n in zip(lay.domids, per_dom.tolist()) if n}

        # Domains: those the source lists plus those that only appear in the totals.
        has_probes = getattr(src, "has_probes", False)
        for domid in sorted(set(view.domains) | set(n_ranges)):
            if not is_visible(domid):
                for k in [k for k in self._first_seen if k[0] == name and k[1] == domid]:
                    del self._first_seen[k]
                continue
            dn, ds = display_name(domid, names), str(domid)
            fam["iotrace_domain_info"].add((ds, dn, name), 1)
            fam["iotrace_domain_ranges_seen"].add((name, dn, ds), n_ranges.get(domid, 0))
            if has_probes and domid in view.domains:
                fam["iotrace_probes_attached"].add((name, dn, ds),
                                                   view.domains[domid].probes_attached)
        return {(name, d) for d, v in visible.items() if not v}


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
    hist = pairs * (len(BUCKET_BOUNDS_NS) + 1 + 2)    # buckets, +Inf, _sum, _count
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
