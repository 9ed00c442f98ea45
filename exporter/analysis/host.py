"""What the host itself says, read-only: Dom0's CPU, the device models' CPU, Xen's domain list.

A ``HostSample`` holds cumulative counters taken at one moment (like the sources' totals);
``iotrace.analysis.signals`` turns two of them into rates. Every reader returns None when its
file or program is not there, so a host without Xen (or without PSI) simply has fewer signals.

* Dom0's CPU: the first line of ``/proc/stat`` (user nice system idle iowait irq softirq steal,
  in USER_HZ ticks; Documentation/filesystems/proc.rst). In a Dom0, *steal* is the time its
  vCPUs were runnable while Xen ran other domains: it counts as busy, a Dom0 starved by Xen is
  saturated too.
* CPU pressure: ``/proc/pressure/cpu`` ``some ... total=`` microseconds (PSI,
  Documentation/accounting/psi.rst): time some task waited for a CPU.
* Device-model CPU: ``/proc/PID/stat`` utime + stime (fields 14 and 15) of the process behind
  ``-xen-domid N`` (``iotrace.probes.discovery``), and how long its threads waited for a CPU:
  the run delay of each ``/proc/PID/task/TID/schedstat`` (its second field, ns spent runnable on
  a run queue; kernel/sched/stats.h, CONFIG_SCHED_INFO). A device model that waits for a CPU
  keeps the guest's vCPUs waiting for their answers as long.
* Xen: ``xl list -v`` (tools/xl/xl_info.c list_domains: name, ID, Mem, VCPUs, State, Time(s),
  then with -v the UUID), run only where ``/proc/xen/capabilities`` says ``control_d`` (a Dom0).
  It gives each domain's vCPU count, CPU seconds and UUID.

``HostSample.to_json``/``from_json`` carry a sample in a recording's metadata (``host_samples``),
so ``iotrace advise --replay`` can evaluate a capture with the host figures of its time.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from iotrace.core.procfs import STARTTIME, STIME, UTIME, stat_fields

PROC = "/proc"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
XL_TIMEOUT = 10.0


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds of every CPU of this host (Dom0's vCPUs in a Dom0)."""
    busy: float
    total: float
    steal: float = 0.0


@dataclass(frozen=True)
class XenDomain:
    domid: int
    name: str
    vcpus: int
    cpu_seconds: float
    uuid: str | None = None


@dataclass
class HostSample:
    t: float                                   # seconds, on the clock of the source's totals
    cpu: CpuTimes | None = None
    ncpu: int | None = None
    pressure_us: int | None = None             # PSI cpu "some" total
    dm_cpu: dict = field(default_factory=dict)     # domid -> device-model CPU seconds
    dm_ident: dict = field(default_factory=dict)   # domid -> "dm:<pid>:<start ticks>"
    xen: dict | None = None                    # domid -> XenDomain; None: no Xen here
    dm_wait: dict = field(default_factory=dict)    # domid -> device-model run delay seconds
    # domid -> UUID when this sample's xl listing failed: the last one xl gave, for a domain
    # whose device model is still the same process (LocalHost.sample)
    uuids: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"t": self.t}
        if self.cpu is not None:
            out["cpu"] = {"busy": self.cpu.busy, "total": self.cpu.total, "steal": self.cpu.steal}
        if self.ncpu is not None:
            out["ncpu"] = self.ncpu
        if self.pressure_us is not None:
            out["pressure_us"] = self.pressure_us
        if self.dm_cpu:
            out["dm_cpu"] = {str(k): v for k, v in self.dm_cpu.items()}
        if self.dm_ident:
            out["dm_ident"] = {str(k): v for k, v in self.dm_ident.items()}
        if self.dm_wait:
            out["dm_wait"] = {str(k): v for k, v in self.dm_wait.items()}
        if self.xen is not None:
            out["xen"] = {str(d.domid): {"name": d.name, "vcpus": d.vcpus,
                                         "cpu_seconds": d.cpu_seconds, "uuid": d.uuid}
                          for d in self.xen.values()}
        if self.uuids:
            out["uuids"] = {str(k): v for k, v in self.uuids.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "HostSample":
        """The inverse of ``to_json``; ValueError (with what is wrong) for anything else."""
        if not isinstance(obj, dict) or not isinstance(obj.get("t"), (int, float)):
            raise ValueError("a host sample is an object with a number 't'")
        try:
            cpu = obj.get("cpu")
            cpu = CpuTimes(float(cpu["busy"]), float(cpu["total"]),
                           float(cpu.get("steal", 0.0))) if cpu is not None else None
            xen = obj.get("xen")
            if xen is not None:
                xen = {int(k): XenDomain(int(k), str(v["name"]), int(v["vcpus"]),
                                         float(v["cpu_seconds"]), v.get("uuid"))
                       for k, v in xen.items()}
            return cls(float(obj["t"]), cpu, obj.get("ncpu"), obj.get("pressure_us"),
                       {int(k): float(v) for k, v in (obj.get("dm_cpu") or {}).items()},
                       {int(k): str(v) for k, v in (obj.get("dm_ident") or {}).items()}, xen,
                       {int(k): float(v) for k, v in (obj.get("dm_wait") or {}).items()},
                       {int(k): str(v) for k, v in (obj.get("uuids") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"bad host sample: {type(exc).__name__}: {exc}") from None


# -- /proc ----------------------------------------------------------------------------------------

def read_cpu_times(proc: str = PROC) -> tuple[CpuTimes, int] | None:
    """All CPUs' busy/total/steal seconds and the number of CPUs, from /proc/stat."""
    try:
        with open(f"{proc}/stat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].startswith("cpu "):
        return None
    try:
        v = [int(x) for x in lines[0].split()[1:9]]
    except ValueError:
        return None
    v += [0] * (8 - len(v))
    user, nice, system, idle, iowait, irq, softirq, steal = v
    total = user + nice + system + idle + iowait + irq + softirq + steal
    ncpu = sum(1 for ln in lines[1:] if re.match(r"cpu\d+ ", ln))
    return CpuTimes((total - idle - iowait) / CLK_TCK, total / CLK_TCK, steal / CLK_TCK), ncpu


def read_pressure(proc: str = PROC) -> int | None:
    """PSI cpu 'some' total (microseconds), or None without PSI."""
    try:
        with open(f"{proc}/pressure/cpu") as fh:
            for line in fh:
                if line.startswith("some "):
                    m = re.search(r"\btotal=(\d+)", line)
                    return int(m.group(1)) if m else None
    except OSError:
        return None
    return None


def read_process_cpu(pid: int, proc: str = PROC) -> tuple[float, int] | None:
    """(utime + stime in seconds, start time in ticks) of a process, or None if it is gone."""
    rest = stat_fields(pid, proc)
    try:
        return ((int(rest[UTIME]) + int(rest[STIME])) / CLK_TCK, int(rest[STARTTIME])) \
            if rest is not None else None
    except (IndexError, ValueError):
        return None


def read_run_delay(pid: int, proc: str = PROC) -> float | None:
    """Seconds the process's threads have spent waiting on a run queue (their schedstat run
    delays, summed), or None where the kernel does not keep them."""
    total, seen = 0, False
    try:
        tids = os.listdir(f"{proc}/{int(pid)}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"{proc}/{int(pid)}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
                seen = True
        except (OSError, ValueError, IndexError):
            continue                     # a thread that ended meanwhile
    return total / 1e9 if seen else None


def dm_identity(pid: int, start_ticks: int) -> str:
    """A device model process, for as long as it lives (a reused pid has another start time)."""
    return f"dm:{int(pid)}:{int(start_ticks)}"


# -- Xen --------------------------------------------------------------------------------------------

def is_dom0(proc: str = PROC) -> bool:
    """Whether this kernel runs as Xen's control domain (/proc/xen/capabilities: control_d)."""
    try:
        with open(f"{proc}/xen/capabilities") as fh:
            return "control_d" in fh.read()
    except OSError:
        return False


_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# One row of `xl list [-v]`: "%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f" (tools/xl/xl_info.c),
# then with -v " <uuid> ..." (reason code, security label): names may contain spaces, so the
# row is matched from the numeric columns, not split.
_XL_ROW = re.compile(r"^(?P<name>.+?)\s+(?P<id>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+"
                     r"(?P<state>[-a-zS?]{6})\s+(?P<time>\d+(?:\.\d+)?)"
                     r"(?:\s+(?P<uuid>" + _UUID + r"))?")


def parse_xl_list(text: str) -> dict[int, XenDomain]:
    """Domains of ``xl list -v`` output (the header line and anything else unparsable skipped)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("Name ") or not line.strip():
            continue
        m = _XL_ROW.match(line)
        if not m:
            continue
        domid = int(m.group("id"))
        uuid = m.group("uuid").lower() if m.group("uuid") else None
        out[domid] = XenDomain(domid, m.group("name").strip(), int(m.group("vcpus")),
                               float(m.group("time")), uuid)
    return out


def xl_command() -> str | None:
    return shutil.which("xl")


def read_xl_list(xl: str | None = None, timeout: float = XL_TIMEOUT) -> dict[int, XenDomain] | None:
    """``xl list -v`` parsed, or None when xl is absent or fails."""
    xl = xl or xl_command()
    if not xl:
        return None
    try:
        res = subprocess.run([xl, "list", "-v"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return parse_xl_list(res.stdout)


# -- the sampler --------------------------------------------------------------------------------

class LocalHost:
    """Samples this host: /proc for Dom0 and the device models, ``xl list -v`` where this is a
    Dom0 (``use_xen``: None = detect, False = never run xl)."""

    def __init__(self, proc: str = PROC, use_xen: bool | None = None, xl: str | None = None):
        self.proc = proc
        self.use_xen = is_dom0(proc) if use_xen is None else use_xen
        self.xl = xl
        self._uuids: dict[int, tuple[str, str]] = {}   # domid -> (dm identity, UUID) xl gave

    def device_models(self) -> dict[int, int]:
        """domid -> pid of every device model running here."""
        from iotrace.probes.discovery import scan
        return {dm.domid: dm.pid for dm in scan(self.proc).values()}

    def sample(self, t: float, pids: dict[int, int] | None = None) -> HostSample:
        """A sample at time ``t``; ``pids`` (domid -> device-model pid) where the source knows
        them, else the device models are found in /proc."""
        s = HostSample(t)
        got = read_cpu_times(self.proc)
        if got is not None:
            s.cpu, s.ncpu = got
        s.pressure_us = read_pressure(self.proc)
        if pids is None:
            pids = self.device_models()
        for domid, pid in pids.items():
            if pid is None:
                continue
            cpu = read_process_cpu(pid, self.proc)
            if cpu is not None:
                s.dm_cpu[domid] = cpu[0]
                s.dm_ident[domid] = dm_identity(pid, cpu[1])
                wait = read_run_delay(pid, self.proc)
                if wait is not None:
                    s.dm_wait[domid] = wait
        if self.use_xen:
            s.xen = read_xl_list(self.xl)
            self._carry_uuids(s)
        return s

    def _carry_uuids(self, s: HostSample) -> None:
        """A domain keeps the UUID xl last gave while its device model is the same process:
        one failed or timed-out ``xl list`` (a starved Dom0) must not make it look like a new
        domain to the analysis and advise (seen under TCG: advise forgot a guest's original
        weight and doubled it twice)."""
        if s.xen is not None:
            self._uuids = {d: (s.dm_ident[d], x.uuid) for d, x in s.xen.items()
                           if x.uuid and d in s.dm_ident}
            return
        s.uuids = {d: uuid for d, (ident, uuid) in self._uuids.items()
                   if s.dm_ident.get(d) == ident}
