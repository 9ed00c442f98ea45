"""Fuzzing decode_bytes: random bytes, and mutated / truncated / spliced valid captures.

The only exception allowed is InputError (not a capture at all); anything that starts like a
capture decodes, counting what it cannot read. Each example must finish quickly (no hang)."""
from __future__ import annotations

import struct
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotrace.core import events as E
from iotrace.core.errors import InputError
from iotrace.xentrace import catalogue as C
from iotrace.xentrace import decoder as D
from iotrace.xentrace.testing import reference, synth

SEED = synth.generate(5, pcpus=3, steps=300, lost=2)
BASE = SEED.data
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check(buf: bytes, **kw):
    t0 = time.monotonic()
    try:
        res = D.decode_bytes(buf, **kw)
    except InputError as exc:
        msg = str(exc)
        assert "\n" not in msg and "offset" in msg
        return None
    finally:
        assert time.monotonic() - t0 < 5.0
    assert res.events.dtype == E.EVENT_DTYPE
    assert np.all(np.diff(res.events["ts_ns"]) >= 0)
    assert res.records >= len(res.events) and res.decode_errors >= 0
    assert res.truncated_at is None or 0 <= res.truncated_at <= len(buf)
    return res


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(buf):
    check(buf)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_after_a_window_header(buf):
    # past the magic check: every window size and record header the bytes happen to make
    head = struct.pack("<IiI", C.CPU_CHANGE_HEADER, 0, len(buf) // 4 * 4)
    res = check(head + buf)
    assert res is not None


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), max_size=40),
       st.integers(12, len(BASE)), st.booleans())
def test_mutated_and_truncated_capture(flips, cut, compat):
    buf = bytearray(BASE[:cut])
    for pos, val in flips:
        if pos < len(buf):
            buf[pos] = val
    res = check(bytes(buf), xenalyze_compat=compat)
    if all(pos >= 12 for pos, _ in flips):
        assert res is not None               # the first window header is intact


@FUZZ
@given(st.lists(st.integers(0, len(BASE)), min_size=1, max_size=6))
def test_spliced_pieces_of_a_capture(cuts):
    cuts = sorted(cuts)
    pieces = [BASE[a:b] for a, b in zip([0] + cuts, cuts + [len(BASE)])]
    check(b"".join(reversed(pieces[1:])) + pieces[0])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, len(BASE)), st.integers(97, 4096))
def test_streaming_any_split_never_raises_midway(cut, step):
    dec = D.StreamDecoder()
    data = BASE[:cut]
    out = [dec.feed(data[i:i + step]) for i in range(0, len(data), step)]
    try:
        out.append(dec.finish())
    except InputError:
        assert cut < 12                      # not even one complete window header
        return
    ev = np.concatenate(out)
    assert len(ev) <= SEED.io_records


def test_a_whole_valid_capture_is_clean():
    res = check(BASE)
    assert res.decode_errors == 0 and res.truncated_at is None and not res.warnings
    assert len(res.events) == SEED.io_records


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), max_size=30),
       st.integers(12, len(BASE)), st.sampled_from([4 << 20, 997, 4096]), st.booleans())
def test_core_equals_reference_model_on_damaged_captures(flips, cut, chunk, compat):
    """The compiled core and the plain-Python model of its rules (testing/reference.py) agree
    on every event and counter of damaged captures, in any chunking."""
    buf = bytearray(BASE[:cut])
    for pos, val in flips:
        if pos < len(buf):
            buf[pos] = val
    buf = bytes(buf)
    ref = reference.decode_bytes(buf, xenalyze_compat=compat, chunk_bytes=chunk)
    try:
        res = D.decode_bytes(buf, xenalyze_compat=compat, chunk_bytes=chunk)
    except InputError:
        assert ref.status == 1 or ref.windows == 0
        return
    key = ["ts_ns", "addr", "dir", "domid", "vcpu", "service_ns", "rip", "data"]
    a, b = np.sort(ref.events, order=key), np.sort(res.events, order=key)
    assert len(a) == len(b) and (a == b).all()
    assert (res.records, res.windows, res.decode_errors, res.lost_records) == \
        (ref.records, ref.windows, ref.decode_errors, ref.lost_records)
