"""Damaged stream files: the stand-in and the Python reader refuse them with one line, exit 2,
and never crash (no signal, no traceback)."""
from __future__ import annotations

import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotrace.core.errors import InputError
from iotrace.probes.standin import runner as sr
from iotrace.probes.standin import stream


def _small_valid(tmp_path_factory) -> bytes:
    """A short valid stream (the first requests of the bundled one)."""
    reqs = stream.read_stream(sr.BUNDLED_STREAM)[:60]
    p = tmp_path_factory.getbasetemp() / "seed.stream"
    stream.write_stream(p, reqs)
    return p.read_bytes()


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_streams_exit_0_or_2_with_one_line(tmp_path_factory, data):
    exe = sr.build()
    blob = bytearray(_small_valid(tmp_path_factory))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    path = tmp_path_factory.getbasetemp() / "fuzz.stream"
    path.write_bytes(bytes(blob))
    res = subprocess.run([str(exe), "-xen-domid", "1", "-replay", str(path), "-speed", "0"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode in (0, 2), (res.returncode, res.stderr)
    if res.returncode == 2:
        assert len(res.stderr.strip().splitlines()) == 1
    try:
        stream.read_stream(path)
    except InputError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("field_offset,value,msg", [
    (8, b"\x02\x00\x00\x00", "stream version 2"),
    (12, b"\x40\x00\x00\x00", "unexpected header/key/record sizes"),
    (24, b"\xff\xff\xff\x7f", "implausible counts"),
    (32, b"\xff\xff\xff\x7f", "truncated at offset"),
])
def test_binary_names_the_damaged_header_field(tmp_path, field_offset, value, msg):
    blob = bytearray(sr.BUNDLED_STREAM.read_bytes())
    blob[field_offset:field_offset + len(value)] = value
    p = tmp_path / "bad.stream"
    p.write_bytes(bytes(blob))
    res = subprocess.run([str(sr.build()), "-xen-domid", "1", "-replay", str(p)],
                         capture_output=True, text=True, timeout=10)
    assert res.returncode == 2 and msg in res.stderr, res.stderr
