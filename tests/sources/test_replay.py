"""ReplaySource: a capture through the live pipeline (speed 0 and timed replay)."""
from __future__ import annotations

import time

import pytest

from iotrace.core.aggregate import Aggregator
from iotrace.core.errors import InputError, UserError
from iotrace.offline.capture import load_capture
from iotrace.sources.replay import ReplaySource


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory):
    from iotrace.xentrace.testing import synth
    trace = synth.generate(seed=11, pcpus=2, domains=((3, 2),), steps=1500, lost=1)
    path = tmp_path_factory.mktemp("replay") / "s.xt"
    trace.write(path)
    return path, trace


def folded(cells):
    return {k._replace(addr=0): (c.count, c.service_n) for k, c in cells.items()}


def test_speed_zero_equals_the_capture(synth_file):
    path, trace = synth_file
    src = ReplaySource(str(path))
    src.start()
    assert src.finished.is_set()
    agg = Aggregator(keep_addr=False)
    agg.add_batch(load_capture(str(path)).events)
    assert folded(src.totals()) == folded(agg.cells)
    st = src.stats()
    assert st.up and st.events == trace.io_records and st.lost == trace.lost_records
    assert set(src.domains()) == {3}
    first = src.range_first_seen()
    assert first and all(d == 3 or d == -1 for d, _ in first)
    src.stop()
    assert not src.stats().up


def test_timed_replay_feeds_progressively_and_stops(synth_file):
    path, trace = synth_file
    ts = load_capture(str(path)).events["ts_ns"]
    span = (int(ts.max()) - int(ts.min())) / 1e9
    src = ReplaySource(str(path), speed=span / 2.0)       # about 2 s of wall time
    t0 = time.monotonic()
    src.start()
    time.sleep(0.5)
    mid = src.stats().events
    assert 0 < mid < trace.io_records
    assert src.finished.wait(10)
    assert 1.0 < time.monotonic() - t0 < 8
    assert src.stats().events == trace.io_records
    src.stop()
    # stop() in the middle of a replay ends the thread promptly
    slow = ReplaySource(str(path), speed=span / 100.0)
    slow.start()
    t1 = time.monotonic()
    slow.stop()
    assert time.monotonic() - t1 < 2 and not slow.finished.is_set()
    assert slow.stats().events < trace.io_records


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        ReplaySource(str(tmp_path / "missing.xt"))
    with pytest.raises(InputError, match="not a regular file"):
        ReplaySource(str(tmp_path))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(UserError):
        ReplaySource(str(junk)).start()
    with pytest.raises(UserError, match="--speed"):
        ReplaySource(str(junk), speed=-1)
