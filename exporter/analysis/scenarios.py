"""Labelled scenarios for ``iotrace advise``: recordings whose right answer is known.

Each scenario is an iotrace recording (``iotrace.offline.recording.RecordingWriter``) of a few
domains' I/O requests, interval by interval, with the host's own figures of the same moments in
its metadata (``host_samples``: Dom0's CPU, PSI pressure, each device model's CPU, ``xl list``
vCPUs, CPU seconds and UUIDs), so ``iotrace advise --replay FILE`` sees what it would have seen
live. ``SCENARIOS`` says what advise must plan for each (tests/analysis and tests/cli check it):

* ``dom0-starved``: three steady guests; from t=60 s Dom0's CPU is saturated and every guest's
  service times rise x5: Dom0's credit2 weight up (xl), every device model up (cgroup);
* ``storming``: three guests at ~50 req/s; from t=60 s ``noisy`` sends 2,000 req/s and its
  device model burns 80% of a CPU: ``noisy`` down (both knobs), nobody else;
* ``io-bound``: ``db`` waits on emulation 25% of its vCPU time among two CPU hogs (vCPUs 100%
  busy, almost no I/O): ``db`` up, the hogs unchanged;
* ``idle``: three guests at 0.2 req/s: no change;
* ``flapping``: ``flappy`` storms every other interval: it never holds a class for three
  intervals in a row: no change.

Write them with ``python -m iotrace.analysis.scenarios OUTDIR`` (one ``NAME.iotrec`` each), then
e.g. ``iotrace advise --replay OUTDIR/storming.iotrec --config OUTDIR/advise.yaml``: the
scenarios use a 5 s interval and 30 s of minimum history (``SETTINGS``, also written as
``advise.yaml``) so that they are short.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iotrace.analysis.host import CpuTimes, HostSample, XenDomain
from iotrace.analysis.settings import AdviseSettings
from iotrace.core import events as ev

INTERVAL = 5.0
SETTINGS = AdviseSettings(interval=INTERVAL, agree_intervals=3, min_history_seconds=30.0,
                          baseline_window_seconds=600.0)
SETTINGS_YAML = """\
# The settings the labelled scenarios of iotrace.analysis.scenarios are made for.
advise:
  interval: 5
  agree_intervals: 3
  min_history_seconds: 30
  baseline_window_seconds: 600
"""
NCPU = 2
COM1, IDE_DATA, IDE_STATUS = 0x3F8, 0x1F0, 0x1F7


@dataclass
class Guest:
    name: str
    domid: int
    vcpus: int
    # interval index -> (requests/s, mean service time ns, device-model CPU share, vCPU busy share)
    profile: object
    port: int = COM1


@dataclass
class Scenario:
    name: str
    description: str
    guests: list
    dom0: object                          # interval index -> (busy share, pressure share)
    intervals: int
    # knob -> {domain name: "up" | "down"}: the domains advise must change, and which way;
    # every other domain must keep its weight.
    expected: dict = field(default_factory=dict)
    seed: int = 1


def _steady(rate, svc_ns, dm=0.05, cpu=0.2):
    return lambda k: (rate, svc_ns, dm, cpu)


def _after(k0, before, after):
    return lambda k: after(k) if k >= k0 else before(k)


START = 12            # the interval where things change: t = 60 s

SCENARIOS = {
    "dom0-starved": Scenario(
        "dom0-starved", "Dom0 saturated, every guest's service times up x5",
        [Guest("web", 3, 2, _after(START, _steady(300, 20_000), _steady(300, 100_000))),
         Guest("db", 4, 2, _after(START, _steady(200, 30_000), _steady(200, 150_000)),
               IDE_STATUS),
         Guest("mail", 5, 1, _after(START, _steady(100, 25_000), _steady(100, 125_000)))],
        lambda k: (0.98, 0.70) if k >= START else (0.40, 0.02), 30,
        {"xl": {"Domain-0": "up"}, "cgroup": {"web": "up", "db": "up", "mail": "up"}}),
    "storming": Scenario(
        "storming", "noisy goes from 50 to 2,000 req/s; its device model burns a CPU",
        [Guest("web", 3, 2, _steady(50, 20_000)),
         Guest("noisy", 4, 2, _after(START, _steady(50, 20_000, 0.02),
                                     _steady(2000, 20_000, 0.80))),
         Guest("mail", 5, 1, _steady(40, 25_000), IDE_STATUS)],
        lambda k: (0.55, 0.05), 26,
        {"xl": {"noisy": "down"}, "cgroup": {"noisy": "down"}}),
    "io-bound": Scenario(
        "io-bound", "db waits on emulation 25% of its vCPU time, among two CPU hogs",
        [Guest("db", 3, 1, _steady(2000, 125_000, 0.30, 0.35), IDE_DATA),
         Guest("hog1", 4, 2, _steady(2, 15_000, 0.01, 1.00)),
         Guest("hog2", 5, 2, _steady(2, 15_000, 0.01, 1.00))],
        lambda k: (0.60, 0.10), 16,
        {"xl": {"db": "up"}, "cgroup": {"db": "up"}}),
    "idle": Scenario(
        "idle", "three guests at 0.2 req/s",
        [Guest("web", 3, 2, _steady(0.2, 20_000, 0.001, 0.01)),
         Guest("db", 4, 2, _steady(0.2, 20_000, 0.001, 0.01)),
         Guest("mail", 5, 1, _steady(0.2, 20_000, 0.001, 0.01))],
        lambda k: (0.05, 0.0), 24, {"xl": {}, "cgroup": {}}),
    "flapping": Scenario(
        "flapping", "flappy storms every other interval",
        [Guest("web", 3, 2, _steady(50, 20_000)),
         Guest("flappy", 4, 2, lambda k: (2000, 20_000, 0.80, 0.5) if k >= START and k % 2
               else (50, 20_000, 0.02, 0.2))],
        lambda k: (0.50, 0.05), 30, {"xl": {}, "cgroup": {}}),
}


def uuid_of(domid: int) -> str:
    return f"00000000-0000-4000-8000-{domid:012x}"


def build(sc: Scenario) -> tuple[np.ndarray, list[HostSample]]:
    """The scenario's events (time order) and its host samples (one per interval boundary)."""
    rng = np.random.default_rng(sc.seed)
    parts = []
    busy = total = steal = 0.0
    pressure_us = 0
    dm_cpu = {g.domid: 0.0 for g in sc.guests}
    vcpu_s = {g.domid: 0.0 for g in sc.guests}
    dom0_s = 0.0
    samples = []

    def sample(t):
        xen = {0: XenDomain(0, "Domain-0", NCPU, dom0_s, uuid_of(0))}
        for g in sc.guests:
            xen[g.domid] = XenDomain(g.domid, g.name, g.vcpus, vcpu_s[g.domid], uuid_of(g.domid))
        return HostSample(t, CpuTimes(busy, total, steal), NCPU, pressure_us, dict(dm_cpu),
                          {g.domid: f"dm:{10_000 + g.domid}:{4242 + g.domid}" for g in sc.guests},
                          xen)

    samples.append(sample(0.0))
    for k in range(sc.intervals):
        t0 = k * INTERVAL
        b, p = sc.dom0(k)
        busy += b * INTERVAL * NCPU
        total += INTERVAL * NCPU
        dom0_s += b * INTERVAL * NCPU
        pressure_us += int(p * INTERVAL * 1e6)
        for g in sc.guests:
            rate, svc, dm, cpu = g.profile(k)
            dm_cpu[g.domid] += dm * INTERVAL
            vcpu_s[g.domid] += cpu * INTERVAL * g.vcpus
            n = int(rng.poisson(rate * INTERVAL))
            if not n:
                continue
            b_ = ev.empty(n)
            b_["ts_ns"] = np.sort(rng.integers(int(t0 * 1e9), int((t0 + INTERVAL) * 1e9), n))
            b_["domid"] = g.domid
            b_["vcpu"] = rng.integers(0, g.vcpus, n)
            b_["type"] = ev.TYPE_PIO
            b_["dir"] = ev.DIR_READ if g.port != COM1 else ev.DIR_WRITE
            b_["addr"] = g.port
            b_["size"] = 1
            b_["service_ns"] = np.maximum(rng.lognormal(np.log(svc), 0.3, n), 1).astype(np.int64)
            parts.append(b_)
        samples.append(sample((k + 1) * INTERVAL))
    events = ev.concat(parts)
    if len(events):
        events = events[np.argsort(events["ts_ns"], kind="stable")]
    return events, samples


def write(sc: Scenario, path: str | Path) -> Path:
    from iotrace.offline.recording import RecordingWriter
    events, samples = build(sc)
    meta = {"source": "scenario", "scenario": sc.name, "description": sc.description,
            "domains": {g.domid: g.name for g in sc.guests},
            "host_samples": [s.to_json() for s in samples]}
    with RecordingWriter(str(path), meta) as w:
        w.write(events)
    return Path(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m iotrace.analysis.scenarios",
                                description="write the labelled scenarios of iotrace advise")
    p.add_argument("outdir", type=Path)
    p.add_argument("names", nargs="*", default=[], metavar="NAME",
                   help=f"scenarios to write (default: all of {', '.join(SCENARIOS)})")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r} (expected one of: {', '.join(SCENARIOS)})")
    args.outdir.mkdir(parents=True, exist_ok=True)
    (args.outdir / "advise.yaml").write_text(SETTINGS_YAML)
    for name in args.names or SCENARIOS:
        path = write(SCENARIOS[name], args.outdir / f"{name}.iotrec")
        print(f"{path}: {SCENARIOS[name].description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
