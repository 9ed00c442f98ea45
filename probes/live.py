"""The live qemu-dm source: uprobes on handle_ioreq in every device model binary.

``QemuProbeSource`` implements ``iotrace.core.source.Source`` (name "qemu"):

* metrics mode (serve, top): requests are aggregated in kernel maps keyed by (tgid, vcpu, type, dir,
  size, address bucket); ``totals()`` reads the maps at call time and maps tgid -> domid in user
  space. No per-request wake-up of user space. The bucket (``metrics_bucket``) is an MMIO
  request's 4 KiB page, a PCI config request's SEG/BUS/DEV/FN without the register, and a port's
  exact number: so ``Key.addr`` in metrics-mode totals is the bucket, and a bucketed MMIO address
  names the range its page start falls in (operator MMIO ranges should be page-aligned).
* events mode (snoop, record): each request goes through a ring buffer with its exact address;
  ``poll()`` returns them as ``EVENT_DTYPE`` batches with the domid filled in, and folds them into
  the totals as well (exact addresses there too). Records the ring buffer could not take are
  counted (``stats().lost``).

Probes are attached per binary (pid -1), so a device model started later from a probed binary is
covered from its first request. Binaries at start: those installed at the known paths
(``discovery.KNOWN_PATHS``: Debian's ``/usr/libexec/xen-qemu-system-i386``, upstream Xen's
``<libexecdir>/xen/bin/qemu-system-i386``), the binaries of running processes with ``-xen-domid``,
and any given with ``binaries=[...]``. After that, every refresh (each scrape, each ``top``
refresh, every 0.2 s in events mode) looks for new ``-xen-domid`` processes; one whose binary is
not probed yet (``device_model_override=``, a copy anywhere) has that binary resolved and
attached by a background thread, so the refresh itself stays cheap. Requests such a process
served before its binary was attached are not seen, and their number cannot be known from
outside the process: each such process is logged with how long it ran unobserved, and counted
in ``stats().extra["unobserved_processes"]``. A domain whose device model cannot be probed is
listed with ``DomainInfo.probes_attached == 0`` and the reason in ``DomainInfo.probe_error``.

Health: the source is up only while every probe it set up counts. A binary whose program the
kernel refuses (the verifier's verdict is kept, one line) or whose uprobes do not all attach is not
counted at all (``ProbeSet.attach`` is whole or nothing) and makes ``stats().up`` False, as does a
binary asked for (``binaries``, those at the known install paths) that cannot be resolved: serve
exports ``iotrace_source_up 0``, top's header shows DOWN with the error. Every such binary is
listed in ``failures`` (``stats().error`` is the first), its domains have 0 probes attached
(``iotrace_probes_attached``, the IotraceProbeDetached alert), ``strict`` makes it an exception at
start. A binary only discovered from a running device model (/proc/PID/exe, at start or later) is
different: gone by the time it is resolved or attached, it is skipped (the process exited);
present but without a resolvable handle_ioreq (an unknown build), or with uprobes that do not
attach, it is a failure of that domain only (``probe_error``, probes_attached 0), not of the
source; a program the kernel refuses makes the source down whichever binary it was for.

A device model that goes away leaves its final totals behind: at the first refresh after its exit
its map entries are moved out of the kernel maps (freeing their room in the bounded map, and so
that a reused pid starts afresh) into the source's *retired* cells, which ``totals()`` keeps
adding to the live ones. Its domain stays listed by ``domains()`` with ``last_seen`` frozen at the
last time it was known alive, for ``retain_seconds`` (``iotrace serve`` passes its
``domain_grace_seconds`` plus a margin; the exporter decides from ``last_seen`` when the series go),
then the domain and its retired cells are dropped together. A device model of the same domain
that starts meanwhile adds to the same cells: no counter of a listed domain ever goes down.
``stats().events`` counts retired requests too, so it never goes down either. Retired cells are
bounded (``MAX_RETIRED`` keys, the kernel map's size); beyond that new keys lose their address.
"""
from __future__ import annotations

import ctypes as ct
import os
import queue
import sys
import threading
import time

import numpy as np

from iotrace.core.addrmap import AddressMap
from iotrace.core.aggregate import Aggregator, Cell, Key
from iotrace.core.errors import ProbeError
from iotrace.core.events import EVENT_DTYPE
from iotrace.core.source import DomainInfo, SourceStats
from iotrace.probes.bpf import tracefs
from iotrace.probes.bpf import types as T
from iotrace.probes.bpf.loader import RINGBUF_PAGES, ProbeSet
from iotrace.probes.bpf.uprobes import TracefsMissing
from iotrace.probes.discovery import CLK_TCK, ProcessMap, file_id, installed_binaries
from iotrace.probes.discovery import default_binaries as _default_binaries
from iotrace.probes.hook.auto import Finding
from iotrace.probes.hook.resolve import ElfError, resolve

DEBIAN_DM = "/usr/libexec/xen-qemu-system-i386"
# Retired cells (the final totals of device models that went away) kept at most: the kernel map's
# bound (probes/bpf/loader.py STATS_ENTRIES); keys beyond it are kept without their address.
MAX_RETIRED = 65536
# One poll()/drain() delivers at most this many ring-buffer records, and stops taking more once
# its time is up (poll: its timeout; drain: DRAIN_BUDGET_S): see _on_record.
DELIVER_CAP = 131072
DRAIN_BUDGET_S = 1.0


CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def metrics_bucket(type_code: int, addr: int) -> int:
    """The address a metrics-mode key holds for a request of ``type_code`` at ``addr``, as
    probes/bpf/ioreq.bpf.c computes it in kernel: MMIO (IOREQ_TYPE_COPY) -> its 4 KiB page
    (``addr & ~0xfff``); PCI config -> SEG/BUS/DEV/FN, the register (bits 31:0) dropped; anything
    else (port I/O: 65536 ports at most) -> ``addr`` unchanged. The range a bucketed MMIO address
    names is the one its page start falls in: the same as the exact address's when MMIO ranges
    are page-aligned (every range in pc-default.yaml starts on a page; hpet ends inside its only
    page, whose start is still hpet's)."""
    if type_code == T.IOREQ_TYPE_COPY:
        return addr & T.MMIO_BUCKET_MASK
    if type_code == T.IOREQ_TYPE_PCI_CONFIG:
        return addr & T.PCI_BUCKET_MASK
    return addr


def _boottime() -> float:
    """Seconds since boot, on the clock /proc/PID/stat's start times use."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def has_bpf_privileges() -> bool:
    """Effective capabilities allow loading tracing BPF programs and attaching uprobes: CAP_BPF and
    CAP_PERFMON (kernel >= 5.8), or CAP_SYS_ADMIN (e.g. root under deploy/iotrace.service's
    bounding set, or plain root)."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return os.geteuid() == 0
    has = lambda cap: bool(eff >> cap & 1)  # noqa: E731
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def default_binaries() -> list[str]:
    """The device models installed at the known paths, plus the binaries of running ones."""
    return _default_binaries()


class QemuProbeSource:
    """``iotrace.core.source.Source`` over uprobes on handle_ioreq.

    addrmap: range names; binaries: extra device model binaries (``--binary``); strict: any binary
    that cannot be resolved or attached raises ``ProbeError`` (else it is a warning, counted in
    ``stats().probes_failed``). Keyword-only: mode "metrics" | "events"; timing: the return probe
    for service times (a second trap per request); defaults: also probe the Debian binary and the
    binaries of running device models, and follow device models that appear later from binaries
    not probed yet (off with defaults=False: only ``binaries``); send_vcpu_offset: an int, or
    {path: int}, for binaries whose XenIOState layout the resolver cannot tell; keep_addr: keep raw
    addresses in the keys (the collector folds them into ranges); ringbuf_pages: ring buffer size
    (events); retain_seconds: how long a domain whose device model went away stays listed with
    its final totals (see the module doc; 0: dropped at once). strict applies at start; a
    binary found later that cannot be probed (or, strict, is not sure) is reported (warning,
    ``stats().probes_failed``, the domain's ``probe_error``).

    Address buckets: in metrics mode the kernel keys by ``metrics_bucket(type, addr)`` (MMIO: the
    4 KiB page; PCI config: the function, register dropped; port I/O: exact), so ``totals()`` keys
    carry the bucket and name the range the bucket's start falls in: exact for page-aligned MMIO
    ranges (operator ranges for this source should be page-aligned). Events mode keeps exact
    addresses.
    """

    name = "qemu"
    has_probes = True        # its domains carry probes_attached (iotrace.core.source.Source)

    def __init__(self, addrmap: AddressMap | None = None, binaries=None, strict: bool = False,
                 *, mode: str = "metrics", timing: bool = True, defaults: bool = True,
                 send_vcpu_offset: int | dict | None = None, keep_addr: bool = True,
                 ringbuf_pages: int = RINGBUF_PAGES, warn=None, retain_seconds: float = 0.0):
        self.addrmap = addrmap or AddressMap.default()
        self.extra = list(binaries or [])
        self.strict = strict
        self.mode = mode
        self.timing = timing
        self.defaults = defaults
        self.send_vcpu_offset = send_vcpu_offset
        self.keep_addr = keep_addr
        self.ringbuf_pages = ringbuf_pages
        self.warn = warn or (lambda msg: print(f"iotrace: {msg}", file=sys.stderr))
        self.sets: list[ProbeSet] = []
        self.resolutions = []
        self.attach_log: list[tuple[str, str, bool, str | None]] = []   # binary, point, ok, error
        self.failures: list[str] = []       # one line per binary that is not counted
        self._down: list[str] = []          # those of them that make the source down
        self._lock = threading.Lock()
        self._pm = ProcessMap()
        self._stats = SourceStats(self.name)
        self._agg = Aggregator(self.addrmap, keep_addr=keep_addr)     # events mode totals
        self._pending: list[bytes] = []
        self._deliver_cap = DELIVER_CAP             # records per poll()/drain() at most
        self._deliver_until = float("inf")          # ... and no later than this (monotonic)
        self._domains: dict[int, DomainInfo] = {}
        self._pid_binary: dict[int, str] = {}
        self._started = False
        self._last_refresh = 0.0
        self._alive: set[int] = set()
        self._seen_tgids: set[int] = set()
        self._probed: dict[str, ProbeSet] = {}      # binary (real path) -> its newest probe set
        self._probed_ids: dict[tuple, ProbeSet] = {}   # (st_dev, st_ino) of the probed file
        self._attached_at: dict = {}                # file id (else path) -> boottime of attach
        self._unprobed: dict[str, str] = {}         # binary -> why it is not probed
        self._queued: set[str] = set()              # binaries waiting for the attach thread
        self._attach_q: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._reported: set[tuple[int, str]] = set()   # (pid, what) already logged
        self._t_start = 0.0                          # CLOCK_BOOTTIME of start()
        self._before_start = 0                       # device models running before start()
        self._discovered: set[str] = set()          # binaries known only from a running DM
        self.retain_seconds = float(retain_seconds)
        self._retired: dict[Key, Cell] = {}          # final totals of gone device models
        self._retired_tgids: set[int] = set()        # moved out of the maps, pid not reused yet
        self._retired_events = 0                     # requests in retired cells, ever
        self._gone: dict[int, DomainInfo] = {}       # domid -> its info when last seen alive

    # -- lifecycle -------------------------------------------------------------------------------
    def binaries(self) -> list[str]:
        """The binaries to probe (real paths). Those known only from a running device model's
        /proc/PID/exe are remembered in ``_discovered``: one that is gone by the time it is
        resolved (its process exited, its file was replaced) is skipped, not a failure."""
        paths = default_binaries() if self.defaults else []
        installed = set(installed_binaries())
        self._discovered = {os.path.realpath(p) for p in paths if os.path.realpath(p) not in installed}
        for p in self.extra:
            self._discovered.discard(os.path.realpath(p))
            if not os.path.exists(p):
                self._fail(f"{p}: no such file")
                continue
            real = os.path.realpath(p)
            if real not in [os.path.realpath(q) for q in paths]:
                paths.append(real)
        seen, out = set(), []
        for p in paths:
            r = os.path.realpath(p)
            if r not in seen:
                seen.add(r)
                out.append(r)
        return out

    def _fail(self, msg: str, strict: bool | None = None, down: bool = True) -> None:
        """A binary that will not be counted: recorded in ``failures``, fatal when strict, and
        the source is down unless ``down`` is False (see the module docstring). Not printed
        here: the sinks report it (serve's log, top's header, snoop/record's warning lines), a
        discovered device model's domain is logged once by _refresh_domains."""
        with self._lock:
            self._stats.probes_failed += 1
            self.failures.append(msg)
            if down:
                self._down.append(msg)
                self._stats.up = False
            more = len(self.failures) - 1
            self._stats.error = self.failures[0] + (f" (and {more} more)" if more else "")
        if self.strict if strict is None else strict:
            self.stop()
            raise ProbeError(msg)

    def start(self) -> None:
        if self._started:
            return
        if not has_bpf_privileges():
            raise ProbeError("the qemu-dm probes need root (CAP_BPF and CAP_PERFMON, or "
                             "CAP_SYS_ADMIN: loading BPF programs and uprobes)")
        self._started = True
        note = tracefs.ensure()
        if note:
            self.warn(note)
        self._t_start = _boottime()
        try:
            for path in self.binaries():
                self._probe_binary(path, strict=self.strict)
        except TracefsMissing as exc:
            # the host's problem, the same for every binary: one line, then stop trying
            self.stop()
            self._stats.error = str(exc)
            raise
        # Up only while every probe set up counts (the module docstring); with the
        # defaults, a host with no device model yet is up and waiting for one.
        self._stats.up = (bool(self.sets) or self.defaults) and not self._down
        if self.defaults:
            self._worker = threading.Thread(target=self._attach_loop, name="iotrace-attach",
                                            daemon=True)
            self._worker.start()
        self._refresh_domains()
        if self._before_start:
            self.warn(f"{self._before_start} device model process(es) were running before "
                      f"iotrace started: requests they served before then are not counted")

    def _probe_binary(self, path: str, strict: bool,
                      refuse_doubts: bool | None = None) -> ProbeSet | None:
        """Resolve ``path``, load the BPF program for it and attach; on failure the reason goes
        to ``_unprobed`` (and ``_fail``: a warning, or ProbeError when ``strict``). A resolution
        that is not sure of every number is refused when ``refuse_doubts`` (default: strict)."""
        refuse_doubts = self.strict if refuse_doubts is None else refuse_doubts
        real = os.path.realpath(path)
        discovered = real in self._discovered       # not asked for: its failure is its domain's
        try:
            res = resolve(real)
        except ElfError as exc:
            if discovered and not os.path.exists(real):
                return None             # its device model went away: nothing to count there
            return self._not_probed(real, str(exc), strict, down=not discovered)
        with self._lock:
            self.resolutions.append(res)
        if not res.ok:
            return self._not_probed(real, res.error, strict, down=not discovered)
        off = self.send_vcpu_offset
        if isinstance(off, dict):           # per binary: {path: offset}
            off = {os.path.realpath(k): v for k, v in off.items()}.get(res.path)
        sv = res.findings.get("send_vcpu")
        if off is not None and not (sv and sv.how.startswith("table")):
            res.send_vcpu_offset = off
            res.send_vcpu_from = "command line"
            res.findings["send_vcpu"] = Finding(off, "command line (--send-vcpu-offset)", "exact")
        elif sv is not None and sv.confidence == "guess":
            self.warn(f"{res.path}: XenIOState layout not found in the code: assuming "
                      f"send_vcpu at {res.send_vcpu_offset:#x} ({sv.how}); use "
                      f"--send-vcpu-offset (0x50 up to QEMU 8.0, 0x48 from 8.1) if wrong")
        doubts = res.doubts()
        if doubts:
            msg = f"{res.path}: not sure of " + "; ".join(doubts)
            if refuse_doubts:
                return self._not_probed(res.path, msg + " (--strict)", strict, down=not discovered)
            self.warn(msg + " (--strict would refuse it)")
        ident = file_id(res.path)
        try:
            ps = ProbeSet(res, self.mode, self.timing, ringbuf_pages=self.ringbuf_pages)
        except ProbeError as exc:
            return self._not_probed(res.path, str(exc), strict)
        try:
            attachments = ps.attach()
        except TracefsMissing:
            ps.close()
            raise
        with self._lock:
            self.attach_log.extend((res.path, a.point, a.ok, a.error) for a in attachments)
        if not ps.complete:                 # whole or nothing: none of its uprobes is left
            ps.close()
            err = ps.first_error() or "?"
            refused = err.startswith("the kernel refused")
            if discovered and not refused and not os.path.exists(res.path):
                return None                 # gone while attaching: its device model went away
            if not refused:
                err = f"cannot attach the uprobes at {res.func_offset:#x}: {err}"
            # A refused program is the kernel's verdict on the program: the source is down. An
            # attach that failed on a binary only discovered from a running device model is that
            # domain's failure (as an unresolvable one is).
            return self._not_probed(res.path, f"{res.path}: {err}: its requests are not counted",
                                    strict, down=refused or not discovered)
        if self.mode == "events":
            ps.open_ring(self._on_record)
        with self._lock:
            self._stats.probes_attached += ps.attached
            self.sets = self.sets + [ps]        # a new list: readers iterate the old one
            self._probed[res.path] = ps
            if ident is not None:
                self._probed_ids[ident] = ps
            self._attached_at[ident if ident is not None else res.path] = _boottime()
            self._unprobed.pop(res.path, None)
            self._stats.up = not self._down
        return ps

    def _not_probed(self, path: str, why: str, strict: bool, down: bool = True) -> None:
        with self._lock:
            self._unprobed[path] = why
        self._fail(why, strict, down)
        return None

    def _attach_loop(self) -> None:
        """The attach thread: binaries of new device models, one at a time."""
        while True:
            path = self._attach_q.get()
            if path is None:
                return
            try:
                self._probe_binary(path, strict=False, refuse_doubts=self.strict)
            except Exception as exc:              # never let the thread die silently
                self._not_probed(path, f"{path}: {type(exc).__name__}: {exc}", False)
            finally:
                with self._lock:
                    self._queued.discard(path)

    def _follow(self, alive: dict) -> None:
        """Queue the binaries of device models that are neither probed nor known to fail."""
        if not self.defaults or self._worker is None:
            return
        for dm in alive.values():
            exe = dm.exe
            if not exe or self._covered(dm) or exe in self._unprobed or exe in self._queued:
                continue
            if exe in self._probed and file_id(exe) != dm.exe_id:
                continue        # runs a file replaced on disk since: see _probe_error
            self._queued.add(exe)
            self._discovered.add(os.path.realpath(exe))
            self._attach_q.put(exe)

    def _covered(self, dm) -> bool:
        """The file ``dm`` runs has our probes (by inode: a path replaced on disk, say by a
        package upgrade, is a new binary to probe)."""
        if dm.exe_id is not None:
            return dm.exe_id in self._probed_ids
        return dm.exe in self._probed

    def stop(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            self._attach_q.put(None)
            if w is not threading.current_thread():
                w.join(timeout=60)             # a BPF compile in progress finishes first
        for ps in self.sets:
            for problem in ps.close():
                self.warn(f"{ps.res.path}: detaching: {problem}")
        self.sets = []
        self._probed.clear()
        self._probed_ids.clear()
        self._stats.up = False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def attached(self) -> int:
        return sum(ps.attached for ps in self.sets)

    # -- domains ---------------------------------------------------------------------------------
    def _probes_for(self, dm) -> int:
        ps = self._probed_ids.get(dm.exe_id) if dm.exe_id is not None else \
            self._probed.get(dm.exe)
        return ps.attached if ps is not None else 0

    def _probe_error(self, dm) -> str | None:
        """Why the device model ``dm`` is not probed (None when it is)."""
        if not dm.exe:
            return "its binary is unreadable (/proc/PID/exe)"
        if self._covered(dm):
            return None
        if dm.exe in self._probed and file_id(dm.exe) != dm.exe_id:
            return (f"{dm.exe}: it runs a version of that file replaced on disk after it "
                    f"started, which iotrace did not probe (restart the device model)")
        if dm.exe in self._unprobed:
            return self._unprobed[dm.exe]
        if dm.exe in self._queued:
            return f"{dm.exe}: being resolved and attached"
        if not self.defaults:
            return f"{dm.exe}: not probed (only --binary paths are, --no-default-binaries)"
        return f"{dm.exe}: not probed yet"

    def _check_late(self, pid: int, dm) -> None:
        """Log (once) a device model that ran before its binary was probed: the requests it
        served meanwhile are not counted, and how many there were cannot be known."""
        at = self._attached_at.get(dm.exe_id if dm.exe_id is not None else dm.exe)
        if at is None or (pid, "late") in self._reported:
            return
        started = dm.start_ticks / CLK_TCK
        ran = at - started
        self._reported.add((pid, "late"))
        if ran <= 2.0 / CLK_TCK:            # /proc start times have clock-tick resolution
            return
        self._stats.extra["unobserved_processes"] = \
            self._stats.extra.get("unobserved_processes", 0) + 1
        if started < self._t_start:         # running before iotrace: said once, in start()
            self._before_start += 1
            return
        self.warn(f"domain {dm.domid} ({dm.name}, pid {pid}): its device model {dm.exe} ran "
                  f"{ran:.1f} s before iotrace probed it: requests it served before then are "
                  f"not counted (how many cannot be known)")

    def _report(self, pid: int, what: str, msg: str) -> None:
        if (pid, what) not in self._reported:
            self._reported.add((pid, what))
            self.warn(msg)

    def _refresh_domains(self) -> set[int]:
        """Pick up new device models; retire those that went away (their final totals move out
        of the kernel maps, their domain stays listed for retain_seconds); returns the pids
        gone for good."""
        alive, gone = self._pm.refresh()
        self._alive = set(alive)
        if self.mode == "metrics":
            dead = {p for p in self._pm.known() if p not in self._alive} - self._retired_tgids
            if dead:
                self._retire(dead)
        self._follow(alive)
        now = time.time()
        doms: dict[int, DomainInfo] = {}
        for pid, dm in alive.items():
            old = self._domains.get(dm.domid)
            err = self._probe_error(dm)
            info = DomainInfo(dm.domid, dm.name, pid, self._probes_for(dm),
                              first_seen=old.first_seen if old and old.pid == pid else dm.first_seen,
                              last_seen=now, probe_error=err)
            doms[dm.domid] = info
            if err is not None and dm.exe in self._unprobed and \
                    not any(m.startswith(f"{dm.exe}:") for m in self._down):
                # a domain-only failure (a binary that took the source down is said once, as
                # the source's: serve's log, top's header)
                self._report(pid, "unprobed", f"domain {dm.domid} ({dm.name}, pid {pid}): its "
                             f"device model cannot be probed: {err}")
            elif err is None:
                self._check_late(pid, dm)
        for domid, info in self._domains.items():
            if domid not in doms:               # its last device model went away
                self._gone[domid] = info
        for domid in doms:
            self._gone.pop(domid, None)         # alive again: its retired cells stay in its totals
        expired = [d for d, info in self._gone.items()
                   if now - info.last_seen > self.retain_seconds]
        for domid in expired:
            del self._gone[domid]
            if self.mode == "events":
                self._agg.drop_domain(domid)
            else:
                for key in [k for k in self._retired if k.domid == domid]:
                    del self._retired[key]
        self._domains = doms
        if gone:
            self._seen_tgids -= gone
            if self.mode == "events":
                for ps in self.sets:
                    ps.forget_tgids(gone)
            else:
                # Device models' entries left the maps when they were retired (entries under
                # their pid now are a new process's, pid reuse: counted once it is looked up
                # afresh); other processes' (no -xen-domid) leave now, their count kept.
                other = gone - self._retired_tgids
                if other:
                    self._retire(other, keep_cells=False)
                self._retired_tgids -= gone
        return gone

    def _retire(self, tgids: set[int], keep_cells: bool = True) -> None:
        """Move the map entries of processes that went away out of the kernel maps: into the
        retired cells (device models, ``keep_cells``), their count into ``_retired_events``."""
        cells: dict[Key, Cell] = {}
        for ps in self.sets:
            items = [(k, v) for k, v in ps.stats_items() if k.tgid in tgids]
            if items:
                self._retired_events += sum(int(v.count) for _, v in items)
                if keep_cells:
                    self._fold(items, cells, alive_only=False)
                ps.forget_tgids(tgids)
        if not keep_cells:
            return
        self._retired_tgids |= tgids
        retired = self._retired
        for key, cell in cells.items():
            mine = retired.get(key)
            if mine is None:
                if len(retired) >= MAX_RETIRED and key.addr:
                    key = key._replace(addr=0)       # bounded: the range keeps the counts
                    mine = retired.get(key)
                if mine is None:
                    mine = retired[key] = Cell()
            mine.add(cell)

    def domains(self) -> dict[int, DomainInfo]:
        """The domains of running device models, and for retain_seconds those whose device
        models went away (``last_seen``: when last known alive)."""
        with self._lock:
            self._refresh_domains()
            out = dict(self._gone)
            out.update(self._domains)
            return out

    def domain_names(self) -> dict[int, str]:
        """domid -> name of every device model seen so far (including those that went away
        recently), without touching /proc: cheap enough for every batch of events."""
        return {dm.domid: dm.name for dm in self._pm.known().values()}

    def _domid(self, tgid: int) -> int | None:
        dm = self._pm.lookup(int(tgid))
        return dm.domid if dm is not None else None

    # -- metrics mode ----------------------------------------------------------------------------
    def totals(self) -> dict[Key, Cell]:
        with self._lock:
            self._refresh_domains()
            if self.mode == "events":
                return {k: Cell(c.count, c.bytes, c.service_n, c.service_sum_ns, c.hist.copy())
                        for k, c in self._agg.cells.items()}
            return self._read_maps()

    def _read_maps(self) -> dict[Key, Cell]:
        out: dict[Key, Cell] = {k: Cell(c.count, c.bytes, c.service_n, c.service_sum_ns,
                                        c.hist.copy()) for k, c in self._retired.items()}
        unattributed = 0
        for ps in self.sets:
            items = ps.stats_items()
            if items:
                unattributed += self._fold(items, out)
        self._stats.extra["unattributed"] = unattributed
        return out

    def _fold(self, items, out: dict[Key, Cell], alive_only: bool = True) -> int:
        """Add map entries [(IoreqKey, IoreqStats)] to ``out`` by Key (tgid -> domid, address ->
        range); returns the requests of processes that are not device models. ``alive_only``:
        skip the entries of processes that are not alive (a dead one's are retired; a reused
        pid's wait until the new process is looked up)."""
        n = len(items)
        tgid = np.fromiter((k.tgid for k, _ in items), np.int64, n)
        types = np.fromiter((k.type for k, _ in items), np.uint8, n)
        addrs = np.fromiter((k.addr for k, _ in items), np.uint64, n)
        rng = self.addrmap.lookup(types, addrs)
        names = self.addrmap.names
        domid_of = {int(t): self._domid(int(t)) for t in np.unique(tgid)}
        unattributed = 0
        for i, (k, v) in enumerate(items):
            domid = domid_of[k.tgid]
            if domid is not None and alive_only and k.tgid not in self._alive:
                continue
            if domid is None:
                unattributed += v.count
                continue
            key = Key(domid, k.vcpu, k.type, k.dir, names[int(rng[i])],
                      k.addr if self.keep_addr else 0)
            cell = out.get(key)
            if cell is None:
                cell = out[key] = Cell()
            cell.count += v.count
            cell.bytes += v.bytes
            cell.service_n += v.svc_n
            cell.service_sum_ns += v.svc_sum_ns
            if v.svc_n:
                cell.hist[:T.HIST_SLOTS] += np.frombuffer(v.hist, dtype=np.uint64).astype(
                    np.int64)
        return unattributed

    # -- events mode -----------------------------------------------------------------------------
    def _on_record(self, _ctx, data, size):
        # Look a new process up on its first record, while it most likely still runs: a device
        # model that exits right after its last request must still be attributed to its domain.
        tgid = ct.cast(data, ct.POINTER(ct.c_uint32))[2]        # ioreq_event.tgid @8
        if tgid not in self._seen_tgids:
            self._seen_tgids.add(tgid)
            self._pm.lookup(tgid)
        self._pending.append(ct.string_at(data, size))
        # libbpf's ring_buffer__poll/consume (Debian 12's 1.1) loop until the ring is empty: a
        # device model that produces as fast as this callback consumes would keep one call
        # from ever returning (no --duration, no signal, no disk-full check). A negative
        # return stops the call after this record (libbpf has already moved the consumer
        # past it); the rest stays in the ring for the next call.
        n = len(self._pending)
        if n >= self._deliver_cap or (n % 1024 == 0 and time.monotonic() >= self._deliver_until):
            return -1
        return 0

    def poll(self, timeout_ms: int = 100) -> np.ndarray:
        """Events that arrived since the last call (EVENT_DTYPE, domid mapped, time order)."""
        if self.mode != "events":
            raise RuntimeError("poll() needs mode='events'")
        if not self.sets:
            time.sleep(timeout_ms / 1000)
            return np.zeros(0, dtype=EVENT_DTYPE)
        per = max(1, timeout_ms // len(self.sets))
        self._deliver_until = time.monotonic() + max(timeout_ms, 10) / 1000
        for ps in self.sets:
            ps.poll(per)
        batch = self._take_pending()
        with self._lock:
            now = time.monotonic()
            if now - self._last_refresh >= 0.2:
                self._last_refresh = now
                self._refresh_domains()
        return batch

    def drain(self) -> np.ndarray:
        """Whatever is left in the ring buffers, without waiting."""
        self._deliver_until = time.monotonic() + DRAIN_BUDGET_S
        for ps in self.sets:
            ps.consume()
        return self._take_pending()

    def _take_pending(self) -> np.ndarray:
        """The ring-buffer records received so far, as one batch, also folded into the totals."""
        raw, self._pending = self._pending, []
        batch = self._convert(b"".join(raw))
        if len(batch):
            with self._lock:
                self._agg.add_batch(batch)
                self._stats.events += len(batch)
        return batch

    def _convert(self, blob: bytes) -> np.ndarray:
        recs = np.frombuffer(blob, dtype=T.EVENT_RECORD_DTYPE)
        n = len(recs)
        out = np.zeros(n, dtype=EVENT_DTYPE)
        if not n:
            return out
        for f in ("ts_ns", "vcpu", "type", "dir", "data_is_ptr", "df", "size", "count", "addr",
                  "data", "service_ns"):
            out[f] = recs[f]
        tg = recs["tgid"]
        uniq = np.unique(tg)
        dom = np.full(n, -1, dtype=np.int32)
        for t in uniq:
            d = self._domid(int(t))
            if d is not None:
                dom[tg == t] = d
        out["domid"] = dom
        keep = dom >= 0               # processes without -xen-domid (e.g. -xen-attach) are skipped
        if not keep.all():
            self._stats.extra["unattributed"] = (self._stats.extra.get("unattributed", 0)
                                                 + int((~keep).sum()))
        out = out[keep]
        if len(out) > 1 and np.any(np.diff(out["ts_ns"].astype(np.int64)) < 0):
            out = out[np.argsort(out["ts_ns"], kind="stable")]
        return out

    # -- stats -----------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {n: 0 for n in T.COUNTER_NAMES}
        for ps in self.sets:
            for k, v in ps.counters().items():
                total[k] += v
        return total

    def stats(self) -> SourceStats:
        with self._lock:
            st = SourceStats(**{f: getattr(self._stats, f) for f in
                                ("name", "up", "events", "lost", "decode_errors", "records",
                                 "probes_attached", "probes_failed", "error")})
            st.extra = dict(self._stats.extra)
        c = self.counters()
        st.lost = c["lost_events"] + c["stats_full"]
        st.decode_errors = c["read_errors"]
        st.extra.update(c)
        if self.mode == "metrics":
            # live entries plus what retired device models served: never goes down
            with self._lock:
                live = sum(int(v.count) for ps in self.sets for _, v in ps.stats_items())
                st.events = live + self._retired_events
        return st
