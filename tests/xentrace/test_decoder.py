"""Unit tests of the xentrace decoder on small captures built record by record with struct.

Layouts follow xen/include/public/trace.h (struct t_rec) and tools/xentrace/xentrace.c (windows);
see xen-tracepoints/catalogue.py for the sources of each fact.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from iotrace.core import events as E
from iotrace.core.errors import InputError
from iotrace.offline.capture import load_capture
from iotrace.xentrace import catalogue as C
from iotrace.xentrace import decoder as D

HZ = 1_000_000_000          # 1 GHz: 1 cycle = 1 ns, easy to read


def rec(event, words=(), tsc=None):
    h = C.header(event, len(words), tsc is not None)
    out = struct.pack("<I", h)
    if tsc is not None:
        out += struct.pack("<II", tsc & 0xFFFFFFFF, tsc >> 32)
    return out + struct.pack(f"<{len(words)}I", *words)


def window(pcpu, *records):
    body = b"".join(records)
    return struct.pack("<IiI", C.CPU_CHANGE_HEADER, pcpu, len(body)) + body


def run(dom, vcpu, tsc, old=C.RUNSTATE_RUNNABLE):
    return rec(C.runstate_event(old, C.RUNSTATE_RUNNING), [dom << 16 | vcpu], tsc)


def desched(dom, vcpu, tsc, new=C.RUNSTATE_BLOCKED):
    return rec(C.runstate_event(C.RUNSTATE_RUNNING, new), [dom << 16 | vcpu], tsc)


def vmexit(tsc, reason=30, ev=C.TRC_HVM_VMX_EXIT):
    words = [reason, 0x1000] if ev & C.TRC_64_FLAG == 0 else [reason, 0x1000, 0]
    return rec(ev, words, tsc)


def vmentry(tsc):
    return rec(C.TRC_HVM_VMENTRY, [], tsc)


def pio(port, data=None, write=True):
    ev = C.TRC_HVM_IOPORT_WRITE if write else C.TRC_HVM_IOPORT_READ
    return rec(ev, [port] if data is None else [port, data])


def mmio64(gpa, data=None, write=False):
    ev = C.TRC_HVM_IOMEM_WRITE64 if write else C.TRC_HVM_IOMEM_READ64
    words = [gpa & 0xFFFFFFFF, gpa >> 32]
    if data is not None:
        words += [data & 0xFFFFFFFF, data >> 32]
    return rec(ev, words)


def decode(buf, **kw):
    kw.setdefault("cpu_hz", HZ)
    return D.decode_bytes(buf, **kw)


# ----------------------------------------------------------------------------- fields

def test_one_port_write_with_owner_and_service_time():
    buf = window(0, run(3, 1, 1000), vmexit(2000), pio(0x3F8, 0x41), vmentry(2500))
    res = decode(buf)
    assert res.records == 4 and res.windows == 1 and res.decode_errors == 0
    assert res.truncated_at is None and res.warnings == []
    (e,) = res.events
    assert (e["domid"], e["vcpu"], e["type"], e["dir"]) == (3, 1, E.TYPE_PIO, E.DIR_WRITE)
    assert (e["addr"], e["data"], e["data_is_ptr"], e["size"], e["count"]) == (0x3F8, 0x41, 0, 0, 1)
    assert e["ts_ns"] == 2000                # the I/O record has no TSC: the exit's is used
    assert e["service_ns"] == 500            # VMENTRY - VMEXIT


def test_cpu_hz_scales_timestamps_and_default_is_xenalyzes():
    buf = window(0, run(3, 1, 1000), vmexit(2_400_000), pio(0x60, 1, write=False),
                 vmentry(4_800_000))
    e = D.decode_bytes(buf).events[0]       # default: xenalyze's DEFAULT_CPU_HZ, 2.4 GHz
    assert e["ts_ns"] == 1_000_000 and e["service_ns"] == 1_000_000
    assert e["dir"] == E.DIR_READ
    e = D.decode_bytes(buf, cpu_hz=1.2e9).events[0]
    assert e["ts_ns"] == 2_000_000 and e["service_ns"] == 2_000_000


def test_records_before_first_runstate_are_kept_unowned():
    buf = window(1, vmexit(10), pio(0x70, 5), vmentry(20), run(7, 0, 30), vmexit(40),
                 pio(0x71), vmentry(45))
    ev = decode(buf).events
    assert len(ev) == 2
    assert (ev[0]["domid"], ev[0]["vcpu"]) == (-1, -1)
    assert (ev[1]["domid"], ev[1]["vcpu"]) == (7, 0)
    assert ev[1]["data_is_ptr"] == 1 and ev[1]["data"] == 0    # rep: data words omitted
    assert ev[1]["service_ns"] == 5


def test_idle_domain_and_continue_running_attribution():
    buf = window(0, run(C.DOMID_IDLE, 0, 5), pio(0x80, 1),
                 rec(C.TRC_SCHED_CONTINUE_RUNNING, [2 << 16 | 3], 9), pio(0x81, 2))
    ev = decode(buf).events
    assert [(int(e["domid"]), int(e["vcpu"])) for e in ev] == [(C.DOMID_IDLE, 0), (2, 3)]


def test_lost_records_counted_and_name_the_current_vcpu():
    # trace.c insert_lost_records: [lost, did | vid << 16, first_tsc lo, hi] (domain LOW half)
    lost = rec(C.TRC_LOST_RECORDS, [17, 5 | (2 << 16), 100, 0], 200)
    buf = window(0, run(1, 0, 50), lost, vmexit(210), pio(0x1F0, 9), vmentry(230))
    buf += window(1, rec(C.TRC_LOST_RECORDS, [4, 1, 0, 0], 60))
    res = decode(buf)
    assert res.lost_records == 21
    e = res.events[0]
    assert (e["domid"], e["vcpu"]) == (5, 2) and e["service_ns"] == 20


def test_wrap_records_are_padding():
    wrap = rec(C.TRC_TRACE_WRAP_BUFFER, [0, 0, 0, 0, 0, 0, 0], 1)
    buf = window(0, run(1, 1, 1), wrap, rec(C.TRC_TRACE_WRAP_BUFFER, [0]), pio(0x64, 1))
    res = decode(buf)
    assert res.records == 4 and res.decode_errors == 0 and len(res.events) == 1


def test_64bit_mmio_with_and_without_data():
    gpa = 0x1_2345_6780
    buf = window(0, run(1, 0, 1), vmexit(10, 48), mmio64(gpa, 0xDEADBEEF_00C0FFEE), vmentry(30),
                 vmexit(40, 48), mmio64(gpa + 8, write=True), vmentry(45))
    ev = decode(buf).events
    assert len(ev) == 2
    assert ev[0]["type"] == E.TYPE_MMIO and ev[0]["addr"] == gpa and ev[0]["dir"] == E.DIR_READ
    assert ev[0]["data"] == 0xDEADBEEF_00C0FFEE and ev[0]["data_is_ptr"] == 0
    assert ev[1]["addr"] == gpa + 8 and ev[1]["dir"] == E.DIR_WRITE
    assert ev[1]["data_is_ptr"] == 1 and ev[1]["service_ns"] == 5


def test_32bit_mmio_and_rep_pio():
    buf = window(0, run(2, 0, 1), rec(C.TRC_HVM_IOMEM_WRITE, [0xFED00010, 7]),
                 rec(C.TRC_HVM_IOPORT_READ, [0x1F0]))
    ev = decode(buf).events
    assert (ev[0]["type"], ev[0]["addr"], ev[0]["data"], ev[0]["dir"]) == (1, 0xFED00010, 7, 0)
    assert (ev[1]["type"], ev[1]["addr"], ev[1]["data_is_ptr"], ev[1]["dir"]) == (0, 0x1F0, 1, 1)


@pytest.mark.parametrize("exit_id", [C.TRC_HVM_VMX_EXIT, C.TRC_HVM_VMX_EXIT64,
                                     C.TRC_HVM_SVM_EXIT, C.TRC_HVM_SVM_EXIT64])
def test_service_time_for_every_exit_id(exit_id):
    buf = window(0, run(1, 0, 1), vmexit(100, 0x7B, exit_id), pio(0x3F8, 1), vmentry(175))
    res = decode(buf)
    assert res.decode_errors == 0
    assert res.events[0]["service_ns"] == 75


def test_service_time_when_read_completes_on_another_pcpu_listed_first():
    # vCPU 4.1 exits on pCPU 0 and blocks waiting for qemu; it resumes on pCPU 1, where the read
    # completes (reads are traced at completion) and it re-enters. pCPU 1's window comes first
    # in the file, as xentrace may write it.
    p0 = window(0, run(4, 1, 100), vmexit(200), desched(4, 1, 210, C.RUNSTATE_OFFLINE))
    p1 = window(1, run(4, 1, 900), pio(0x1F7, 0x50, write=False), vmentry(950))
    for buf in (p0 + p1, p1 + p0):
        ev = decode(buf).events
        assert len(ev) == 1 and (ev[0]["domid"], ev[0]["vcpu"]) == (4, 1)
        assert ev[0]["service_ns"] == 750


def test_no_service_time_without_an_open_exit_or_entry():
    buf = window(0, run(1, 0, 1), pio(0x3F8, 1), vmexit(10), vmexit(20), pio(0x3F9, 1),
                 vmentry(30), vmexit(40), pio(0x3FA, 1))
    ev = decode(buf).events
    assert list(ev["service_ns"]) == [-1, 10, -1]


def test_junk_ids_and_bad_layouts_are_counted_not_fatal():
    buf = window(0, run(1, 0, 1),
                 rec(0x0ABCDEF, [1, 2]),                       # class 0x0ab: no such class
                 rec(C.TRC_HVM_IOPORT_WRITE, [1, 2, 3]),       # 3 words: no such layout
                 rec(C.TRC_HVM_VMX_EXIT, [1], 5),              # exit with 1 word
                 rec(C.TRC_LOST_RECORDS, [1], 6),              # lost with 1 word
                 rec(0x00022001, [1, 2, 3], 7),                # a scheduler-class record: fine
                 pio(0x60, 0x1C))
    res = decode(buf)
    assert res.decode_errors == 4
    assert res.records == 7 and len(res.events) == 1 and res.events[0]["addr"] == 0x60


def test_events_are_in_time_order_across_pcpus():
    a = window(0, run(1, 0, 100), vmexit(500), pio(1, 1), vmentry(510))
    b = window(1, run(1, 1, 100), vmexit(300), pio(2, 2), vmentry(310))
    ev = decode(a + b).events
    assert list(ev["addr"]) == [2, 1] and list(ev["ts_ns"]) == [300, 500]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("buf", [b"", b"\0" * 64, os.urandom(4096), b"\x03\xf0\x01"])
def test_not_a_capture_is_one_line_input_error(buf):
    with pytest.raises(InputError) as exc:
        D.decode_bytes(buf, name="x.bin")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("x.bin:") and "offset" in msg


def test_missing_file_directory_and_empty_file(tmp_path):
    for path, what in [(tmp_path / "nope.bin", "no such file"), (tmp_path, "directory")]:
        with pytest.raises(InputError, match=what) as exc:
            D.decode_file(path)
        assert str(path) in str(exc.value) and "offset 0" in str(exc.value)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        D.decode_file(empty)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(InputError, match=r"junk\.bin: not a xentrace capture.*byte offset 0"):
        D.decode_file(junk)


def test_truncated_mid_record_keeps_every_complete_record(tmp_path):
    recs = [run(1, 0, 1)] + [vmexit(10 * i) + pio(0x3F8, i) + vmentry(10 * i + 5)
                             for i in range(1, 6)]
    buf = window(0, *recs)
    full = decode(buf)
    assert len(full.events) == 5
    cut = len(buf) - 6                       # inside the last VMENTRY record
    res = decode(buf[:cut])
    assert res.truncated_at == len(buf) - 12
    assert len(res.events) == 5 and res.records == full.records - 1
    assert any("truncated" in w and str(res.truncated_at) in w for w in res.warnings)
    assert res.events[-1]["service_ns"] == -1   # its VMENTRY was cut off
    # a cut on a record boundary inside a window, and one not on a u32 boundary
    res = decode(buf[:len(buf) - 12])
    assert res.truncated_at == len(buf) - 12 and len(res.warnings) == 1
    path = tmp_path / "cut.bin"
    path.write_bytes(buf[:len(buf) - 5])
    res = load_capture(str(path), cpu_hz=HZ)
    assert res.source == "xentrace" and len(res.events) == 5 and res.warnings


def test_corrupt_window_header_resyncs_on_the_next_window():
    good = window(1, run(1, 0, 5), pio(0x61, 1))
    bad = b"\xff" * 20
    res = decode(good + bad + good)
    assert len(res.events) == 2 and res.decode_errors == 1
    assert any("corrupt window header" in w and str(len(good)) in w for w in res.warnings)


def test_record_running_past_its_window_is_an_error():
    body = run(1, 0, 5) + pio(0x61, 1)
    short = struct.pack("<IiI", C.CPU_CHANGE_HEADER, 0, len(body) - 4) + body
    res = decode(short + window(0, pio(0x62, 2)))
    # the overrunning record, then its last word where a window header should be (resync)
    assert res.decode_errors == 2
    assert any("past the end of their window" in w for w in res.warnings)
    assert [int(a) for a in res.events["addr"]] == [0x62]


# ----------------------------------------------------------------------------- streaming

def _capture():
    from iotrace.xentrace.testing import synth
    return synth.generate(11, pcpus=4, steps=1500, lost=3)


def _canon(ev):
    return np.sort(ev, order=["ts_ns", "addr", "dir", "domid", "vcpu", "service_ns"])


def test_stream_decoder_in_small_chunks_equals_whole_decode():
    t = _capture()
    whole = D.decode_bytes(t.data)
    for step in (1, 7, 4096):
        data = {1: t.data[:5_000], 7: t.data[:30_000]}.get(step, t.data)
        dec = D.StreamDecoder()
        parts = [dec.feed(data[i:i + step]) for i in range(0, len(data), step)]
        parts.append(dec.finish())
        got = _canon(np.concatenate(parts))
        ref = _canon(D.decode_bytes(data).events if len(data) < len(t.data) else whole.events)
        assert len(got) == len(ref) and (got == ref).all(), step
        if data is t.data:
            assert dec.records == whole.records and dec.lost_records == whole.lost_records


def test_synth_ground_truth_counts_and_totals():
    t = _capture()
    res = D.decode_bytes(t.data)
    got = {}
    for e in res.events:
        k = (int(e["domid"]), int(e["vcpu"]), int(e["type"]), int(e["dir"]), int(e["addr"]))
        got[k] = got.get(k, 0) + 1
    assert got == dict(t.truth)
    assert (res.records, res.windows, res.lost_records) == (t.records, t.windows, t.lost_records)
    known = res.events[res.events["domid"] >= 0]
    assert (known["service_ns"] >= 0).mean() > 0.95


def test_fast_path_equals_full_table_path(monkeypatch):
    t = _capture()
    fast = D.decode_bytes(t.data).events
    monkeypatch.setenv("IOTRACE_XT_FULLPATH", "1")
    full = D.decode_bytes(t.data).events
    assert (_canon(fast) == _canon(full)).all()


def test_numpy_walk_equals_c_walk():
    if D._C_WALK is None:
        pytest.skip("_xtwalk.so not built (make xtwalk); the NumPy walk is the one in use")
    t = _capture()
    buf = t.data + window(0, pio(1, 1))[:-2]       # end mid-record
    w = np.frombuffer(buf[:len(buf) // 4 * 4], "<u4")
    outs = []
    for fn in (D._walk_c, D._walk_numpy):
        st = np.zeros(8, np.int64)
        outs.append((fn(w, st), st.copy()))
    (c, cst), (n, nst) = outs
    for a, b in zip(c, n):
        assert np.array_equal(a, b)
    assert np.array_equal(cst[[0, 1, 2, 3, 4, 6]], nst[[0, 1, 2, 3, 4, 6]])
    assert cst[D._ST_STATUS] == D._XT_PARTIAL


def test_numpy_fallback_decodes_the_same(monkeypatch):
    t = _capture()
    ref = _canon(D.decode_bytes(t.data).events)
    monkeypatch.setattr(D, "_C_WALK", None)
    assert D.walker_name() == "numpy"
    assert (_canon(D.decode_bytes(t.data).events) == ref).all()


def test_catalogue_ids_match_xen_trace_h():
    assert C.CPU_CHANGE_HEADER == 0x2001F003
    assert C.runstate_event(C.RUNSTATE_RUNNABLE, C.RUNSTATE_RUNNING) == 0x21101
    assert C.runstate_event(C.RUNSTATE_RUNNING, C.RUNSTATE_OFFLINE) == 0x21031
    assert (C.TRC_HVM_IOMEM_READ64, C.TRC_HVM_IOMEM_WRITE64) == (0x82117, 0x82317)
    assert C.event_name(0x21211) == "runstate_change blocked->runnable"
    assert C.event_name(C.TRC_HVM_SVM_EXIT64) == "svm_exit64"
    with pytest.raises(ValueError):
        C.header(1, 8, False)


def test_stream_yields_events_before_the_end_of_input():
    # reads of a few bytes (a pipe from xentrace): a window is decoded once it is complete, so
    # exits closed inside it are timed and emitted at once, not at EOF
    from iotrace.xentrace.testing import synth
    t = synth.generate(21, steps=150)
    dec = D.StreamDecoder()
    early = sum(len(dec.feed(t.data[i:i + 7])) for i in range(0, len(t.data), 7))
    late = len(dec.finish())
    total = sum(t.truth.values())
    assert early + late == total
    assert early >= total // 2


def test_bad_cpu_hz_is_an_input_error():
    with pytest.raises(InputError, match="cpu_hz must be positive"):
        D.decode_bytes(window(0, pio(1, 1)), cpu_hz=-1.0)
