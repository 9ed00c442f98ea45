"""The per-domain analysis in the exporter: LiveAnalysis beside real sources, exported by the
collector as iotrace_domain_io_wait_ratio, iotrace_domain_class, iotrace_advised_weight,
iotrace_domain_device_model_cpu_ratio and iotrace_dom0_cpu_busy_ratio."""
from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iotrace.analysis.classify import CLASSES
from iotrace.analysis.host import LocalHost
from iotrace.analysis.live import LiveAnalysis
from iotrace.analysis.settings import AdviseSettings
from iotrace.core import events as ev
from iotrace.serve.collector import IotraceCollector
from support.fakes import FedSource, batch


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def samples(col):
    out = {}
    for fam in text_string_to_metric_families(col.render_text().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_the_analysis_is_exported_per_domain_and_source():
    src = FedSource()
    src.start()
    src.add_domain(3, "web", last_seen=1e9)
    clock = Clock()
    la = LiveAnalysis([src], AdviseSettings(interval=10.0), clock=clock)
    col = IotraceCollector([src], clock=lambda: 1e9, analysis=la)
    got = samples(col)
    assert "iotrace_domain_class" not in got          # nothing before a whole interval
    la.step()
    # 10 s, 1 vCPU: 2000 synchronous requests of 500 us: waits 10% of its time: io-bound
    src.feed(batch(2000, 3, 0, ev.TYPE_PIO, 0x1F0, service_ns=500_000))
    clock.t = 10.0
    la.step()
    got = samples(col)
    (labels, value), = got["iotrace_domain_io_wait_ratio"]
    assert labels == {"source": "qemu", "domain": "web", "domid": "3"}
    assert value == pytest.approx(0.1)
    classes = {lb["class"]: v for lb, v in got["iotrace_domain_class"] if lb["domid"] == "3"}
    assert set(classes) == set(CLASSES) and classes["io-bound"] == 1 and sum(classes.values()) == 1
    dom0 = {lb["class"]: v for lb, v in got["iotrace_domain_class"] if lb["domid"] == "0"}
    assert dom0 == {"dom0-starved": 0, "normal": 1}
    weights = {(lb["domid"], lb["knob"]): v for lb, v in got["iotrace_advised_weight"]}
    # not yet settled (600 s of history needed): the defaults
    assert weights == {("3", "xl"): 256, ("3", "cgroup"): 100, ("0", "xl"): 256}
    assert "iotrace_domain_device_model_cpu_ratio" not in got    # no host sampled
    assert "iotrace_dom0_cpu_busy_ratio" not in got


def test_settled_advice_and_host_figures_with_a_real_device_model():
    """A stand-in device model (a real process with -xen-domid) and this host's /proc."""
    from iotrace.probes.standin import runner as sr
    domid = 5300 + int(time.time()) % 500
    with sr.StandIn(domid, name="busy", speed=0, loop=True, die_with_parent=True) as dm:
        src = FedSource()
        src.start()
        src.add_domain(domid, "busy", last_seen=1e9, pid=dm.pid)
        clock = Clock()
        la = LiveAnalysis([src], AdviseSettings(interval=1.0, agree_intervals=2,
                                                min_history_seconds=1.0),
                          host=LocalHost(use_xen=False), clock=clock)
        col = IotraceCollector([src], clock=lambda: 1e9, analysis=la)
        la.step()
        for i in range(1, 4):
            time.sleep(0.3)
            src.feed(batch(5000, domid, 0, ev.TYPE_PIO, 0x1F0, service_ns=100_000))
            clock.t = float(i)
            la.step()
        got = samples(col)
    (labels, cpu), = got["iotrace_domain_device_model_cpu_ratio"]
    assert labels["domid"] == str(domid) and cpu > 0          # it replays flat out
    (_, busy), = got["iotrace_dom0_cpu_busy_ratio"]
    assert 0 < busy <= 1
    weights = {(lb["domid"], lb["knob"]): v for lb, v in got["iotrace_advised_weight"]}
    # io-bound (50% of its vCPU time waiting) for 3 intervals, settled: x2 on both knobs
    assert weights[(str(domid), "xl")] == 512 and weights[(str(domid), "cgroup")] == 200


def test_a_source_that_fails_does_not_stop_the_analysis():
    good, bad = FedSource("qemu"), FedSource("xentrace")
    la = LiveAnalysis([good, bad], AdviseSettings(interval=1.0), clock=Clock())

    def broken():
        raise RuntimeError("gone")
    bad.totals = broken
    la.step()
    la.clock.t = 1.0
    la.step()
    assert set(la.latest()) == {"qemu"}


def test_a_gone_domain_leaves_the_analysis_families_with_its_grace_period():
    """The source keeps a destroyed domain's totals (so the analysis keeps a row for it); the
    exporter drops every series of it once the grace period is over, these included."""
    from iotrace.serve.settings import ExporterSettings
    src = FedSource()
    src.start()
    src.add_domain(3, "web", last_seen=1000.0)
    src.add_domain(4, "db", last_seen=1000.0)
    clock = Clock()
    la = LiveAnalysis([src], AdviseSettings(interval=10.0), clock=clock)
    now = [1000.0]
    col = IotraceCollector([src], ExporterSettings(domain_grace_seconds=60), clock=lambda: now[0],
                           analysis=la)
    la.step()
    src.feed(batch(2000, 3, 0, ev.TYPE_PIO, 0x1F0, service_ns=500_000))
    src.feed(batch(2000, 4, 0, ev.TYPE_PIO, 0x1F0, service_ns=500_000))
    clock.t = 10.0
    la.step()

    def domids(got, family):
        return {lb["domid"] for lb, _ in got.get(family, [])}
    got = samples(col)
    assert domids(got, "iotrace_domain_class") == {"0", "3", "4"}
    src.add_domain(4, "db", last_seen=1100.0)          # db still alive, web not seen since 1000
    now[0] = 1100.0
    got = samples(col)
    for family in ("iotrace_ioreqs_total", "iotrace_domain_io_wait_ratio"):
        assert domids(got, family) == {"4"}, family
    for family in ("iotrace_domain_class", "iotrace_advised_weight"):
        assert domids(got, family) == {"0", "4"}, family
