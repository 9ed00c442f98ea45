"""A capture's own timeline (iotrace.analysis.timeline): cumulative totals per window."""
from __future__ import annotations

import pytest

from iotrace.analysis.host import HostSample
from iotrace.analysis.timeline import host_samples_from_meta, windows
from iotrace.core import events as ev
from iotrace.core.aggregate import Aggregator
from iotrace.core.errors import InputError
from support.fakes import batch


def test_windows_add_up_to_the_whole_capture():
    b = ev.concat([batch(10, 3, 0, ev.TYPE_PIO, 0x3F8, ts_ns=0, dt_ns=1_000_000_000),
                   batch(5, 4, 1, ev.TYPE_PIO, 0x1F0, ts_ns=2_500_000_000, dt_ns=100)])
    got = list(windows(b, 3.0))
    assert [w.t for w in got] == [0.0, 3.0, 6.0, 9.0]
    assert got[0].totals == {} and [w.events for w in got] == [0, 9, 3, 3]
    whole = Aggregator(keep_addr=False)
    whole.add_batch(b)
    last = got[-1].totals
    assert {k: c.count for k, c in last.items()} == {k: c.count for k, c in whole.cells.items()}


def test_host_samples_go_with_their_window():
    b = batch(4, 3, 0, ev.TYPE_PIO, 0x3F8, ts_ns=0, dt_ns=1_000_000_000)
    samples = [HostSample(0.0), HostSample(1.0), HostSample(2.5)]
    got = [(w.t, w.host.t) for w in windows(b, 1.0, host_samples=samples)]
    assert got == [(0.0, 0.0), (1.0, 1.0), (2.0, 1.0), (3.0, 2.5)]


def test_meta_host_samples_errors_name_the_file():
    assert host_samples_from_meta({}, "f") == []
    with pytest.raises(InputError, match="f: metadata host_samples is not a list"):
        host_samples_from_meta({"host_samples": 3}, "f")
    with pytest.raises(InputError, match=r"f: metadata host_samples\[1\]"):
        host_samples_from_meta({"host_samples": [{"t": 0}, {"t": "x"}]}, "f")
    with pytest.raises(ValueError):
        list(windows(ev.empty(0), 0))
