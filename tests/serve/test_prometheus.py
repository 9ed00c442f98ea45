"""A real Prometheus scrapes `iotrace serve`; PromQL sums equal the ground truth.

* `--replay` of a synthetic xentrace capture (iotrace.xentrace.testing.synth: every I/O record known) and
  of the real xentrace capture (94 port reads + 11 writes, docs/data.md);
* TLS + basic auth scraping (right password: up 1, wrong one: up 0);
* as root, the live qemu source on a stand-in device model (`iotrace standin`'s C program, probed
  with real uprobes): sums equal the requests the stand-in reports having issued.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import bcrypt
import pytest

from iotrace.core.addrmap import AddressMap
from iotrace.core.events import DIR_NAMES, TYPE_CODES, TYPE_NAMES
from support import require_tool
from support.prometheus import Prometheus, free_port, scrape_config, self_signed_cert, wait_http

pytestmark = pytest.mark.integration


def start_serve(exe, *args, port=None):
    port = port or free_port()
    p = subprocess.Popen([exe, "serve", "--web.listen-address", f"127.0.0.1:{port}", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return p, port


def stop_serve(p) -> str:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
    else:
        _, err = p.communicate()
    assert p.returncode == 0, err
    return err


def promql_rows(prom, q, keys):
    return {tuple(m.get(k, "") for k in keys): v for m, v in prom.query(q)}


@pytest.fixture(scope="module")
def synth_capture(tmp_path_factory):
    from iotrace.xentrace.testing import synth
    trace = synth.generate(seed=4, pcpus=4, domains=((1, 2), (5, 3)), steps=3000, lost=2)
    path = tmp_path_factory.mktemp("synth") / "synth.xt"
    trace.write(path)
    return path, trace


def test_replay_of_synthetic_capture_matches_truth(tmp_path, iotrace_exe, synth_capture):
    require_tool("prometheus")
    path, trace = synth_capture
    am = AddressMap.default()
    want = Counter()
    for (domid, vcpu, typ, d, addr), n in trace.truth.items():
        want[(str(domid), str(vcpu), TYPE_NAMES[typ], DIR_NAMES[d], am.name(typ, addr))] += n
    serve, port = start_serve(iotrace_exe, "--replay", str(path))
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=30)
        with Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"]) as prom:
            prom.wait_for_scrapes(count=2)
            total = prom.query_value('sum(iotrace_ioreqs_total{source="replay"})')
            assert total == sum(trace.truth.values()) == trace.io_records
            keys = ("domid", "vcpu", "type", "dir", "range")
            got = promql_rows(prom, "sum by (domid, vcpu, type, dir, range) "
                                    "(iotrace_ioreqs_total)", keys)
            assert got == {k: float(v) for k, v in want.items()}
            assert prom.query_value('iotrace_events_lost_total{source="replay"}') == \
                trace.lost_records
            assert prom.query_value('iotrace_source_up{source="replay"}') == 1
            # every I/O exit with a VMENTRY has a service time; histogram count <= requests
            n_svc = prom.query_value("sum(iotrace_ioreq_service_seconds_count)")
            assert 0 < n_svc <= total
            assert prom.query_value('sum(iotrace_ioreq_service_seconds_bucket{le="+Inf"})') \
                == n_svc
            info = promql_rows(prom, "iotrace_domain_info", ("domid", "domain"))
            assert {k[0] for k in info} == {d for d, *_ in want}
    finally:
        stop_serve(serve)


def test_replay_of_real_capture_and_promtool(tmp_path, iotrace_exe, real_xentrace):
    require_tool("prometheus")
    promtool = require_tool("promtool")
    serve, port = start_serve(iotrace_exe, "--replay", str(real_xentrace))
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=30)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        with Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"]) as prom:
            prom.wait_for_scrapes(count=1)
            by_dir = promql_rows(prom, 'sum by (dir) (iotrace_ioreqs_total{type="pio"})',
                                 ("dir",))
            # data/README.md: 94 TRC_HVM_IOPORT_READ and 11 TRC_HVM_IOPORT_WRITE records
            assert by_dir == {("read",): 94.0, ("write",): 11.0}
            assert prom.query_value('sum(iotrace_ioreqs_total{domid="14"})') > 0
    finally:
        stop_serve(serve)


def test_replay_at_speed_counts_grow_to_the_total(tmp_path, iotrace_exe, synth_capture):
    require_tool("prometheus")
    from iotrace.offline.capture import load_capture
    path, trace = synth_capture
    ts = load_capture(str(path)).events["ts_ns"]
    span_s = (int(ts.max()) - int(ts.min())) / 1e9
    speed = span_s / 6.0                         # the whole capture in about 6 s of wall time
    port = free_port()
    with Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], scrape_interval="500ms") as prom:
        serve, _ = start_serve(iotrace_exe, "--replay", str(path), "--speed", repr(speed),
                               port=port)
        try:
            final = prom.wait_for('sum(iotrace_ioreqs_total)',
                                  lambda v: v == trace.io_records, timeout=40)
            assert final == trace.io_records
            # it got there through intermediate values, not all at once
            series = prom.api("query", query='iotrace_source_events_total{source="replay"}[1m]')
            values = sorted({float(v) for _, v in series["result"][0]["values"]})
            assert len(values) >= 3 and values[0] < trace.io_records, values
        finally:
            stop_serve(serve)


def test_prometheus_scrapes_over_tls_with_basic_auth(tmp_path, iotrace_exe, real_xentrace):
    require_tool("prometheus")
    ca = self_signed_cert(tmp_path / "ca", "iotrace-ca")
    cert, key = self_signed_cert(tmp_path / "srv", "localhost", ca=ca)
    hashed = bcrypt.hashpw(b"scrape-me", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    serve, port = start_serve(iotrace_exe, "--replay", str(real_xentrace),
                              "--web.config.file", str(web))
    target = [f"localhost:{port}"]
    tls = {"ca_file": str(ca[0])}
    try:
        import ssl
        wait_http(f"https://localhost:{port}/", timeout=30,
                  context=ssl.create_default_context(cafile=str(ca[0])))
        configs = [
            scrape_config("good", target, scheme="https", tls_config=tls,
                          basic_auth={"username": "prometheus", "password": "scrape-me"}),
            scrape_config("badpw", target, scheme="https", tls_config=tls,
                          basic_auth={"username": "prometheus", "password": "nope"}),
            scrape_config("plain", target),
        ]
        with Prometheus(tmp_path / "prom", scrape_configs=configs) as prom:
            prom.wait_for_scrapes(job="good", count=2)
            assert prom.query_value('sum(iotrace_ioreqs_total{job="good"})') == 105
            prom.wait_for('count_over_time(up{job="badpw"}[1h])', lambda v: v and v >= 2)
            assert prom.query_value('max_over_time(up{job="badpw"}[1h])') == 0
            assert prom.query_value('max_over_time(up{job="plain"}[1h])') == 0
            assert prom.query_value('count(iotrace_ioreqs_total{job="badpw"})') is None
    finally:
        stop_serve(serve)


# -- live: real uprobes on a stand-in device model (root) ----------------------------------------

UPROBE_EVENTS = [Path("/sys/kernel/tracing/uprobe_events"),
                 Path("/sys/kernel/debug/tracing/uprobe_events")]


def _uprobes_on(exe: str) -> list[str]:
    out = []
    for p in UPROBE_EVENTS:
        if p.exists():
            out += [ln for ln in p.read_text().splitlines() if exe in ln]
    return out


@pytest.mark.root
def test_live_standin_scraped_by_prometheus_equals_truth(tmp_path, iotrace_exe):
    require_tool("prometheus")
    from iotrace.probes.live import metrics_bucket
    from iotrace.probes.standin import runner as sr
    exe = str(sr.build())
    domid = 741
    serve, port = start_serve(iotrace_exe, "--source", "qemu", "--binary", exe)
    truth = tmp_path / "truth.json"
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=60)
        with sr.StandIn(domid=domid, name="scraped", speed=0, hold=True, truth=truth) as s:
            deadline = time.monotonic() + 60
            while not truth.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert truth.exists(), "stand-in did not finish its stream"
            doc = json.loads(truth.read_text())
            am = AddressMap.default()
            want = Counter()
            for r in doc["io"]:
                # metrics mode keys by address bucket: name the truth's addresses the same way
                t = TYPE_CODES[r["type"]]
                want[(str(r["vcpu"]), r["type"], r["dir"],
                      am.name(t, metrics_bucket(t, r["addr"])))] += r["count"]
            total = sum(want.values())
            with Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"]) as prom:
                q = f'sum(iotrace_ioreqs_total{{source="qemu",domid="{domid}"}})'
                prom.wait_for(q, lambda v: v == total, timeout=40)
                got = promql_rows(prom, f'sum by (vcpu, type, dir, range) '
                                        f'(iotrace_ioreqs_total{{domid="{domid}"}})',
                                  ("vcpu", "type", "dir", "range"))
                assert got == {k: float(v) for k, v in want.items()}
                assert prom.query_value(f'iotrace_domain_info{{domid="{domid}"}}') == 1
                assert prom.query(f'iotrace_domain_info{{domid="{domid}"}}')[0][0]["domain"] \
                    == "scraped"
                assert prom.query_value(
                    f'iotrace_probes_attached{{domid="{domid}"}}') > 0
                assert prom.query_value('iotrace_source_up{source="qemu"}') == 1
                assert prom.query_value(
                    f'sum(iotrace_ioreq_service_seconds_count{{domid="{domid}"}})') > 0
            assert s.running()
    finally:
        err = stop_serve(serve)
    assert "Traceback" not in err
    assert _uprobes_on(exe) == [], "uprobes left behind after SIGTERM"
    assert os.path.exists(exe)
