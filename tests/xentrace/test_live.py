"""The live xentrace source (iotrace.xentrace.live.XentraceLiveSource).

Xen cannot run here, so the command is a stand-in for the xentrace binary: the synth module
playing a capture to its stdout in small writes with pauses, cut in the middle of records
(``python -m iotrace.xentrace.testing.synth --stream``). The real xentrace binary is run too, to check
how the source reports a command that fails (no hypervisor here).
"""
from __future__ import annotations

import sys
import time
from collections import Counter

import pytest

from iotrace.core.errors import UserError
from iotrace.xentrace import live as live_module
from iotrace.xentrace.decoder import StreamDecoder
from iotrace.xentrace.live import XentraceLiveSource, default_command
from iotrace.xentrace.testing import synth
from support import require_tool


def standin(path, *extra):
    return [sys.executable, "-m", "iotrace.xentrace.testing.synth", "--stream", "--input", str(path),
            *extra]


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def totals_by_key(src) -> Counter:
    out = Counter()
    for k, cell in src.totals().items():
        out[(k.domid, k.vcpu, k.type, k.dir, k.addr)] += cell.count
    return out


@pytest.mark.parametrize("chunk,steps,pause", [(997, 2000, "0.003"), (7, 150, "0.0005")],
                         ids=["997B", "7B"])
def test_live_counts_equal_ground_truth(tmp_path, chunk, steps, pause):
    t = synth.generate(21, steps=steps)
    path = tmp_path / "cap.bin"
    t.write(path)
    assert len(t.data) % chunk and chunk % 4      # every write ends inside a record
    src = XentraceLiveSource(None, command=standin(path, "--chunk", str(chunk), "--pause", pause,
                                                   "--hold", "30"), keep_addr=True)
    src.start()
    try:
        total = sum(t.truth.values())
        # every byte read while the command still runs (--hold): all complete records decoded;
        # the decoder may hold the newest rows until later TSCs order them (or until EOF)
        assert wait_for(lambda: src.stats().extra.get("bytes") == len(t.data))
        assert wait_for(lambda: src.stats().records == t.records)
        st = src.stats()
        assert st.up and st.error is None
        assert st.name == "xentrace"
        assert 0 < st.events <= total
        assert st.lost == t.lost_records
        assert st.decode_errors == 0
        assert Counter(totals_by_key(src)) - t.truth == Counter()   # nothing wrong so far
    finally:
        t0 = time.monotonic()
        src.stop()
        assert time.monotonic() - t0 < 10
    st = src.stats()
    assert not st.up and st.error is None           # stopped on purpose: not an error
    assert st.events == total
    assert totals_by_key(src) == t.truth            # everything, nothing doubled
    doms = src.domains()
    assert set(doms) == {k[0] for k in t.truth if k[0] >= 0}
    assert all(d.name == f"dom{d.domid}" and d.last_seen >= d.first_seen for d in doms.values())


def test_live_totals_grow_while_streaming(tmp_path):
    t = synth.generate(22, steps=1500)
    path = tmp_path / "cap.bin"
    t.write(path)
    src = XentraceLiveSource(None, command=standin(path, "--chunk", "1001", "--pause", "0.02"))
    src.start()
    try:
        assert wait_for(lambda: src.stats().events > 0)
        partial = src.stats().events
        assert partial < sum(t.truth.values())
        assert src.wait(30)
    finally:
        src.stop()
    assert src.stats().events == sum(t.truth.values())


def test_command_that_dies_sets_up_false(tmp_path):
    t = synth.generate(23, steps=800)
    path = tmp_path / "cap.bin"
    t.write(path)
    cut = 5001                                       # mid-record
    src = XentraceLiveSource(None, command=standin(path, "--chunk", "500", "--pause", "0.005",
                                                   "--die-after", str(cut)))
    src.start()
    assert src.wait(20)
    st = src.stats()
    assert not st.up
    assert st.error and "status 1" in st.error and "simulated failure" in st.error
    assert "\n" not in st.error
    # what arrived before the failure is kept: the same as decoding those bytes
    dec = StreamDecoder()
    n = len(dec.feed(t.data[:cut])) + len(dec.finish())
    assert st.events == n > 0
    src.stop()


def test_command_not_found():
    src = XentraceLiveSource(None, command=["no-such-xentrace-binary-here"])
    with pytest.raises(UserError, match="command not found"):
        src.start()
    st = src.stats()
    assert not st.up and "command not found" in st.error


def test_command_that_is_not_executable(tmp_path):
    f = tmp_path / "xentrace"
    f.write_text("not a program")
    src = XentraceLiveSource(None, command=[str(f)])
    with pytest.raises(UserError, match="cannot start"):
        src.start()
    assert not src.stats().up


def test_garbage_on_the_pipe_is_one_line_error():
    cmd = [sys.executable, "-c",
           "import sys, time; sys.stdout.buffer.write(b'this is not a trace ' * 200); "
           "sys.stdout.flush(); time.sleep(30)"]
    src = XentraceLiveSource(None, command=cmd)
    src.start()
    try:
        assert src.wait(20)                          # the reader gives up and ends the command
        st = src.stats()
        assert not st.up and st.error and "\n" not in st.error
        assert "xentrace" in st.error
    finally:
        src.stop()


def test_default_command_reads_hvm_and_sched_to_stdout():
    cmd = default_command()
    assert cmd[0] == "xentrace"
    # Xen 4.17's xentrace requires the output file as its last argument (parse_args:
    # optind != argc-1 -> usage): /dev/stdout, the pipe
    assert cmd[-1] == "/dev/stdout"
    assert [a for a in cmd[1:-1] if not a.startswith("-")] == ["256", "hvm", "sched"]
    masks = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-e"]
    assert sorted(masks) == ["hvm", "sched"]
    assert "-D" in cmd


def test_default_command_asks_for_256_pages_per_cpu():
    cmd = default_command()
    assert cmd[cmd.index("-S") + 1] == "256"
    other = default_command("/usr/sbin/xentrace", tbuf_pages=64)
    assert other[0] == "/usr/sbin/xentrace" and other[other.index("-S") + 1] == "64"
    assert other[-1] == "/dev/stdout"


def test_default_command_parses_like_xentrace_4_17():
    """Xen 4.17's parse_args: getopt_long with "t:s:c:e:S:r:T:M:DxX?V", then exactly one operand
    (the output file). The default command must leave exactly one, and every option it uses must
    take its argument the way that optstring says."""
    import getopt
    opts, operands = getopt.getopt(default_command()[1:], "t:s:c:e:S:r:T:M:DxX?V")
    assert operands == ["/dev/stdout"]
    assert ("-S", "256") in opts and ("-D", "") in opts


@pytest.mark.integration
def test_real_xentrace_without_hypervisor_reports_its_error():
    """The real binary, default command: no Xen here, so it exits at once with its message."""
    require_tool("xentrace")
    src = XentraceLiveSource(None)
    src.start()
    assert src.wait(20)
    st = src.stats()
    assert not st.up
    assert st.error.startswith("xentrace exited with status ")
    assert "hypervisor" in st.error.lower() or "xen" in st.error.lower()
    assert st.events == 0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_liveness_comes_from_xenstore_not_from_the_last_record(tmp_path):
    """A guest that makes no I/O (idle, paused) stays alive while xenstore lists it; a destroyed
    one keeps the time it was last listed, so the exporter's grace period counts from there."""
    t = synth.generate(24, steps=600)
    path = tmp_path / "cap.bin"
    t.write(path)
    doms = sorted({k[0] for k in t.truth if k[0] >= 0})
    assert len(doms) >= 2
    listed = set(doms)
    calls = []

    def live():
        calls.append(clock.t)
        return set(listed)

    clock = Clock(1000.0)
    src = XentraceLiveSource(None, command=standin(path), live_domids=live, clock=clock)
    src.start()
    try:
        assert src.wait(30)
    finally:
        src.stop()
    assert {d: i.last_seen for d, i in src.domains().items()} == {d: 1000.0 for d in doms}
    clock.t = 1600.0                         # ten minutes without a record from anyone
    gone = doms[0]
    listed.discard(gone)                     # ... and one domain destroyed
    seen = src.domains()
    assert seen[gone].last_seen == 1000.0
    assert all(seen[d].last_seen == 1600.0 for d in doms[1:])
    clock.t = 1602.0                         # within LIVENESS_S: xenstore is not asked again
    src.domains()
    assert calls == [1000.0, 1600.0]
    clock.t = 1600.0 + live_module.LIVENESS_S
    assert src.domains()[doms[1]].last_seen == clock.t and len(calls) == 3


def test_without_xenstore_the_last_record_is_the_last_sign_of_life(tmp_path):
    t = synth.generate(25, steps=300)
    path = tmp_path / "cap.bin"
    t.write(path)
    clock = Clock(50.0)
    src = XentraceLiveSource(None, command=standin(path), live_domids=lambda: None, clock=clock)
    src.start()
    try:
        assert src.wait(30)
    finally:
        src.stop()
    clock.t = 500.0
    assert {i.last_seen for i in src.domains().values()} == {50.0}
