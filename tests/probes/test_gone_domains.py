"""Device models that go away (issue #12, item 1): a domain keeps its series, at their final values,
for the exporter's ``domain_grace_seconds``; no counter goes down while its series exist, and
``iotrace_source_events_total{source="qemu"}`` never does.

Real ``iotrace serve --source qemu`` processes, real stand-ins killed with real signals, direct
scrapes every half second. Each test builds a private copy of the stand-in (its own inode), so
stand-ins of other tests and users do not mix in; domain ids 78x are this module's.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

import pytest

from iotrace.probes.live import QemuProbeSource
from iotrace.probes.standin import runner as sr
from support.exposition import samples as _samples
from support.exposition import scrape as _scrape
from support.exposition import start_serve, stop_serve
from support.procs import wait_until as _wait

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={out}"], check=True)
    return str(out / "iotrace-standin")


def _start(exe, domid, truth, name):
    return subprocess.Popen(sr.command(domid, sr.BUNDLED_STREAM, exe=exe, name=name, speed=0.0,
                                       hold=True, truth=truth),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _truth_total(path) -> int:
    return sum(r["count"] for r in json.loads(path.read_text())["io"])


class Scrapes:
    """Scrape every ``interval`` s, recording the domain's request total, whether its series
    exist, and the source's event counter; ``check()`` asserts no counter went down."""

    def __init__(self, port, domid):
        self.port, self.domid = port, str(domid)
        self.rows: list[tuple[float, float | None, float]] = []    # t, domain total, events

    def take(self) -> tuple[float | None, float]:
        text = _scrape(self.port)
        listed = bool(_samples(text, "iotrace_domain_info", domid=self.domid))
        total = sum(_samples(text, "iotrace_ioreqs_total", domid=self.domid)) if listed else None
        events = _samples(text, "iotrace_source_events_total", source="qemu")[0]
        self.rows.append((time.monotonic(), total, events))
        return total, events

    def during(self, seconds, interval=0.5) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.take()
            time.sleep(interval)

    def check(self) -> None:
        ev = [e for _, _, e in self.rows]
        assert all(b >= a for a, b in zip(ev, ev[1:])), ev
        tot = [t for _, t, _ in self.rows]
        for a, b in zip(tot, tot[1:]):
            assert a is None or b is None or b >= a, tot


def _serve(tmp_path, exe, grace):
    cfg = tmp_path / "iotrace.yaml"
    cfg.write_text(f"exporter:\n  domain_grace_seconds: {grace}\n")
    return start_serve(tmp_path, "--binary", exe, "--config", str(cfg), "--log-level", "info")


def _stop(p, log) -> str:
    return stop_serve(p, log)


def test_a_killed_device_model_keeps_its_series_for_the_grace_period(tmp_path, standin):
    """The repro of the issue: a stand-in serves a burst and holds; it is killed 4 s later. Its
    domain's series stay, at their final values, for the grace period (8 s here), then go, with
    a log line; the source's event counter never falls."""
    grace = 8
    serve, port, log = _serve(tmp_path, standin, grace)
    truth = tmp_path / "a.json"
    dm = _start(standin, 781, truth, "victim")
    s = Scrapes(port, 781)
    try:
        assert _wait(truth.exists, 30)
        want = _truth_total(truth)
        assert _wait(lambda: s.take()[0] == want, 30), s.rows[-3:]
        s.during(4)
        events_before = s.take()[1]
        dm.send_signal(signal.SIGKILL)
        dm.wait()
        killed = time.monotonic()
        s.during(grace - 2.5)                       # well inside the grace period
        inside = [t for at, t, _ in s.rows if at > killed]
        assert inside and all(t == want for t in inside), inside
        assert _wait(lambda: s.take()[0] is None, grace + 20, 0.5), s.rows[-3:]
        gone_after = s.rows[-1][0] - killed
        assert grace - 1 <= gone_after <= grace + 15, gone_after
        assert s.take()[1] >= events_before
        s.check()
    finally:
        dm.kill()
        dm.wait()
        err = _stop(serve, log)
    assert "Traceback" not in err
    assert "source qemu: domain 781 gone for more than 8s: its series are dropped" in err, err


def test_a_domain_whose_device_model_restarts_keeps_counting_up(tmp_path, standin):
    """A domain's device model killed and another started for the same domain within the grace
    period: its counters continue from the first one's totals (first + second), never down."""
    serve, port, log = _serve(tmp_path, standin, 30)
    ta, tb = tmp_path / "a.json", tmp_path / "b.json"
    a = _start(standin, 782, ta, "phoenix")
    b = None
    s = Scrapes(port, 782)
    try:
        assert _wait(ta.exists, 30)
        first = _truth_total(ta)
        assert _wait(lambda: s.take()[0] == first, 30), s.rows[-3:]
        a.send_signal(signal.SIGKILL)
        a.wait()
        s.during(2)
        b = _start(standin, 782, tb, "phoenix")
        assert _wait(tb.exists, 30)
        both = first + _truth_total(tb)
        assert _wait(lambda: s.take()[0] == both, 30), (s.rows[-3:], both)
        b.send_signal(signal.SIGKILL)
        b.wait()
        s.during(3)
        assert s.rows[-1][1] == both
        s.check()
    finally:
        for p in (a, b):
            if p is not None:
                p.kill()
                p.wait()
        err = _stop(serve, log)
    assert "Traceback" not in err


def test_the_source_frees_the_kernel_map_and_keeps_the_totals(tmp_path, standin):
    """In the source itself: a gone device model's entries leave the kernel map at once (room in
    the bounded map; a reused pid starts afresh), its totals stay in totals() and stats().events
    for retain_seconds, then the domain and its cells are dropped together."""
    src = QemuProbeSource(binaries=[standin], defaults=False, strict=True, keep_addr=False,
                          retain_seconds=3.0)
    src.start()
    truth = tmp_path / "t.json"
    dm = _start(standin, 783, truth, "mapped")
    try:
        assert _wait(truth.exists, 30)
        want = _truth_total(truth)

        def mine():
            return sum(c.count for k, c in src.totals().items() if k.domid == 783)

        def tgids():
            return {k.tgid for ps in src.sets for k, _ in ps.stats_items()}

        assert _wait(lambda: mine() == want, 30)
        events = src.stats().events
        dm.send_signal(signal.SIGKILL)
        dm.wait()
        assert _wait(lambda: mine() == want and dm.pid not in tgids(), 5, 0.1), tgids()
        assert 783 in src.domains() and src.domains()[783].name == "mapped"
        assert src.stats().events == events
        assert _wait(lambda: 783 not in src.domains(), 10, 0.2)
        assert mine() == 0 and src.stats().events == events
        per_key = Counter(k.range for k, c in src.totals().items() if k.domid == 783)
        assert not per_key
    finally:
        dm.kill()
        dm.wait()
        src.stop()


def test_retired_cells_are_bounded(tmp_path, standin, monkeypatch):
    """Past MAX_RETIRED keys (the kernel map's size; 8 here) the final totals of a gone device
    model are kept per range without their address: the counts stay exact."""
    from iotrace.probes import live
    monkeypatch.setattr(live, "MAX_RETIRED", 8)
    src = QemuProbeSource(binaries=[standin], defaults=False, strict=True, keep_addr=True,
                          retain_seconds=60.0)
    src.start()
    truth = tmp_path / "t.json"
    dm = _start(standin, 784, truth, "many")
    try:
        assert _wait(truth.exists, 30)
        want = _truth_total(truth)

        def mine():
            return {k: c.count for k, c in src.totals().items() if k.domid == 784}

        assert _wait(lambda: sum(mine().values()) == want, 30)
        before = mine()
        assert len(before) > 8
        by_range = Counter()
        for k, n in before.items():
            by_range[(k.vcpu, k.type, k.dir, k.range)] += n
        dm.send_signal(signal.SIGKILL)
        dm.wait()
        assert _wait(lambda: len(mine()) < len(before), 5, 0.1)
        after = mine()
        assert sum(after.values()) == want
        assert 0 < sum(1 for k in after if k.addr) <= 8             # the first keep theirs
        assert len(after) <= 8 + len(by_range)
        got = Counter()
        for k, n in after.items():
            got[(k.vcpu, k.type, k.dir, k.range)] += n
        assert got == by_range
    finally:
        dm.kill()
        dm.wait()
        src.stop()
