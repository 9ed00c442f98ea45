"""iotrace.offline.recording: round trip, truncation (killed writer), corruption, and a fuzzed reader."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotrace.core import events
from iotrace.core.errors import InputError, OutputError
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


def _read_blob(blob: bytes, name: str = "x.iotrace"):
    """Read a recording held in memory: (events, reader)."""
    reader = recording.RecordingReader(io.BytesIO(blob), name)
    parts = list(reader.batches())
    return events.concat(parts), reader


def _meta_len(blob: bytes) -> int:
    return struct.unpack_from("<I", blob, 12)[0]


@pytest.mark.parametrize("what,offset,value,pattern", [
    ("magic", 0, b"\x89IOTREX", r"offset 0: not an iotrace recording"),
    ("meta length", 12, struct.pack("<I", 1 << 30), r"offset 12: metadata length"),
    ("meta byte", 30, b"#", r"offset 24: metadata checksum mismatch"),
])
def test_a_header_beyond_repair_is_one_line_input_error(tmp_path, what, offset, value, pattern):
    """A file header or metadata damaged with no chunk after it to recover from: one line."""
    path = tmp_path / "c.iotrace"
    w = recording.RecordingWriter(path, {"source": "test"})
    w.flush()                                  # the header and metadata only (writer killed)
    path.write_bytes(_corrupt(path.read_bytes(), offset, value))
    with pytest.raises(InputError, match=pattern) as ei:
        recording.read_recording(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg


def test_a_later_version_is_refused(tmp_path):
    """A version this reader does not know, said by the header and the metadata alike."""
    path = tmp_path / "v.iotrace"
    write_file(path, [make_batch(5)])
    blob = path.read_bytes()
    meta = json.loads(blob[24:24 + _meta_len(blob)])
    meta["version"] = 7
    m = json.dumps(meta).encode()
    head = struct.pack("<8sHHIII", recording.MAGIC, 7, 24, len(m), zlib.crc32(m), 0)
    path.write_bytes(head + m + blob[24 + _meta_len(blob):])
    with pytest.raises(InputError, match=r"offset 8: recording version 7, this iotrace reads "
                                         r"version 1"):
        recording.read_recording(path)


def _flip(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("what,bit,warning", [
    ("magic", 8 * 3 + 2, r"offset 0: file magic damaged"),
    ("version", 8 * 8 + 1, r"offset 8: the file header says version 3"),
    ("header size", 8 * 10 + 5, r"offset 10: header size 56"),
    ("meta length, low bit", 8 * 12, r"offset 12: metadata length \d+ damaged"),
    ("meta length, high bit", 8 * 15 + 6, r"offset 12: metadata length \d+ damaged"),
    ("meta crc", 8 * 16 + 3, r"offset 24: metadata damaged \(checksum mismatch\): read with "
                             r"this iotrace's version 1 record layout"),
    ("meta, a brace", 8 * 24 + 1, r"offset 24: metadata damaged"),
])
def test_one_damaged_header_field_is_read_through(tmp_path, what, bit, warning):
    """One flipped bit in the file header or the metadata: every event still reads, and a
    warning says what was damaged."""
    path = tmp_path / "h.iotrace"
    b = make_batch(20, 4)
    write_file(path, [b], domains={2: "beta"}, chunk_records=8)
    got, reader = _read_blob(_flip(path.read_bytes(), bit))
    np.testing.assert_array_equal(got, b)
    assert reader.complete and reader.skipped_chunks == 0
    assert reader.domains[2] == "beta"
    assert any(re.search(warning, w) for w in reader.warnings), reader.warnings


def test_a_damaged_chunk_costs_that_chunk_only(tmp_path):
    """A flipped payload bit skips exactly its chunk (the header is intact); a chunk header
    overwritten with junk is skipped up to the next chunk (resynchronisation). Both are counted
    and said with their offsets; every other chunk reads."""
    path = tmp_path / "c.iotrace"
    b = make_batch(40, 7)
    write_file(path, [b], chunk_records=10)
    blob = path.read_bytes()
    body = 24 + _meta_len(blob)
    size = 24 + 10 * recording.RECORD_DTYPE.itemsize          # one events chunk
    got, reader = _read_blob(_corrupt(blob, body + size + 24 + 7, b"\xff"))    # 2nd payload
    np.testing.assert_array_equal(got, np.concatenate([b[:10], b[20:]]))
    assert (reader.skipped_chunks, reader.skipped_records) == (1, 10)
    assert reader.warnings == [f"offset {body + size}: events chunk checksum mismatch: "
                               "skipped it (10 record(s))"]
    assert reader.complete
    got, reader = _read_blob(_corrupt(blob, body + 2 * size, b"JUNK"))          # 3rd header
    np.testing.assert_array_equal(got, np.concatenate([b[:20], b[30:]]))
    assert (reader.skipped_chunks, reader.skipped_records) == (1, 10)
    assert reader.warnings == [f"offset {body + 2 * size}: bad chunk magic b'JUNK': skipped "
                               f"{size} bytes to the next chunk at offset {body + 3 * size} "
                               "(about 10 record(s))"]


def _old_format(batches) -> bytes:
    """A recording as iotrace wrote them before the chunk header check (reserved field 0)."""
    meta = json.dumps({"format": "iotrace-recording", "version": 1, "domains": {},
                       "record_size": recording.RECORD_DTYPE.itemsize,
                       "record_fields": [[n, recording.RECORD_DTYPE.fields[n][0].str]
                                         for n in recording.RECORD_DTYPE.names]}).encode()
    blob = struct.pack("<8sHHIII", recording.MAGIC, 1, 24, len(meta), zlib.crc32(meta), 0) + meta
    for b in batches:
        payload = b.astype(recording.RECORD_DTYPE).tobytes()
        blob += struct.pack("<4sHHIIQ", b"IOTC", 1, 0, len(payload), zlib.crc32(payload), 0)
        blob += payload
    return blob + struct.pack("<4sHHIIQ", b"IOTC", 3, 0, 0, 0, 0)


def test_files_without_the_header_check_resynchronise_too():
    b = make_batch(30, 8)
    blob = _old_format([b[:10], b[10:20], b[20:]])
    body = 24 + _meta_len(blob)
    size = 24 + 10 * recording.RECORD_DTYPE.itemsize
    got, reader = _read_blob(_flip(blob, 8 * (body + size + 24 + 100)))
    np.testing.assert_array_equal(got, np.concatenate([b[:10], b[20:]]))
    assert (reader.skipped_chunks, reader.skipped_records, reader.complete) == (1, 10, True)
    got, reader = _read_blob(_corrupt(blob, body + size, b"JUNK"))
    np.testing.assert_array_equal(got, np.concatenate([b[:10], b[20:]]))
    assert reader.skipped_chunks == 1 and reader.complete


def test_every_single_bit_flip_costs_one_chunk_at_most(tmp_path):
    """Each bit of a small recording flipped in turn (about 10,000 files): nothing raises, the
    events read are the written ones minus one chunk at most, the skipped records are counted
    exactly, no event is invented, and the lost count and names never grow. (A CRC-32 catches
    every single-bit error, so its low 16 bits in a chunk header catch every flipped header bit:
    kind, length, checksum, lost count.)"""
    path = tmp_path / "s.iotrace"
    b = make_batch(10, 9)
    w = recording.RecordingWriter(path, {"source": "test", "domains": {1: "a"}},
                                  chunk_records=4)
    w.write(b[:6])
    w.set_domain(3, "x")
    w.add_lost(2)
    w.write(b[6:])
    w.close()
    blob = path.read_bytes()
    chunks = [(0, 4), (4, 8), (8, 10)]                 # the events of each events chunk
    original = set(map(bytes, b.astype(recording.RECORD_DTYPE)))
    for bit in range(len(blob) * 8):
        got, reader = _read_blob(_flip(blob, bit))
        missing = len(b) - len(got)
        assert missing == reader.skipped_records or (missing == 0 and reader.skipped_records
                                                     <= 4), bit
        if missing:
            assert any(np.array_equal(got, np.concatenate([b[:i], b[j:]])) for i, j in chunks), \
                bit
            assert reader.skipped_chunks == 1, bit
        else:
            np.testing.assert_array_equal(got, b)
        assert set(map(bytes, got.astype(recording.RECORD_DTYPE))) <= original
        assert reader.lost_events <= 2
        assert set(reader.domains.items()) <= {(1, "a"), (3, "x")}, bit
        if bit < 8 * (24 + _meta_len(blob)):
            continue              # the file header or metadata: the names in it may be lost
        assert 1 in reader.domains or reader.skipped_chunks, bit


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
_SEED = [make_batch(7, 5), make_batch(3, 6)]


def _valid_blob(tmp_path_factory) -> bytes:
    if "blob" not in _VALID:
        p = tmp_path_factory.mktemp("fuzz") / "seed.iotrace"
        write_file(p, _SEED, lost=2, domains={3: "x"}, chunk_records=4)
        _VALID["blob"] = p.read_bytes()
    return _VALID["blob"]


def _event_chunks(blob: bytes):
    """(start, end, records) of every events chunk of an intact recording."""
    off, out = 24 + _meta_len(blob), []
    while off < len(blob):
        _, kind, _, plen, _, _ = recording.CHUNK_HEADER.unpack_from(blob, off)
        if kind == recording.KIND_EVENTS and plen:
            out.append((off, off + 24 + plen, blob[off + 24:off + 24 + plen]))
        off += 24 + plen
    return out


def _records(batch) -> list[bytes]:
    return [bytes(r) for r in batch.astype(recording.RECORD_DTYPE)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_reader_returns_or_raises_input_error(tmp_path_factory, data):
    """Random damage: the reader returns or raises one InputError line. When it returns, after
    overwritten bytes or bytes inserted, every event it gives was written (none invented) and
    every events chunk the damage did not touch is read whole (resynchronisation)."""
    orig = _valid_blob(tmp_path_factory)
    blob = bytearray(orig)
    mode = data.draw(st.sampled_from(["flip", "region", "splice", "cut", "random"]))
    touched: list[tuple[int, int]] = []         # [start, end) of original bytes changed
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
            touched.append((i, i + 1))
    elif mode == "region":
        i = data.draw(st.integers(0, len(blob) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=200))
        blob[i:i + len(junk)] = junk[:len(blob) - i]
        touched.append((i, i + len(junk)))
    elif mode == "splice":
        i = data.draw(st.integers(8, len(blob)))
        blob[i:i] = data.draw(st.binary(max_size=64))
        touched.append((i - 1, i + 1))           # the chunk holding either side of the seam
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
    if mode in ("flip", "region", "splice"):
        written = _records(np.concatenate(_SEED))
        got = _records(rec.events)
        assert set(got) <= set(written)
        for start, end, payload in _event_chunks(orig):
            if any(a < end and start < b for a, b in touched):
                continue
            n = len(payload) // recording.RECORD_DTYPE.itemsize
            whole = [payload[k * 60:(k + 1) * 60] for k in range(n)]
            assert any(got[k:k + n] == whole for k in range(len(got) - n + 1)), (start, touched)


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


# -- writing: private files, bounded delay, disk full -------------------------------------------
def test_recordings_are_created_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        w = recording.RecordingWriter(tmp_path / "r.iotrec", {"source": "test"})
        w.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.iotrec").st_mode) == 0o600


def test_an_existing_file_is_refused_unless_forced(tmp_path):
    path = tmp_path / "old.iotrec"
    path.write_bytes(b"precious")
    path.chmod(0o644)
    with pytest.raises(OutputError, match=r"old.iotrec: exists: refused .*--force") as ei:
        recording.RecordingWriter(path, {"source": "test"})
    assert "\n" not in str(ei.value)
    assert path.read_bytes() == b"precious"
    w = recording.RecordingWriter(path, {"source": "test"}, force=True)
    w.write(make_batch(3))
    w.close()
    assert recording.read_recording(path).complete
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_symbolic_link_is_refused_even_forced(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link = tmp_path / "link.iotrec"
    link.symlink_to(target)
    for force in (False, True):
        with pytest.raises(OutputError, match="symbolic link"):
            recording.RecordingWriter(link, {"source": "test"}, force=force)
    assert target.read_bytes() == b"precious"
    dangling = tmp_path / "dangling.iotrec"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        recording.RecordingWriter(dangling, {"source": "test"})
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_or_a_missing_directory_is_one_line(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        recording.RecordingWriter(tmp_path, {"source": "test"}, force=True)
    with pytest.raises(OutputError, match="No such file or directory"):
        recording.RecordingWriter(tmp_path / "no" / "r.iotrec", {"source": "test"})


def test_queued_events_reach_the_file_within_the_flush_interval(tmp_path):
    """A burst, then silence: tick() (called by `record` every poll) writes what waited
    flush_interval, without a further event to trigger it; the file has it before close()."""
    path = tmp_path / "t.iotrec"
    w = recording.RecordingWriter(path, {"source": "test"}, flush_interval=0.2)
    b = make_batch(50)
    w.write(b)
    w.tick()
    assert len(recording.read_recording(path).events) == 0      # not yet: 0.2 s not passed
    time.sleep(0.25)
    w.tick()
    rec = recording.read_recording(path)
    np.testing.assert_array_equal(rec.events, b)
    assert not rec.complete
    w.set_domain(4, "late")            # a name alone is written in time too
    time.sleep(0.25)
    w.tick()
    assert recording.read_recording(path).domains == {4: "late"}
    w.close()


def test_dev_full_is_one_line(tmp_path):
    with pytest.raises(OutputError, match=r"/dev/full: cannot write the recording: No space "
                                          r"left on device: it stops at byte 0") as ei:
        recording.RecordingWriter("/dev/full", {"source": "test"}, force=True)
    assert "\n" not in str(ei.value)
    assert stat.S_IMODE(os.stat("/dev/full").st_mode) == 0o666       # a device is not chmod'ed


_FILL = """
import sys, numpy as np
from iotrace.core import events
from iotrace.core.errors import OutputError
from iotrace.offline import recording
w = recording.RecordingWriter(sys.argv[1], {"source": "test"}, chunk_records=1000)
b = events.empty(700)
try:
    for i in range(10_000):
        b["ts_ns"] = np.arange(700) + 700 * i
        w.write(b)
except OutputError as exc:
    print(w.events_written, exc, sep="\\n")
    w.close()                     # after the failure: closes, writes nothing, raises nothing
    sys.exit(1)
"""


@pytest.mark.root
def test_disk_full_keeps_everything_written_before(tmp_path):
    """A 1 MB tmpfs, mounted in a private mount namespace: the writer stops with one line; the
    file keeps every event written before and reads (its last chunk cut short)."""
    script = tmp_path / "fill.py"
    script.write_text(_FILL)
    small = tmp_path / "small"
    small.mkdir()
    body = (f'mount -t tmpfs -o size=1m iotrace-test {small} && '
            f'{sys.executable} {script} {small}/r.iotrec; rc=$?; '
            f'cp {small}/r.iotrec {tmp_path}/r.iotrec; exit $rc')
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", body],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    written, msg = res.stdout.splitlines()
    assert re.fullmatch(re.escape(str(small)) + r"/r.iotrec: cannot write the recording: No space left on device: "
                        r"it stops at byte \d+ with \d+ event\(s\), readable up to there", msg)
    rec = recording.read_recording(tmp_path / "r.iotrec")
    assert len(rec.events) >= int(written) > 10_000
    np.testing.assert_array_equal(rec.events["ts_ns"], np.arange(len(rec.events)))
    assert not rec.complete and rec.warnings
