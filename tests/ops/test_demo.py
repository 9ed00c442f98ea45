"""``iotrace demo``: three stand-in guests, the live view command, and cleanup on every exit."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iotrace.cli import demo as cmd_demo
from iotrace.probes.standin import runner as sr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start_demo(iotrace_exe, *args):
    sr.build("7.2")
    sr.build("8.1")
    proc = subprocess.Popen([iotrace_exe, "demo", *args], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.PIPE)
    pids = {}
    deadline = time.monotonic() + 30
    while len(pids) < 3 and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"domain (\d+) '(\w+)': pid (\d+)", line)
        if m:
            pids[int(m.group(3))] = (int(m.group(1)), m.group(2))
    assert len(pids) == 3, f"demo did not start three stand-ins (rc={proc.poll()})"
    return proc, pids


def _check_standins(pids, base):
    seen = {}
    for pid, (domid, name) in pids.items():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:3] == [b"-xen-domid", str(domid).encode()]
        assert b"-loop" in argv and name.encode() in argv
        seen[name] = domid
        assert os.path.basename(os.path.realpath(f"/proc/{pid}/exe")).startswith("iotrace-standin")
    assert seen == {"web": base + 1, "db": base + 2, "batch": base + 3}


def test_guests_differ_in_name_speed_and_layout():
    assert len({g.name for g in cmd_demo.GUESTS}) == 3
    assert len({g.speed for g in cmd_demo.GUESTS}) == 3
    assert {g.layout for g in cmd_demo.GUESTS} == {"7.2", "8.1"}


def test_view_command_probes_the_standin_binaries():
    cmd = cmd_demo.view_command("top", ["/x/iotrace-standin", "/x/iotrace-standin-81"],
                                interactive=False, duration=5)
    assert cmd[:4] == [sys.executable, "-m", "iotrace", "top"]
    assert cmd[4:] == ["--source", "qemu", "--binary", "/x/iotrace-standin", "--binary",
                       "/x/iotrace-standin-81", "-b", "1", "5"]
    assert "-b" not in cmd_demo.view_command("top", ["/x/a"], interactive=True, duration=None)
    assert cmd_demo.view_command("snoop", ["/x/a"], True, None)[3] == "snoop"


def test_pick_view_prefers_top_when_installed():
    import importlib.util
    have_top = importlib.util.find_spec("iotrace.cli.top") is not None
    have_snoop = importlib.util.find_spec("iotrace.probes.cli.snoop") is not None
    want = "top" if have_top else "snoop" if have_snoop else None
    assert cmd_demo.pick_view() == want


def test_no_view_runs_three_standins_and_stops_them_after_duration(iotrace_exe):
    proc, pids = _start_demo(iotrace_exe, "--no-view", "--duration", "2", "--domid-base", "300")
    _check_standins(pids, 300)
    assert proc.wait(20) == 0
    assert not [p for p in pids if _alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_clean_up_the_device_models(iotrace_exe, sig):
    proc, pids = _start_demo(iotrace_exe, "--no-view", "--domid-base", "310")
    assert all(_alive(p) for p in pids)
    proc.send_signal(sig)
    assert proc.wait(15) == 0
    assert sr.wait_for(lambda: not [p for p in pids if _alive(p)], 5)


def test_sigkill_of_the_demo_still_stops_the_standins(iotrace_exe):
    proc, pids = _start_demo(iotrace_exe, "--no-view", "--domid-base", "320")
    proc.kill()
    proc.wait(5)
    assert sr.wait_for(lambda: not [p for p in pids if _alive(p)], 5), \
        "stand-ins outlived a SIGKILLed demo"


@pytest.mark.parametrize("args,pattern", [
    (["--duration", "soon"], "--duration: expected seconds"),
    (["--duration", "-3"], "--duration: expected a positive number"),
    (["--domid-base", "x"], "--domid-base: expected a domain id"),
    (["--domid-base", "40000"], "--domid-base: 40000 outside"),
    (["--no-view", "--replay", "/nonexistent.csv"], "/nonexistent.csv: no such file"),
])
def test_bad_arguments_are_one_line_exit_2(iotrace_exe, args, pattern):
    res = subprocess.run([iotrace_exe, "demo", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], res.stderr


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.slow
def test_demo_end_to_end_shows_the_three_domains(iotrace_exe):
    """As root: the live view (top -b when not on a terminal) probes the stand-ins."""
    if cmd_demo.pick_view() != "top":
        pytest.skip("iotrace top is not installed in this checkout")
    res = subprocess.run([iotrace_exe, "demo", "--duration", "3", "--domid-base", "330"],
                         capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("web", "db", "batch"):
        assert name in res.stdout, res.stdout[-2000:]
    assert not subprocess.run(["pgrep", "-f", "-xen-domid 33[123] "], capture_output=True).stdout
