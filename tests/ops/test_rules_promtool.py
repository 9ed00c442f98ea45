"""Prometheus rules of rules/: checked and unit-tested with the real promtool.

* ``promtool check rules`` on every rule file;
* ``promtool test rules`` on every unit-test file in rules/tests/ (firing and non-firing series);
* every alert has a firing and a non-firing case, a summary, a description and a runbook link to
  its own section of docs/alerts.md; every metric the rules read is in rules/metrics-contract.yml;
* mutants: with one guard of an alert removed, the unit tests must fail (they can fail).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support import REPO, require_tool

RULES = REPO / "rules"
RULE_FILES = sorted(RULES.glob("iotrace-*.yml"))
UNIT_FILES = sorted((RULES / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "alerts.md"
CONTRACT = yaml.safe_load((RULES / "metrics-contract.yml").read_text())

pytestmark = pytest.mark.integration


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = require_tool("promtool")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_rules(path: Path) -> list[dict]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [r for r in load_rules(RULES / "iotrace-alerts.yml") if "alert" in r]


def recordings() -> list[dict]:
    return [r for f in RULE_FILES for r in load_rules(f) if "record" in r]


def test_rule_files_present():
    names = {p.name for p in RULE_FILES}
    assert {"iotrace-alerts.yml", "iotrace-recording.yml"} <= names
    assert UNIT_FILES, "no promtool unit tests in rules/tests/"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path):
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_example_prometheus_config():
    """rules/prometheus-example.yml is a valid config that loads both rule files."""
    res = promtool("check", "config", str(RULES / "prometheus-example.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load((RULES / "prometheus-example.yml").read_text())
    assert set(doc["rule_files"]) == {p.name for p in RULE_FILES}
    (job,) = doc["scrape_configs"]
    assert job["job_name"].startswith("iotrace")
    port = CONTRACT["default_port"]
    assert all(t.endswith(f":{port}") for c in job["static_configs"] for t in c["targets"])


@pytest.mark.parametrize("path", UNIT_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests(path):
    res = promtool("test", "rules", str(path.relative_to(REPO)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def _unit_cases():
    """(alertname, fires?) for every alert_rule_test case in rules/tests/."""
    for path in UNIT_FILES:
        doc = yaml.safe_load(path.read_text())
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                yield case["alertname"], bool(case.get("exp_alerts"))


def test_every_alert_has_firing_and_quiet_case():
    cases = set(_unit_cases())
    missing = []
    for rule in alerts():
        for fires in (True, False):
            if (rule["alert"], fires) not in cases:
                missing.append(f"{rule['alert']} {'firing' if fires else 'non-firing'}")
    assert not missing, "alerts without unit tests: " + ", ".join(missing)


def _runbook_anchors() -> dict[str, str]:
    """GitHub-style anchors of the runbook's '## ' sections -> heading text."""
    out = {}
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            anchor = re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")
            out[anchor] = title
    return out


def test_alerts_have_annotations_and_runbook_sections():
    anchors = _runbook_anchors()
    names = set()
    for rule in alerts():
        name = rule["alert"]
        names.add(name)
        assert name.startswith("Iotrace"), name
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert ann.get(key, "").strip(), f"{name}: no {key}"
        assert ann["runbook_url"] == f"docs/alerts.md#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no '## {name}' section in docs/alerts.md"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["labels"]["component"] == "iotrace", name
    # One section per alert, and no section for an alert that does not exist.
    assert set(anchors.values()) == names


def test_guest_alerts_describe_domain_labels():
    """Alerts about a guest name the domain, its domid and the source in their description."""
    for rule in alerts():
        if "iotrace_ioreq" in rule["expr"] or "first_seen" in rule["expr"]:
            desc = rule["annotations"]["description"]
            for label in ("domain", "domid", "source", "instance"):
                assert "$labels." + label in desc, f"{rule['alert']}: description lacks {label}"


METRIC_RE = re.compile(r"\b(iotrace_[a-z0-9_]+)\b")
RECORDED_RE = re.compile(r"\b([a-z_]+:[a-z0-9_]+(?::[a-z0-9_]+)*)\b")


def contract_names(expr: str) -> set[str]:
    """iotrace_* metric names an expression reads, histogram suffixes folded onto the family."""
    out = set()
    for name in METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_count", "_sum"):
            base = name[: -len(suffix)] if name.endswith(suffix) else None
            if base and CONTRACT["metrics"].get(base, {}).get("type") == "histogram":
                name = base
        out.add(name)
    return out


def test_rules_read_only_contract_metrics():
    unknown = set()
    for path in RULE_FILES:
        for rule in load_rules(path):
            # Recording-rule names contain iotrace_ between colons: strip them first.
            expr = RECORDED_RE.sub(" ", rule["expr"])
            unknown |= contract_names(expr) - set(CONTRACT["metrics"])
    assert not unknown, f"metrics not in rules/metrics-contract.yml: {sorted(unknown)}"


def test_recorded_series_used_are_defined():
    defined = {r["record"] for r in recordings()}
    for path in RULE_FILES:
        for rule in load_rules(path):
            used = set(RECORDED_RE.findall(rule["expr"]))
            assert used <= defined, f"{rule.get('alert') or rule.get('record')}: {used - defined}"


def test_recording_rules_keep_source_apart():
    """qemu and xentrace count the same accesses: no recording rule may sum them together."""
    for rule in recordings():
        for clause in re.findall(r"by\s*\(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in clause.split(",")}
            assert "source" in labels, f"{rule['record']}: 'by ({clause})' drops source"


# (alert file edit, unit-test file that must then fail). Each removes one guard or changes one
# threshold; a unit test that still passed would not be testing that part of the rule.
MUTANTS = [
    ("and source_domain:iotrace_ioreqs:rate1m > 50", "", "storm_test.yml"),
    ("and source_domain:iotrace_ioreqs:rate1m offset 1h", "", "storm_test.yml"),
    ("and source_domain:iotrace_ioreqs:rate1m > 2 * source_domain:iotrace_ioreqs:rate1m_avg6h",
     "", "storm_test.yml"),
    ("unless on (instance, job, source, domid, range)",
     "and on (instance, job, source, domid, range)", "probing_test.yml"),
    ("group by (instance, job, source, domid) (iotrace_ioreqs_total offset 70m)",
     "group by (instance, job, source, domid) (iotrace_ioreqs_total)", "probing_test.yml"),
    ("min by (instance, job, source, domid) (iotrace_range_first_seen_timestamp_seconds) > 3600",
     "min by (instance, job, source, domid) (iotrace_range_first_seen_timestamp_seconds) > 0",
     "probing_test.yml"),
    ("and source_domain_range:iotrace_ioreq_service_seconds:rate5m > 1", "", "slow_test.yml"),
    ('up{job=~"iotrace.*"} == 0', "up == 0", "exporter_test.yml"),
    ("expr: iotrace_source_up == 0\n        for: 2m", "expr: iotrace_source_up == 0",
     "exporter_test.yml"),
    ('iotrace_domain_class{domid="0", class="dom0-starved"}',
     'iotrace_domain_class{class="dom0-starved"}', "dom0_test.yml"),
    ('class="dom0-starved"}) == 1\n        for: 10m', 'class="dom0-starved"}) == 1\n        for: 8m',
     "dom0_test.yml"),
]


@pytest.mark.parametrize("old,new,unit", MUTANTS, ids=[f"{m[2]}:{m[0][:40]}" for m in MUTANTS])
def test_unit_tests_catch_mutants(tmp_path, old, new, unit):
    text = (RULES / "iotrace-alerts.yml").read_text()
    assert old in text, f"mutant no longer applies: {old!r}"
    (tmp_path / "tests").mkdir()
    (tmp_path / "iotrace-alerts.yml").write_text(text.replace(old, new))
    shutil.copy(RULES / "iotrace-recording.yml", tmp_path)
    shutil.copy(RULES / "tests" / unit, tmp_path / "tests")
    res = promtool("test", "rules", f"tests/{unit}", cwd=tmp_path)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr, \
        f"unit test {unit} still passes with {old!r} -> {new!r}"


def test_runbook_names_only_real_verbs():
    """Commands the runbook tells an operator to run are verbs of the iotrace CLI."""
    from iotrace.cli.main import VERBS
    text = RUNBOOK.read_text()
    verbs = set(re.findall(r"`iotrace ([a-z][a-z-]*)", text))
    assert verbs, "runbook names no iotrace command"
    assert verbs <= set(VERBS), verbs - set(VERBS)
