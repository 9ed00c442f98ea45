"""The labelled scenarios (iotrace.analysis.scenarios) through the analysis and the policy: each
gives the plan whose answer is known, for both knobs; all-idle and flapping give nothing."""
from __future__ import annotations

import pytest

from iotrace.advise import text
from iotrace.advise.advisor import Advisor, DefaultKnobs
from iotrace.analysis import classify as C
from iotrace.analysis import scenarios as SC
from iotrace.analysis.analyzer import Analyzer
from iotrace.analysis.timeline import windows
from support.scenarios import first_changes


def run(name: str, knob: str, settings=SC.SETTINGS):
    sc = SC.SCENARIOS[name]
    events, samples = SC.build(sc)
    names = {g.domid: g.name for g in sc.guests}
    analyzer, advisor = Analyzer(settings), Advisor(settings, DefaultKnobs(knob, "test"))
    docs, analyses = [], []
    for w in windows(events, settings.interval, None, samples, start=0.0):
        a = analyzer.step(w.t, w.totals, names, w.host)
        if a is None:
            continue
        res = advisor.step(a)
        analyses.append(a)
        docs.append(text.as_json(a, res, knob=knob, applying=False))
    return docs, analyses


@pytest.mark.parametrize("knob", ["xl", "cgroup"])
@pytest.mark.parametrize("name", list(SC.SCENARIOS))
def test_scenario_gives_the_expected_plan(name, knob):
    docs, _ = run(name, knob)
    first = first_changes(docs)
    want = SC.SCENARIOS[name].expected[knob]
    assert set(first) == set(want), (name, knob, {d: c["reason"] for d, (_, c) in first.items()})
    for dom, way in want.items():
        t, c = first[dom]
        assert (c["new"] > c["current"]) == (way == "up"), c
        assert c["new"] <= 2 * c["current"] and 2 * c["new"] >= c["current"]     # x2 at most
        # not before the hysteresis allows it: three agreeing intervals, 30 s of history
        assert t >= SC.SETTINGS.min_history_seconds
        assert c["settled"] != C.NORMAL and c["reason"]


def test_storming_plan_in_detail():
    docs, analyses = run("storming", "cgroup")
    t, c = first_changes(docs)["noisy"]
    start = SC.START * SC.INTERVAL
    # storming from the first storm interval on, acted on after 3 of them
    classes = {a.t: a.domains[4].cls for a in analyses}
    assert classes[start + 5] == C.STORMING and classes[start] == C.NORMAL
    assert t == start + 3 * SC.INTERVAL
    assert (c["current"], c["new"], c["target"]) == (100, 50, 25)
    assert "×40 its own baseline" in c["reason"] and "80% of a CPU" in c["reason"]
    # the other domains are normal throughout, never changed
    assert {a.domains[3].cls for a in analyses} == {C.NORMAL}


def test_dom0_starved_names_the_saturation_and_every_domain():
    docs, analyses = run("dom0-starved", "xl")
    t, c = first_changes(docs)["Domain-0"]
    assert (c["domid"], c["current"], c["new"]) == (0, 256, 512)
    assert "Dom0 CPU 98% busy" in c["reason"]
    for dom in ("web", "db", "mail"):
        assert dom in c["reason"]
    late = analyses[-1]
    assert late.saturated and late.dom0.cls == C.DOM0_STARVED
    assert {r.cls for r in late.domains.values()} == {C.DOM0_STARVED}


def test_io_bound_among_cpu_hogs():
    docs, analyses = run("io-bound", "xl")
    a = analyses[-1]
    assert a.domains[3].cls == C.IO_BOUND
    assert a.domains[3].signals.io_wait_ratio == pytest.approx(0.25, rel=0.1)
    assert {a.domains[4].cls, a.domains[5].cls} == {C.CPU_BOUND}
    assert first_changes(docs)["db"][1]["new"] == 512


def test_flapping_never_settles():
    _, analyses = run("flapping", "xl")
    classes = [a.domains[4].cls for a in analyses]
    assert classes.count(C.STORMING) >= 6                 # it does storm, every other interval
    assert {a.domains[4].settled for a in analyses} == {C.NORMAL}


def test_more_agreement_needed_means_later():
    settings = SC.SETTINGS.with_(agree_intervals=5)
    t, _ = first_changes(run("storming", "xl", settings)[0])["noisy"]
    assert t == SC.START * SC.INTERVAL + 5 * SC.INTERVAL
    settings = SC.SETTINGS.with_(min_history_seconds=1000.0)
    assert first_changes(run("storming", "xl", settings)[0]) == {}
