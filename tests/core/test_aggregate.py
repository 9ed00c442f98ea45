"""The aggregator: grouping, bytes, log2 service histograms and quantiles."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotrace.core.aggregate import N_SLOTS, Aggregator, Cell, Key, hist_quantile_ns, log2_slots
from support.fakes import dict_batch as batch


def test_groups_by_domain_vcpu_type_dir_range_addr():
    b = batch([dict(domid=1, vcpu=0, type=0, dir=1, addr=0x3f8, size=1),
               dict(domid=1, vcpu=0, type=0, dir=1, addr=0x3f8, size=1),
               dict(domid=1, vcpu=1, type=0, dir=1, addr=0x3f8, size=1),
               dict(domid=2, vcpu=0, type=0, dir=0, addr=0x3f8, size=1),
               dict(domid=2, vcpu=0, type=1, dir=0, addr=0xa0000, size=4, count=8)])
    agg = Aggregator()
    agg.add_batch(b)
    agg.add_batch(b[:1])
    cells = agg.cells
    assert cells[Key(1, 0, 0, 1, "com1", 0x3f8)].count == 3
    assert cells[Key(1, 1, 0, 1, "com1", 0x3f8)].count == 1
    assert cells[Key(2, 0, 0, 0, "com1", 0x3f8)].count == 1
    assert cells[Key(2, 0, 1, 0, "vga-lowmem", 0xa0000)].bytes == 32
    assert sum(c.count for c in cells.values()) == 6 == agg.events


def test_without_addresses_keys_collapse_to_ranges():
    b = batch([dict(domid=1, addr=0x3f8), dict(domid=1, addr=0x3f9), dict(domid=1, addr=0x9999)])
    agg = Aggregator(keep_addr=False)
    agg.add_batch(b)
    assert {k.range: c.count for k, c in agg.cells.items()} == {"com1": 2, "other": 1}


def test_log2_slots_are_bit_lengths():
    ns = np.array([0, 1, 2, 3, 4, 7, 8, 1023, 1024, 10**9, -5])
    expect = [0, 1, 2, 2, 3, 3, 4, 10, 11, (10**9).bit_length(), 0]
    assert log2_slots(ns).tolist() == expect


@given(st.lists(st.integers(min_value=0, max_value=2**50), min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_log2_slots_match_python_bit_length(values):
    assert log2_slots(np.array(values)).tolist() == [v.bit_length() for v in values]


def test_quantiles_read_off_histogram_within_slot_bounds():
    agg = Aggregator()
    svc = [1000] * 90 + [100_000] * 10
    agg.add_batch(batch([dict(domid=1, addr=0x3f8, service_ns=s) for s in svc]))
    cell = next(iter(agg.cells.values()))
    assert cell.service_avg_seconds() == pytest.approx(np.mean(svc) / 1e9)
    p50, p95 = cell.service_quantile_seconds(0.5), cell.service_quantile_seconds(0.95)
    assert 512e-9 <= p50 <= 1024e-9        # slot of 1000 ns is [512, 1024)
    assert 65536e-9 <= p95 <= 131072e-9     # slot of 100000 ns


def test_unknown_service_time_is_not_counted():
    agg = Aggregator()
    agg.add_batch(batch([dict(domid=1, addr=0x3f8), dict(domid=1, addr=0x3f8, service_ns=50)]))
    cell = next(iter(agg.cells.values()))
    assert cell.count == 2 and cell.service_n == 1 and int(cell.hist.sum()) == 1


def test_empty_histogram_quantile_is_nan_and_cell_says_none():
    assert np.isnan(hist_quantile_ns(np.zeros(N_SLOTS, dtype=np.int64), 0.5))
    assert Cell().service_quantile_seconds(0.5) is None


def test_add_cell_and_rollup():
    agg = Aggregator()
    c = Cell(count=5, bytes=10)
    agg.add_cell(Key(3, 0, 0, 0, "com1", 0x3f8), c)
    agg.add_cell(Key(3, 1, 0, 1, "com1", 0x3f9), Cell(count=2))
    agg.add_cell(Key(3, 1, 0, 1, "vga", 0x3da), Cell(count=7))
    roll = agg.rollup(("domid", "range"))
    assert roll[(3, "com1")].count == 7 and roll[(3, "vga")].count == 7
    agg.drop_domain(3)
    assert not agg.cells


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1, 3), st.integers(0, 1),
                          st.integers(0, 1), st.sampled_from([0x3f8, 0x60, 0xa0000, 0x1234])),
                max_size=300))
@settings(max_examples=100, deadline=None)
def test_batch_aggregation_equals_per_event_counting(rows):
    b = batch([dict(domid=d, vcpu=v, type=t, dir=r, addr=a) for d, v, t, r, a in rows])
    agg = Aggregator()
    agg.add_batch(b)
    expect = {}
    for d, v, t, r, a in rows:
        expect[(d, v, t, r, a)] = expect.get((d, v, t, r, a), 0) + 1
    got = {(k.domid, k.vcpu, k.type, k.dir, k.addr): c.count for k, c in agg.cells.items()}
    assert got == expect


def test_quantiles_clamped_to_observed_extremes():
    agg = Aggregator()
    agg.add_batch(batch([dict(domid=1, addr=0x3f8, service_ns=75_400)]))
    cell = next(iter(agg.cells.values()))
    assert cell.service_quantile_seconds(0.5) == pytest.approx(75.4e-6)
    assert cell.service_quantile_seconds(0.95) == pytest.approx(75.4e-6)
    agg.add_batch(batch([dict(domid=1, addr=0x3f8, service_ns=70_000)]))
    assert 70e-6 <= cell.service_quantile_seconds(0.5) <= 75.4e-6
    assert (cell.service_min_ns, cell.service_max_ns) == (70_000, 75_400)


def test_out_of_range_fields_take_the_general_path_with_the_same_result():
    # dir is one bit in the packed fast path; a source that sent dir 2 must not collide with type.
    rows = [dict(domid=1, type=0, dir=2, addr=0x9999), dict(domid=1, type=1, dir=0, addr=0x9999),
            dict(domid=1, type=0, dir=2, addr=0x9999)]   # same range ("other") for both types
    agg = Aggregator()
    agg.add_batch(batch(rows))
    got = {(k.domid, k.type, k.dir, k.addr): c.count for k, c in agg.cells.items()}
    assert got == {(1, 0, 2, 0x9999): 2, (1, 1, 0, 0x9999): 1}
    # a domid beyond 16 bits takes the general path too
    agg = Aggregator()
    agg.add_batch(batch([dict(domid=70000, vcpu=5, addr=0x60), dict(domid=1, addr=0x60)]))
    assert {k.domid: c.count for k, c in agg.cells.items()} == {70000: 1, 1: 1}
