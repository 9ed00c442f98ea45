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

Probes are attached per binary (pid -1), so a device model started later is covered from its first
request.

Health: the source is up only while every probe it sets up counts. A binary whose program the
kernel refuses (the verifier's verdict is kept, one line) or whose uprobes do not all attach is
not counted at all (``ProbeSet.attach`` is whole or nothing) and makes ``stats().up`` False, as
does a binary asked for (``binaries``, Debian's device model) that cannot be resolved: serve
exports ``iotrace_source_up 0``, top's header shows DOWN with the error. Every such binary is
listed in ``failures`` (``stats().error`` is the first), its domains have 0 probes attached
(``iotrace_probes_attached``, the IotraceProbeDetached alert), ``strict`` makes it an exception.
A binary only discovered from a running device model (/proc/PID/exe) is different: gone by the
time it is resolved or attached, it is skipped (the process exited); present but without a
resolvable handle_ioreq (an unknown build), or with uprobes that do not attach, it is a failure of
that domain only (probes_attached 0), not of the source; a program the kernel refuses makes the
source down whichever binary it was for. Binaries: the Debian device model (``/usr/libexec/xen-qemu-system-i386``) when present,
the binaries of running processes with ``-xen-domid``, and any given with ``binaries=[...]``.
"""
from __future__ import annotations

import ctypes as ct
import os
import sys
import threading
import time

import numpy as np

from iotrace.core.addrmap import AddressMap
from iotrace.core.aggregate import Aggregator, Cell, Key
from iotrace.core.errors import ProbeError
from iotrace.core.events import EVENT_DTYPE
from iotrace.core.source import DomainInfo, SourceStats
from iotrace.probes.bpf import types as T
from iotrace.probes.bpf.loader import RINGBUF_PAGES, ProbeSet
from iotrace.probes.discovery import ProcessMap, scan
from iotrace.probes.hook.resolve import ElfError, resolve

DEBIAN_DM = "/usr/libexec/xen-qemu-system-i386"
DEFAULT_BINARIES = (DEBIAN_DM,)


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
    """The Debian device model if installed, plus the binaries of running device models."""
    out = [p for p in DEFAULT_BINARIES if os.path.exists(p)]
    for dm in scan().values():
        if dm.exe and dm.exe not in out:
            out.append(dm.exe)
    return out


class QemuProbeSource:
    """``iotrace.core.source.Source`` over uprobes on handle_ioreq.

    addrmap: range names; binaries: extra device model binaries (``--binary``); strict: any binary
    that cannot be resolved or attached raises ``ProbeError`` (else it is a warning, counted in
    ``stats().probes_failed``). Keyword-only: mode "metrics" | "events"; timing: the return probe
    for service times (a second trap per request); defaults: also probe the Debian binary and the
    binaries of running device models; send_vcpu_offset: an int, or {path: int}, for binaries whose
    XenIOState layout the table and the QEMU banner do not tell; keep_addr: keep raw addresses in
    the keys (the collector folds them into ranges); ringbuf_pages: ring buffer size (events).

    Address buckets: in metrics mode the kernel keys by ``metrics_bucket(type, addr)`` (MMIO: the
    4 KiB page; PCI config: the function, register dropped; port I/O: exact), so ``totals()`` keys
    carry the bucket and name the range the bucket's start falls in: exact for page-aligned MMIO
    ranges (operator ranges for this source should be page-aligned). Events mode keeps exact
    addresses.
    """

    name = "qemu"

    def __init__(self, addrmap: AddressMap | None = None, binaries=None, strict: bool = False,
                 *, mode: str = "metrics", timing: bool = True, defaults: bool = True,
                 send_vcpu_offset: int | dict | None = None, keep_addr: bool = True,
                 ringbuf_pages: int = RINGBUF_PAGES, warn=None):
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
        self._domains: dict[int, DomainInfo] = {}
        self._pid_binary: dict[int, str] = {}
        self._started = False
        self._last_refresh = 0.0
        self._alive: set[int] = set()
        self._seen_tgids: set[int] = set()
        self._discovered: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    def binaries(self) -> list[str]:
        """The binaries to probe (real paths). Those known only from a running device model's
        /proc/PID/exe are remembered in ``_discovered``: one that is gone by the time it is
        resolved (its process exited, its file was replaced) is skipped, not a failure."""
        paths = default_binaries() if self.defaults else []
        self._discovered = {os.path.realpath(p) for p in paths if p not in DEFAULT_BINARIES}
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

    def _fail(self, msg: str, down: bool = True) -> None:
        """A binary that will not be counted: recorded, fatal if strict, and the source is down
        unless ``down`` is False (a binary only discovered from a running device model whose
        handle_ioreq cannot be found: its domain shows iotrace_probes_attached 0). Not printed
        here: the sinks report it (serve's log, top's header, snoop/record's warning through
        ``start_or_fail``), once."""
        self._stats.probes_failed += 1
        self.failures.append(msg)
        if down:
            self._down.append(msg)
        first = self.failures[0]
        more = len(self.failures) - 1
        self._stats.error = first + (f" (and {more} more)" if more else "")
        if self.strict:
            self.stop()
            raise ProbeError(msg)

    def start(self) -> None:
        if self._started:
            return
        if not has_bpf_privileges():
            raise ProbeError("the qemu-dm probes need root (CAP_BPF and CAP_PERFMON, or "
                             "CAP_SYS_ADMIN: loading BPF programs and uprobes)")
        self._started = True
        for path in self.binaries():
            try:
                res = resolve(path)
            except ElfError as exc:
                if path in self._discovered and not os.path.exists(path):
                    continue            # its device model went away: nothing to count there
                self._fail(str(exc), down=path not in self._discovered)
                continue
            self.resolutions.append(res)
            if not res.ok:
                self._fail(res.error, down=path not in self._discovered)
                continue
            off = self.send_vcpu_offset
            if isinstance(off, dict):           # per binary: {path: offset}
                off = {os.path.realpath(k): v for k, v in off.items()}.get(res.path)
            if off is not None and not res.send_vcpu_from.startswith("table"):
                res.send_vcpu_offset = off
                res.send_vcpu_from = "command line"
            elif res.send_vcpu_from.startswith("default"):
                self.warn(f"{res.path}: XenIOState layout unknown (no table entry, no QEMU "
                          f"banner): assuming send_vcpu at {res.send_vcpu_offset:#x} (QEMU <= 8.0); "
                          f"use --send-vcpu-offset 0x48 for QEMU >= 8.1")
            try:
                ps = ProbeSet(res, self.mode, self.timing, ringbuf_pages=self.ringbuf_pages)
            except ProbeError as exc:
                self._fail(str(exc))
                continue
            for a in ps.attach():
                self.attach_log.append((res.path, a.point, a.ok, a.error))
            if not ps.complete:
                ps.close()
                err = ps.first_error() or "?"
                refused = err.startswith("the kernel refused")
                discovered = res.path in self._discovered
                if discovered and not refused and not os.path.exists(res.path):
                    continue            # gone while attaching: its device model went away
                if not refused:
                    err = f"cannot attach the uprobes at {res.func_offset:#x}: {err}"
                # A refused program is the kernel's verdict on the program: the source is down.
                # An attach that failed on a binary only discovered from a running device model
                # is that domain's failure (as an unresolvable one is).
                self._fail(f"{res.path}: {err}: its requests are not counted",
                           down=refused or not discovered)
                continue
            self._stats.probes_attached += ps.attached
            if self.mode == "events":
                ps.open_ring(self._on_record)
            self.sets.append(ps)
        # Up only while every probe set up counts (see the module docstring).
        self._stats.up = bool(self.sets) and not self._down
        self._refresh_domains()

    def stop(self) -> None:
        for ps in self.sets:
            ps.close()
        self.sets = []
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
    def _probes_for(self, exe: str | None) -> int:
        return sum(ps.attached for ps in self.sets if exe and ps.res.path == exe)

    def _refresh_domains(self) -> set[int]:
        """Pick up new device models, drop those that went away; returns the pids gone."""
        alive, gone = self._pm.refresh()
        self._alive = set(alive)
        now = time.time()
        doms: dict[int, DomainInfo] = {}
        for pid, dm in alive.items():
            old = self._domains.get(dm.domid)
            info = DomainInfo(dm.domid, dm.name, pid, self._probes_for(dm.exe),
                              first_seen=old.first_seen if old and old.pid == pid else dm.first_seen,
                              last_seen=now)
            doms[dm.domid] = info
        dropped = {d for d in self._domains if d not in doms}
        self._domains = doms
        if gone:
            self._seen_tgids -= gone
            for ps in self.sets:
                ps.forget_tgids(gone)
        if self.mode == "events":
            for domid in dropped:
                self._agg.drop_domain(domid)
        return gone

    def domains(self) -> dict[int, DomainInfo]:
        with self._lock:
            self._refresh_domains()
            return dict(self._domains)

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
        out: dict[Key, Cell] = {}
        unattributed = 0
        for ps in self.sets:
            items = ps.stats_items()
            if not items:
                continue
            n = len(items)
            tgid = np.fromiter((k.tgid for k, _ in items), np.int64, n)
            types = np.fromiter((k.type for k, _ in items), np.uint8, n)
            addrs = np.fromiter((k.addr for k, _ in items), np.uint64, n)
            rng = self.addrmap.lookup(types, addrs)
            names = self.addrmap.names
            domid_of = {int(t): self._domid(int(t)) for t in np.unique(tgid)}
            for i, (k, v) in enumerate(items):
                domid = domid_of[k.tgid]
                if domid is not None and k.tgid not in self._alive:
                    continue                    # its process went away: dropped
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
        self._stats.extra["unattributed"] = unattributed
        return out

    # -- events mode -----------------------------------------------------------------------------
    def _on_record(self, _ctx, data, size):
        # Look a new process up on its first record, while it most likely still runs: a device
        # model that exits right after its last request must still be attributed to its domain.
        tgid = ct.cast(data, ct.POINTER(ct.c_uint32))[2]        # ioreq_event.tgid @8
        if tgid not in self._seen_tgids:
            self._seen_tgids.add(tgid)
            self._pm.lookup(tgid)
        self._pending.append(ct.string_at(data, size))

    def poll(self, timeout_ms: int = 100) -> np.ndarray:
        """Events that arrived since the last call (EVENT_DTYPE, domid mapped, time order)."""
        if self.mode != "events":
            raise RuntimeError("poll() needs mode='events'")
        if not self.sets:
            time.sleep(timeout_ms / 1000)
            return np.zeros(0, dtype=EVENT_DTYPE)
        per = max(1, timeout_ms // len(self.sets))
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
            st.events = sum(int(v.count) for ps in self.sets for _, v in ps.stats_items())
        return st


# -- shared by snoop and record ----------------------------------------------------------------------

def add_probe_arguments(p) -> None:
    """The options every probe verb takes (snoop, record)."""
    p.add_argument("--binary", action="append", default=[], metavar="PATH",
                   help="also probe this device model binary (repeatable); the defaults are "
                        f"{DEBIAN_DM} and the binaries of running -xen-domid processes")
    p.add_argument("--no-default-binaries", action="store_true",
                   help="probe only the --binary paths")
    p.add_argument("--strict", action="store_true",
                   help="any binary that cannot be resolved or attached is fatal")
    p.add_argument("--no-service-time", action="store_true",
                   help="no return probe: no service times, one trap per request instead of two")
    p.add_argument("--send-vcpu-offset", type=lambda s: int(s, 0), default=None, metavar="OFF",
                   help="offsetof(XenIOState, send_vcpu) for binaries the table does not know "
                        "(0x50 up to QEMU 8.0, 0x48 from 8.1; default: from the QEMU banner)")
    p.add_argument("--config", metavar="YAML", default=None,
                   help="address map overriding the PC default range names")


def source_from_args(args, mode: str) -> QemuProbeSource:
    if not args.binary and args.no_default_binaries:
        raise ProbeError("--no-default-binaries needs at least one --binary PATH")
    addrmap = AddressMap.load(args.config)
    return QemuProbeSource(addrmap, binaries=args.binary, strict=args.strict, mode=mode,
                           timing=not args.no_service_time,
                           defaults=not args.no_default_binaries,
                           send_vcpu_offset=args.send_vcpu_offset)


def start_or_fail(src: QemuProbeSource) -> None:
    """Start ``src`` for snoop/record: an error when nothing counts, a warning line per binary
    that is not counted while others are (``--strict`` made those fatal already)."""
    src.start()
    if not src.attached:
        msg = src.stats().error or "no device model binary found"
        raise ProbeError(f"nothing attached: {msg}")
    for msg in src.failures:
        src.warn(f"warning: {msg}")
