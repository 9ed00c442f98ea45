"""Properties of the safety rails (hypothesis): weights stay within bounds, no step is above x2,
alternating input never changes anything, and a rollback restores exactly (on Linux's real
cgroups, as root)."""
from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotrace.advise.advisor import Advisor, CgroupKnobs, DefaultKnobs, rollback
from iotrace.advise.audit import AuditLog, read_audit
from iotrace.advise.policy import KnobState, Policy
from iotrace.analysis import classify as C
from iotrace.analysis.analyzer import Analyzer
from iotrace.analysis.host import HostSample, XenDomain
from iotrace.analysis.settings import KNOB_RANGE, AdviseSettings, Bounds
from iotrace.core import events as ev
from support.advice import analysis, report
from support.fakes import FedSource, batch

CLASSES = st.sampled_from(C.CLASSES)


@st.composite
def knob_setup(draw):
    knob = draw(st.sampled_from(["xl", "cgroup"]))
    lo_k, hi_k = KNOB_RANGE[knob]
    a, b = sorted(draw(st.lists(st.integers(lo_k, hi_k), min_size=2, max_size=2)))
    original = draw(st.integers(lo_k, hi_k))
    floor = draw(st.integers(lo_k, hi_k))
    domid = draw(st.sampled_from([0, 5]))
    agree = draw(st.integers(1, 4))
    return knob, Bounds(a, b), original, floor, domid, agree


@settings(max_examples=300, deadline=None)
@given(knob_setup(), st.lists(CLASSES, min_size=1, max_size=40))
def test_steps_stay_in_bounds_at_most_x2_and_come_back_exactly(setup, classes):
    knob, bounds, original, floor, domid, agree = setup
    s = AdviseSettings(agree_intervals=agree, bounds={"xl": bounds, "cgroup": bounds},
                       dom0_floor=floor)
    pol = Policy(s, knob)
    current = original
    # the settled classes, then long enough back to normal to undo everything
    for cls in classes + [C.NORMAL] * 60:
        r = report(domid, cls)
        pol.note_interval([r])
        (d,) = pol.plan(analysis([r]), {domid: KnobState(current, original)})
        lo, hi = sorted((current, d.target))
        assert lo <= d.new <= hi                                  # towards the target, no further
        assert d.new <= 2 * current and 2 * d.new >= current     # never more than x2 per step
        assert KNOB_RANGE[knob][0] <= d.new <= KNOB_RANGE[knob][1]
        if d.target != original:                                 # an active class's target
            assert bounds.lo <= d.target <= bounds.hi or (
                knob == "xl" and domid == 0 and d.target == max(floor, bounds.clamp(d.target)))
            if knob == "xl" and domid == 0:
                assert d.target >= floor                         # Dom0's floor
        if d.changes:
            pol.note_changed(d.identity)
            current = d.new
    assert current == original                                   # back exactly


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1000, 20_000), st.integers(1, 80), st.integers(0, 1),
       st.sampled_from(["xl", "cgroup"]))
def test_alternating_input_changes_nothing(storm_rate, calm_rate, phase, knob):
    """A domain whose load flips every interval (storming, then calm) after a calm baseline:
    it is storming every other interval, never three in a row: no plan ever changes it."""
    s = AdviseSettings(interval=1.0, agree_intervals=3, min_history_seconds=3.0)
    src, an = FedSource(), Analyzer(s)
    adv = Advisor(s, DefaultKnobs(knob, "test"))
    xen = {0: XenDomain(0, "Domain-0", 2, 0.0, None), 6: XenDomain(6, "flap", 1, 0.0, "u6")}
    an.step(0.0, {}, {}, HostSample(0.0, xen=xen))
    classes = []
    for t in range(1, 25):
        flip = t > 8 and (t + phase) % 2 == 0
        n = storm_rate if flip else calm_rate
        src.feed(batch(n, 6, 0, ev.TYPE_PIO, 0x3F8, service_ns=1000))
        a = an.step(float(t), src.totals(), {}, HostSample(float(t), xen=xen))
        classes.append(a.domains[6].cls)
        res = adv.step(a)
        assert not [d for d in res.decisions if d.changes], (t, classes)
    assert C.STORMING in classes


# -- rollback on the real kernel --------------------------------------------------------------

CPU_V1 = "/sys/fs/cgroup/cpu"


def cpu_cgroup_of(pid):
    for line in open(f"/proc/{pid}/cgroup"):
        hid, ctrls, path = line.rstrip("\n").split(":", 2)
        if "cpu" in ctrls.split(","):
            return path
    return None


@pytest.fixture(scope="module")
def device_model():
    if os.geteuid() != 0:
        pytest.skip("needs root (writes cgroups)")
    if not os.path.isfile(os.path.join(CPU_V1, "cpu.shares")):
        pytest.skip("no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu on this host")
    from iotrace.probes.standin import runner as sr
    domid = 5000 + os.getpid() % 2000
    with sr.StandIn(domid, name="rollback", speed=0, hold=True, die_with_parent=True) as s:
        yield s, domid


@pytest.mark.root
@pytest.mark.parametrize("own_group", [False, True], ids=["moved", "existing-group"])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(classes=st.lists(st.sampled_from([C.STORMING, C.IO_BOUND, C.DOM0_STARVED, C.NORMAL]),
                        min_size=1, max_size=12))
def test_rollback_restores_exactly(device_model, tmp_path, own_group, classes):
    s, domid = device_model
    pid = s.pid
    start = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    home = cpu_cgroup_of(pid)
    group = None
    if own_group:          # the device model alone in a cgroup of its own, 700 shares
        group = os.path.join(CPU_V1, f"iotrace-test-{uuid.uuid4().hex[:8]}")
        os.mkdir(group)
        open(os.path.join(group, "cpu.shares"), "w").write("700")
        open(os.path.join(group, "cgroup.procs"), "w").write(str(pid))
    try:
        before_path = cpu_cgroup_of(pid)
        before_shares = open(os.path.join(CPU_V1 + before_path.rstrip("/"), "cpu.shares")).read()
        audit_path = tmp_path / f"audit-{uuid.uuid4().hex[:6]}.jsonl"
        cfg = AdviseSettings(agree_intervals=1, min_history_seconds=0.0,
                             bounds={"xl": Bounds(1, 65535), "cgroup": Bounds(1, 10000)})
        with AuditLog(str(audit_path)) as audit:
            adv = Advisor(cfg, CgroupKnobs(), apply=True, audit=audit)
            for i, cls in enumerate(classes):
                r = report(domid, cls)
                r.signals.identity = f"dm:{pid}:{start}"
                res = adv.step(analysis([r], float(i)), {domid: (pid, start)})
                assert not res.errors, res.errors
        records = read_audit(str(audit_path))
        if any(c != C.NORMAL for c in classes):
            assert records and records[0]["action"] == "set"      # something was changed
        with AuditLog(str(audit_path)) as audit:
            done = rollback(records, CgroupKnobs(), audit)
        assert all(status == "restored" for _, status, _ in done), done
        assert cpu_cgroup_of(pid) == before_path                     # back where it was
        now = open(os.path.join(CPU_V1 + before_path.rstrip("/"), "cpu.shares")).read()
        assert now == before_shares                                  # its weight, exactly
        assert not [d for d in os.listdir(CPU_V1 + before_path.rstrip("/"))
                    if d.startswith(f"iotrace-dom{domid}-")]          # advise's group removed
    finally:
        if group is not None:
            open(os.path.join(CPU_V1 + home.rstrip("/"), "cgroup.procs"), "w").write(str(pid))
            os.rmdir(group)
