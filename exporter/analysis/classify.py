"""One class per domain and interval, with the reasons in words.

The classes, in the order they are decided (the first that applies wins):

* ``storming``: the request rate is far above the domain's own baseline (``storm_factor`` times
  the median of its earlier non-storming intervals), at least ``storm_min_rate``, and its device
  model burns Dom0 CPU for it (at least ``storm_dm_cpu`` of a CPU, where that is known). A domain
  without a baseline yet is never storming. Once storming is its settled class, it stays
  storming down to half those rates, whatever its (now lowered) device model CPU.
* ``dom0-starved``: Dom0's CPU is saturated (busy share, steal included, or PSI pressure) and
  the p95 service time of *every* active, non-storming domain with a baseline rose to at least
  ``starved_rise`` times its own baseline: the device models are slow because Dom0 is, not
  because of one guest. Dom0 itself gets this class too (``DOM0``).
* ``idle``: fewer than ``idle_rate`` requests/s (and, where Xen tells, little CPU);
* ``io-bound``: its vCPUs spend at least ``io_wait`` of their time waiting for emulation;

Each class advise acts on is entered at its threshold and left at a looser one once it is the
settled class (storming at half the rates, io-bound at half the wait share, Dom0-starved at half
the rise): acting on a domain changes its signals, and that must not make it flap.

* ``cpu-bound``: its vCPUs are busy (``xl list``: at least ``cpu_bound`` per vCPU) and it
  waits little for I/O;
* ``normal``: active, neither bound.

The label values are these six names (``CLASSES``): bounded by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

from iotrace.analysis.settings import Thresholds
from iotrace.analysis.signals import DomainSignals, HostSignals

IDLE, CPU_BOUND, IO_BOUND, STORMING, DOM0_STARVED, NORMAL = (
    "idle", "cpu-bound", "io-bound", "storming", "dom0-starved", "normal")
CLASSES = (IDLE, CPU_BOUND, IO_BOUND, STORMING, DOM0_STARVED, NORMAL)
# Classes that call for no change of priority: a domain returns to its original weight.
NEUTRAL = (IDLE, CPU_BOUND, NORMAL)
DOM0 = 0


@dataclass
class Verdict:
    cls: str
    reasons: list

    def reason(self) -> str:
        return "; ".join(self.reasons)


def fmt_rate(r: float) -> str:
    return f"{r:,.0f} req/s" if r >= 10 else f"{r:.1f} req/s"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def storm_verdict(sig: DomainSignals, base_rate: float | None, th: Thresholds,
                  sticky: bool = False) -> Verdict | None:
    """``storming`` with its reasons, or None.

    ``sticky``: the domain's settled class is already storming. Its priority was lowered for it,
    so its device model now gets less CPU and its rate may drop: it stays storming while its
    rate is at least half the entry threshold, whatever CPU its device model still gets
    (entering and leaving at different thresholds, so the feedback cannot make it flap)."""
    if base_rate is None:
        return None
    factor = th.storm_factor / 2 if sticky else th.storm_factor
    floor = th.storm_min_rate / 2 if sticky else th.storm_min_rate
    if sig.rate < floor or sig.rate < factor * max(base_rate, 1e-9):
        return None
    if not sticky and sig.dm_cpu_ratio is not None and sig.dm_cpu_ratio < th.storm_dm_cpu:
        return None
    times = sig.rate / base_rate if base_rate > 0 else float("inf")
    why = [f"{fmt_rate(sig.rate)} = ×{times:,.0f} its own baseline {fmt_rate(base_rate)}"]
    if sig.dm_cpu_ratio is not None:
        why.append(f"its device model uses {pct(sig.dm_cpu_ratio)} of a CPU")
    else:
        why.append("device-model CPU unknown here")
    if sticky:
        why.append("still storming since its priority was lowered")
    return Verdict(STORMING, why)


def is_active(sig: DomainSignals, th: Thresholds) -> bool:
    return sig.rate >= th.idle_rate


def rise_threshold(th: Thresholds, sticky: bool) -> float:
    """The p95 rise that makes Dom0-starved; once settled, half as far above 1 keeps it."""
    return 1 + (th.starved_rise - 1) / 2 if sticky else th.starved_rise


def rose(sig: DomainSignals, base_p95: float | None, th: Thresholds,
         sticky: bool = False) -> bool | None:
    """Whether the domain's p95 rose to ``starved_rise`` x its baseline (None: cannot tell)."""
    if sig.p95_s is None or base_p95 is None or base_p95 <= 0:
        return None
    return sig.p95_s >= rise_threshold(th, sticky) * base_p95


def starved_verdict(host: HostSignals, rising: dict[int, tuple], th: Thresholds) -> Verdict | None:
    """The host-wide ``dom0-starved`` verdict, or None.

    ``rising``: domid -> (name, p95, baseline p95, rose?) of every active, non-storming domain
    whose p95 could be compared with its baseline."""
    sat = host.saturated(th.dom0_busy, th.dom0_pressure)
    if not sat or not rising or not all(r[3] for r in rising.values()):
        return None
    what = []
    if host.busy_ratio is not None:
        what.append(f"Dom0 CPU {pct(host.busy_ratio)} busy"
                    + (f" ({pct(host.steal_ratio)} stolen by Xen)"
                       if host.steal_ratio and host.steal_ratio >= 0.01 else ""))
    if host.pressure_ratio is not None:
        what.append(f"CPU pressure {pct(host.pressure_ratio)}")
    slow = ", ".join(f"{name} p95 {fmt_seconds(p)} (×{p / b:.1f})"
                     for name, p, b, _ in sorted(rising.values()))
    return Verdict(DOM0_STARVED, [" and ".join(what),
                                  f"service times up for every active domain: {slow}"])


def plain_verdict(sig: DomainSignals, th: Thresholds, sticky_io: bool = False) -> Verdict:
    """idle, io-bound, cpu-bound or normal. ``sticky_io``: io-bound is the domain's settled
    class: it stays io-bound down to half the ``io_wait`` threshold (its raised priority shortens
    its waits, which must not make it flap)."""
    if not is_active(sig, th) and (sig.cpu_ratio is None or sig.cpu_ratio < th.cpu_bound):
        why = [f"{fmt_rate(sig.rate)}"]
        if sig.cpu_ratio is not None:
            why.append(f"vCPUs {pct(sig.cpu_ratio)} busy")
        return Verdict(IDLE, why)
    wait = sig.io_wait_ratio
    if wait is not None and wait >= (th.io_wait / 2 if sticky_io else th.io_wait):
        split = ""
        if sig.served_ratio is not None and wait - sig.served_ratio >= 0.005:
            split = (f"; {pct(sig.served_ratio)} being served, {pct(wait - sig.served_ratio)} "
                     "its device model waiting for a CPU")
        return Verdict(IO_BOUND, [
            f"waits on emulation {pct(wait)} of its vCPU time ({fmt_rate(sig.sync_rate)} "
            f"synchronous, p95 {fmt_seconds(sig.p95_s)}, {sig.vcpus} vCPU"
            f"{'s' if sig.vcpus != 1 else ''}{' seen' if sig.vcpus_from == 'seen' else ''}"
            f"{split})"])
    if sig.cpu_ratio is not None and sig.cpu_ratio >= th.cpu_bound:
        return Verdict(CPU_BOUND, [f"vCPUs {pct(sig.cpu_ratio)} busy, waits on emulation "
                                   f"{pct(wait) if wait is not None else '0%'}"])
    why = [f"{fmt_rate(sig.rate)}, waits on emulation {pct(wait)}"]
    if sig.cpu_ratio is not None:
        why.append(f"vCPUs {pct(sig.cpu_ratio)} busy")
    return Verdict(NORMAL, why)
