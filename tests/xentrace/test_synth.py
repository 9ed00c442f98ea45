"""Self-checks of the synthetic xentrace generator (iotrace.xentrace.testing.synth).

The checks read the bytes back with a small walker written here from the format (trace.h,
xentrace.c), independent of the project's decoder, so a synth bug and a decoder bug cannot hide
each other.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from iotrace.xentrace.testing import synth

CPU_CHANGE_HDR = 0x2001F003


def walk(data: bytes):
    """Yield (pcpu, event, tsc or None, words) for every record, checking window framing."""
    off = 0
    while off < len(data):
        hdr, cpu, size = struct.unpack_from("<III", data, off)
        assert hdr == CPU_CHANGE_HDR, f"window header at {off}: {hdr:#x}"
        off += 12
        end = off + size
        assert end <= len(data)
        while off < end:
            (h,) = struct.unpack_from("<I", data, off)
            n = (h >> 28) & 7
            has_tsc = h >> 31
            off += 4
            tsc = None
            if has_tsc:
                lo, hi = struct.unpack_from("<II", data, off)
                tsc = lo | hi << 32
                off += 8
            words = list(struct.unpack_from(f"<{n}I", data, off))
            off += 4 * n
            yield cpu, h & 0x0FFFFFFF, tsc, words
        assert off == end, "a window's size does not end on a record boundary"


def replay(data: bytes):
    """Count I/O records per (domid, vcpu, type, dir, addr), the owner being the vCPU the pCPU's
    own stream last took to running (or the vCPU named by a lost-records record)."""
    owner: dict[int, tuple[int, int]] = {}
    counts = Counter()
    for cpu, ev, tsc, w in walk(data):
        if ev & 0xFFFFF00F == synth.TRC_SCHED_RUNSTATE_CHANGE and (ev >> 4) & 0xF == 0:
            owner[cpu] = (w[0] >> 16, w[0] & 0xFFFF)
        elif ev == synth.TRC_SCHED_CONTINUE_RUNNING:
            owner[cpu] = (w[0] >> 16, w[0] & 0xFFFF)
        elif ev == synth.TRC_LOST_RECORDS:
            owner[cpu] = (w[1] & 0xFFFF, w[1] >> 16)
        elif ev & ~0x300 in (0x82016, 0x82017):
            typ = synth.TYPE_PIO if ev & 0xFF == 0x16 else synth.TYPE_MMIO
            d = synth.DIR_WRITE if ev & 0x200 else synth.DIR_READ
            addr = w[0] | (w[1] << 32 if ev & 0x100 else 0)
            counts[(*owner.get(cpu, (-1, -1)), typ, d, addr)] += 1
    return counts


@pytest.fixture(scope="module")
def trace():
    return synth.generate(7, steps=1500)


def test_record_encoding():
    assert synth.record(synth.TRC_HVM_VMENTRY, [], 0x1_0000_0002) == struct.pack(
        "<III", 0x80081001, 2, 1)
    assert synth.record(synth.TRC_HVM_IOPORT_WRITE, [0x3F8, 0x41]) == struct.pack(
        "<III", 0x20082216, 0x3F8, 0x41)
    assert synth.cpu_change(3, 40) == struct.pack("<III", CPU_CHANGE_HDR, 3, 40)
    assert synth.runstate_event(synth.RUNNING, synth.OFFLINE) == 0x21031
    with pytest.raises(ValueError):
        synth.record(1, [0] * 8)


def test_framing_and_counters(trace):
    recs = list(walk(trace.data))
    assert len(recs) == trace.records
    assert trace.data.count(struct.pack("<I", CPU_CHANGE_HDR)) >= trace.windows
    by_ev = Counter(ev for _, ev, _, _ in recs)
    assert by_ev[synth.TRC_TRACE_WRAP_BUFFER] == trace.wrap_records > 0
    lost = [w for _, ev, _, w in recs if ev == synth.TRC_LOST_RECORDS]
    assert len(lost) == trace.lost_record_records >= 1
    assert sum(w[0] for w in lost) == trace.lost_records > 0
    io = sum(n for ev, n in by_ev.items() if ev & ~0x300 in (0x82016, 0x82017))
    assert io == trace.io_records == sum(trace.truth.values())
    assert {cpu for cpu, *_ in recs} == set(range(trace.pcpus))


def test_windows_interleave(trace):
    cpus, off = [], 0
    while off < len(trace.data):
        _, cpu, size = struct.unpack_from("<III", trace.data, off)
        cpus.append(cpu)
        off += 12 + size
    assert len(cpus) == trace.windows
    # several rounds over the pCPUs, not one window per pCPU
    assert len(cpus) > 3 * trace.pcpus
    assert any(a > b for a, b in zip(cpus, cpus[1:]))


def test_per_pcpu_tsc_monotonic_and_lost_first_tsc(trace):
    last = defaultdict(int)
    for cpu, ev, tsc, w in walk(trace.data):
        if tsc is None:
            continue
        assert tsc >= last[cpu]
        if ev == synth.TRC_LOST_RECORDS:
            first = w[2] | w[3] << 32
            assert last[cpu] <= first < tsc
        last[cpu] = tsc


def test_truth_matches_an_independent_replay(trace):
    assert replay(trace.data) == trace.truth
    # records written before a pCPU's first scheduler record have no known owner
    assert any(k[0] == -1 for k in trace.truth)


def test_runstates_are_consistent_and_vcpus_migrate(trace):
    """Per vCPU, in TSC order over all pCPUs, each change starts from the state the previous one
    left; running vCPUs appear on several pCPUs; waits for qemu go through offline."""
    recs = [(tsc, cpu, ev, w) for cpu, ev, tsc, w in walk(trace.data)
            if tsc is not None and ev & 0xFFFFF00F == synth.TRC_SCHED_RUNSTATE_CHANGE]
    recs.sort(key=lambda r: r[0])
    state, pcpus, transitions = {}, defaultdict(set), Counter()
    for _, cpu, ev, w in recs:
        v = w[0]
        old, new = (ev >> 8) & 0xF, (ev >> 4) & 0xF
        if v in state:
            assert state[v] == old, f"d{v >> 16}v{v & 0xffff}: {state[v]} then {old}->{new}"
        state[v] = new
        transitions[(old, new)] += 1
        if new == synth.RUNNING and v >> 16 not in (0, synth.IDLE_DOMAIN):
            pcpus[v].add(cpu)
    assert max(len(s) for s in pcpus.values()) > 1
    assert trace.migrations > 0
    for t in [(0, 3), (3, 1), (1, 0), (0, 1), (0, 2), (2, 1)]:
        assert transitions[t] > 0, t
    assert trace.waited_reads > 0


def test_shapes_present(trace):
    recs = list(walk(trace.data))
    words = defaultdict(set)
    for _, ev, _, w in recs:
        words[ev].add(len(w))
    assert words[synth.TRC_HVM_IOMEM_READ | synth.TRC_64_FLAG] <= {2, 4}
    assert 4 in words[synth.TRC_HVM_IOMEM_WRITE | synth.TRC_64_FLAG] | \
        words[synth.TRC_HVM_IOMEM_READ | synth.TRC_64_FLAG]
    assert 1 in words[synth.TRC_HVM_IOPORT_WRITE] | words[synth.TRC_HVM_IOPORT_READ]  # rep
    assert words[synth.TRC_HVM_VMENTRY] == {0}
    assert words[synth.TRC_HVM_VMX_EXIT | synth.TRC_64_FLAG] == {3}
    assert words[synth.TRC_HVM_VMX_EXIT] == {2}
    assert any(k[2] == synth.TYPE_MMIO and k[4] >> 32 for k in trace.truth)


def test_amd_ids_and_legacy_ids_give_the_same_trace():
    new = synth.generate(5, amd=True, steps=600)
    old = synth.generate(5, amd=True, amd_legacy_ids=True, steps=600)
    ev_new = Counter(ev for _, ev, _, _ in walk(new.data))
    ev_old = Counter(ev for _, ev, _, _ in walk(old.data))
    assert ev_new[0x81003] + ev_new[0x81103] > 0 and ev_new[0x81002] + ev_new[0x81102] == 0
    assert ev_old[0x81003] + ev_old[0x81103] == 0
    assert ev_old[0x81002] + ev_old[0x81102] == ev_new[0x81003] + ev_new[0x81103]
    assert new.truth == old.truth and new.xa_counted == old.xa_counted
    assert len(new.data) == len(old.data)


def test_deterministic_per_seed():
    a, b, c = synth.generate(11, steps=300), synth.generate(11, steps=300), \
        synth.generate(12, steps=300)
    assert a.data == b.data and a.truth == b.truth
    assert a.data != c.data


def test_xenalyze_model_rules():
    t = synth.generate(3, steps=800)
    skip, keep = t.xenalyze_expected(True), t.xenalyze_expected(False)
    vga = [k for k in keep if k[2] == synth.TYPE_MMIO and 0xA0000 <= k[4] < 0xBFFFF]
    assert vga and not any(k in skip for k in vga)
    # xenalyze never lists more than the file holds, keys MMIO by 32 bits, knows no owner -1
    assert sum(keep.values()) < t.io_records
    assert all(k[4] < 1 << 32 and k[0] >= 0 for k in keep)


def test_cli_writes_capture_and_truth(tmp_path):
    out = tmp_path / "s.bin"
    r = subprocess.run([sys.executable, "-m", "iotrace.xentrace.testing.synth", "-o", str(out),
                        "--seed", "4", "--steps", "200"], capture_output=True, text=True,
                       check=True)
    summary = json.loads(r.stdout)
    t = synth.generate(4, steps=200)
    assert out.read_bytes() == t.data
    assert summary["io_records"] == t.io_records
    assert {tuple(k[:5]): k[5] for k in summary["truth"]} == dict(t.truth)


def test_cli_stream_plays_the_same_bytes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "iotrace.xentrace.testing.synth", "--stream", "--seed", "4",
                        "--steps", "200", "--chunk", "333", "--pause", "0"],
                       capture_output=True, check=True)
    assert r.stdout == synth.generate(4, steps=200).data


@pytest.mark.parametrize("args", [["--stream", "--input", "/nonexistent/cap.bin"],
                                  ["-o", "/nonexistent/dir/cap.bin", "--steps", "10"],
                                  ["--pcpus", "0"]])
def test_cli_bad_input_is_one_line_exit_2(args):
    r = subprocess.run([sys.executable, "-m", "iotrace.xentrace.testing.synth", *args],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_io_truth_has_every_record_with_its_exit(trace):
    assert sum(trace.io_truth.values()) == trace.io_records
    # waited reads are timed to their wake-up, not to the VMENTRY: some service times differ
    # from any VMEXIT->VMENTRY span, and every RIP is one the exits carried
    exits = {w[1] | (w[2] << 32 if ev & 0x100 else 0)
             for _, ev, _, w in walk(trace.data) if ev & ~0x101 == 0x81002}
    assert {k[5] for k in trace.io_truth} <= exits
    assert all(k[6] >= 0 for k in trace.io_truth)


@pytest.mark.parametrize("mix", sorted(synth.MIXES))
def test_stream_writes_valid_captures_of_every_mix(mix):
    pieces = list(synth.stream(3, target_bytes=60_000, segment_steps=300, **synth.MIXES[mix]))
    data = b"".join(pieces)
    assert len(pieces) >= 2 and len(data) >= 60_000
    recs = list(walk(data))
    t = synth.stream.last_trace
    assert len(recs) == t.records and t.io_records > 0
    if synth.MIXES[mix].get("amd"):
        assert any(ev & ~0x100 == 0x81002 for _, ev, _, _ in recs)     # legacy ids
    if mix == "io-dense":
        io = sum(1 for _, ev, _, _ in recs if ev & ~0x300 in (0x82016, 0x82017))
        sched = sum(1 for _, ev, _, _ in recs if ev >> 12 == 0x21)
        assert 0.2 < io / len(recs) < 0.3 and sched / len(recs) < 0.05
    if mix == "many-domains":
        assert len({w[0] >> 16 for _, ev, _, w in recs if ev >> 12 == 0x21}) >= 50
        assert t.migrations > 100
    if mix == "lost-heavy":
        assert t.lost_record_records >= 20


def test_tile_shifts_every_copy_after_the_last():
    t = synth.generate(9, steps=300)
    data = b"".join(synth.tile(t.data, 3))
    assert len(data) == 3 * len(t.data)
    last = defaultdict(int)
    for cpu, ev, tsc, w in walk(data):
        if tsc is not None:
            assert tsc >= last[cpu]
            last[cpu] = tsc
            if ev == synth.TRC_LOST_RECORDS:
                assert (w[2] | w[3] << 32) < tsc
    # the same I/O records three times (copies 2 and 3 know the owners of their first records:
    # the previous copy's last ones)
    def by_addr(c):
        out = Counter()
        for k, n in c.items():
            out[k[2:]] += n
        return out
    assert by_addr(replay(data)) == Counter({k: 3 * n for k, n in by_addr(t.truth).items()})

