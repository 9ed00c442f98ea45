"""Per-domain signals of one interval (iotrace.analysis.signals), from a real EventSource's
totals: rates, the I/O wait share, p95 per range, vCPUs, device-model and domain CPU."""
from __future__ import annotations

import pytest

from iotrace.analysis import signals as S
from iotrace.analysis.host import CpuTimes, HostSample, XenDomain
from iotrace.core import events as ev
from iotrace.core.aggregate import Cell, Key
from support.fakes import FedSource, batch


def totals_after(*batches):
    src = FedSource()
    for b in batches:
        src.feed(b)
    return src.totals()


def test_io_wait_share_counts_synchronous_service_time_only():
    # 10 s on 2 vCPUs: 1000 synchronous requests of 100 us on vCPU 0 and 1000 on vCPU 1 (0.2 s
    # of waiting) and 5000 buffered VGA writes of 1 ms that keep no vCPU waiting.
    cur = S.rollup(totals_after(batch(1000, 3, 0, ev.TYPE_PIO, 0x3F8, service_ns=100_000),
                                batch(1000, 3, 1, ev.TYPE_PIO, 0x1F0, service_ns=100_000),
                                batch(5000, 3, -1, ev.TYPE_MMIO, 0xA0000, service_ns=1_000_000)))
    sig = S.domain_signals(3, "web", None, cur, 10.0, None, None, seen_vcpus=2)
    assert sig.rate == pytest.approx(700.0)
    assert sig.sync_rate == pytest.approx(200.0)
    assert sig.io_wait_ratio == pytest.approx(0.2 / (10.0 * 2))
    assert (sig.vcpus, sig.vcpus_from) == (2, "seen")
    assert set(sig.p95_by_range) == {"com1", "ide-primary"}      # buffered VGA not among them
    # quantiles come off the histogram (Cell.service_quantile_seconds): within its factor of 2
    assert 100e-6 <= sig.p95_by_range["com1"] < 200e-6
    assert 100e-6 <= sig.p95_s < 200e-6


def test_xl_gives_the_vcpu_count_and_the_domain_cpu():
    cur = S.rollup(totals_after(batch(400, 5, 0, ev.TYPE_PIO, 0x3F8, service_ns=50_000)))
    prev_h = HostSample(0.0, xen={5: XenDomain(5, "db", 4, 100.0, "u-5")})
    cur_h = HostSample(10.0, xen={5: XenDomain(5, "db", 4, 130.0, "u-5")})
    sig = S.domain_signals(5, "db", None, cur, 10.0, prev_h, cur_h, seen_vcpus=1)
    assert (sig.vcpus, sig.vcpus_from) == (4, "xl")
    assert sig.cpu_ratio == pytest.approx(30.0 / 10.0 / 4)
    assert sig.io_wait_ratio == pytest.approx(400 * 50e-6 / (10.0 * 4))
    assert (sig.identity, sig.uuid) == ("uuid:u-5", "u-5")


def test_interval_is_the_difference_of_two_totals():
    src = FedSource()
    src.feed(batch(100, 3, 0, ev.TYPE_PIO, 0x3F8, service_ns=10_000))
    prev = S.rollup(src.totals())
    src.feed(batch(300, 3, 0, ev.TYPE_PIO, 0x3F8, service_ns=40_000))
    cur = S.rollup(src.totals())
    sig = S.domain_signals(3, "web", prev, cur, 2.0, None, None, seen_vcpus=1)
    assert sig.rate == pytest.approx(150.0)
    assert sig.io_wait_ratio == pytest.approx(300 * 40e-6 / 2.0)
    # this interval's 40 us (within the histogram's factor of 2), not the 10 us before
    assert 40e-6 <= sig.p95_s < 80e-6


def test_a_counter_going_backwards_restarts_the_interval():
    big = S.rollup(totals_after(batch(1000, 3, 0, ev.TYPE_PIO, 0x3F8, service_ns=1000)))
    small = S.rollup(totals_after(batch(10, 3, 0, ev.TYPE_PIO, 0x3F8, service_ns=1000)))
    sig = S.domain_signals(3, "web", big, small, 1.0, None, None, seen_vcpus=1)
    assert sig.rate == pytest.approx(10.0)             # the later totals taken whole
    assert sig.io_wait_ratio >= 0


def test_remote_service_only_cells_count_as_synchronous():
    # What iotrace.sources.remote makes of a remote page: counts per vCPU, service histograms
    # in cells with vcpu -1 and count 0 (the histogram has no vcpu label).
    counts = Cell(count=500)
    svc = Cell(count=0, service_n=500, service_sum_ns=500 * 20_000)
    svc.hist[15] = 500
    totals = {Key(4, 0, ev.TYPE_PIO, 0, "com1", 0): counts,
              Key(4, -1, ev.TYPE_PIO, 255, "com1", 0): svc}
    sig = S.domain_signals(4, "r", None, S.rollup(totals), 5.0, None, None, seen_vcpus=1)
    assert sig.sync_rate == pytest.approx(100.0)
    assert sig.io_wait_ratio == pytest.approx(500 * 20e-6 / 5.0)


def test_device_model_cpu_needs_the_same_process():
    cur = S.rollup({})
    a = HostSample(0.0, dm_cpu={3: 1.0}, dm_ident={3: "dm:10:1"})
    b = HostSample(2.0, dm_cpu={3: 2.0}, dm_ident={3: "dm:10:1"})
    c = HostSample(2.0, dm_cpu={3: 0.1}, dm_ident={3: "dm:11:7"})    # another process since
    assert S.domain_signals(3, "x", None, cur, 2.0, a, b, None).dm_cpu_ratio == pytest.approx(0.5)
    assert S.domain_signals(3, "x", None, cur, 2.0, a, c, None).dm_cpu_ratio is None
    assert S.domain_signals(3, "x", None, cur, 2.0, a, c, None).identity == "dm:11:7"


def test_the_device_model_s_wait_for_a_cpu_counts_as_waiting():
    """qemu source: service starts in the device model; its run delay (schedstat) is time the
    guest waited too, for the synchronous share of its requests. xentrace: already inside."""
    cur = S.rollup(totals_after(batch(300, 3, 0, ev.TYPE_PIO, 0x3F8, service_ns=100_000),
                                batch(100, 3, -1, ev.TYPE_MMIO, 0xA0000, service_ns=100_000)))
    a = HostSample(0.0, dm_cpu={3: 0.0}, dm_wait={3: 1.0}, dm_ident={3: "dm:9:1"})
    b = HostSample(10.0, dm_cpu={3: 1.0}, dm_wait={3: 3.0}, dm_ident={3: "dm:9:1"})
    sig = S.domain_signals(3, "web", None, cur, 10.0, a, b, seen_vcpus=1)
    assert sig.dm_wait_ratio == pytest.approx(0.2)
    assert sig.served_ratio == pytest.approx(300 * 100e-6 / 10.0)
    assert sig.io_wait_ratio == pytest.approx((300 * 100e-6 + 2.0 * 300 / 400) / 10.0)
    xt = S.domain_signals(3, "web", None, cur, 10.0, a, b, seen_vcpus=1, dm_wait_counts=False)
    assert xt.io_wait_ratio == pytest.approx(xt.served_ratio)


def test_host_signals():
    a = HostSample(0.0, CpuTimes(10.0, 40.0, 1.0), 2, 1_000_000)
    b = HostSample(10.0, CpuTimes(28.0, 60.0, 3.0), 2, 4_000_000)
    h = S.host_signals(a, b, 10.0)
    assert h.busy_ratio == pytest.approx(18 / 20)
    assert h.steal_ratio == pytest.approx(2 / 20)
    assert h.pressure_ratio == pytest.approx(0.3)
    assert h.saturated(0.9, 0.5) is True
    assert h.saturated(0.95, 0.5) is False
    assert h.saturated(0.95, 0.3) is True
    assert S.host_signals(None, b, 10.0).saturated(0.9, 0.3) is None     # nothing known yet
