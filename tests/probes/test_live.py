"""Real uprobes on real stand-in device models (root): counts equal the stand-in's --truth.

Each test module builds a private copy of the stand-in (its own inode), so uprobes attached here do
not see other stand-ins running the shared binary (the demo, other tests), and vice versa.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from iotrace.core.aggregate import SLOT_LOWER_NS, SLOT_UPPER_NS
from iotrace.core.events import TYPE_CODES
from iotrace.offline.recording import read_recording
from iotrace.probes.hook.resolve import resolve
from iotrace.probes.live import QemuProbeSource, metrics_bucket
from iotrace.probes.standin import runner as sr
from iotrace.probes.standin import stream as st
from support.procs import terminate
from support.procs import wait_line as _wait_line
from support.uprobe import runtime_byte as _runtime_byte
from support.uprobe import uprobe_lines as _uprobe_lines

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={out}"], check=True)
    return {"7.2": str(out / "iotrace-standin"), "8.1": str(out / "iotrace-standin-81")}


def start_standin(exe, domid, truth, *, speed=0.0, hold=False, loop=False, name=None,
                  stream=None):
    stream = st.stream_for(stream or sr.BUNDLED_STREAM)
    argv = sr.command(domid, stream, exe=exe, name=name, speed=speed, hold=hold, loop=loop,
                      truth=truth)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def stop(proc):
    terminate(proc, 10)


def assert_clean_exit(proc, sig):
    """Stop a running iotrace command with ``sig``; it must flush and exit 0. Returns its stderr."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return err


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def truth_counts(path, bucketed: bool = False) -> Counter:
    """The stand-in's truth per (domid, vcpu, type, dir, addr); bucketed: addresses as metrics
    mode keys them (metrics_bucket), for comparing with metrics-mode totals."""
    doc = json.loads(Path(path).read_text())
    out = Counter()
    for r in doc["io"]:
        t = TYPE_CODES[r["type"]]
        a = metrics_bucket(t, r["addr"]) if bucketed else r["addr"]
        out[(r["domid"], r["vcpu"], t, 1 if r["dir"] == "read" else 0, a)] += r["count"]
    return out


def totals_counts(totals, domid) -> Counter:
    c = Counter()
    for k, cell in totals.items():
        if k.domid == domid:
            c[(k.domid, k.vcpu, k.type, k.dir, k.addr)] += cell.count
    return c


def event_counts(batch, domid) -> Counter:
    b = batch[batch["domid"] == domid]
    return Counter(zip(b["domid"].tolist(), b["vcpu"].tolist(), b["type"].tolist(),
                       b["dir"].tolist(), b["addr"].tolist()))


def source(bins, layouts=("7.2",), **kw) -> QemuProbeSource:
    src = QemuProbeSource(binaries=[bins[layout] for layout in layouts], defaults=False,
                          strict=True, send_vcpu_offset={bins["8.1"]: 0x48}, **kw)
    src.start()
    return src


def test_metrics_counts_equal_truth_at_full_speed(bins, tmp_path, linux_boot_csv):
    """A whole Linux boot (173k forwarded requests) at --speed 0: in-kernel aggregation loses
    nothing; service times are binned for every request."""
    src = source(bins)
    truth = tmp_path / "truth.json"
    proc = start_standin(bins["7.2"], 901, truth, hold=True, name="boot", stream=linux_boot_csv)
    try:
        assert wait_for(truth.exists, 60), proc.stderr
        tot = src.totals()
        want = truth_counts(truth, bucketed=True)
        assert totals_counts(tot, 901) == want
        assert sum(want.values()) > 100_000
        # the kernel keyed by address bucket: a few hundred entries, not one per address (41,592)
        exact = truth_counts(truth)
        n_entries = sum(1 for ps in src.sets for k, _ in ps.stats_items() if k.tgid == proc.pid)
        assert len(want) <= n_entries < 1000 < len(exact)
        assert any(k[1] == -1 for k in want)                 # buffered VGA writes: vcpu -1
        mine = {k: c for k, c in tot.items() if k.domid == 901}
        for k, c in mine.items():
            assert c.service_n == c.count and c.hist.sum() == c.count
            assert c.service_sum_ns > 0
            # the kernel's slots are iotrace.core.aggregate's: the sum lies within the slots' bounds
            assert (c.hist * SLOT_LOWER_NS).sum() <= c.service_sum_ns < (c.hist * SLOT_UPPER_NS).sum()
        assert {k.range for k in mine if k.vcpu == -1} == {"vga-lowmem"}
        st_ = src.stats()
        assert st_.lost == 0 and st_.probes_attached == 2 and st_.probes_failed == 0
        doms = src.domains()
        assert doms[901].name == "boot" and doms[901].pid == proc.pid
        assert doms[901].probes_attached == 2
    finally:
        stop(proc)
        src.stop()


def test_events_real_speed_two_domains_two_layouts(bins, tmp_path):
    """Two device models at once, QEMU 7.2 and 8.1 XenIOState layouts, replayed at real speed:
    every request arrives once, with its vCPU (from send_vcpu) or -1 when buffered."""
    src = source(bins, ("7.2", "8.1"), mode="events")
    t1, t2 = tmp_path / "t1.json", tmp_path / "t2.json"
    got = []
    p1 = start_standin(bins["7.2"], 902, t1, speed=1.0, name="web")
    p2 = start_standin(bins["8.1"], 903, t2, speed=1.0, name="db")
    try:
        end = time.monotonic() + 20
        while (p1.poll() is None or p2.poll() is None) and time.monotonic() < end:
            got.append(src.poll(50))
        got.append(src.poll(50))
        got.append(src.drain())
        assert p1.returncode == 0 and p2.returncode == 0
        batch = np.concatenate(got)
        for domid, truth in ((902, t1), (903, t2)):
            want = truth_counts(truth)
            assert event_counts(batch, domid) == want, domid
            assert {k[1] for k in want} == {-1, 0, 1}
        assert src.stats().lost == 0
        assert (batch["service_ns"] > 0).all()
        # reads carry the device model's answer (read at return): the stand-in's 16550 LSR
        lsr = batch[(batch["type"] == 0) & (batch["addr"] == 0x3FD) & (batch["dir"] == 1)]
        assert len(lsr) > 100 and set(lsr["data"].tolist()) <= {0x60, 0x61}
        # at real speed the replay spreads over the stream's duration (0.43 s)
        mine = batch[batch["domid"] == 902]
        assert (mine["ts_ns"].max() - mine["ts_ns"].min()) / 1e9 > 0.3
    finally:
        stop(p1)
        stop(p2)
        src.stop()


def test_two_domains_one_binary_metrics(bins, tmp_path):
    src = source(bins, timing=False)
    t1, t2 = tmp_path / "a.json", tmp_path / "b.json"
    p1 = start_standin(bins["7.2"], 904, t1, hold=True, name="alpha")
    p2 = start_standin(bins["7.2"], 905, t2, hold=True)
    try:
        assert wait_for(lambda: t1.exists() and t2.exists())
        tot = src.totals()
        assert totals_counts(tot, 904) == truth_counts(t1, bucketed=True)
        assert totals_counts(tot, 905) == truth_counts(t2, bucketed=True)
        assert all(c.service_n == 0 for c in tot.values())       # no return probe
        doms = src.domains()
        assert doms[904].name == "alpha" and doms[905].name == "dom905"
        assert src.stats().probes_attached == 1
    finally:
        stop(p1)
        stop(p2)
        src.stop()


def test_churn_and_nothing_left_behind(bins, tmp_path):
    """Device models started after iotrace and stopped while it is attached; afterwards no uprobe
    is left, neither in the kernel's uprobe list nor as a breakpoint in a running process."""
    exe = bins["7.2"]
    res = resolve(exe)
    file_byte = Path(exe).read_bytes()[res.func_offset]
    src = source(bins)
    procs = []
    try:
        try:
            ta = tmp_path / "a.json"
            a = start_standin(exe, 911, ta, hold=True)
            procs.append(a)
            assert wait_for(ta.exists), a.stderr
            assert totals_counts(src.totals(), 911) == truth_counts(ta, bucketed=True)
            assert 911 in src.domains(), (src.domains(), src.domain_names())
            stop(a)
            tb = tmp_path / "b.json"
            b = start_standin(exe, 912, tb, hold=True)
            procs.append(b)
            assert wait_for(tb.exists)
            # a's domain is dropped once its process is gone (after a short grace period)
            # and its entries leave the kernel maps (a reused pid starts afresh)
            def tgids():
                return {k.tgid for ps in src.sets for k, _ in ps.stats_items()}
            assert wait_for(lambda: 911 not in src.domains() and a.pid not in tgids(), 10), \
                (src.domains(), tgids(), a.pid)
            assert 912 in src.domains() and b.pid in tgids(), (src.domains(), tgids(), b.pid)
            tot = src.totals()
            assert totals_counts(tot, 911) == Counter()
            assert totals_counts(tot, 912) == truth_counts(tb, bucketed=True)
            # while attached, handle_ioreq's first byte is int3 in the running process
            assert _runtime_byte(b.pid, exe, res.func_vaddr) == 0xCC
        finally:
            src.stop()
        assert _runtime_byte(b.pid, exe, res.func_vaddr) == file_byte != 0xCC
        assert _uprobe_lines(exe) == []
    finally:
        for p in procs:
            stop(p)


def test_overload_in_event_mode_counts_lost(bins, tmp_path):
    """A one-page ring buffer that nobody reads for a while: records are lost, counted, no crash."""
    src = source(bins, mode="events", ringbuf_pages=1)
    p = start_standin(bins["7.2"], 921, tmp_path / "t.json", loop=True)
    try:
        assert wait_for(lambda: src.counters()["lost_events"] > 1000, 20)
        batch = src.poll(100)
        st_ = src.stats()
        assert st_.lost > 1000
        assert len(batch) > 0 and set(batch["domid"].tolist()) == {921}
    finally:
        stop(p)
        src.stop()


def _iotrace(iotrace_exe, *args, stdout=subprocess.PIPE):
    return subprocess.Popen([iotrace_exe, *args], stdout=stdout, stderr=subprocess.PIPE,
                            text=True)


def test_record_cli_sigterm_flushes_everything(bins, tmp_path, iotrace_exe):
    out, truth = tmp_path / "r.iotrec", tmp_path / "t.json"
    rec = _iotrace(iotrace_exe, "record", "-o", str(out), "--binary", bins["7.2"],
                   "--no-default-binaries")
    try:
        _wait_line(rec, "writing")
        p = start_standin(bins["7.2"], 931, truth, speed=1.0, name="rec")
        assert p.wait(20) == 0
        assert_clean_exit(rec, signal.SIGTERM)
    finally:
        if rec.poll() is None:
            rec.kill()
    assert _uprobe_lines(bins["7.2"]) == []
    r = read_recording(out)
    assert r.complete and r.lost_events == 0
    assert r.domains.get(931) == "rec"
    assert event_counts(r.events, 931) == truth_counts(truth)
    assert r.meta["source"] == "qemu"


def test_snoop_says_when_its_domain_filter_matches_nothing(bins, tmp_path, iotrace_exe):
    """-D with a name no device model has: one line saying so (with the domains seen), not a
    silent empty output (issue #12, item 11)."""
    p = start_standin(bins["7.2"], 951, tmp_path / "t.json", speed=1.0, loop=True, name="real")
    try:
        r = subprocess.run([iotrace_exe, "snoop", "--binary", bins["7.2"], "--no-default-binaries",
                            "-D", "nosuchdom", "--duration", "2"], capture_output=True, text=True,
                           timeout=120)
    finally:
        p.kill()
        p.wait(10)
    assert r.returncode == 0, r.stderr
    said = [ln for ln in r.stderr.splitlines() if "matches no domain" in ln]
    assert len(said) == 1 and said[0].startswith("iotrace snoop: -D nosuchdom matches no domain")
    assert "real" in said[0]
    assert r.stdout.splitlines()[1:] == []                 # the header only


def test_snoop_cli_filters(bins, tmp_path, iotrace_exe):
    truth = tmp_path / "t.json"
    # stdout to a file: a pipe nobody reads would block snoop (and then the ring buffer overflows)
    outf = open(tmp_path / "snoop.out", "w+")
    sn = _iotrace(iotrace_exe, "snoop", "--binary", bins["7.2"], "--no-default-binaries",
                  "-d", "web", "--range", "com1", stdout=outf)
    try:
        _wait_line(sn, "Ctrl-C")
        p = start_standin(bins["7.2"], 941, truth, speed=0, name="web")
        q = start_standin(bins["7.2"], 942, tmp_path / "other.json", speed=0, name="other")
        assert p.wait(20) == 0 and q.wait(20) == 0
        time.sleep(0.5)
        err = assert_clean_exit(sn, signal.SIGINT)
    finally:
        if sn.poll() is None:
            sn.kill()
    outf.seek(0)
    lines = outf.read().splitlines()
    assert lines[0].split()[:3] == ["TIME", "DOMAIN", "VCPU"]
    rows = [ln.split() for ln in lines[1:]]
    want = sum(n for k, n in truth_counts(truth).items() if 0x3F8 <= k[4] <= 0x3FF and k[2] == 0)
    assert want > 0 and len(rows) == want
    assert all(r[1] == "web" and r[6] == "com1" and r[3] == "pio" for r in rows)
    assert "0 lost" in err


def test_probe_info_attaches_to_the_debian_binary(iotrace_exe):
    if not os.path.exists("/usr/libexec/xen-qemu-system-i386"):
        pytest.skip("qemu-system-xen is not installed")
    # tracefs is the machine's: other runs may have left entries on this shared binary
    before = set(_uprobe_lines("/usr/libexec/xen-qemu-system-i386"))
    r = subprocess.run([iotrace_exe, "probe-info", "--attach"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "resolved from:    the table" in r.stdout
    assert "attach:           entry ok, return ok" in r.stdout
    assert set(_uprobe_lines("/usr/libexec/xen-qemu-system-i386")) - before == set()


def test_missing_symbol_strict_is_one_line(iotrace_exe, tmp_path):
    # --no-default-binaries: only /bin/true (a shared machine runs other -xen-domid processes,
    # whose binaries --strict would judge too)
    r = subprocess.run([iotrace_exe, "snoop", "--binary", "/bin/true", "--no-default-binaries",
                        "--strict", "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "cannot find handle_ioreq" in r.stderr and "offsets.yaml" in r.stderr
    # not strict: a warning for /bin/true, and nothing else to attach to is an error too
    out = tmp_path / "never.iotrec"
    r = subprocess.run([iotrace_exe, "record", "-o", str(out), "--binary", "/bin/true",
                        "--no-default-binaries", "--duration", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nothing attached" in r.stderr.splitlines()[-1]
    assert not out.exists()             # a recording that never started leaves no file


def test_capabilities_of_the_systemd_unit_are_enough(bins, tmp_path, iotrace_exe):
    """Root restricted to CAP_BPF + CAP_PERFMON (deploy/iotrace.service's bounding set) records,
    from a binary with a long path. Without CAP_SYS_ADMIN the kernel (>= 6.16, and stable kernels
    since July 2025) refuses the perf uprobe PMU, so BCC goes through tracefs's uprobe_events,
    whose event names must stay under 64 characters: bcc's own names (the whole path) did not for
    paths of 48 characters or more; iotrace's (probes/bpf/uprobes.py) do."""
    import shutil
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("setpriv not installed")
    out, truth = tmp_path / "r.iotrec", tmp_path / "t.json"
    exe = tmp_path / ("a-device-model-path-longer-than-bcc-could-name" + "-" * 8) / "dm"
    exe.parent.mkdir()
    shutil.copy2(bins["7.2"], exe)
    assert len(str(exe)) >= 48
    rec = subprocess.Popen([setpriv, "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon",
                            iotrace_exe, "record", "-o", str(out), "--binary", str(exe),
                            "--no-default-binaries"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_line(rec, "writing")
        p = start_standin(str(exe), 951, truth, speed=0, name="capped")
        assert p.wait(20) == 0
        time.sleep(0.3)
        assert_clean_exit(rec, signal.SIGTERM)
    finally:
        if rec.poll() is None:
            rec.kill()
    assert _uprobe_lines(str(exe)) == []
    r = read_recording(out)
    assert event_counts(r.events, 951) == truth_counts(truth)
    if os.path.exists("/usr/libexec/xen-qemu-system-i386"):
        r = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon",
                            iotrace_exe, "probe-info", "--attach"], capture_output=True, text=True,
                           timeout=60)
        assert "attach:           entry ok, return ok" in r.stdout, r.stderr


class _SlowConsumer(QemuProbeSource):
    """Consumes each ring-buffer record 20 µs late: slower than a looping stand-in produces, as
    a loaded Dom0's iotrace is under a guest's I/O storm."""
    watchdog_fired = False

    def _on_record(self, ctx, data, size):
        time.sleep(0.00002)
        if _SlowConsumer.watchdog_fired:
            return -1                       # let a poll that never returned go, to fail cleanly
        return super()._on_record(ctx, data, size)


def test_a_flood_faster_than_the_consumer_does_not_hold_poll(bins, tmp_path):
    """libbpf loops until the ring is empty: with a producer faster than the callback, one
    poll() would never return (record's --duration, signals and disk-full check never ran: a CI
    hang). poll(100) returns about on time with what it took, drain() within its budget."""
    src = _SlowConsumer(binaries=[bins["7.2"]], defaults=False, strict=True, mode="events")
    src.start()
    p = start_standin(bins["7.2"], 923, tmp_path / "t.json", loop=True)

    def fire(_sig, _frame):
        _SlowConsumer.watchdog_fired = True

    old = signal.signal(signal.SIGALRM, fire)
    try:
        assert wait_for(lambda: src.counters()["lost_events"] > 0, 20)   # the ring is full
        took = []
        signal.alarm(30)
        for _ in range(5):
            t0 = time.monotonic()
            batch = src.poll(100)
            took.append(time.monotonic() - t0)
            assert len(batch) > 0 and set(batch["domid"].tolist()) == {923}
        t0 = time.monotonic()
        src.drain()
        took.append(time.monotonic() - t0)
        signal.alarm(0)
        assert not _SlowConsumer.watchdog_fired, f"a poll/drain did not return: {took}"
        assert max(took[:5]) < 5 and took[5] < 10, took
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        stop(p)
        src.stop()
