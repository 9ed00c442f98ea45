"""As root, with real BCC uprobes: the stand-in looks like qemu-dm to a probe on handle_ioreq.

probes/standin/selfcheck.bpf.c reads, on entry of handle_ioreq, state->send_vcpu at the layout's
offset, the ioreq_t fields at Xen's ABI offsets, and the return address on the stack. Every
synchronous request of the bundled stream must show its vCPU in send_vcpu and return into
cpu_handle_ioreq; every buffered one must be a zeroed READY/WRITE/count-1 ioreq returning into
handle_buffered_iopage (the return addresses -print-layout reports)."""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest

from iotrace.probes.bpf import uprobes
from iotrace.probes.standin import runner as sr
from iotrace.probes.standin import stream
from support import REPO

pytestmark = [pytest.mark.root, pytest.mark.integration]


class Seen(ctypes.Structure):
    _fields_ = [("ret", ctypes.c_uint64), ("addr", ctypes.c_uint64), ("data", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("send_vcpu", ctypes.c_int32), ("pid", ctypes.c_uint32), ("bits", ctypes.c_uint8),
                ("type", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 6)]


def _base(pid: int, exe: str) -> int:
    """Load address of exe in pid (start of its first mapping minus that mapping's file offset)."""
    real = os.path.realpath(exe)
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                start = int(parts[0].split("-")[0], 16)
                return start - int(parts[2], 16)
    raise AssertionError(f"{real} not mapped in {pid}")


@pytest.mark.parametrize("layout", ["7.2", "8.1"])
def test_a_uprobe_on_handle_ioreq_sees_what_it_would_see_in_qemu(layout):
    bcc = pytest.importorskip("bcc")
    assert ctypes.sizeof(Seen) == 48
    info = sr.layout_info(layout)
    exe = info["exe"]
    b = bcc.BPF(src_file=str(REPO / "probes" / "standin" / "selfcheck.bpf.c"),
                cflags=[f"-DSEND_VCPU_OFFSET={info['send_vcpu_offset']}"])
    try:
        # as iotrace attaches (probes/bpf/uprobes.py: ref_ctr_offset 0, see there)
        uprobes.attach(b, str(exe), info["handle_ioreq"]["vaddr"], "on_handle_ioreq")
        events, lost = [], []

        def on_event(cpu, data, size):
            events.append(Seen.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(Seen))))

        b["seen"].open_perf_buffer(on_event, page_cnt=512, lost_cb=lambda n: lost.append(n))
        s = sr.StandIn(21, layout=layout, speed=0, hold=True).start()
        try:
            reqs = stream.read_stream(sr.BUNDLED_STREAM)
            mine = []
            # Poll until every request is in or 20 s have passed (a poll returns as soon as any
            # data is there, so a count of polls is no measure of time on a busy machine).
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                b.perf_buffer_poll(timeout=50)
                mine = [e for e in events if e.pid == s.pid]
                if len(mine) >= len(reqs):
                    break
            base = _base(s.pid, exe)
        finally:
            s.stop()
    finally:
        b.cleanup()
    assert not lost
    assert len(mine) == len(reqs)
    ret_sync = base + info["ret_sync"]["vaddr"]
    ret_buf = base + info["ret_buffered"]["vaddr"]
    sync = [e for e in mine if e.ret == ret_sync]
    buf = [e for e in mine if e.ret == ret_buf]
    assert len(sync) + len(buf) == len(mine)
    want_sync = reqs[reqs["buffered"] == 0]
    want_buf = reqs[reqs["buffered"] == 1]
    # synchronous: the vCPU is only in state->send_vcpu; state INPROCESS (2) in the copy
    assert [(e.send_vcpu, e.addr, e.type, e.size, e.count, (e.bits >> 5) & 1, e.bits & 0xF)
            for e in sync] == [(int(r["vcpu"]), int(r["addr"]), int(r["type"]), int(r["size"]),
                                1, int(r["dir"]), 2) for r in want_sync]
    # buffered: a zeroed local ioreq_t, READY (1), WRITE, count 1, data widened to 64 bits
    assert [(e.addr, e.type, e.size, e.count, e.bits, e.data) for e in buf] == \
        [(int(r["addr"]), 1, int(r["size"]), 1, 0x01, int(r["data"])) for r in want_buf]
    assert np.unique([e.send_vcpu for e in sync]).tolist() == [0, 1]
