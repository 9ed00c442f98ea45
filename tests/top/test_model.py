"""Unit tests of iotrace.top.model: rates from successive totals, filters, sorting, expansion."""
from __future__ import annotations

import numpy as np
import pytest

from iotrace.core import events
from iotrace.core.aggregate import N_SLOTS, Cell, Key, hist_slots
from iotrace.core.filters import Filter, FilterError, make_filter, parse_filter_spec
from iotrace.core.source import DomainInfo, SourceStats
from iotrace.top.columns import fmt_bytes, fmt_count, fmt_secs
from iotrace.top.model import Model
from iotrace.top.snapshot import Snapshot, take_snapshot
from support.fakes import FedSource, batch


def Fed(**kw):
    return FedSource("fed", **kw)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def fed():
    src = Fed(keep_addr=True)
    src.start()
    src.add_domain(1, "alpha")
    src.add_domain(2, "beta")
    return src


def step(model, src, clock, dt, *batches):
    for b in batches:
        src.feed(b)
    clock.t += dt
    model.update(take_snapshot([src], clock=clock, host="h"))
    return model.view()


def by_name(view):
    return {r.name: r for r in view.rows}


def test_rates_are_deltas_over_elapsed_time(fed):
    clock, m = Clock(), Model()
    v = step(m, fed, clock, 0)
    assert m.elapsed is None
    assert all(r.req_rate is None for r in v.rows)           # no rate from one snapshot
    v = step(m, fed, clock, 2.0,
             batch(100, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1),
             batch(40, 1, 1, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2))
    a = by_name(v)["alpha"]
    assert a.req_rate == pytest.approx(70.0)
    assert a.byte_rate == pytest.approx((100 + 80) / 2)
    assert a.read_rate == pytest.approx(20.0) and a.write_rate == pytest.approx(50.0)
    assert (a.reqs, a.bytes) == (140, 180)
    assert a.busiest == "com1" and a.busiest_share == pytest.approx(100 / 140)
    assert a.vcpus == 2
    # Next interval: only 10 more in 0.5 s; totals keep growing, rates follow the interval.
    v = step(m, fed, clock, 0.5, batch(10, 1, 1, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2))
    a = by_name(v)["alpha"]
    assert a.req_rate == pytest.approx(20.0) and a.reqs == 150
    assert a.busiest == "ide-primary" and a.busiest_share == 1.0   # busiest in the interval
    assert v.total_req_rate == pytest.approx(20.0)
    # Idle domain known to the source: shown with zero rates.
    b = by_name(v)["beta"]
    assert b.req_rate == 0 and b.reqs == 0 and b.busiest == ""


def test_counter_reset_is_not_a_negative_rate():
    """A key whose counters went down (source restarted) counts from zero: rate = new value."""
    key = Key(1, 0, events.TYPE_PIO, events.DIR_WRITE, "com1", 0)
    h = np.zeros(64, dtype=np.int64)
    m = Model()
    m.update(Snapshot(0.0, 0.0, {key: Cell(100, 1000, 0, 0, h.copy())}, {}, []))
    m.update(Snapshot(1.0, 1.0, {key: Cell(30, 300, 0, 0, h.copy())}, {}, []))
    row = m.view().rows[0]
    assert (row.req_rate, row.byte_rate, row.reqs) == (30.0, 300.0, 30)
    m.update(Snapshot(3.0, 3.0, {key: Cell(130, 1300, 0, 0, h.copy())}, {}, []))
    assert m.view().rows[0].req_rate == 50.0
    # A key that disappeared and one that is new: the new one counts whole.
    other = key._replace(vcpu=1)
    m.update(Snapshot(4.0, 4.0, {other: Cell(7, 7, 0, 0, h.copy())}, {}, []))
    assert m.view().rows[0].req_rate == 7.0


def test_quantiles_are_over_the_interval(fed):
    clock, m = Clock(), Model(slow_p95=1e-3)
    step(m, fed, clock, 0)
    v = step(m, fed, clock, 1.0,
             batch(100, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, service_ns=3_000_000))
    a = by_name(v)["alpha"]
    # one duration: the quantiles read it back within 12.5% (and exactly: clamped to min = max)
    assert a.p50 == pytest.approx(3e-3, rel=0.125) and a.p95 == pytest.approx(3e-3, rel=0.125)
    assert a.avg == pytest.approx(3e-3)
    assert "slow" in a.flags
    v = step(m, fed, clock, 1.0,
             batch(100, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, service_ns=5_000))
    a = by_name(v)["alpha"]
    assert 4.0e-6 <= a.p95 <= 8.2e-6                        # the slow interval is gone
    assert "slow" not in a.flags
    v = step(m, fed, clock, 1.0)
    assert by_name(v)["alpha"].p95 is None                    # nothing served: unknown


def test_sort_keys_and_reverse(fed):
    clock, m = Clock(), Model()
    step(m, fed, clock, 0)
    fed.add_domain(3, "gamma")
    v = step(m, fed, clock, 1.0,
             batch(300, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1),
             batch(100, 2, 0, events.TYPE_MMIO, 0xa0000, events.DIR_WRITE, 8),
             batch(5, 3, 0, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2))
    order = lambda v: [r.name for r in v.rows]  # noqa: E731
    assert order(v) == ["alpha", "beta", "gamma"]
    m.sort = "bytes"
    assert order(m.view()) == ["beta", "alpha", "gamma"]
    m.sort = "reads"
    assert order(m.view())[0] == "gamma"
    m.sort = "name"
    assert order(m.view()) == ["alpha", "beta", "gamma"]
    m.reverse = True
    assert order(m.view()) == ["gamma", "beta", "alpha"]
    m.reverse = False
    m.sort = "domid"
    assert order(m.view()) == ["alpha", "beta", "gamma"]
    m.cycle_sort()
    assert m.sort == "name"
    m.cycle_sort(-2)
    assert m.sort == "lost"


def test_rows_without_value_sort_last(fed):
    clock, m = Clock(), Model(sort="p95")
    step(m, fed, clock, 0)
    v = step(m, fed, clock, 1.0,
             batch(10, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1),            # no timing
             batch(10, 2, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, service_ns=1000))
    assert [r.name for r in v.rows] == ["beta", "alpha"]
    m.reverse = True
    assert [r.name for r in m.view().rows] == ["beta", "alpha"]   # unknown stays last


def test_filters(fed):
    clock, m = Clock(), Model()
    step(m, fed, clock, 0)
    step(m, fed, clock, 1.0,
             batch(300, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1),
             batch(50, 1, 1, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2),
             batch(100, 2, -1, events.TYPE_MMIO, 0xa0000, events.DIR_WRITE, 8))
    m.filter = make_filter(domains=["be*"])
    assert [r.name for r in m.view().rows] == ["beta"]
    m.filter = make_filter(domains=["1"])
    assert [r.name for r in m.view().rows] == ["alpha"]
    m.filter = make_filter(vcpus=["1"])
    rows = m.view().rows
    assert [r.name for r in rows] == ["alpha"] and rows[0].reqs == 50
    m.filter = make_filter(types=["mmio"])
    assert [r.name for r in m.view().rows] == ["beta"]
    m.filter = make_filter(ranges=["com*,vga-*"])
    rows = {r.name: r.reqs for r in m.view().rows}
    assert rows == {"alpha": 300, "beta": 100}
    m.filter = make_filter(vcpus=["-1"], types=["pio"])
    assert m.view().rows == []
    m.filter = make_filter(dirs=["read"])
    rows = m.view().rows
    assert [r.name for r in rows] == ["alpha"] and rows[0].reqs == 50
    m.filter = make_filter(dirs=["w"], domains=["alpha"])
    assert [r.reqs for r in m.view().rows] == [300]
    m.filter = make_filter(domains=["nosuch"])
    assert m.view().rows == []


def test_filter_parsing():
    f = parse_filter_spec("web* vcpu=0,1 range=com1 type=pio,mmio")
    assert f.domains == ["web*"] and f.vcpus == {0, 1} and f.ranges == ["com1"]
    assert f.types == {events.TYPE_PIO, events.TYPE_MMIO}
    assert f.describe() == "domain=web* vcpu=0,1 range=com1 type=pio,mmio"
    g = parse_filter_spec("vcpu=", f)                   # clears one field, keeps the rest
    assert g.vcpus == set() and g.domains == ["web*"]
    assert not Filter().active() and f.active()
    with pytest.raises(FilterError, match="unknown filter field"):
        parse_filter_spec("colour=red")
    with pytest.raises(FilterError, match="vcpu"):
        parse_filter_spec("vcpu=x")
    with pytest.raises(FilterError, match="type"):
        make_filter(types=["disk"])
    with pytest.raises(FilterError):
        make_filter(vcpus=["-2"])
    d = parse_filter_spec("dir=read type=pio")
    assert d.dirs == {events.DIR_READ} and d.describe() == "type=pio dir=read"
    assert d.traffic_filtered() and parse_filter_spec("dir=", d).dirs == set()
    with pytest.raises(FilterError, match="dir: expected read or write"):
        make_filter(dirs=["sideways"])


def test_expansion_vcpus_ranges_addresses(fed):
    clock, m = Clock(), Model()
    step(m, fed, clock, 0)
    step(m, fed, clock, 1.0,
         batch(300, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1),
         batch(30, 1, 0, events.TYPE_PIO, 0x3fd, events.DIR_READ, 1),
         batch(50, 1, 1, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2),
         batch(100, 2, -1, events.TYPE_MMIO, 0xa0000, events.DIR_WRITE, 8))
    kinds = lambda: [(r.kind, r.name) for r in m.view().rows]  # noqa: E731
    assert kinds() == [("domain", "alpha"), ("domain", "beta")]
    m.toggle(1, "vcpu")
    assert kinds() == [("domain", "alpha"), ("vcpu", "vcpu 0"), ("vcpu", "vcpu 1"),
                       ("domain", "beta")]
    v0 = [r for r in m.view().rows if r.name == "vcpu 0"][0]
    assert v0.reqs == 330 and v0.busiest == "com1"
    m.toggle(1, "addr")                                      # addresses imply ranges
    rows = [(r.kind, r.name, r.reqs) for r in m.view().rows]
    assert rows[3:8] == [("range", "com1", 330), ("addr", "0x3f8", 300), ("addr", "0x3fd", 30),
                         ("range", "ide-primary", 50), ("addr", "0x1f0", 50)]
    com1 = [r for r in m.view().rows if r.name == "com1"][0]
    assert com1.busiest == "0x3f8" and com1.busiest_share == pytest.approx(300 / 330)
    m.toggle(1, "range")                                     # ranges off: addresses off too
    assert "addr" not in m.expansion(1)
    m.toggle(1, "vcpu")
    assert kinds() == [("domain", "alpha"), ("domain", "beta")]
    m.toggle_all("vcpu")
    assert ("vcpu", "vcpu ?") in kinds()                     # beta's buffered writes
    assert kinds().count(("vcpu", "vcpu 0")) == 1
    m.toggle_all("vcpu")
    assert kinds() == [("domain", "alpha"), ("domain", "beta")]


def test_lost_and_remote_service_only_cells():
    """Lost events per domain come from stats.extra; service-only cells (count 0, as the remote
    exporter's histograms have no vcpu) count for domain/range quantiles, not as vCPU rows."""
    hist = np.zeros(N_SLOTS, dtype=np.int64)
    hist[hist_slots(np.array([6000]))[0]] = 10               # [5632, 6144) ns
    totals = {
        Key(5, 0, events.TYPE_PIO, events.DIR_WRITE, "com1", 0): Cell(count=50, bytes=50),
        Key(5, -1, events.TYPE_PIO, 255, "com1", 0): Cell(0, 0, 10, 60_000, hist),
    }
    stats = [SourceStats("x", up=True, lost=4, extra={"lost_by_domid": {5: 4}})]
    m = Model()
    m.update(Snapshot(0.0, 0.0, {}, {5: DomainInfo(5, "e")}, stats))
    m.update(Snapshot(1.0, 1.0, totals, {5: DomainInfo(5, "e")}, stats))
    m.toggle(5, "vcpu")
    m.toggle(5, "range")
    rows = m.view().rows
    assert [(r.kind, r.name) for r in rows] == [("domain", "e"), ("vcpu", "vcpu 0"),
                                                ("range", "com1")]
    dom, vcpu, rng = rows
    assert dom.lost == 4 and "lost" in dom.flags
    assert 5.632e-6 <= dom.p95 < 6.144e-6 and 5.632e-6 <= rng.p95 < 6.144e-6
    assert vcpu.p95 is None and vcpu.reqs == 50


def test_formatting():
    assert [fmt_count(x) for x in (None, 0, 0.5, 7, 9999, 12345, 2.5e6, 3e9)] == \
        ["-", "0", "0.5", "7", "9999", "12.3k", "2.5M", "3.0G"]
    assert [fmt_bytes(x) for x in (None, 0, 512, 2048, 5 * 2 ** 20)] == \
        ["-", "0", "512", "2.0K", "5.0M"]
    assert [fmt_secs(x) for x in (None, 5e-7, 5e-6, 250e-6, 2e-3, 1.5)] == \
        ["-", "500ns", "5.0us", "250us", "2.0ms", "1.50s"]


def test_sampler_keeps_last_totals_of_a_failing_source(fed):
    from iotrace.top.snapshot import Sampler
    clock = Clock()
    sample = Sampler([fed], clock=clock, host="h")
    fed.feed(batch(10, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1))
    good = sample()
    assert sum(c.count for c in good.totals.values()) == 10 and good.stats[0].up

    def broken():
        raise AttributeError("'int' object has no attribute 'value'")
    fed.totals = broken
    clock.t += 1
    bad = sample()
    assert sum(c.count for c in bad.totals.values()) == 10     # last good totals, no reset
    assert not bad.stats[0].up
    assert bad.stats[0].error == ("reading the source failed: AttributeError: "
                                  "'int' object has no attribute 'value'")
    m = Model()
    m.update(good)
    m.update(bad)
    assert m.view().rows[0].req_rate == 0


def test_view_layout_fits_and_keeps_the_busiest_share():
    from iotrace.top.columns import Row
    from iotrace.top.screen import too_small_lines
    from iotrace.top.table import layout, render_header, render_row
    row = Row("domain", 0, 14, "dom14", reqs=105, req_rate=24.0, byte_rate=0.0, read_rate=24.0,
              write_rate=0.0, busiest="pci-bar-io", busiest_share=1.0, p50=74.9e-6, p95=125e-6)
    child = Row("range", 1, 14, "ide-secondary", reqs=3, req_rate=0.0, busiest="0xae00",
                busiest_share=0.5)
    for width in (60, 80, 100, 160, 250):
        cols = layout(width)
        for line in (render_header(cols), render_row(row, cols), render_row(child, cols)):
            assert len(line) <= width - 1, (width, line)
    cols80 = layout(80)
    assert [c.id for c, _ in cols80][-1] == "lost"
    line = render_row(row, cols80)
    assert " pci-b~:100% " in line                          # the name cut, the share kept
    assert "  ide-secondary " in render_row(child, cols80)  # child labels use the ID column too
    wide = layout(160)
    assert "pci-bar-io:100%" in render_row(row, wide) and {"reqs", "avg"} <= {c.id for c, _ in wide}
    assert "REQS" not in render_header(cols80)
    msg = too_small_lines(30, 5)
    assert msg[0].startswith("Terminal too small (30x5)") and all(len(x) <= 29 for x in msg)


def test_a_domain_whose_device_model_is_not_probed_is_flagged_with_the_reason():
    """DomainInfo.probe_error (qemu source): the domain row is flagged, the view carries the
    reason for the header, and batch output prints it."""
    from iotrace.top.batch import format_table
    why = "/opt/dm/qemu: cannot find handle_ioreq (build-id 12ab)"
    doms = {5: DomainInfo(5, "web", 100, 2), 6: DomainInfo(6, "db", 101, 0, probe_error=why)}
    stats = [SourceStats("qemu", up=True, probes_attached=2)]
    m = Model()
    m.update(Snapshot(0.0, 0.0, {}, doms, stats))
    m.update(Snapshot(1.0, 1.0, {}, doms, stats))
    v = m.view()
    rows = {r.name: r for r in v.rows}
    assert "unprobed" in rows["db"].flags and "unprobed" not in rows["web"].flags
    assert rows["db"].probes == 0 and rows["web"].probes == 2
    assert v.unprobed == {6: why}
    lines = format_table(v)
    assert f"unprobed=6:db reason={why!r}" in lines[1]
    db = next(ln for ln in lines[3:] if ln.split()[1] == "db")
    assert db.split()[-1] == "!unprobed"


def test_pci_config_addresses_read_as_bdf(fed):
    clock, m = Clock(), Model()
    step(m, fed, clock, 0)
    step(m, fed, clock, 1.0,
         batch(20, 1, 0, events.TYPE_PCI_CONFIG, (1 << 35) | (1 << 32) | 0x3C, events.DIR_READ, 4),
         batch(5, 1, 0, events.TYPE_PCI_CONFIG, 3 << 35, events.DIR_READ, 4))
    m.toggle(1, "addr")
    rows = [(r.kind, r.name, r.reqs) for r in m.view().rows]
    assert rows[1:4] == [("range", "pci-config", 25), ("addr", "00:01.1+0x3c", 20),
                         ("addr", "00:03.0+0x0", 5)]
    assert rows and m.view().rows[1].busiest == "00:01.1+0x3c"
