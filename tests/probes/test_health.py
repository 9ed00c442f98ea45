"""Health that tells the truth (issue #16): a probe program the kernel refuses makes the source down.

The program is broken on purpose with the test-only flag IOTRACE_BPF_EXTRA_CFLAGS=-DIOTRACE_TEST_OOB=1
(probes/bpf/loader.py): ioreq.bpf.c's return program then indexes one slot past its histogram, which
every verifier refuses, and the entry program still loads: the shape of the failure Debian 12's
kernel gave the unfixed program (an entry probe attached, its counting return probe refused, and
the source reporting up while counting nothing). On the host's kernel, as root:

* the source: not up, nothing left attached, the verifier's verdict in one line;
* ``iotrace serve``: iotrace_source_up 0, iotrace_probes_attached 0 for the stand-in's domain, one
  log line with the verifier's verdict and none of BCC's dump; the alerts IotraceSourceDown and
  IotraceProbeDetached fire on exactly the series it exported (promtool, rules/iotrace-alerts.yml);
  ``--strict``: exit 2 with that line;
* ``iotrace top -b``: the header says DOWN with the error;
* without the flag (control), the same setup is up and counts;
* device models only discovered from /proc: one whose binary is gone is skipped, one of a build
  whose handle_ioreq cannot be found is that domain's failure (0 probes attached), not the
  source's.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from iotrace.probes.bpf.loader import EXTRA_CFLAGS_ENV
from iotrace.probes.standin import runner as sr
from support import REPO, require_tool
from support.prometheus import free_port, wait_http

pytestmark = [pytest.mark.root, pytest.mark.integration]

BROKEN = "-DIOTRACE_TEST_OOB=1"
VERDICT = "verifier: invalid access to map value"
DOMID = 971
# What BCC's dump of a verifier log looks like (none of it may reach the operator's log).
DUMP_MARKS = ("processed ", "; __sync_fetch_and_add", "R1=", "mark_precise", "bpf: Failed")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    """A private copy of the stand-in (its own inode: no other test's uprobes see it)."""
    d = tmp_path_factory.mktemp("health")
    dst = d / "dm"
    shutil.copy2(sr.build(), dst)
    return str(dst)


@pytest.fixture
def standin(exe, tmp_path):
    s = sr.StandIn(DOMID, name="broken-probe", hold=True, truth=tmp_path / "truth.json")
    s.exe = exe
    s.argv[0] = exe
    s.start()
    yield s
    s.stop()


def test_refused_program_makes_the_source_down(exe, standin, monkeypatch):
    from iotrace.probes.live import QemuProbeSource
    monkeypatch.setenv(EXTRA_CFLAGS_ENV, BROKEN)
    src = QemuProbeSource(binaries=[exe], defaults=False)
    src.start()
    try:
        st = src.stats()
        assert st.up is False
        assert src.sets == [] and src.attached == 0      # the entry probe did not stay behind
        assert st.probes_attached == 0 and st.probes_failed == 1
        assert len(src.failures) == 1 and "\n" not in st.error
        assert st.error.startswith(f"{exe}: the kernel refused on_return")
        assert VERDICT in st.error and "its requests are not counted" in st.error
        assert src.domains()[DOMID].probes_attached == 0
    finally:
        src.stop()
    # strict: the same failure is an exception with the same line
    from iotrace.core.errors import ProbeError
    with pytest.raises(ProbeError, match="the kernel refused on_return.*" + VERDICT):
        QemuProbeSource(binaries=[exe], defaults=False, strict=True).start()
    # control: without the flag the same binary is up and counted
    monkeypatch.delenv(EXTRA_CFLAGS_ENV)
    src = QemuProbeSource(binaries=[exe], defaults=False)
    src.start()
    try:
        assert src.stats().up is True and src.attached == 2 and src.failures == []
        assert src.domains()[DOMID].probes_attached == 2
    finally:
        src.stop()


def _scrape(port) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _serve(iotrace_exe, exe, port, *extra):
    env = dict(os.environ, **{EXTRA_CFLAGS_ENV: BROKEN})
    return subprocess.Popen([iotrace_exe, "serve", "--source", "qemu", "--binary", exe,
                             "--web.listen-address", f"127.0.0.1:{port}", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _promtool_test(tmp_path, series: dict[str, float]) -> subprocess.CompletedProcess:
    """promtool test rules on rules/iotrace-alerts.yml with ``series`` (exported by serve,
    constant for 30 minutes, as one Prometheus target would scrape them)."""
    promtool = require_tool("promtool")
    inst = 'instance="dom0:9878",job="iotrace"'
    inputs = [{"series": name.replace("{", "{" + inst + ",", 1) if "{" in name
               else f"{name}{{{inst}}}", "values": f"{value:g}x30"}
              for name, value in series.items()]
    test = {
        "rule_files": [str(REPO / "rules" / "iotrace-recording.yml"),
                       str(REPO / "rules" / "iotrace-alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": [
            {"eval_time": "1m", "alertname": "IotraceSourceDown", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "IotraceSourceDown", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "component": "iotrace",
                                "instance": "dom0:9878", "job": "iotrace", "source": "qemu"},
                 "exp_annotations": {
                     "summary": "iotrace source qemu is down on dom0:9878",
                     "description": "The qemu source of the iotrace exporter on dom0:9878 has "
                                    "reported down for 2 minutes: its metrics are frozen.",
                     "runbook_url": "docs/alerts.md#iotracesourcedown"}}]},
            {"eval_time": "5m", "alertname": "IotraceProbeDetached", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "component": "iotrace",
                                "instance": "dom0:9878", "job": "iotrace", "source": "qemu",
                                "domain": "broken-probe", "domid": str(DOMID)},
                 "exp_annotations": {
                     "summary": "No iotrace probe attached for domain broken-probe on dom0:9878",
                     "description": f"The device model of domain broken-probe (domid {DOMID}) on "
                                    "dom0:9878 has no probe attached (source qemu): its I/O "
                                    "requests are not counted.",
                     "runbook_url": "docs/alerts.md#iotraceprobedetached"}}]},
        ]}],
    }
    path = tmp_path / "from-serve_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_serve_exports_the_source_down_and_the_alerts_fire(exe, standin, tmp_path, iotrace_exe):
    port = free_port()
    serve = _serve(iotrace_exe, exe, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=60)
        time.sleep(1.5)            # the monitor's first pass (once a second)
        m = _scrape(port)
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
    q = (("source", "qemu"),)
    dom = tuple(sorted({"source": "qemu", "domain": "broken-probe", "domid": str(DOMID)}.items()))
    assert m[("iotrace_source_up", q)] == 0
    assert m[("iotrace_probes_attached", dom)] == 0
    assert m[("iotrace_probe_attach_failures_total", q)] >= 1
    assert m[("iotrace_source_events_total", q)] == 0
    # The log: the verdict once per binary, one line each, and nothing of BCC's dump.
    lines = err.splitlines()
    mine = [ln for ln in lines if exe in ln]
    assert len(mine) == 1, err
    assert "source qemu is down" in mine[0] and VERDICT in mine[0], mine[0]
    assert not [ln for ln in lines if any(mark in ln for mark in DUMP_MARKS)], err
    assert "Traceback" not in err
    # The alerts, on the very series serve exported.
    series = {"iotrace_source_up{source=\"qemu\"}": m[("iotrace_source_up", q)],
              f'iotrace_probes_attached{{source="qemu",domain="broken-probe",domid="{DOMID}"}}':
                  m[("iotrace_probes_attached", dom)],
              "iotrace_probe_attach_failures_total{source=\"qemu\"}":
                  m[("iotrace_probe_attach_failures_total", q)],
              "iotrace_source_events_total{source=\"qemu\"}":
                  m[("iotrace_source_events_total", q)]}
    r = _promtool_test(tmp_path, series)
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_strict_exits_with_the_verdict(exe, iotrace_exe):
    serve = _serve(iotrace_exe, exe, free_port(), "--strict")
    try:
        _, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 2, err
    assert "Traceback" not in err
    fatal = [ln for ln in err.splitlines() if "(--strict)" in ln or "failed to start" in ln]
    # the first binary refused is fatal: Debian's device model when installed, else the stand-in
    from iotrace.probes.live import default_binaries
    first = (default_binaries() or [exe])[0]
    assert len(fatal) == 1 and VERDICT in fatal[0] and f": {first}: " in fatal[0], err
    assert not [ln for ln in err.splitlines() if any(mark in ln for mark in DUMP_MARKS)], err


def test_top_header_shows_the_source_down(exe, standin, iotrace_exe):
    env = dict(os.environ, **{EXTRA_CFLAGS_ENV: BROKEN})
    r = subprocess.run([iotrace_exe, "top", "-b", "0.5", "2", "--binary", exe], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr          # batch mode: a source was down
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("iotrace top: source qemu is down")]
    src_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("sources:")]
    assert src_lines, r.stdout
    assert all("qemu=DOWN" in ln and VERDICT in ln and "failed=" in ln for ln in src_lines), \
        src_lines
    assert not [ln for ln in r.stderr.splitlines() if any(m in ln for m in DUMP_MARKS)], r.stderr


def test_discovered_device_models_that_cannot_be_counted(exe, tmp_path):
    """A stand-in running from a binary deleted since (a replaced build, a test's temporary copy)
    and a -xen-domid process whose binary has no handle_ioreq at all (a copy of a shell: no
    symbol, no table entry, nothing the automatic resolver recognises): neither makes the source
    down; the second one's domain shows 0 probes attached and its failure is listed."""
    from iotrace.probes.live import QemuProbeSource
    gone, stripped = tmp_path / "gone-dm", tmp_path / "no-hook-dm"
    shutil.copy2(exe, gone)
    shutil.copy2(os.path.realpath("/bin/sh"), stripped)
    procs = []
    fake = None
    try:
        s = sr.StandIn(981, hold=True)
        s.exe, s.argv[0] = str(gone), str(gone)
        procs.append(s.start())
        fake = subprocess.Popen([str(stripped), "-c", "sleep 120", "-xen-domid", "982"])
        time.sleep(0.3)
        gone.unlink()
        src = QemuProbeSource(binaries=[exe])          # defaults: discovered device models too
        src.start()
        try:
            st = src.stats()
            assert st.up is True, st.error
            assert not [f for f in src.failures if str(gone) in f]
            mine = [f for f in src.failures if str(stripped) in f]
            assert len(mine) == 1 and "handle_ioreq" in mine[0], src.failures
            doms = src.domains()
            assert doms[982].probes_attached == 0
            assert exe in [ps.res.path for ps in src.sets]
        finally:
            src.stop()
    finally:
        for s in procs:
            s.stop()
        if fake is not None:
            fake.kill()
            fake.wait(10)
