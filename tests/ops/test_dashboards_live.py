"""Live: a real Prometheus, loaded with rules/*.yml, scrapes ``iotrace serve --replay``; every
dashboard query (variables substituted) is evaluated through /api/v1/query.

The replays are recordings this test writes: two named domains, port I/O, MMIO and PCI config
requests with sizes and service times, spread over minutes and replayed in real time, so counters
move while Prometheus scrapes them every second. Live sources cannot run without Xen, so a host
running both of them (``--source both``) is played by two exporters: one replays every request
(what Xen's trace points see) and is relabelled source="xentrace"; the other replays only the
requests that reach qemu-dm (the ranges Xen emulates itself removed) and is relabelled
source="qemu". A third scrape target is a closed port, so IotraceExporterDown goes pending and
ALERTS has something to show.

Every query must parse and evaluate; every query whose data the replay provides must return
series, whose labels must include those the panel's legend shows. The queries that legitimately
return nothing here are listed in EXPECTED_EMPTY with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

from support import IN_CI, REPO, require_tool

sys.path.insert(0, str(REPO / "grafana"))
import queries  # noqa: E402  (grafana/queries.py)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE_INTERVAL = "15s"          # Grafana: max(4 x scrape interval, step); scrape interval is 1s
CONTRACT = yaml.safe_load((REPO / "rules" / "metrics-contract.yml").read_text())

# (dashboard uid, panel title or variable/annotation name) -> why it has no data in this test.
EXPECTED_EMPTY = {
    ("iotrace-anomalies", "Request-rate z-score by domain"):
        "the baseline is the 6h of rates ending 10 minutes ago: none in a short test",
    ("iotrace-anomalies", "Request rate vs baseline", "B"): "same: no baseline yet",
    ("iotrace-anomalies", "Request rate vs baseline", "C"): "same: no baseline yet",
    ("iotrace-anomalies", "iotrace alerts firing"):
        "annotation of firing alerts; the only alert here (IotraceExporterDown) is pending for 2m",
    ("iotrace-exporter", "Probes attached by domain"): "a replay attaches no probes",
    ("iotrace-anomalies", "Dom0 CPU and device-model CPU"):
        "a replay has no host: no Dom0 or device-model CPU",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def write_recording(path, *, qemu_only: bool = False, seconds: int = 150, rate: int = 300) -> None:
    """Two domains' I/O over ``seconds``: web (domid 3) and db (domid 4), several ranges.

    ``qemu_only``: leave out the requests Xen serves itself (rtc, hpet: handled_by xen in
    exporter/core/data/pc-default.yaml), i.e. what a qemu-dm probe would see of the same guests."""
    from iotrace.core import events as ev
    from iotrace.offline.recording import RecordingWriter

    rng = np.random.default_rng(7)
    n = seconds * rate
    batch = ev.empty(n)
    batch["ts_ns"] = np.sort(rng.integers(0, seconds * 1_000_000_000, n))
    batch["domid"] = rng.choice([3, 4], n, p=[0.7, 0.3])
    batch["vcpu"] = rng.choice([0, 1, -1], n, p=[0.6, 0.3, 0.1])
    # (type, addr, size): com1, ide-primary, rtc, vga-lowmem, pci config space of 00:01.0, hpet
    kinds = [(ev.TYPE_PIO, 0x3F8, 1), (ev.TYPE_PIO, 0x1F0, 2), (ev.TYPE_PIO, 0x70, 1),
             (ev.TYPE_MMIO, 0xA0000, 4), (ev.TYPE_PCI_CONFIG, (1 << 35) | 0x10, 4),
             (ev.TYPE_MMIO, 0xFED000F0, 4)]
    xen_handled = [2, 5]
    pick = rng.choice(len(kinds), n, p=[0.35, 0.25, 0.1, 0.2, 0.05, 0.05])
    table = np.array(kinds, dtype=np.uint64)
    batch["type"] = table[pick, 0].astype(np.uint8)
    batch["addr"] = table[pick, 1]
    batch["size"] = table[pick, 2].astype(np.uint32)
    batch["dir"] = rng.integers(0, 2, n).astype(np.uint8)
    # Service times: log-normal around 20 us, a slow tail for the IDE data port.
    svc = rng.lognormal(np.log(20_000), 0.8, n)
    svc[pick == 1] *= 50
    batch["service_ns"] = svc.astype(np.int64)
    if qemu_only:
        batch = batch[~np.isin(pick, xen_handled)]
    with RecordingWriter(str(path), {"source": "qemu", "domains": {3: "web", 4: "db"}}) as w:
        w.write(batch)
        w.add_lost(5)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        qs = urllib.parse.urlencode(params)
        try:
            body = http_get(f"{self.url}/api/v1/query?{qs}")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            raise AssertionError(f"query failed ({exc.code}): {body.decode()[:300]}\n{expr}")
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]


def _iotrace_exe() -> str:
    """conftest's iotrace_exe, for a module-scoped fixture (that one is function-scoped)."""
    if importlib.util.find_spec("iotrace.cli.serve") is None:
        if IN_CI:
            pytest.fail("iotrace serve is missing from this tree")
        pytest.skip("iotrace serve is not in this tree yet")
    exe = REPO / ".venv" / "bin" / "iotrace"
    found = str(exe) if exe.exists() else shutil.which("iotrace")
    if not found:
        pytest.skip("iotrace is not installed (make install)")
    return found


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    prom_exe = require_tool("prometheus")
    iotrace_exe = _iotrace_exe()
    tmp = tmp_path_factory.mktemp("live")
    write_recording(tmp / "all.rec")
    write_recording(tmp / "qemu.rec", qemu_only=True)
    xen_port, qemu_port, prom_port, dead_port = (free_port() for _ in range(4))
    procs = []
    try:
        for rec, port in (("all.rec", xen_port), ("qemu.rec", qemu_port)):
            procs.append(subprocess.Popen(
                [iotrace_exe, "serve", "--replay", str(tmp / rec), "--speed", "1",
                 "--analysis-interval", "2",
                 "--web.listen-address", f"127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL, stderr=open(tmp / f"serve-{port}.log", "wb")))
        for port in (xen_port, qemu_port):
            wait_until(lambda port=port: b"iotrace_build_info" in http_get(f"http://127.0.0.1:{port}/metrics"),
                       30, "iotrace serve")

        def as_source(port, source):
            return {"source_labels": ["instance", "source"], "regex": f"127\\.0\\.0\\.1:{port};replay",
                    "target_label": "source", "replacement": source}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(REPO / "rules" / "iotrace-recording.yml"),
                           str(REPO / "rules" / "iotrace-alerts.yml")],
            "scrape_configs": [
                {"job_name": "iotrace",
                 "static_configs": [{"targets": [f"127.0.0.1:{xen_port}", f"127.0.0.1:{qemu_port}"]}],
                 "metric_relabel_configs": [as_source(xen_port, "xentrace"),
                                            as_source(qemu_port, "qemu")]},
                {"job_name": "iotrace-unreachable",
                 "static_configs": [{"targets": [f"127.0.0.1:{dead_port}"]}]},
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen(
            [prom_exe, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"))
        procs.append(prom)
        p = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_until(lambda: http_get(f"{p.url}/-/ready"), 30, "prometheus ready")
        # Enough scrapes for the recorded 1m rates, the 5m service p95 and 15s rate windows.
        wait_until(lambda: p.query("source_domain_range:iotrace_ioreq_service_seconds:p95_5m"),
                   40, "recorded p95")
        wait_until(lambda: p.query('ALERTS{alertname="IotraceExporterDown"}'), 30,
                   "IotraceExporterDown pending")
        wait_until(lambda: len(p.query(f"iotrace_ioreqs_total[{RATE_INTERVAL}]")[0]["values"]) >= 8,
                   30, "a full rate window of samples")
        yield p, (xen_port, qemu_port)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _dash_queries():
    for path in sorted((REPO / "grafana" / "dashboards").glob("*.json")):
        dash = queries.load(path)
        for q in queries.iter_queries(dash):
            yield q


def _key(q: queries.Query):
    name = q.panel["title"] if q.panel else q.where.split(" ", 1)[1].strip("'")
    ref = q.target["refId"] if q.target else None
    return (q.dashboard, name), (q.dashboard, name, ref)


def _expected_empty(q):
    k2, k3 = _key(q)
    return EXPECTED_EMPTY.get(k3) or EXPECTED_EMPTY.get(k2)


def test_rules_loaded_and_healthy(live):
    p, _ = live
    doc = json.loads(http_get(f"{p.url}/api/v1/rules"))
    groups = {g["name"]: g for g in doc["data"]["groups"]}
    assert {"iotrace.rates", "iotrace.service", "iotrace.baseline", "iotrace.guest",
            "iotrace.exporter"} <= set(groups)
    errors = [(r["name"], r.get("lastError")) for g in groups.values() for r in g["rules"]
              if r.get("health") == "err"]
    assert not errors, errors


def test_exporter_follows_metric_contract(live):
    """Every contract metric the replay can produce is scraped with its labels; buckets match."""
    p, _ = live
    # a replay attaches no probes and has no host (Dom0 and device-model CPU)
    produced_by_replay = set(CONTRACT["metrics"]) - {
        "iotrace_probes_attached", "iotrace_dom0_cpu_busy_ratio",
        "iotrace_domain_device_model_cpu_ratio"}
    for name in sorted(produced_by_replay):
        spec = CONTRACT["metrics"][name]
        series = name + "_count" if spec["type"] == "histogram" else name
        result = p.query(f'{series}{{job="iotrace"}}')
        assert result, f"{name}: not exposed by iotrace serve --replay"
        for r in result:
            missing = set(spec["labels"]) - set(r["metric"])
            assert not missing, f"{name}: labels {missing} missing in {r['metric']}"
    les = {r["metric"]["le"] for r in p.query("count by (le) (iotrace_ioreq_service_seconds_bucket)")}
    want = {float(b) / 1e9 for b in CONTRACT["metrics"]["iotrace_ioreq_service_seconds"]
            ["buckets_ns"]}
    assert {float(le) for le in les if le != "+Inf"} == want
    assert "+Inf" in les


def test_every_dashboard_query_evaluates(live):
    p, _ = live
    empty, nonempty, report = [], [], []
    for q in _dash_queries():
        expr = queries.to_promql(q, queries.substitute(q.expr, rate_interval=RATE_INTERVAL))
        result = p.query(expr)                      # a parse/evaluation error fails here
        reason = _expected_empty(q)
        if result:
            nonempty.append(q)
            assert not reason, f"{q.dashboard} {q.where}: listed as empty ({reason}) but has data"
            # The aggregation keeps every label the legend shows.
            legend = (q.target or {}).get("legendFormat", "")
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                for r in result:
                    assert label in r["metric"], \
                        f"{q.dashboard} {q.where}: legend {{{{{label}}}}} but series {r['metric']}"
        else:
            empty.append(q)
            report.append(f"{q.dashboard} {q.where}: {reason}")
            assert reason, f"{q.dashboard} {q.where}: no data\n{expr}"
    # Every listed exception is a real query (no stale entries).
    keys = {k for q in _dash_queries() for k in _key(q)}
    assert set(EXPECTED_EMPTY) <= keys, set(EXPECTED_EMPTY) - keys
    assert len(nonempty) >= 40, len(nonempty)
    print("\nno data, as expected:\n  " + "\n  ".join(report))


def test_domain_variable_filters(live):
    """With $domain = web, per-domain panels return web's series only."""
    p, _ = live
    checked = 0
    for q in _dash_queries():
        if q.kind != "panel" or "$domain" not in q.expr or _expected_empty(q):
            continue
        expr = queries.substitute(q.expr, {"domain": "web"}, rate_interval=RATE_INTERVAL)
        for r in p.query(expr):
            if "domain" in r["metric"]:
                assert r["metric"]["domain"] == "web", f"{q.where}: {r['metric']}"
                checked += 1
    assert checked > 20
    domains = {r["metric"]["domain"] for r in p.query(
        queries.to_promql(queries.Query("", "variable domain", "variable",
                                        'label_values(iotrace_domain_info{instance=~".*"}, domain)'),
                          'label_values(iotrace_domain_info{instance=~".*"}, domain)'))}
    assert {"web", "db"} <= domains


def test_alerts_panel_shows_pending_exporter_down(live):
    p, _ = live
    result = p.query('ALERTS{alertname=~"Iotrace.*"}')
    states = {(r["metric"]["alertname"], r["metric"]["alertstate"], r["metric"].get("job"))
              for r in result}
    assert ("IotraceExporterDown", "pending", "iotrace-unreachable") in states
    # The reachable exporter does not alert.
    assert not any(r["metric"].get("job") == "iotrace" for r in result)


def test_xen_kept_vs_qemu_panels(live):
    """The comparison panels: ranges Xen serves itself are 'kept by Xen' in full; the others
    reach qemu-dm (forwarded share close to 1: the same requests, replayed by both exporters)."""
    p, _ = live
    dash = queries.load(REPO / "grafana" / "dashboards" / "iotrace-overview.json")
    at = time.time() - 1          # one evaluation time for all the panels compared

    def values(title, ref="A"):
        (q,) = [q for q in queries.iter_queries(dash) if q.panel and q.panel["title"] == title
                and q.target["refId"] == ref]
        expr = queries.substitute(q.expr, rate_interval="30s")
        return {r["metric"]["range"]: float(r["value"][1]) for r in p.query(expr, at)}

    traced = values("Requests/s by range: xentrace vs qemu", "A")
    reached = values("Requests/s by range: xentrace vs qemu", "B")
    assert {"rtc", "hpet"} <= set(traced) and not {"rtc", "hpet"} & set(reached)
    kept = values("Kept by Xen (xentrace − qemu) by range")
    forwarded = values("Forwarded to qemu-dm (qemu ÷ xentrace) by range")
    for rng in ("rtc", "hpet"):
        assert kept[rng] == pytest.approx(traced[rng]), (kept, traced)
        assert rng not in forwarded, forwarded
    for rng in ("com1", "ide-primary", "vga-lowmem"):
        assert 0.7 < forwarded[rng] < 1.3, forwarded
        assert abs(kept[rng]) < 0.3 * traced[rng], (rng, kept, traced)


def test_instance_variable_filters(live):
    """With $instance set to one exporter (regex-escaped, as Grafana sends it), panels that show
    the instance label show that exporter only, and still have data."""
    p, (xen_port, _) = live
    chosen = f"127.0.0.1:{xen_port}"
    escaped = chosen.replace(".", "\\\\.")          # \\. inside a PromQL double-quoted string
    shown = 0
    for q in _dash_queries():
        if q.kind != "panel" or "$instance" not in q.expr or _expected_empty(q):
            continue
        expr = queries.substitute(q.expr, {"instance": escaped}, rate_interval=RATE_INTERVAL)
        result = p.query(expr)
        for r in result:
            if "instance" in r["metric"]:
                assert r["metric"]["instance"] == chosen, f"{q.where}: {r['metric']}"
                shown += 1
    assert shown > 10
