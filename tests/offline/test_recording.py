"""iotrace.offline.recording: round trip, truncation (killed writer), corruption, and a fuzzed reader."""
from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotrace.core import events
from iotrace.core.errors import InputError
from iotrace.offline import capture, recording


def make_batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = events.empty(n)
    b["ts_ns"] = np.cumsum(rng.integers(1, 10_000, n))
    b["domid"] = rng.integers(0, 5, n)
    b["vcpu"] = rng.integers(-1, 4, n)
    b["type"] = rng.choice([0, 1, 2], n)
    b["dir"] = rng.integers(0, 2, n)
    b["size"] = rng.choice([1, 2, 4, 8], n)
    b["count"] = rng.integers(1, 3, n)
    b["addr"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    b["data"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    b["service_ns"] = rng.integers(-1, 100_000, n)
    return b


def write_file(path, batches, lost=0, domains=None, close=True, chunk_records=100):
    w = recording.RecordingWriter(path, {"source": "test", "domains": {1: "alpha"}},
                                  chunk_records=chunk_records)
    for b in batches:
        w.write(b)
    if lost:
        w.add_lost(lost)
    for d, n in (domains or {}).items():
        w.set_domain(d, n)
    if close:
        w.close()
    else:
        w.flush()
    return w


def test_round_trip_keeps_every_field_domains_lost_and_meta(tmp_path):
    path = tmp_path / "r.iotrace"
    b1, b2 = make_batch(250, 1), make_batch(37, 2)
    write_file(path, [b1, b2], lost=12, domains={2: "beta", 1: "alpha2"})
    rec = recording.read_recording(path)
    assert rec.complete and rec.warnings == []
    assert rec.events.dtype == events.EVENT_DTYPE
    np.testing.assert_array_equal(rec.events, np.concatenate([b1, b2]))
    assert rec.domains == {1: "alpha2", 2: "beta"}
    assert rec.lost_events == 12
    assert rec.meta["source"] == "test" and rec.meta["host"] and rec.meta["iotrace_version"]
    assert rec.meta["record_size"] == events.EVENT_DTYPE.itemsize


def test_file_layout_is_as_documented(tmp_path):
    path = tmp_path / "r.iotrace"
    b = make_batch(3)
    w = recording.RecordingWriter(path, {"source": "test"})
    w.write(b)
    w.flush()                 # events chunk, lost 0 so far
    w.add_lost(2)
    w.close()                 # an empty events chunk carries the new lost count, then END
    blob = path.read_bytes()
    assert blob[:8] == b"\x89IOTREC\n" and recording.is_recording(blob[:64])
    magic, ver, hsize, mlen, mcrc, _ = struct.unpack_from("<8sHHIII", blob)
    assert (ver, hsize) == (1, 24)
    meta = json.loads(blob[24:24 + mlen])
    assert zlib.crc32(blob[24:24 + mlen]) == mcrc and meta["format"] == "iotrace-recording"
    off = 24 + mlen
    kinds = []
    while off < len(blob):
        cm, kind, _, plen, pcrc, lost = struct.unpack_from("<4sHHIIQ", blob, off)
        assert cm == b"IOTC" and zlib.crc32(blob[off + 24:off + 24 + plen]) == pcrc
        kinds.append((kind, plen, lost))
        off += 24 + plen
    assert off == len(blob)
    assert kinds == [(1, 3 * recording.RECORD_DTYPE.itemsize, 0), (1, 0, 2), (3, 0, 2)]
    # little-endian packed EVENT_DTYPE records
    first = np.frombuffer(blob, events.EVENT_DTYPE.newbyteorder("<"), 3, 24 + mlen + 24)
    np.testing.assert_array_equal(first, b)


def test_is_recording_rejects_other_files():
    assert not recording.is_recording(b"")
    assert not recording.is_recording(b"\x03\xf0\x02\x00" + bytes(60))   # xentrace CPU_CHANGE
    assert not recording.is_recording(b"IOTSTRM\0")


def test_truncated_at_every_offset_keeps_whole_records(tmp_path):
    path = tmp_path / "full.iotrace"
    b = make_batch(9, 3)
    write_file(path, [b[:4], b[4:]], lost=3, chunk_records=4)
    blob = path.read_bytes()
    mlen = struct.unpack_from("<I", blob, 12)[0]
    body = 24 + mlen
    cut_path = tmp_path / "cut.iotrace"
    for cut in range(8, len(blob)):
        cut_path.write_bytes(blob[:cut])
        if cut < body:
            with pytest.raises(InputError, match=r"cut.iotrace: offset \d+: truncated"):
                recording.read_recording(cut_path)
            continue
        rec = recording.read_recording(cut_path)
        n = len(rec.events)
        np.testing.assert_array_equal(rec.events, b[:n])
        assert rec.warnings, cut
        # every whole record that made it to disk is kept
        off = body
        records_on_disk = 0
        while off + 24 <= cut:
            plen = struct.unpack_from("<I", blob, off + 8)[0]
            kind = struct.unpack_from("<H", blob, off + 4)[0]
            avail = min(plen, cut - off - 24)
            if kind == 1:
                records_on_disk += avail // recording.RECORD_DTYPE.itemsize
            off += 24 + plen
        assert n == records_on_disk, cut


def test_killed_writer_leaves_a_readable_file(tmp_path):
    path = tmp_path / "killed.iotrace"
    code = textwrap.dedent(f"""
        import sys, time, numpy as np
        from iotrace.offline import recording
        from iotrace.core import events
        w = recording.RecordingWriter({str(path)!r}, {{"source": "test"}}, chunk_records=1000)
        b = events.empty(1000); b["addr"] = 0x3f8
        for i in range(5):
            b["ts_ns"] = np.arange(1000) + i * 1000
            w.write(b); w.add_lost(1)
        w.set_domain(9, "victim"); w.flush()
        print("flushed", flush=True)
        w.write(b[:500])          # queued, never flushed
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "flushed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rec = recording.read_recording(path)
    assert len(rec.events) == 5000 and not rec.complete
    np.testing.assert_array_equal(rec.events["ts_ns"], np.arange(5000))
    assert rec.lost_events == 5 and rec.domains == {9: "victim"}
    assert any("did not close" in w for w in rec.warnings)


def _corrupt(blob: bytes, off: int, val: bytes) -> bytes:
    return blob[:off] + val + blob[off + len(val):]


@pytest.mark.parametrize("what,offset,value,pattern", [
    ("magic", 0, b"\x89IOTREX", r"offset 0: not an iotrace recording"),
    ("version", 8, struct.pack("<H", 7), r"offset 8: recording version 7"),
    ("header size", 10, struct.pack("<H", 32), r"offset 10: header size 32"),
    ("meta length", 12, struct.pack("<I", 1 << 30), r"offset 12: metadata length"),
    ("meta byte", 30, b"#", r"offset 24: metadata checksum mismatch"),
])
def test_corrupt_header_is_one_line_input_error(tmp_path, what, offset, value, pattern):
    path = tmp_path / "c.iotrace"
    write_file(path, [make_batch(5)])
    path.write_bytes(_corrupt(path.read_bytes(), offset, value))
    with pytest.raises(InputError, match=pattern) as ei:
        recording.read_recording(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg


def test_corrupt_chunk_names_the_offset(tmp_path):
    path = tmp_path / "c.iotrace"
    write_file(path, [make_batch(5)])
    blob = path.read_bytes()
    body = 24 + struct.unpack_from("<I", blob, 12)[0]
    path.write_bytes(_corrupt(blob, body + 24 + 7, b"\xff"))      # inside the first payload
    with pytest.raises(InputError, match=rf"offset {body + 24}: events chunk checksum"):
        recording.read_recording(path)
    path.write_bytes(_corrupt(blob, body, b"JUNK"))
    with pytest.raises(InputError, match=rf"offset {body}: bad chunk magic"):
        recording.read_recording(path)


def test_load_capture_and_report_read_recordings(tmp_path, iotrace_exe):
    path = tmp_path / "r.iotrace"
    b = make_batch(50)
    b["domid"] = 4
    write_file(path, [b], lost=1, domains={4: "web"})
    cap = capture.load_capture(str(path))
    assert cap.source == "recording" and len(cap.events) == 50
    assert cap.lost_records == 1 and cap.domain_names[4] == "web"
    out = subprocess.run([iotrace_exe, "report", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "web" in out.stdout
    path.write_bytes(b"\x89IOTREC\n" + b"\x00" * 8)
    bad = subprocess.run([iotrace_exe, "report", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr


def test_reader_maps_fields_by_name(tmp_path):
    """A recording with an extra field and one missing (a future/older writer) still reads."""
    path = tmp_path / "v.iotrace"
    fdt = np.dtype([("ts_ns", "<i8"), ("domid", "<i4"), ("vcpu", "<i4"), ("type", "u1"),
                    ("dir", "u1"), ("addr", "<u8"), ("future", "<u4")])
    recs = np.zeros(3, fdt)
    recs["ts_ns"] = [1, 2, 3]
    recs["addr"] = 0x60
    recs["future"] = 99
    meta = json.dumps({"format": "iotrace-recording", "version": 1, "domains": {},
                       "record_size": fdt.itemsize,
                       "record_fields": [[n, fdt.fields[n][0].str] for n in fdt.names]}).encode()
    payload = recs.tobytes()
    blob = struct.pack("<8sHHIII", b"\x89IOTREC\n", 1, 24, len(meta), zlib.crc32(meta), 0) + meta
    blob += struct.pack("<4sHHIIQ", b"IOTC", 1, 0, len(payload), zlib.crc32(payload), 0) + payload
    path.write_bytes(blob)
    rec = recording.read_recording(path)
    assert rec.events["ts_ns"].tolist() == [1, 2, 3]
    assert rec.events["addr"].tolist() == [0x60] * 3
    assert rec.events["count"].tolist() == [1] * 3 and rec.events["service_ns"].tolist() == [-1] * 3


_VALID: dict[str, bytes] = {}


def _valid_blob(tmp_path_factory) -> bytes:
    if "blob" not in _VALID:
        p = tmp_path_factory.mktemp("fuzz") / "seed.iotrace"
        write_file(p, [make_batch(7, 5), make_batch(3, 6)], lost=2, domains={3: "x"},
                   chunk_records=4)
        _VALID["blob"] = p.read_bytes()
    return _VALID["blob"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_reader_returns_or_raises_input_error(tmp_path_factory, data):
    blob = bytearray(_valid_blob(tmp_path_factory))
    mode = data.draw(st.sampled_from(["flip", "splice", "cut", "random"]))
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif mode == "splice":
        i = data.draw(st.integers(8, len(blob)))
        blob[i:i] = data.draw(st.binary(max_size=64))
    elif mode == "cut":
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    else:
        blob = bytearray(recording.MAGIC) + bytearray(data.draw(st.binary(max_size=300)))
    path = tmp_path_factory.getbasetemp() / "fuzz.iotrace"
    path.write_bytes(bytes(blob))
    try:
        rec = recording.read_recording(path)
    except InputError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert rec.events.dtype == events.EVENT_DTYPE
    assert isinstance(rec.domains, dict) and rec.lost_events >= 0


@pytest.mark.parametrize("bad_type", ["(2,)<i4", "O", "<f8", "S8", ">i4"])
def test_metadata_types_other_than_plain_integers_are_refused(tmp_path, bad_type):
    from iotrace.offline.recording import (
        FILE_HEADER,
        MAGIC,
        VERSION,
        RecordingWriter,
        read_recording,
    )
    path = tmp_path / "r.iotr"
    w = RecordingWriter(path, {"source": "qemu"})
    w.close()
    raw = path.read_bytes()
    meta_len = struct.unpack_from("<I", raw, 12)[0]
    meta = json.loads(raw[FILE_HEADER.size:FILE_HEADER.size + meta_len])
    meta["record_fields"][0][1] = bad_type
    blob = json.dumps(meta).encode()
    head = FILE_HEADER.pack(MAGIC, VERSION, FILE_HEADER.size, len(blob), zlib.crc32(blob), 0)
    path.write_bytes(head + blob + raw[FILE_HEADER.size + meta_len:])
    with pytest.raises(InputError, match="record_fields"):
        read_recording(path)
