"""Per-domain signals of one interval, from two successive totals and host samples.

Totals are cumulative (``Source.totals()``: ``{Key: Cell}``); an interval's figures are the
difference of two of them. They are first rolled up by (domid, synchronous?, range): a request
is *synchronous* when it carries a vCPU (``vcpu >= 0``): its vCPU waits for the device model to
answer. Buffered requests (vcpu -1: VGA writes, time offsets) do not make a vCPU wait.

* ``rate``, ``sync_rate``: requests per second, all and synchronous;
* ``io_wait_ratio``: the time the domain's vCPUs waited for emulation / (interval x its vCPUs):
  the share of its vCPU time the guest spent waiting for its device model. The waiting is the
  service time of its synchronous requests, plus, where the service time is measured in the
  device model (the qemu source: it starts when the device model picks the request up), the
  time the device model waited for a CPU (its threads' run delay, ``dm_wait_ratio``) times the
  share of its requests that were synchronous: an estimate of the wait before service, which
  is what a CPU-starved Dom0 adds. xentrace's service time (VM exit to VM entry) already
  includes it. The vCPU count comes from ``xl list`` where Xen is, else from the highest vCPU
  index the domain's requests carried (a lower bound, so the share is then an upper bound). A
  remote exporter's page (``--from``) has no vCPU label on its service histogram: there every
  request's service time counts;
* ``p95_s`` (synchronous requests, all ranges) and ``p95_by_range``: read off the interval's
  service-time distribution with ``Cell.service_quantile_seconds`` (whatever its histogram
  layout);
* ``dm_cpu_ratio``: the device-model process's CPU use, as a share of one CPU (/proc);
  ``dm_wait_ratio``: the time its threads waited on a run queue, per second (/proc schedstat);
* ``cpu_ratio``: the domain's own CPU use per vCPU (``xl list`` Time(s)), where Xen is;
* Dom0: ``HostSignals`` (busy share of all its CPUs, steal included; PSI pressure share).

A counter that went backwards (a source restarted, a domain's cells dropped) restarts its
interval from zero: the later totals are taken whole, never a negative rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from iotrace.analysis.host import HostSample
from iotrace.core.aggregate import Cell, Key

RollKey = tuple      # (domid, sync: bool, range)


@dataclass
class Rollup:
    """Totals rolled up by (domid, synchronous, range), and the vCPUs each domain showed."""
    cells: dict = field(default_factory=dict)        # RollKey -> Cell
    max_vcpu: dict = field(default_factory=dict)     # domid -> highest vCPU index seen

    def domids(self) -> set[int]:
        return {k[0] for k in self.cells}


def rollup(totals: dict[Key, Cell]) -> Rollup:
    out = Rollup()
    cells, top = out.cells, out.max_vcpu
    for key, cell in totals.items():
        if key.domid < 0:
            continue                      # requests no domain could be found for
        # A service-only cell (count 0, no vCPU: a remote exporter's histogram) counts as
        # synchronous: its page cannot tell them apart.
        sync = key.vcpu >= 0 or (cell.count == 0 and cell.service_n > 0)
        rk = (key.domid, sync, key.range)
        acc = cells.get(rk)
        if acc is None:
            acc = cells[rk] = Cell()
        acc.count += cell.count
        acc.bytes += cell.bytes
        acc.service_n += cell.service_n
        acc.service_sum_ns += cell.service_sum_ns
        acc.hist = acc.hist + cell.hist if len(acc.hist) == len(cell.hist) else cell.hist.copy()
        if key.vcpu >= 0 and key.vcpu > top.get(key.domid, -1):
            top[key.domid] = key.vcpu
    return out


def cell_delta(cur: Cell, prev: Cell | None) -> Cell:
    """``cur - prev``; ``cur`` itself when there is no ``prev`` or a counter went backwards. A
    difference has no exact extremes: its quantiles are the histogram's own."""
    if prev is None:
        return Cell(cur.count, cur.bytes, cur.service_n, cur.service_sum_ns, cur.hist.copy(),
                    cur.service_min_ns, cur.service_max_ns)
    if (cur.count < prev.count or cur.service_n < prev.service_n
            or len(cur.hist) != len(prev.hist)):
        return cell_delta(cur, None)
    hist = cur.hist - prev.hist
    if (hist < 0).any():
        return cell_delta(cur, None)
    return Cell(cur.count - prev.count, cur.bytes - prev.bytes, cur.service_n - prev.service_n,
                cur.service_sum_ns - prev.service_sum_ns, hist)


@dataclass
class HostSignals:
    interval_s: float
    busy_ratio: float | None = None           # Dom0 CPUs busy (steal included), 0..1
    steal_ratio: float | None = None
    pressure_ratio: float | None = None       # PSI cpu some, 0..1
    ncpu: int | None = None

    def saturated(self, busy_threshold: float, pressure_threshold: float) -> bool | None:
        """Dom0's CPU saturated? None when nothing is known."""
        if self.busy_ratio is None and self.pressure_ratio is None:
            return None
        return bool((self.busy_ratio is not None and self.busy_ratio >= busy_threshold)
                    or (self.pressure_ratio is not None
                        and self.pressure_ratio >= pressure_threshold))


@dataclass
class DomainSignals:
    domid: int
    name: str
    identity: str                 # "uuid:<uuid>" | "dm:<pid>:<start>" | "domid:<n>"
    uuid: str | None
    interval_s: float
    rate: float = 0.0
    sync_rate: float = 0.0
    io_wait_ratio: float | None = None
    served_ratio: float | None = None         # the part of io_wait_ratio spent being served
    p95_s: float | None = None
    p95_by_range: dict = field(default_factory=dict)
    vcpus: int | None = None
    vcpus_from: str | None = None             # "xl" | "seen"
    cpu_ratio: float | None = None            # domain CPU per vCPU (xl)
    dm_cpu_ratio: float | None = None         # device model, share of one CPU
    dm_wait_ratio: float | None = None        # device model's run delay per second

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _ratio(a: float | None, b: float | None, dt: float) -> float | None:
    if a is None or b is None or dt <= 0:
        return None
    d = b - a
    return d / dt if d >= 0 else None


def host_signals(prev: HostSample | None, cur: HostSample | None, dt: float) -> HostSignals:
    out = HostSignals(dt)
    if cur is None:
        return out
    out.ncpu = cur.ncpu
    if prev is None:
        return out
    if prev.cpu is not None and cur.cpu is not None:
        total = cur.cpu.total - prev.cpu.total
        if total > 0:
            out.busy_ratio = min(max((cur.cpu.busy - prev.cpu.busy) / total, 0.0), 1.0)
            out.steal_ratio = min(max((cur.cpu.steal - prev.cpu.steal) / total, 0.0), 1.0)
    if prev.pressure_us is not None and cur.pressure_us is not None:
        p = _ratio(prev.pressure_us / 1e6, cur.pressure_us / 1e6, dt)
        out.pressure_ratio = None if p is None else min(p, 1.0)
    return out


def identity_of(domid: int, host: HostSample | None) -> tuple[str, str | None]:
    """(identity, uuid) of a domain: its UUID where Xen tells it (or told it, while its device
    model is the same process), else its device-model process (pid + start time), else its
    domid."""
    if host is not None:
        if host.xen and domid in host.xen and host.xen[domid].uuid:
            uuid = host.xen[domid].uuid
            return f"uuid:{uuid}", uuid
        if domid in host.uuids:              # xl failed this time; same device model
            return f"uuid:{host.uuids[domid]}", host.uuids[domid]
        if domid in host.dm_ident:
            return host.dm_ident[domid], None
    return f"domid:{domid}", None


def domain_signals(domid: int, name: str, prev: Rollup | None, cur: Rollup, dt: float,
                   prev_host: HostSample | None, cur_host: HostSample | None,
                   seen_vcpus: int | None, dm_wait_counts: bool = True) -> DomainSignals:
    """One domain's signals over the interval ``dt`` between ``prev`` and ``cur``.
    ``dm_wait_counts``: the source's service times start in the device model (qemu), so its
    run delay is waiting the guest did too (False for xentrace, whose times include it)."""
    ident, uuid = identity_of(domid, cur_host)
    sig = DomainSignals(domid, name, ident, uuid, dt)
    prev_cells = prev.cells if prev is not None else {}
    sync_all = Cell()
    svc_ns = 0
    count = sync_count = 0
    for (d, sync, rng), cell in cur.cells.items():
        if d != domid:
            continue
        delta = cell_delta(cell, prev_cells.get((d, sync, rng)))
        count += delta.count
        if not sync:
            continue
        sync_count += delta.count
        svc_ns += delta.service_sum_ns
        if delta.service_n:
            q = delta.service_quantile_seconds(0.95)
            if q is not None:
                sig.p95_by_range[rng] = max(q, sig.p95_by_range.get(rng, 0.0))
            sync_all.service_n += delta.service_n
            sync_all.service_sum_ns += delta.service_sum_ns
            sync_all.hist = sync_all.hist + delta.hist if len(sync_all.hist) == len(delta.hist) \
                else delta.hist.copy()
    if dt > 0:
        sig.rate = count / dt
        sig.sync_rate = sync_count / dt
    if sync_all.service_n:
        sig.p95_s = sync_all.service_quantile_seconds(0.95)

    xen_now = cur_host.xen if cur_host is not None and cur_host.xen else {}
    xen_before = prev_host.xen if prev_host is not None and prev_host.xen else {}
    if domid in xen_now:
        sig.vcpus, sig.vcpus_from = max(xen_now[domid].vcpus, 1), "xl"
        if domid in xen_before:
            per = _ratio(xen_before[domid].cpu_seconds, xen_now[domid].cpu_seconds, dt)
            sig.cpu_ratio = None if per is None else per / sig.vcpus
    elif seen_vcpus:
        sig.vcpus, sig.vcpus_from = seen_vcpus, "seen"
    if cur_host is not None and prev_host is not None and \
            cur_host.dm_ident.get(domid) == prev_host.dm_ident.get(domid):
        sig.dm_cpu_ratio = _ratio(prev_host.dm_cpu.get(domid), cur_host.dm_cpu.get(domid), dt)
        sig.dm_wait_ratio = _ratio(prev_host.dm_wait.get(domid), cur_host.dm_wait.get(domid), dt)
    if sig.vcpus and dt > 0 and (sync_all.service_n or sync_count):
        wait_s = served_s = svc_ns / 1e9
        if dm_wait_counts and sig.dm_wait_ratio is not None and count:
            wait_s += sig.dm_wait_ratio * dt * (sync_count / count)
        sig.io_wait_ratio = min(wait_s / (dt * sig.vcpus), 1.0)
        sig.served_ratio = min(served_s / (dt * sig.vcpus), 1.0)
    return sig
