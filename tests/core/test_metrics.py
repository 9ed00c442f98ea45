"""The one metric table (iotrace.core.metrics): the collector, the contract file and the docs follow it."""
from __future__ import annotations

import re

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from iotrace.core import metrics
from iotrace.serve.collector import IotraceCollector
from iotrace.serve.settings import ExporterSettings
from support import REPO
from support.fakes import FedSource, random_batch


def test_contract_file_is_generated_from_the_table():
    text = (REPO / "rules" / "metrics-contract.yml").read_text()
    assert text == metrics.contract_yaml(), \
        "rules/metrics-contract.yml is stale: python -m iotrace.core.metrics contract > it"


def test_docs_table_is_generated_from_the_table():
    doc = (REPO / "docs" / "metrics.md").read_text()
    m = re.search(re.escape(metrics.DOC_BEGIN) + r"\n(.*?)" + re.escape(metrics.DOC_END), doc, re.S)
    assert m, "docs/metrics.md lost its generated-table markers"
    assert m.group(1) == metrics.doc_table(), \
        "docs/metrics.md's table is stale: python -m iotrace.core.metrics doc-table"


def _exposed(vcpu_label: bool) -> dict:
    src = FedSource()
    src.start()
    src.add_domain(1, "alpha", last_seen=1e9, probes=2)
    src.feed(random_batch(np.random.default_rng(0), 500, domains=(1,)))
    col = IotraceCollector([src], ExporterSettings(vcpu_label=vcpu_label), clock=lambda: 1e9)
    return {f.name: f for f in text_string_to_metric_families(col.render_text().decode())}


def test_collector_exports_exactly_the_table():
    for vcpu_label in (True, False):
        fams = _exposed(vcpu_label)
        assert set(fams) == {m.name for m in metrics.METRICS}
        for m in metrics.METRICS:
            fam = fams[m.name]
            assert fam.type == m.type and fam.documentation == m.help, m.name
            want = set(m.labels_without(() if vcpu_label else ("vcpu",)))
            for s in fam.samples:
                assert set(s.labels) - {"le"} == want, (m.name, s.labels)


def test_contract_file_reads_back_the_table():
    """The generated YAML parses back to the table: names, types, labels, helps (any text)."""
    import yaml
    doc = yaml.safe_load(metrics.contract_yaml())
    assert list(doc["metrics"]) == [m.sample for m in metrics.METRICS]
    for m in metrics.METRICS:
        entry = doc["metrics"][m.sample]
        assert entry["type"] == m.type and entry["help"] == m.summary
        assert entry["labels"] + entry.get("optional_labels", []) == \
            [lb for lb in m.labels if lb not in m.optional] + list(m.optional)
    tricky = metrics.MetricDef("iotrace_x", "gauge", (), "h", summary='a: "b" # c')
    assert yaml.safe_load(f"help: {metrics.json.dumps(tricky.summary)}")["help"] == tricky.summary


def test_table_follows_the_naming_conventions():
    for m in metrics.METRICS:
        assert m.name.startswith("iotrace_") and m.type in ("counter", "gauge", "histogram")
        assert not m.name.endswith("_total"), "counters are declared without _total"
        assert set(m.optional) <= set(m.labels)
        assert "addr" not in m.labels and "pid" not in m.labels      # bounded labels only
        assert m.help and m.summary
