"""``iotrace record`` under faults (issue #12, items 2, 4, 5, 11): SIGKILL after a burst, a full
disk, outputs that must be refused before any probe is compiled. Real record processes, real
stand-ins, real signals, a real 1 MB tmpfs in a private mount namespace.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections import Counter

import pytest

from iotrace.offline.recording import read_recording
from iotrace.probes.standin import runner as sr
from support.procs import wait_line as _wait_line


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={out}"], check=True)
    return str(out / "iotrace-standin")


def _truth(path) -> Counter:
    out = Counter()
    for r in json.loads(path.read_text())["io"]:
        out[(r["domid"], r["addr"], 1 if r["dir"] == "read" else 0)] += r["count"]
    return out


def _counts(events, domid) -> Counter:
    e = events[events["domid"] == domid]
    return Counter(zip(e["domid"].tolist(), e["addr"].tolist(), e["dir"].tolist()))


@pytest.mark.root
@pytest.mark.integration
def test_sigkill_after_a_burst_keeps_every_event(tmp_path, standin, iotrace_exe):
    """A burst of the bundled stream (3,291 requests in milliseconds), then silence: 3 s later
    record is killed with SIGKILL. Every event is in the file (they reach it within half a
    second, traffic or not: 3 s leaves room for a loaded machine; before, 69 of them were there
    10 s later), and the file is private (0600 under umask 022)."""
    out, truth = tmp_path / "burst.iotrec", tmp_path / "t.json"
    old = os.umask(0o022)
    try:
        rec = subprocess.Popen([iotrace_exe, "record", "-o", str(out), "--binary", standin,
                                "--no-default-binaries"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    finally:
        os.umask(old)
    dm = None
    try:
        _wait_line(rec, "writing", timeout=60)
        dm = subprocess.Popen(sr.command(791, sr.BUNDLED_STREAM, exe=standin, name="burst",
                                         speed=0.0, hold=True, truth=truth),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while not truth.exists() and time.monotonic() < end:
            time.sleep(0.02)
        assert truth.exists()
        time.sleep(3.0)
        rec.send_signal(signal.SIGKILL)
        rec.wait(10)
    finally:
        for p in (rec, dm):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    r = read_recording(out)
    want = _truth(truth)
    assert sum(want.values()) == 3291
    assert _counts(r.events, 791) == want
    assert not r.complete and r.domains.get(791) == "burst"


@pytest.mark.root
@pytest.mark.integration
def test_a_full_disk_is_one_line_and_the_file_reads(tmp_path, standin, iotrace_exe):
    """-o on a 1 MB tmpfs (mounted in a private mount namespace) while a stand-in loops: record
    stops with one line and exit status 1, its probes detached; the file reads up to there."""
    small = tmp_path / "small"
    small.mkdir()
    dm = subprocess.Popen(sr.command(792, sr.BUNDLED_STREAM, exe=standin, name="filler",
                                     speed=0.0, loop=True),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = (f'mount -t tmpfs -o size=1m iotrace-test {small} || exit 99; '
                f'"$@"; rc=$?; cp {small}/r.iotrec {tmp_path}/r.iotrec; exit $rc')
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", body,
                              "sh", iotrace_exe, "record", "-o", f"{small}/r.iotrec", "--binary",
                              standin, "--no-default-binaries", "--duration", "60"],
                             capture_output=True, text=True, timeout=120)
    finally:
        dm.kill()
        dm.wait()
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"iotrace record: {small}/r.iotrec: cannot write the recording: No "
                           "space left on device: it stops at byte "), res.stderr
    assert "readable up to there" in last
    r = read_recording(tmp_path / "r.iotrec")
    assert len(r.events) > 10_000 and set(r.events["domid"].tolist()) == {792}
    assert not r.complete


def test_outputs_are_checked_before_any_probe_is_compiled(tmp_path, iotrace_exe):
    """A directory, an existing file, a symbolic link: refused in one line before the probes
    are set up (a binary that cannot be probed would be the error otherwise), nothing changed."""
    existing = tmp_path / "old.iotrec"
    existing.write_bytes(b"precious")
    link = tmp_path / "link.iotrec"
    link.symlink_to(existing)
    for out, words in ((tmp_path, "is a directory"), (existing, "exists: refused"),
                       (link, "symbolic link")):
        for extra in ([], ["--force"]):
            if out == existing and extra:
                continue
            r = subprocess.run([iotrace_exe, "record", "-o", str(out), "--binary", "/bin/true",
                                "--no-default-binaries", "--duration", "1", *extra],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "Traceback" not in r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and words in lines[0] and str(out) in lines[0], r.stderr
    assert existing.read_bytes() == b"precious"
