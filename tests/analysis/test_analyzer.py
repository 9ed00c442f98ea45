"""The analysis over time (iotrace.analysis.analyzer): identities, baselines, hysteresis."""
from __future__ import annotations

from iotrace.analysis import classify as C
from iotrace.analysis.analyzer import Analyzer
from iotrace.analysis.host import HostSample, XenDomain
from iotrace.analysis.settings import AdviseSettings
from iotrace.core import events as ev
from support.fakes import FedSource, batch

SETTINGS = AdviseSettings(interval=1.0, agree_intervals=3, min_history_seconds=5.0)


class Host:
    """Host samples of a Xen host whose domains the test creates and destroys."""

    def __init__(self):
        self.doms = {0: XenDomain(0, "Domain-0", 2, 0.0, "00000000-0000-0000-0000-000000000000")}

    def sample(self, t, dm_cpu=None):
        return HostSample(t, xen=dict(self.doms), dm_cpu=dict(dm_cpu or {}),
                          dm_ident={d: f"dm:{100 + d}:1" for d in self.doms if d})


def feed_rate(src, domid, n, t):
    src.feed(batch(n, domid, 0, ev.TYPE_PIO, 0x3F8, service_ns=20_000, ts_ns=int(t * 1e9)))


def test_a_reused_domid_is_a_new_domain():
    src, host, an = FedSource(), Host(), Analyzer(SETTINGS)
    host.doms[7] = XenDomain(7, "old", 1, 0.0, "aaaaaaaa-0000-4000-8000-000000000007")
    an.step(0.0, src.totals(), {}, host.sample(0.0))
    reports = []
    for t in range(1, 10):
        feed_rate(src, 7, 100, t)
        reports.append(an.step(float(t), src.totals(), {}, host.sample(float(t))).domains[7])
    assert reports[-1].history_s == 9.0 and reports[-1].base_rate is not None
    # domain 7 destroyed, a new guest created with the same domid: another UUID
    host.doms[7] = XenDomain(7, "new", 1, 0.0, "bbbbbbbb-0000-4000-8000-000000000007")
    feed_rate(src, 7, 100, 10)
    r = an.step(10.0, src.totals(), {}, host.sample(10.0)).domains[7]
    assert r.signals.identity == "uuid:bbbbbbbb-0000-4000-8000-000000000007"
    assert r.signals.name == "new"
    assert r.history_s == 1.0 and r.base_rate is None and r.streak == 1   # all history gone


def test_storming_needs_a_baseline_and_stays_while_settled():
    src, host, an = FedSource(), Host(), Analyzer(SETTINGS)
    host.doms[4] = XenDomain(4, "noisy", 1, 0.0, "cccccccc-0000-4000-8000-000000000004")
    an.step(0.0, src.totals(), {}, host.sample(0.0, {4: 0.0}))
    dm = 0.0
    out = []

    def step(t, n, dm_share):
        nonlocal dm
        dm += dm_share
        feed_rate(src, 4, n, t)
        r = an.step(float(t), src.totals(), {}, host.sample(float(t), {4: dm})).domains[4]
        out.append(r)
        return r

    assert step(1, 5000, 0.9).cls != C.STORMING          # no baseline yet: never storming
    for t in range(2, 8):
        step(t, 50, 0.01)
    for t in range(8, 12):
        r = step(t, 5000, 0.9)
    assert r.cls == C.STORMING and r.settled == C.STORMING
    assert r.base_rate == 50                              # the storm is not in its own baseline
    # lowered, its device model gets less CPU and its rate halves: still storming (settled),
    # which a fresh domain with these figures would not be
    r = step(12, 2000, 0.1)
    assert r.cls == C.STORMING and "priority was lowered" in r.verdict.reason()
    r = step(13, 200, 0.01)                              # really calm now
    assert r.cls == C.NORMAL


def test_settling_needs_agreement_and_history():
    src, host, an = FedSource(), Host(), Analyzer(SETTINGS.with_(min_history_seconds=4.0))
    host.doms[5] = XenDomain(5, "db", 1, 0.0, "dddddddd-0000-4000-8000-000000000005")
    an.step(0.0, src.totals(), {}, host.sample(0.0))
    settled = []
    for t in range(1, 8):
        # 10 000 requests of 20 us in 1 s on 1 vCPU: waits 20% of its time: io-bound
        feed_rate(src, 5, 10_000, t)
        settled.append(an.step(float(t), src.totals(), {}, host.sample(float(t))).domains[5].settled)
    # io-bound from the first interval, but settled only with 4 s of history
    assert settled == [C.NORMAL] * 3 + [C.IO_BOUND] * 4


def test_domains_without_io_come_from_xl_and_dom0_is_reported():
    src, host, an = FedSource(), Host(), Analyzer(SETTINGS)
    host.doms[9] = XenDomain(9, "hog", 2, 0.0, "eeeeeeee-0000-4000-8000-000000000009")
    an.step(0.0, src.totals(), {}, host.sample(0.0))
    host.doms[9] = XenDomain(9, "hog", 2, 2.0, "eeeeeeee-0000-4000-8000-000000000009")
    a = an.step(1.0, src.totals(), {}, host.sample(1.0))
    assert a.domains[9].cls == C.CPU_BOUND                # 2 s of CPU in 1 s on 2 vCPUs
    assert a.dom0.signals.domid == 0 and a.dom0.signals.name == "Domain-0"
    assert a.dom0.signals.identity == "uuid:00000000-0000-0000-0000-000000000000"


def test_io_bound_is_left_at_half_its_threshold():
    """Promoted, an I/O-bound domain waits less: between half the threshold and the threshold it
    stays io-bound (settled), below half it is normal again."""
    src, host, an = FedSource(), Host(), Analyzer(SETTINGS.with_(min_history_seconds=2.0))
    host.doms[5] = XenDomain(5, "db", 1, 0.0, "dddddddd-0000-4000-8000-000000000005")
    an.step(0.0, src.totals(), {}, host.sample(0.0))
    got = []
    # waits per interval (1 s, 1 vCPU): 20% x4 (settles), 7% x3 (stays), 3% x3 (leaves)
    for t, n in enumerate([10_000] * 4 + [3500] * 3 + [1500] * 3, 1):
        feed_rate(src, 5, n, t)
        r = an.step(float(t), src.totals(), {}, host.sample(float(t))).domains[5]
        got.append((r.cls, r.settled))
    assert got[3] == (C.IO_BOUND, C.IO_BOUND)
    assert got[4:7] == [(C.IO_BOUND, C.IO_BOUND)] * 3
    assert [c for c, _ in got[7:]] == [C.NORMAL] * 3 and got[-1][1] == C.NORMAL
    # a domain that never settled is not io-bound at 7%
    fresh = Analyzer(SETTINGS)
    src2 = FedSource()
    fresh.step(0.0, src2.totals(), {}, host.sample(0.0))
    feed_rate(src2, 5, 3500, 1)
    assert fresh.step(1.0, src2.totals(), {}, host.sample(1.0)).domains[5].cls == C.NORMAL
