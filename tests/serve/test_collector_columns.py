"""The column-wise scrape (issue #4): ``Source.totals_columns()`` and its fallback, the collector's
per-source layout (group sums, cached label prefixes), chunked and gzipped serving.

Ground truth is computed here from ``totals()`` with plain Python, independently of the collector.
"""
from __future__ import annotations

import gzip
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from iotrace.core.aggregate import N_SLOTS, SLOT_UPPER_NS, Cell, Key
from iotrace.core.events import DIR_NAMES, TYPE_MMIO, TYPE_NAMES, TYPE_PIO, empty
from iotrace.core.metrics import BUCKET_BOUNDS_NS
from iotrace.core.source import SourceStats, columns_of, totals_columns
from iotrace.serve.collector import IotraceCollector
from iotrace.serve.render import Renderer
from iotrace.serve.server import ExporterServer
from iotrace.serve.settings import ExporterSettings
from support.fakes import FedSource as Fed
from support.fakes import random_batch

NOW = 1_000_000.0


def fed_collector(seed: int, n: int):
    """A started source fed ``n`` random requests, its collector and a private registry."""
    s = Fed()
    s.start()
    s.feed(random_batch(np.random.default_rng(seed), n))
    col = IotraceCollector([s])
    reg = CollectorRegistry()
    reg.register(col)
    return col, reg


def truth(totals: dict, source: str, names: dict, vcpu_label: bool) -> dict:
    """{(sample name, sorted labels): value} from a totals dict, the slow obvious way."""
    out: dict = {}
    tname = dict(TYPE_NAMES)
    dname = dict(DIR_NAMES)

    def add(name, labels, v):
        k = (name, tuple(sorted(labels.items())))
        out[k] = out.get(k, 0) + v

    for key, c in totals.items():
        if not c.count and not c.service_n:
            continue
        dom = names.get(key.domid) or ("unknown" if key.domid < 0 else f"dom{key.domid}")
        t = tname.get(key.type, "other")
        base = dict(source=source, domain=dom, domid=str(key.domid))
        io = dict(base, type=t, dir=dname[key.dir], range=key.range)
        if vcpu_label:
            io["vcpu"] = str(key.vcpu)
        add("iotrace_ioreqs_total", io, c.count)
        add("iotrace_ioreq_bytes_total", io, c.bytes)
        if c.service_n:
            h = dict(base, type=t, range=key.range)
            for b in BUCKET_BOUNDS_NS:          # the slots that end at or below the bound
                add("iotrace_ioreq_service_seconds_bucket", dict(h, le=repr(b / 1e9)),
                    int(c.hist[SLOT_UPPER_NS <= b].sum()))
            add("iotrace_ioreq_service_seconds_bucket", dict(h, le="+Inf"), c.service_n)
            add("iotrace_ioreq_service_seconds_count", h, c.service_n)
            add("iotrace_ioreq_service_seconds_sum", h, c.service_sum_ns)
    out = {k: v for k, v in out.items() if not (k[0] == "iotrace_ioreq_bytes_total" and v == 0)}
    return {k: (v / 1e9 if k[0].endswith("_sum") else v) for k, v in out.items()}


def exported(text: str, prefix="iotrace_ioreq") -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(prefix):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


def test_columns_equal_totals():
    s = Fed()
    s.feed(random_batch(np.random.default_rng(1), 3000))
    tot = s.totals()
    cols = s.totals_columns()
    assert len(cols) == len(tot) > 50 and cols.hist.shape == (len(tot), N_SLOTS)
    for i, k in enumerate(cols.keys):
        c = tot[k]
        assert (cols.count[i], cols.bytes[i], cols.service_n[i], cols.service_sum_ns[i]) == \
            (c.count, c.bytes, c.service_n, c.service_sum_ns)
        assert (cols.hist[i] == c.hist).all()
    # a snapshot: later feeds do not change it
    before = cols.count.sum(), cols.hist.sum()
    s.feed(random_batch(np.random.default_rng(2), 100))
    assert (cols.count.sum(), cols.hist.sum()) == before
    # histograms that cannot be copied as one buffer (other dtype, not contiguous) still work
    odd = {Key(1, 0, TYPE_PIO, 0, "com1", 0): Cell(1, 1, 1, 5, np.arange(N_SLOTS,
                                                                          dtype=np.uint32)),
           Key(1, 1, TYPE_PIO, 0, "com1", 0): Cell(2, 2, 2, 6, np.arange(2 * N_SLOTS)[::2])}
    c = columns_of(odd)
    assert (c.hist[0] == np.arange(N_SLOTS)).all() and (c.hist[1] == 2 * np.arange(N_SLOTS)).all()
    assert c.hist.dtype == np.int64 and list(c.count) == [1, 2]
    assert len(columns_of({})) == 0


class OwnTotals(Fed):
    """Overrides totals() only, and says so (columnar = False): its columns must come from that
    totals(), not the base class's."""

    columnar = False

    def totals(self):
        return {Key(5, 0, TYPE_PIO, 0, "com1", 0): Cell(7, 7, 0, 0)}


class MapSource:
    """A source that is no EventSource (like the live probes): totals() only."""

    name = "qemu"

    def __init__(self, cells):
        self.cells = cells

    def totals(self):
        return {k: Cell(c.count, c.bytes, c.service_n, c.service_sum_ns, c.hist.copy())
                for k, c in self.cells.items()}

    def domains(self):
        return {}

    def stats(self):
        return SourceStats(self.name, up=True)


def test_totals_columns_dispatch():
    s = OwnTotals()
    s.feed(random_batch(np.random.default_rng(3), 50))
    assert list(totals_columns(s).keys) == [Key(5, 0, TYPE_PIO, 0, "com1", 0)]
    f = Fed()
    f.feed(random_batch(np.random.default_rng(3), 50))
    assert totals_columns(f).keys == list(f.totals())
    m = MapSource(f.totals())
    assert totals_columns(m).keys == list(f.totals())


@pytest.mark.parametrize("vcpu_label", [True, False])
def test_scrapes_equal_truth_across_changes(vcpu_label):
    """Several scrapes of a changing source: new keys (layout rebuilt), a renamed domain, cells
    with service times but no count and empty cells, a domain past its grace period."""
    rng = np.random.default_rng(11)
    s = Fed(keep_addr=True)          # several cells per series: real group sums
    s.start()
    clock = [NOW]
    col = IotraceCollector([s], ExporterSettings(vcpu_label=vcpu_label,
                                                 domain_grace_seconds=60),
                           clock=lambda: clock[0])
    reg = CollectorRegistry()
    reg.register(col)
    names = {1: "alpha", 2: "beta"}

    def check():
        want = truth(s.totals(), "qemu", names, vcpu_label)
        got_fast = exported(col.render_text().decode())
        got_slow = exported(generate_latest(reg).decode())
        assert_same(got_fast, want)
        assert_same(got_slow, want)
        return got_fast

    for d, n in names.items():
        s.add_domain(d, n, last_seen=NOW)
    s.feed(random_batch(rng, 2000))
    check()
    check()                               # same layout, values only
    s.feed(random_batch(rng, 500))        # same keys, new values
    check()
    s.feed(random_batch(rng, 300, domains=(4, -1)))   # new keys: the layout is rebuilt
    got = check()
    assert any(dict(k[1])["domain"] == "unknown" for k in got)
    names[2] = "beta-renamed"
    s.add_domain(2, "beta-renamed", last_seen=NOW)
    got = check()
    assert not any(dict(k[1])["domain"] == "beta" for k in got)
    # map-style cells: service times without a count, and a cell with nothing at all
    h = np.zeros(N_SLOTS, dtype=np.int64)
    h[12] = 3
    s.add_cell(Key(7, 0, TYPE_MMIO, 1, "vga-lowmem", 0), Cell(0, 0, 3, 9000, h))
    s.add_cell(Key(8, 0, TYPE_MMIO, 1, "vga-lowmem", 0), Cell())
    # inconsistent map data: a histogram without service times is not counted
    s.add_cell(Key(7, 1, TYPE_MMIO, 1, "vga-lowmem", 0), Cell(2, 8, 0, 0, h * 5))
    got = check()
    assert ("iotrace_ioreq_service_seconds_count",
            (("domain", "dom7"), ("domid", "7"), ("range", "vga-lowmem"), ("source", "qemu"),
             ("type", "mmio"))) in got
    assert not any(dict(k[1])["domid"] == "8" for k in got)
    text = col.render_text().decode()
    assert 'iotrace_domain_info{domid="8"' not in text
    # domain 2 stops being alive: hidden after the grace period, the others stay
    s.add_domain(2, "beta-renamed", last_seen=NOW)
    clock[0] = NOW + 61
    for d in (1,):
        s.add_domain(d, names[d], last_seen=clock[0])
    text = col.render_text().decode()
    got = exported(text)
    assert got and not any(dict(k[1])["domid"] == "2" for k in got)
    assert any(dict(k[1])["domid"] == "1" for k in got)
    assert 'domid="2"' not in text
    assert exported(generate_latest(reg).decode()) == got


def test_first_seen_and_ranges_seen_per_domain():
    s = Fed()
    s.start()
    clock = [NOW]
    col = IotraceCollector([s], clock=lambda: clock[0])
    b = empty(3)
    b["domid"], b["type"], b["addr"], b["service_ns"] = 1, TYPE_PIO, [0x3f8, 0x60, 0x3f9], -1
    s.feed(b)
    g = exported(col.render_text().decode(), "iotrace_")
    first = {dict(k[1])["range"]: v for k, v in g.items()
             if k[0] == "iotrace_range_first_seen_timestamp_seconds"}
    assert first == {"com1": NOW, "i8042": NOW}
    clock[0] = NOW + 5
    b = empty(1)
    b["domid"], b["type"], b["addr"], b["service_ns"] = 1, TYPE_PIO, 0x70, -1
    s.feed(b)
    g = exported(col.render_text().decode(), "iotrace_")
    first = {dict(k[1])["range"]: v for k, v in g.items()
             if k[0] == "iotrace_range_first_seen_timestamp_seconds"}
    assert first == {"com1": NOW, "i8042": NOW, "rtc": NOW + 5}
    seen = [v for k, v in g.items() if k[0] == "iotrace_domain_ranges_seen"]
    assert seen == [3]


def test_concurrent_renders_one_thread_same_body():
    col, _ = fed_collector(5, 5000)
    bodies, threads = [], set()
    orig = col.renderer.render_into

    def spy(put):
        threads.add(threading.get_ident())
        return orig(put)

    col.renderer.render_into = spy
    ts = [threading.Thread(target=lambda: bodies.append(col.render_text())) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert len(bodies) == 8
    assert len({b[:b.rindex(b"iotrace_scrape_duration_seconds ")] for b in bodies}) == 1
    # every rendering ran on the collector's one rendering thread, none on the scrapers'
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert col.last_render_cpu > 0


def test_server_sends_chunks_plain_and_gzip():
    col, reg = fed_collector(6, 2000)
    srv = ExporterServer(reg, "127.0.0.1:0", fast_text=col.iter_chunks)
    srv.start()
    try:
        url = srv.url + "/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            plain = r.read()
            assert int(r.headers["Content-Length"]) == len(plain)
        req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            raw = r.read()
            assert int(r.headers["Content-Length"]) == len(raw)
        unzipped = gzip.decompress(raw)
        drop = lambda b: [x for x in b.split(b"\n") if not x.startswith(  # noqa: E731
            b"iotrace_scrape_duration_seconds ")]
        assert drop(unzipped) == drop(plain) and len(raw) < len(plain) / 5
        assert plain.endswith(b"\n") and not plain.endswith(b"\n\n")
        assert exported(plain.decode()) == exported(col.render_text().decode())
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.read() == b"" and int(r.headers["Content-Length"]) > 1000
    finally:
        srv.shutdown()


def test_failed_rendering_is_500_then_recovers():
    col, reg = fed_collector(8, 200)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("collector bug")
        return col.snapshot()

    renderer = Renderer(flaky)
    srv = ExporterServer(reg, "127.0.0.1:0", fast_text=lambda: renderer.job().stream())
    srv.start()
    try:
        for enc in ("gzip", "identity"):
            req = urllib.request.Request(srv.url + "/metrics", headers={"Accept-Encoding": enc})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    code, body = r.status, r.read()
            except urllib.error.HTTPError as exc:
                code, body = exc.code, exc.read()
            if enc == "gzip":
                assert code == 500 and b"collector bug" in body
            else:
                assert code == 200 and b"iotrace_ioreqs_total{" in body
        with pytest.raises(RuntimeError):
            calls.clear()
            renderer.job().result()
        assert b"iotrace_ioreqs_total{" in b"".join(renderer.job().result())
    finally:
        srv.shutdown()


def test_render_thread_ends_when_idle_and_comes_back(monkeypatch):
    import time

    import iotrace.serve.render as render_mod
    monkeypatch.setattr(render_mod, "IDLE_SECONDS", 0.2)
    col, _ = fed_collector(9, 100)
    first = col.render_text()
    worker = col.renderer.thread
    assert worker is not None and worker.daemon
    worker.join(5)
    assert not worker.is_alive() and col.renderer.thread is None
    time.sleep(0.05)
    again = col.render_text()
    assert again[:again.rindex(b"iotrace_scrape_duration")] == \
        first[:first.rindex(b"iotrace_scrape_duration")]
    assert col.renderer.thread is not None and col.renderer.thread is not worker


class ShuffledMapSource(MapSource):
    """Map-order cells: new Key objects, in another order on every read."""

    def __init__(self, cells, seed=0):
        super().__init__(cells)
        self.rng = np.random.default_rng(seed)

    def totals(self):
        items = list(super().totals().items())
        self.rng.shuffle(items)
        return {Key(*k): c for k, c in items}


def test_reordered_keys_reuse_the_layout():
    f = Fed(keep_addr=True)
    f.feed(random_batch(np.random.default_rng(12), 3000))
    m = ShuffledMapSource(f.totals())
    col = IotraceCollector([m])
    want = truth(f.totals(), "qemu", {}, True)
    assert_same(exported(col.render_text().decode()), want)
    lay = col.layout_of("qemu")
    for _ in range(3):
        assert_same(exported(col.render_text().decode()), want)
        assert col.layout_of("qemu") is lay
    # a new key: a new layout, still right
    f.feed(random_batch(np.random.default_rng(13), 50, domains=(9,)))
    m.cells = f.totals()
    want = truth(f.totals(), "qemu", {}, True)
    assert_same(exported(col.render_text().decode()), want)
    assert col.layout_of("qemu") is not lay


def test_new_keys_and_domains_extend_the_layout(monkeypatch):
    from iotrace.serve.layout import Layout
    built = []
    init = Layout.__init__

    def counting_init(self, *a, **kw):
        built.append(1)
        init(self, *a, **kw)

    monkeypatch.setattr(Layout, "__init__", counting_init)
    rng = np.random.default_rng(14)
    s = Fed(keep_addr=True)
    s.start()
    names = {1: "alpha"}
    s.add_domain(1, "alpha", last_seen=NOW)
    col = IotraceCollector([s], clock=lambda: NOW)
    s.feed(random_batch(rng, 1000, domains=(1,)))
    text_before = col.render_text()
    old = col.layout_of("qemu")
    n_old = len(old.keys)
    prefixes_old = list(old.prefixes("iotrace_ioreqs_total"))
    # a new guest appears (listed, with a name) and sends requests: its keys come after
    names[6] = "new-guest"
    s.add_domain(6, "new-guest", last_seen=NOW)
    s.feed(random_batch(rng, 1000, domains=(1, 6)))
    text = col.render_text().decode()
    lay = col.layout_of("qemu")
    assert lay is not old and len(lay.keys) > n_old
    assert len(built) == 1                 # the first scrape's; extended since, not rebuilt
    # extended, not rebuilt: the old series' label text is carried over as is
    assert lay.prefixes("iotrace_ioreqs_total")[:len(prefixes_old)] == prefixes_old
    # ... and the old layout is left as it was (earlier scrapes may still read it)
    assert len(old.keys) == n_old and old.prefixes("iotrace_ioreqs_total") == prefixes_old
    assert_same(exported(text), truth(s.totals(), "qemu", names, True))
    assert 'domain="new-guest"' in text and b'domain="new-guest"' not in text_before
    want = exported(generate_latest(_registry(col)).decode())
    assert_same(exported(text), want)


def _registry(col):
    reg = CollectorRegistry()
    reg.register(col)
    return reg
