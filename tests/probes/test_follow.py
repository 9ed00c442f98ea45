"""Any device-model path, started any time (issue #10 §3): discovery follows new ``-xen-domid``
processes incrementally, and the qemu source probes binaries it was never told about.

The root tests run real ``iotrace serve`` / ``iotrace top`` processes without ``--binary`` and
real stand-ins copied to paths iotrace does not know, and read the metrics with direct scrapes.
Domain ids are unusual (76x) because other stand-ins may run on the machine at the same time and
are followed too: every assertion is about these domains only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from iotrace.probes import discovery
from iotrace.probes.standin import runner as sr
from support.exposition import samples as _samples
from support.exposition import scrape as _scrape
from support.exposition import start_serve, stop_serve
from support.procs import wait_until as _wait

# -- discovery (no root) ---------------------------------------------------------------------------

def test_a_process_that_execs_into_a_device_model_is_seen(tmp_path):
    """Seen first as a plain shell (not a device model), then, after its exec, as one."""
    exe = sr.build()
    script = f'sleep 0.6; exec "{exe}" -xen-domid 771 -replay "{sr.BUNDLED_STREAM}" -hold'
    p = subprocess.Popen(["/bin/sh", "-c", script])
    pm = discovery.ProcessMap(grace_s=0.2)
    try:
        alive, _ = pm.refresh()
        assert p.pid not in alive and p.pid in pm._known          # a shell, for now
        got = _wait(lambda: pm.refresh()[0].get(p.pid), timeout=20)
        assert got is not None and (got.domid, got.exe) == (771, str(exe))
    finally:
        p.kill()
        p.wait()


def test_a_wrapper_that_execs_the_real_binary_is_followed(tmp_path):
    """A wrapper script carrying -xen-domid (device_model_override= can name one) is first seen
    with the shell as its binary; after the exec the real binary is the one to probe."""
    exe = sr.build()
    p = subprocess.Popen(["/bin/sh", "-c", 'sleep 0.6; exec "$0" "$@"', str(exe),
                          "-xen-domid", "772", "-replay", str(sr.BUNDLED_STREAM), "-hold"])
    pm = discovery.ProcessMap(grace_s=0.2)
    try:
        first = _wait(lambda: pm.refresh()[0].get(p.pid), timeout=20)
        assert first is not None and first.domid == 772
        got = _wait(lambda: (d := pm.refresh()[0].get(p.pid)) and d.exe == str(exe) and d,
                    timeout=20)
        assert got and got.domid == 772 and got.first_seen == first.first_seen
    finally:
        p.kill()
        p.wait()


def test_refresh_reads_proc_only_for_processes_it_has_not_seen():
    """The second refresh reads /proc/PID files only for processes that appeared in between:
    one scandir of /proc, whose entries carry each process directory's inode."""
    pm = discovery.ProcessMap(young_s=0.0)
    pm.refresh()
    n_proc = sum(1 for e in os.listdir("/proc") if e.isdigit())
    before = pm.reads
    pm.refresh()
    assert pm.reads - before <= max(20, n_proc // 10), (pm.reads - before, n_proc)


def test_known_paths_include_upstream_xens_libexec_dirs():
    for p in ("/usr/libexec/xen-qemu-system-i386", "/usr/lib/xen/bin/qemu-system-i386",
              "/usr/local/lib/xen/bin/qemu-system-i386", "/usr/lib64/xen/bin/qemu-system-i386"):
        assert p in discovery.KNOWN_PATHS
    installed = discovery.installed_binaries()
    assert all(os.path.isabs(p) and os.path.exists(p) for p in installed)


# -- the live source (root) ------------------------------------------------------------------------

def _total(text, domid) -> float:
    return sum(_samples(text, "iotrace_ioreqs_total", domid=str(domid)))


def _serve(tmp_path, *args):
    return start_serve(tmp_path, *args)


def _stop(p, log) -> str:
    text = stop_serve(p, log)
    assert p.returncode == 0, text
    return text


@pytest.mark.root
@pytest.mark.integration
def test_serve_probes_a_standin_at_a_path_it_was_never_told_about(tmp_path):
    """A stand-in copied to a new path, started after `iotrace serve` (no --binary): its binary
    is resolved and attached then, its domain counted; a second device model from the same
    binary, started after that, is counted from its first request (equal to its truth)."""
    hidden = tmp_path / "opt" / "some-vendor" / "dm"
    hidden.parent.mkdir(parents=True)
    shutil.copy2(sr.build(), hidden)
    serve, port, log = _serve(tmp_path)
    late = first = None
    try:
        assert str(hidden) not in _scrape(port)
        late = subprocess.Popen(sr.command(761, sr.BUNDLED_STREAM, exe=hidden, name="late",
                                           speed=1.0, loop=True),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = _wait(lambda: (t := _scrape(port)) and
                     _samples(t, "iotrace_probes_attached", domid="761") == [2.0] and t,
                     timeout=90, interval=0.3)
        assert text, "the new binary was not attached"
        assert _samples(text, "iotrace_domain_info", domid="761", domain="late") == [1.0]
        assert _wait(lambda: _total(_scrape(port), 761) > 0, timeout=30, interval=0.3)
        n1 = _total(_scrape(port), 761)
        assert _wait(lambda: _total(_scrape(port), 761) > n1, timeout=30, interval=0.3)
        # the binary is probed now: a device model started from it is seen from its first request
        truth = tmp_path / "truth.json"
        first = subprocess.Popen(sr.command(762, sr.BUNDLED_STREAM, exe=hidden, name="first",
                                            speed=0.0, hold=True, truth=truth),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait(lambda: truth.exists(), timeout=30)
        want = sum(r["count"] for r in json.loads(truth.read_text())["io"])
        assert _wait(lambda: _total(_scrape(port), 762) == want, timeout=30, interval=0.3), \
            (_total(_scrape(port), 762), want)
    finally:
        for p in (late, first):
            if p is not None:
                p.kill()
                p.wait()
        err = _stop(serve, log)
    assert "Traceback" not in err
    # the late one ran before its binary was probed: said so, once, with why nothing can count it
    lines = [ln for ln in err.splitlines() if "domain 761 " in ln]
    assert len(lines) == 1 and f"device model {hidden} ran" in lines[0], err
    assert "how many cannot be known" in lines[0]
    assert not [ln for ln in err.splitlines() if "domain 762 " in ln], err


@pytest.mark.root
@pytest.mark.integration
def test_a_device_model_that_cannot_be_probed_is_shown_with_the_reason(tmp_path):
    """A -xen-domid process whose binary has no handle_ioreq (a shell): the domain is listed
    with 0 probes in the metrics, flagged with the reason in `top -b`, logged once."""
    fake = subprocess.Popen(["/bin/sh", "-c", "sleep 120", "-xen-domid", "763", "-name", "nohook"])
    serve, port, log = _serve(tmp_path)
    try:
        text = _wait(lambda: (t := _scrape(port)) and
                     _samples(t, "iotrace_domain_info", domid="763") and t, timeout=60)
        assert text and _samples(text, "iotrace_probes_attached", domid="763") == [0.0]
        sh = os.path.realpath("/bin/sh")
        assert _wait(lambda: any("domain 763 " in ln and "cannot be probed" in ln
                                 for ln in open(tmp_path / "serve.log")), timeout=60)
        r = subprocess.run([sys.executable, "-m", "iotrace", "top", "-b", "--source", "qemu",
                            "-D", "763", "1", "3"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        blocks = [b.splitlines() for b in r.stdout.strip("\n").split("\n\n")]
        last = blocks[-1]
        assert re.search(r"unprobed=763:nohook reason='[^']*cannot find handle_ioreq", last[1]), \
            last[1]
        assert sh in last[1]
        row = next(ln for ln in last[3:] if ln.split()[0] == "763")
        assert row.split()[-1] == "!unprobed"
    finally:
        fake.kill()
        fake.wait()
        err = _stop(serve, log)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "domain 763 " in ln]
    assert len(lines) == 1 and "its device model cannot be probed" in lines[0]
    assert "cannot find handle_ioreq" in lines[0]


@pytest.mark.root
@pytest.mark.integration
def test_a_binary_replaced_on_disk_is_probed_again(tmp_path):
    """A package upgrade replaces the binary at the same path (a new inode): device models
    started from the new file are probed (the new inode), those still running the old one keep
    their probes."""
    dm = tmp_path / "xen" / "bin" / "qemu-system-i386"
    dm.parent.mkdir(parents=True)
    shutil.copy2(sr.build("7.2"), dm)
    serve, port, log = _serve(tmp_path)
    old = new = None
    try:
        old = subprocess.Popen(sr.command(764, sr.BUNDLED_STREAM, exe=dm, name="old", speed=1.0,
                                          loop=True), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        assert _wait(lambda: _samples(_scrape(port), "iotrace_probes_attached",
                                      domid="764") == [2.0], timeout=90, interval=0.3)
        staged = dm.with_name("qemu-system-i386.new")
        shutil.copy2(sr.build("8.1"), staged)
        os.replace(staged, dm)                       # what dpkg does: a new file at the path
        new = subprocess.Popen(sr.command(765, sr.BUNDLED_STREAM, exe=dm, name="new",
                                          speed=1.0, loop=True), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        assert _wait(lambda: _samples(_scrape(port), "iotrace_probes_attached",
                                      domid="765") == [2.0], timeout=90, interval=0.3)
        n_old, n_new = _total(_scrape(port), 764), _total(_scrape(port), 765)
        assert _wait(lambda: (t := _scrape(port)) and _total(t, 764) > n_old
                     and _total(t, 765) > n_new, timeout=30, interval=0.3)
        assert _samples(_scrape(port), "iotrace_probes_attached", domid="764") == [2.0]
    finally:
        for p in (old, new):
            if p is not None:
                p.kill()
                p.wait()
        err = _stop(serve, log)
    assert "Traceback" not in err
