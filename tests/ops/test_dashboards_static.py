"""Grafana dashboards of grafana/: structure of the JSON model, and every query parsed by promtool.

No Grafana runs here; what Grafana needs from the files is checked directly: valid JSON in the
dashboard model (schemaVersion 39), unique uids and panel ids, a datasource and an expression on
every target, variables defined before use, provisioning files Grafana accepts. PromQL has no
parse-only command in promtool 2.42, so every query (variables substituted) becomes a recording
rule of a throw-away rule file and ``promtool check rules`` parses it. The live test
(test_dashboards_live.py) then evaluates them against a real Prometheus.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from support import REPO, require_tool

GRAFANA = REPO / "grafana"
sys.path.insert(0, str(GRAFANA))
import generate  # noqa: E402  (grafana/generate.py)
import queries  # noqa: E402  (grafana/queries.py)

DASH_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
CONTRACT = yaml.safe_load((REPO / "rules" / "metrics-contract.yml").read_text())
RECORDED = {r["record"] for g in yaml.safe_load((REPO / "rules" / "iotrace-recording.yml")
                                                .read_text())["groups"] for r in g["rules"]}
REQUIRED_VARS = ["datasource", "instance", "source", "domain", "range"]


def dashboards():
    return [(p.name, json.loads(p.read_text())) for p in DASH_FILES]


def all_queries():
    for name, dash in dashboards():
        for q in queries.iter_queries(dash):
            yield name, q


def test_generated_json_is_up_to_date(tmp_path):
    assert DASH_FILES, "no dashboards in grafana/dashboards/"
    assert {p.name for p in DASH_FILES} == set(generate.DASHBOARDS)
    assert generate.main(["--check"]) == 0, "run python3 grafana/generate.py and commit"
    # ... and --check does detect a stale file.
    generate.main(["--out", str(tmp_path)])
    victim = tmp_path / DASH_FILES[0].name
    victim.write_text(victim.read_text().replace('"30s"', '"1m"', 1))
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("path", DASH_FILES, ids=lambda p: p.name)
def test_dashboard_model(path):
    dash = json.loads(path.read_text())
    for key in ("uid", "title", "panels", "templating", "time", "schemaVersion", "annotations"):
        assert key in dash, key
    assert dash["schemaVersion"] == 39
    assert dash["id"] is None, "provisioned dashboards must not carry a database id"
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dash["uid"])
    assert "iotrace" in dash["tags"]
    ids = [p["id"] for p in queries.panels(dash)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    # Panels sit on the 24-column grid without overlapping.
    cells = set()
    for p in queries.panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


def test_uids_and_titles_unique():
    dashes = [d for _, d in dashboards()]
    assert len({d["uid"] for d in dashes}) == len(dashes)
    assert len({d["title"] for d in dashes}) == len(dashes)


@pytest.mark.parametrize("path", DASH_FILES, ids=lambda p: p.name)
def test_panels_have_datasource_and_expressions(path):
    dash = json.loads(path.read_text())
    for p in queries.panels(dash):
        if p["type"] == "row":
            assert not p.get("targets"), p["title"]
            continue
        assert p.get("title"), f"panel {p['id']} has no title"
        assert p.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        targets = p.get("targets") or []
        assert targets, f"{p['title']!r} has no target"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t.get("datasource", {}).get("uid") == "${datasource}", p["title"]
            assert t.get("expr", "").strip(), f"{p['title']!r} {t['refId']}: empty expression"
        if p["type"] == "heatmap":
            assert all(t["format"] == "heatmap" and "_bucket" in t["expr"] for t in targets)
        if p["type"] == "table":
            assert all(t["instant"] and t["format"] == "table" for t in targets)


@pytest.mark.parametrize("path", DASH_FILES, ids=lambda p: p.name)
def test_variables_defined_before_use(path):
    dash = json.loads(path.read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == REQUIRED_VARS
    ds = dash["templating"]["list"][0]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    defined = set(queries.BUILTINS)
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"
            used = set(queries.variables_used(var["definition"]))
            assert used <= defined, f"variable {var['name']} uses {used - defined} before it is defined"
            assert var["query"]["query"] == var["definition"]
            assert queries.LABEL_VALUES_RE.match(var["definition"]), var["definition"]
            assert var["includeAll"] and var["allValue"] == ".*"
        defined.add(var["name"])
    for _, q in [(None, q) for q in queries.iter_queries(dash)]:
        used = set(queries.variables_used(q.expr))
        assert used <= defined, f"{q.where}: undefined variables {used - defined}"


def test_rates_use_rate_interval():
    """Every rate()/increase() in a panel is over $__rate_interval (Grafana adapts it to the step)."""
    for name, q in all_queries():
        if q.kind != "panel":
            continue
        for window in re.findall(r"\b(?:rate|increase|irate)\([^()]*\[([^\]]+)\]", q.expr):
            assert window == "$__rate_interval", f"{name} {q.where}: [{window}]"


def test_queries_use_contract_metrics_and_recorded_series():
    metric_re = re.compile(r"\b(iotrace_[a-z0-9_]+)\b")
    recorded_re = re.compile(r"\b([a-z_]+:[a-z0-9_]+(?::[a-z0-9_]+)*)\b")
    for name, q in all_queries():
        recorded = set(recorded_re.findall(q.expr))
        assert recorded <= RECORDED, f"{name} {q.where}: not recorded: {recorded - RECORDED}"
        for metric in metric_re.findall(recorded_re.sub(" ", q.expr)):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            ok = metric in CONTRACT["metrics"] or (
                CONTRACT["metrics"].get(base, {}).get("type") == "histogram")
            assert ok, f"{name} {q.where}: {metric} is not in rules/metrics-contract.yml"


def test_required_panels_present():
    text = {name: json.dumps(d) for name, d in dashboards()}
    allq = [q.expr for _, q in all_queries()]
    assert any('ALERTS{alertname=~\\"Iotrace.*\\"}' in t for t in text.values())
    assert any(q.startswith("topk(") for q in allq), "no busiest-devices topk panel"
    assert any("source=\"xentrace\"" in q and "source=\"qemu\"" in q for q in allq)
    assert any("rate1m_zscore" in q for q in allq)
    assert any("histogram_quantile(0.95" in q for q in allq)
    for metric in ("iotrace_source_up", "iotrace_probes_attached", "iotrace_events_lost_total",
                   "iotrace_scrape_duration_seconds", "iotrace_domain_io_wait_ratio",
                   "iotrace_domain_class", "iotrace_advised_weight",
                   "iotrace_dom0_cpu_busy_ratio"):
        assert any(metric in q for q in allq), metric
    kinds = {p["type"] for _, d in dashboards() for p in queries.panels(d)}
    assert {"timeseries", "heatmap", "table", "stat"} <= kinds


def test_every_query_parses_with_promtool(tmp_path):
    """promtool check rules parses each query (as a recording rule's expression)."""
    promtool = require_tool("promtool")
    rules, where = [], {}
    for i, (name, q) in enumerate(all_queries()):
        record = f"dashboard_check:q{i}"
        where[record] = f"{name} {q.where}"
        rules.append({"record": record, "expr": queries.to_promql(q, queries.substitute(q.expr))})
    assert len(rules) > 40
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    out = res.stdout + res.stderr
    bad = [where.get(m, m) for m in re.findall(r"dashboard_check:q\d+", out)]
    assert res.returncode == 0, f"queries that do not parse: {bad}\n{out}"
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_promtool_parse_check_rejects_a_broken_query(tmp_path):
    """The parse check above is real: a malformed query is reported."""
    promtool = require_tool("promtool")
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "dashboard_check:q0", "expr": "sum by (domain (rate(iotrace_ioreqs_total[1m]))"}]}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0


def test_substitution_and_label_values():
    q = queries.Query("d", "variable range", "variable",
                      'label_values(iotrace_ioreqs_total{instance=~"$instance"}, range)')
    rendered = queries.to_promql(q, queries.substitute(q.expr, {"instance": "dom0-a:9878"}))
    assert rendered == 'group by (range) (iotrace_ioreqs_total{instance=~"dom0-a:9878"})'
    assert queries.substitute("rate(x{domain=~\"${domain}\"}[$__rate_interval])") == \
        'rate(x{domain=~".*"}[1m])'


def test_provisioning_files():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "iotrace.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert re.match(r"https?://", source["url"])
    assert source["isDefault"] is True
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "iotrace.yml").read_text())
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert provider["folder"] == "iotrace"


def test_queries_cli(capsys):
    assert queries.main([str(DASH_FILES[0]), "--var", "domain=web"]) == 0
    out = capsys.readouterr().out
    assert 'domain=~"web"' in out and "$" not in out.replace("$__", "")
    assert queries.main([str(DASH_FILES[0]), "--var", "nonsense"]) == 2


def test_generate_bad_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert generate.main(["--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generate.py:" in err
