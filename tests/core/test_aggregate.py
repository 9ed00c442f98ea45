"""The aggregator: grouping, bytes, log-linear service histograms and quantiles."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotrace.core.aggregate import (
    N_SLOTS,
    QUANTILE_RELATIVE_ERROR,
    SLOT_LOWER_NS,
    SLOT_UPPER_NS,
    Aggregator,
    Cell,
    Key,
    hist_quantile_ns,
    hist_quantiles_ns,
    hist_slots,
    slot_ending_at,
)
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


def _slot(v: int) -> int:
    """The slot layout written out the plain way: one slot per ns below 16, then 8 equal slots
    per power of two [2^(e-1), 2^e) up to 2^34 ns, the last slot taking anything longer."""
    if v < 16:
        return max(v, 0)
    e = v.bit_length()
    if e > 34:
        return 255
    width = 1 << (e - 4)                       # (2^e - 2^(e-1)) / 8
    return 16 + 8 * (e - 5) + (v - (1 << (e - 1))) // width


def test_hist_slots_known_values():
    ns = np.array([0, 1, 7, 8, 15, 16, 17, 18, 31, 32, 1023, 1024, 1151, 1152, 2**34 - 1, 2**34,
                   10**15, -5])
    assert hist_slots(ns).tolist() == [0, 1, 7, 8, 15, 16, 16, 17, 23, 24, 63, 64, 64, 65, 255,
                                       255, 255, 0]
    assert N_SLOTS == 256


@given(st.lists(st.integers(min_value=-10, max_value=2**50), min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_hist_slots_match_the_layout_and_the_bounds(values):
    got = hist_slots(np.array(values)).tolist()
    assert got == [_slot(v) for v in values]
    for v, k in zip(values, got):
        v = max(v, 0)
        assert SLOT_LOWER_NS[k] <= v and (v < SLOT_UPPER_NS[k] or k == N_SLOTS - 1)


def test_the_layout_gives_the_stated_quantile_bound():
    """Every slot holds integers lower..upper-1, at most 1/8 of lower apart: an estimate in the
    slot of the exact quantile is within QUANTILE_RELATIVE_ERROR = 12.5% of it."""
    assert QUANTILE_RELATIVE_ERROR == 0.125
    assert (SLOT_UPPER_NS[:-1] == SLOT_LOWER_NS[1:]).all() and SLOT_LOWER_NS[0] == 0
    spread = (SLOT_UPPER_NS - 1 - SLOT_LOWER_NS)[1:] / SLOT_LOWER_NS[1:]
    assert spread.max() <= QUANTILE_RELATIVE_ERROR
    assert (SLOT_UPPER_NS[:16] - SLOT_LOWER_NS[:16] == 1).all()     # exact below 16 ns
    assert SLOT_UPPER_NS[-1] == 2**34


def test_slot_ending_at():
    assert slot_ending_at(1024) == 63 and slot_ending_at(1280) == 65 and slot_ending_at(16) == 15
    with pytest.raises(ValueError):
        slot_ending_at(1025)


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


def test_quantiles_of_many_histograms_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(3)
    hists = rng.integers(0, 6, (300, N_SLOTS)) * (rng.random((300, N_SLOTS)) < 0.15)
    hists[7] = 0
    hists[8] = 0
    hists[8, 5] = 1
    for q in (0.0, 0.01, 0.5, 0.95, 1.0):
        many = hist_quantiles_ns(hists, q)
        one = np.array([hist_quantile_ns(h, q) for h in hists])
        np.testing.assert_array_equal(np.isnan(many), np.isnan(one))
        np.testing.assert_allclose(many[~np.isnan(one)], one[~np.isnan(one)], rtol=1e-12)
