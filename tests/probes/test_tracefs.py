"""A host without tracefs (a fresh Debian 12, a Dom0 without systemd): real uprobes, namespaces.

Every case runs iotrace in a private mount namespace where tracefs and debugfs are unmounted
(``support.mountns``; the host's mounts are never touched) against a stand-in device model running
in the test's own namespace, and checks what matters to the operator: no traceback, one clear line
when iotrace cannot help itself, and no breakpoint left in the running device model afterwards.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from iotrace.probes.bpf import tracefs
from iotrace.probes.hook.resolve import resolve
from iotrace.probes.standin import runner as sr
from iotrace.probes.standin import stream as st
from support.mountns import tracefs_mounts_after, without_tracefs
from support.prometheus import free_port, wait_http
from support.uprobe import INT3, runtime_byte, uprobe_lines

pytestmark = [pytest.mark.root, pytest.mark.integration]

CAPPED = ["--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon"]   # deploy/iotrace.service


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    """A private copy of the stand-in (its own inode: no other test's uprobes on it)."""
    out = tmp_path_factory.mktemp("standin")
    subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={out}"], check=True)
    return str(out / "iotrace-standin")


@pytest.fixture
def held(exe, tmp_path):
    """A running stand-in (domain 961) that stays alive after its stream: its memory shows
    whether handle_ioreq's first byte is an int3."""
    truth = tmp_path / "truth.json"
    argv = sr.command(961, st.stream_for(sr.BUNDLED_STREAM), exe=exe, name="held", speed=0,
                      hold=True, truth=truth)
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    assert _wait(truth.exists), p.stderr
    yield p
    p.send_signal(signal.SIGTERM)
    p.wait(10)


def _wait(pred, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _setpriv():
    path = shutil.which("setpriv")
    if not path:
        pytest.fail("setpriv (util-linux) is missing")
    return path


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_without_tracefs_nothing_is_found():
    r = subprocess.run(without_tracefs(_python(
        "from iotrace.probes.bpf import tracefs; print(tracefs.tracing_dir())")),
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "None"
    assert tracefs.tracing_dir() is not None, "the test's own namespace lost tracefs"


def test_ensure_mounts_tracefs_like_systemd_when_it_may():
    code = ("from iotrace.probes.bpf import tracefs; print(tracefs.ensure()); "
            "print(tracefs.tracing_dir()); "
            "print([l for l in open('/proc/self/mounts') if ' tracefs ' in l])")
    r = subprocess.run(without_tracefs(_python(code)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    note, where, mounts = r.stdout.splitlines()
    assert note.startswith("mounted tracefs on /sys/kernel/tracing")
    assert where == "/sys/kernel/tracing"
    opts = eval(mounts)[0].split()[3].split(",")          # the printed list of mount lines
    assert {"nosuid", "nodev", "noexec"} <= set(opts)


def test_ensure_without_cap_sys_admin_leaves_the_host_alone():
    code = ("from iotrace.probes.bpf import tracefs; print(tracefs.ensure(), "
            "tracefs.tracing_dir())")
    r = subprocess.run(without_tracefs([_setpriv(), *CAPPED, *_python(code)], report=True),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None"]
    assert tracefs_mounts_after(r.stderr) == 0


# ProbeSet itself never mounts anything: these cases see a host without tracefs all the way.
ATTACH_THEN_WAIT = """
import sys
from iotrace.probes.bpf.loader import ProbeSet
from iotrace.probes.hook.resolve import resolve
ps = ProbeSet(resolve(sys.argv[1]), "metrics", timing=True)
print([a.ok for a in ps.attach()], flush=True)
sys.stdin.readline()
if sys.argv[2] == "close":
    print(ps.close(), flush=True)
# else: leave it to the interpreter's exit (atexit)
"""


@pytest.mark.parametrize("how", ["close", "exit"])
def test_probeset_detaches_without_tracefs(exe, held, how):
    """Attached through the perf uprobe PMU (root), detached by ProbeSet.close() or at exit: the
    int3 byte is gone from the running device model, and nothing on stderr (bcc's own cleanup
    raised "Failed to detach BPF from uprobe" here and left the return probe set)."""
    res = resolve(exe)
    original = open(exe, "rb").read()[res.func_offset]
    assert original != INT3
    p = subprocess.Popen(without_tracefs(_python(ATTACH_THEN_WAIT) + [exe, how], report=True),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        if line.strip() != "[True, True]":
            p.kill()
            out, err = p.communicate(timeout=30)
            pytest.fail(f"attach: {line!r} {out!r} {err!r}")
        assert runtime_byte(held.pid, exe, res.func_vaddr) == INT3
        out, err = p.communicate("go\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    if how == "close":
        assert out.strip() == "[]"                      # no problem while detaching
    assert err.splitlines() == ["tracefs-mounts: 0"]    # nothing else on stderr: no traceback
    assert runtime_byte(held.pid, exe, res.func_vaddr) == original


def test_serve_as_root_without_tracefs_mounts_it_and_leaves_no_probe(exe, held, iotrace_exe):
    """The issue's case: `iotrace serve` on a fresh machine. As root it mounts tracefs (in its
    namespace here), serves, and on SIGTERM leaves no breakpoint and no traceback."""
    res = resolve(exe)
    port = free_port()
    p = subprocess.Popen(without_tracefs([iotrace_exe, "serve", "--web.listen-address",
                                          f"127.0.0.1:{port}", "--binary", exe]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=60)
        assert _wait(lambda: runtime_byte(held.pid, exe, res.func_vaddr) == INT3)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "Failed to detach" not in err, err
    assert "mounted tracefs on /sys/kernel/tracing" in err
    assert runtime_byte(held.pid, exe, res.func_vaddr) == open(exe, "rb").read()[res.func_offset]
    assert uprobe_lines(exe) == []


@pytest.mark.parametrize("verb", [["record", "--duration", "5"], ["probe-info", "--attach"]])
def test_capabilities_of_the_unit_without_tracefs_say_what_to_mount(exe, iotrace_exe, verb,
                                                                     tmp_path):
    """CAP_BPF + CAP_PERFMON (no CAP_SYS_ADMIN: cannot mount, and the kernel keeps the perf
    uprobe PMU for CAP_SYS_ADMIN): one line naming the mount to make, exit 1, nothing mounted."""
    if verb[0] == "record":
        args = verb + ["-o", str(tmp_path / "r.iotrec"), "--binary", exe,
                       "--no-default-binaries"]
    else:
        args = verb + [exe]
    r = subprocess.run(without_tracefs([_setpriv(), *CAPPED, iotrace_exe, *args], report=True),
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.splitlines()
    assert r.returncode == 1, r.stderr
    assert lines[-1] == "tracefs-mounts: 0"
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"iotrace {verb[0]}: tracefs is not mounted on /sys/kernel/tracing")
    assert "mount -t tracefs" in lines[0] and "sys-kernel-tracing.mount" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r.iotrec").exists()       # a record that never started: no file


def test_serve_with_the_units_capabilities_without_tracefs_keeps_serving(exe, iotrace_exe):
    """deploy/iotrace.service's privileges on a host where tracefs is missing all the same: the
    qemu source does not start (one log line says what to mount), /metrics is served with
    iotrace_source_up{source="qemu"} 0, SIGTERM exits cleanly."""
    port = free_port()
    p = subprocess.Popen(without_tracefs([_setpriv(), *CAPPED, iotrace_exe, "serve",
                                          "--web.listen-address", f"127.0.0.1:{port}",
                                          "--binary", exe]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_http(url, timeout=60)
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert 'iotrace_source_up{source="qemu"} 0\n' in body
    said = [ln for ln in err.splitlines() if "failed to start" in ln]
    assert len(said) == 1 and "source qemu failed to start: tracefs is not mounted" in said[0], err
    assert "mount -t tracefs" in said[0]
    assert "Traceback" not in err
