"""ReplaySource: a capture through the live pipeline (speed 0 and timed replay)."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iotrace.core import events
from iotrace.core.aggregate import Aggregator
from iotrace.core.errors import InputError, UserError
from iotrace.offline.capture import load_capture
from iotrace.offline.recording import RecordingWriter
from iotrace.serve.collector import IotraceCollector
from iotrace.serve.settings import ExporterSettings
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


# -- damage surfaced (issue #12, item 9) ----------------------------------------------------------
def _recording(path, close=True, flip=False, n=3000):
    """Domain 3 ("web"), n events in chunks of 1,000; optionally one payload bit flipped in the
    middle chunk, or the writer "killed" (no end chunk)."""
    w = RecordingWriter(path, {"source": "qemu"}, chunk_records=1000)
    w.set_domain(3, "web")
    b = events.empty(n)
    b["domid"], b["addr"], b["ts_ns"] = 3, 0x3F8, np.arange(n) * 1000
    w.write(b)
    if close:
        w.close()
    else:
        w.flush()
    if flip:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    return path


def _scraped(src) -> dict:
    col = IotraceCollector([src], ExporterSettings(), clock=time.time)
    out = {}
    for fam in text_string_to_metric_families(col.render_text().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(scraped, name, **labels):
    return scraped[(name, tuple(sorted({"source": "replay", **labels}.items())))]


@pytest.mark.parametrize("speed", [0.0, 1e3])
def test_a_damaged_chunk_is_counted_said_and_scraped(tmp_path, speed):
    """serve/top --replay of a recording with one flipped bit: the other chunks are served, the
    damage shows in decode_errors, iotrace_input_damage_total and a warning naming the file
    (passed to warn() as it is found)."""
    path = _recording(tmp_path / "d.iotrec", flip=True)
    said = []
    src = ReplaySource(str(path), speed=speed, warn=said.append)
    src.start()
    assert src.finished.wait(20)
    st = src.stats()
    assert st.up and st.events == 2000 and st.decode_errors == 1000
    assert st.damage == {"skipped_chunk": 1, "truncated": 0}
    assert len(st.warnings) == 1 and st.warnings[0].startswith(f"{path}: offset ")
    assert "events chunk checksum mismatch: skipped it (1000 record(s))" in st.warnings[0]
    assert said == st.warnings
    assert src.domains()[3].name == "web"
    m = _scraped(src)
    assert _value(m, "iotrace_decode_errors_total") == 1000
    assert _value(m, "iotrace_input_damage_total", kind="skipped_chunk") == 1
    assert _value(m, "iotrace_input_damage_total", kind="truncated") == 0
    assert _value(m, "iotrace_source_up") == 1
    src.stop()


def test_a_writer_killed_recording_is_truncated(tmp_path):
    path = _recording(tmp_path / "k.iotrec", close=False)
    src = ReplaySource(str(path))
    src.start()
    st = src.stats()
    assert st.events == 3000 and st.damage == {"skipped_chunk": 0, "truncated": 1}
    assert st.warnings == [f"{path}: no end chunk: the writer did not close the file (still "
                           "running, or killed)"]
    assert _value(_scraped(src), "iotrace_input_damage_total", kind="truncated") == 1


def test_a_cut_xentrace_capture_is_truncated(tmp_path, synth_file):
    path, trace = synth_file
    cut = tmp_path / "cut.xt"
    cut.write_bytes(path.read_bytes()[:-6])
    src = ReplaySource(str(cut))
    src.start()
    st = src.stats()
    assert st.damage["truncated"] == 1 and trace.io_records - 1 <= st.events <= trace.io_records
    assert len(st.warnings) == 1 and st.warnings[0].startswith(f"{cut}: capture truncated at")


def test_replay_memory_does_not_grow_with_the_file(tmp_path):
    """The replay streams the file: a 6x longer capture (the same host, tiled in time) costs no
    more memory to serve. (Holding every event, it cost 44 MB more: 58 -> 102 MB.)"""
    from iotrace.xentrace.testing import synth
    base = synth.generate(8, pcpus=4, steps=30_000).data
    files = {}
    for k in (10, 60):
        files[k] = tmp_path / f"x{k}.bin"
        with open(files[k], "wb") as fh:
            for piece in synth.tile(base, k):
                fh.write(piece)
    code = ("import resource, sys; from iotrace.sources.replay import ReplaySource; "
            "s = ReplaySource(sys.argv[1]); s.start(); "
            "print(s.stats().events, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    rss, n = {}, {}
    for k, p in files.items():
        out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True,
                             text=True, timeout=300, check=True).stdout.split()
        n[k], rss[k] = int(out[0]), int(out[1]) / 1024
    assert n[60] > 5 * n[10] > 400_000
    assert rss[60] - rss[10] < 15, rss               # MB: flat (the events alone: 28 MB more)
