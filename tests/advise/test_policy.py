"""The plan (iotrace.advise.policy) and the priorities it follows (iotrace.analysis.priorities):
the factor table, Dom0 first and its floor, bounds, exclusions, holds with reasons, caps."""
from __future__ import annotations

from iotrace.advise.policy import KnobState, Policy
from iotrace.analysis import classify as C
from iotrace.analysis.priorities import advised_weight, factor, step_towards, target_weight
from iotrace.analysis.settings import AdviseSettings, Bounds, DomainRule
from support.advice import analysis, report


def test_factor_table():
    assert factor("xl", 5, C.STORMING) == 0.25 and factor("cgroup", 5, C.STORMING) == 0.25
    assert factor("xl", 5, C.IO_BOUND) == 2 and factor("cgroup", 5, C.IO_BOUND) == 2
    assert factor("xl", 5, C.DOM0_STARVED) == 1 and factor("xl", 0, C.DOM0_STARVED) == 2
    assert factor("cgroup", 5, C.DOM0_STARVED) == 2
    for cls in C.NEUTRAL:
        assert factor("xl", 5, cls) == factor("cgroup", 5, cls) == factor("xl", 0, cls) == 1


def test_targets_steps_and_floor():
    b = Bounds(32, 4096)
    assert target_weight("xl", 5, C.STORMING, 256, b) == 64
    assert target_weight("xl", 5, C.STORMING, 100, b) == 32           # clamped to its bound
    assert target_weight("xl", 5, C.NORMAL, 9000, b) == 9000          # the original, exactly
    assert target_weight("xl", 0, C.DOM0_STARVED, 100, b, dom0_floor=512) == 512
    assert step_towards(256, 64) == 128 and step_towards(128, 64) == 64
    assert step_towards(100, 1000) == 200 and step_towards(7, 7) == 7 and step_towards(3, 1) == 2


def test_dom0_comes_first_and_guests_keep_their_order():
    s = AdviseSettings(agree_intervals=1)
    pol = Policy(s, "xl")
    reps = [report(5, C.STORMING), report(0, C.DOM0_STARVED), report(3, C.IO_BOUND)]
    pol.note_interval(reps)
    plan = pol.plan(analysis(reps), {d: KnobState(256, 256) for d in (0, 3, 5)})
    assert [d.domid for d in plan] == [0, 3, 5]
    assert [(d.current, d.new) for d in plan] == [(256, 512), (256, 512), (256, 128)]


def test_holds_say_why():
    s = AdviseSettings(agree_intervals=3, min_history_seconds=600)
    pol = Policy(s, "cgroup")
    young = report(4, C.STORMING, settled=C.NORMAL, streak=3, history=100)
    wavering = report(5, C.STORMING, settled=C.NORMAL, streak=1)
    pol.note_interval([young, wavering])
    a, b = pol.plan(analysis([young, wavering]), {4: KnobState(100, 100), 5: KnobState(100, 100)})
    assert not a.changes and "history 100 s of the 600 s needed" in a.reason
    assert not b.changes and "for 1 of 3 intervals" in b.reason
    # after a step, the next one waits agree_intervals intervals
    r = report(6, C.STORMING)
    pol.note_interval([r])
    (d,) = pol.plan(analysis([r]), {6: KnobState(100, 100)})
    assert (d.new, d.target) == (50, 25)
    pol.note_changed(d.identity)
    for i in range(3):
        pol.note_interval([r])
        (d,) = pol.plan(analysis([r]), {6: KnobState(50, 100)})
        assert d.changes == (i == 2), d.reason
    assert "storming for 3 intervals" in d.reason


def test_excluded_and_bounded_domains():
    s = AdviseSettings(agree_intervals=1, domains={
        "dom4": DomainRule(exclude=True),
        "dom5": DomainRule(bounds={"cgroup": Bounds(80, 120)})})
    pol = Policy(s, "cgroup")
    reps = [report(4, C.STORMING), report(5, C.STORMING), report(6, C.IO_BOUND)]
    pol.note_interval(reps)
    a, b, c = pol.plan(analysis(reps), {d: KnobState(100, 100) for d in (4, 5, 6)})
    assert not a.changes and "excluded" in a.reason
    assert (b.new, b.target) == (80, 80)
    assert (c.new, c.target) == (200, 200)
    assert advised_weight("cgroup", reps[0], s) == 100          # excluded: the default
    assert advised_weight("cgroup", reps[1], s) == 80
    assert advised_weight("xl", reps[2], s) == 512


def test_caps_only_when_allowed_and_after_the_weight():
    s = AdviseSettings(agree_intervals=1, storm_cap=40)
    r = report(5, C.STORMING)
    for allow in (False, True):
        pol = Policy(s, "xl", allow_caps=allow)
        pol.note_interval([r])
        plan = pol.plan(analysis([r]), {5: KnobState(256, 256, cap=0, original_cap=0)})
        assert [d.knob for d in plan] == (["xl-weight", "xl-cap"] if allow else ["xl-weight"])
        if allow:
            assert not plan[1].changes and "waits until the weight" in plan[1].reason
    pol = Policy(s, "xl", allow_caps=True)
    pol.note_interval([r])
    w, cap = pol.plan(analysis([r]), {5: KnobState(64, 256, cap=0, original_cap=0)})
    assert not w.changes and (cap.current, cap.new) == (0, 40)
    calm = report(5, C.NORMAL)
    pol.note_interval([calm])
    w, cap = pol.plan(analysis([calm]), {5: KnobState(64, 256, cap=40, original_cap=0)})
    assert (w.new, cap.new) == (128, 0)                      # both back towards the original
