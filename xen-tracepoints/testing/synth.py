"""Synthetic xentrace captures with their ground truth, for tests, the live stand-in and the bench.

(Over 600 lines on purpose: one simulation - the host's scheduling, the records Xen writes for
it, the ground truth and the model of xenalyze are updated together, step by step, by the same
generator state; split across modules they would share all of it anyway.)

``generate(...)`` simulates a Xen host (several pCPUs; HVM domains whose vCPUs move between pCPUs;
dom0 and idle vCPUs) and writes, record for record, what Xen's tracing and ``xentrace`` would write
for it, together with what the file holds:

* ``truth``: every I/O record, keyed ``(domid, vcpu, type, dir, addr)`` (``iotrace.core.events`` codes),
  charged to the vCPU that issued it (``(-1, -1)`` for records a pCPU wrote before its first
  scheduler record: nothing in the file tells whose they are);
* ``xenalyze_expected(skip_vga=...)``: what ``xenalyze --summary --with-pio-enumeration
  --with-mmio-enumeration`` lists per domain/vCPU/address, by replaying the rules of
  tools/xentrace/xenalyze.c (see ``_XaExit``). The parity tests check this model against the real
  xenalyze, so it is a checked statement of those rules, not a guess.

Format facts (xen/include/public/trace.h, xen/common/trace.c, tools/xentrace/xentrace.c):

* no file header; one window per pCPU buffer read: TRC_TRACE_CPU_CHANGE (0x0001f003, two extra
  words, no TSC: header 0x2001f003) ``[pcpu, window bytes]`` then that pCPU's records in order
  (xentrace.c write_buffer). Windows of different pCPUs interleave.
* record header: event bits 0-27, extra u32 words bits 28-30, bit 31 TSC follows (t_rec).
* TRC_LOST_RECORDS 0x1f001, TSC, 4 words ``[lost, did | vid << 16, first_tsc lo, hi]``
  (trace.c insert_lost_records: u32 lost_records; u16 did, vid; u64 first_tsc; did/vid are
  ``current`` when the record is inserted, before the next record of that pCPU).
* TRC_TRACE_WRAP_BUFFER 0x1f002: padding to the buffer end, 4..40 bytes, contents not written
  (trace.c insert_wrap_record; it takes a TSC when more than 7 words are needed).
* I/O (xen/arch/x86/hvm/emulate.c hvmtrace_io_assist): IOPORT_READ 0x82016 / WRITE 0x82216
  ``[port, data]``; IOMEM_READ 0x82017 / WRITE 0x82217 ``[gpa, data]``; with a gpa above 4 GiB the
  TRC_64_FLAG (0x100) variants ``[gpa lo, hi, data lo, hi]``; the data words are left out when
  ``data_is_ptr`` (rep ins/outs/movs). No TSC. Writes are traced before dispatch, reads when they
  complete, i.e. after the vCPU waited for qemu: VMEXIT, running->offline (blocked in Xen),
  offline->runnable (traced by the pCPU that wakes it), runnable->running (maybe another pCPU),
  IOPORT_READ, VMENTRY.
* VMENTRY 0x81001 (TSC, no words); VMX exits 0x81002 ``[reason, eip]`` / 0x81102 ``[reason, rip lo,
  hi]``; SVM exits (Xen >= 4.19) 0x81003 / 0x81103.
* TRC_SCHED_RUNSTATE_CHANGE 0x21001 | old << 8 | new << 4 (0 running, 1 runnable, 2 blocked,
  3 offline), TSC, ``[domid << 16 | vcpu]``; TRC_SCHED_CONTINUE_RUNNING 0x21002, same word.
  Idle vCPUs belong to domain 32767, vCPU id = pCPU.

* ``io_truth``: every I/O record with the guest RIP of its exit and its service time in
  cycles (-1 when the file cannot tell it), under the one definition iotrace uses: from the VM
  exit until the request was answered - the vCPU's VMENTRY, or the moment it became runnable
  again if it was descheduled meanwhile (woken when qemu answered, or preempted).

Mixes (``MIXES``) name host shapes for the bench: I/O-dense, scheduler-heavy, MMIO-heavy with
64-bit addresses (an AMD host), many domains, lost-record-heavy. ``stream(...)`` writes any of
them in bounded memory (the host simulated in segments, each laid out in windows as it ends);
``tile(data, copies)`` repeats a capture with each copy's TSCs shifted after the last.

Run as a program it writes a capture (``-o FILE``, ground truth as JSON on stdout) or, with
``--stream``, plays one to stdout in chunks with pauses, cut mid-record: a stand-in for the
``xentrace`` binary (which needs a hypervisor) for the live reader's tests.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

# --- event ids (xen/include/public/trace.h) ---------------------------------------------------
TRC_LOST_RECORDS = 0x0001F001
TRC_TRACE_WRAP_BUFFER = 0x0001F002
TRC_TRACE_CPU_CHANGE = 0x0001F003
TRC_SCHED_RUNSTATE_CHANGE = 0x00021001
TRC_SCHED_CONTINUE_RUNNING = 0x00021002
TRC_HVM_VMENTRY = 0x00081001
TRC_HVM_VMX_EXIT = 0x00081002
TRC_HVM_SVM_EXIT = 0x00081003
TRC_64_FLAG = 0x100
TRC_HVM_IOPORT_READ = 0x00082016
TRC_HVM_IOPORT_WRITE = 0x00082216
TRC_HVM_IOMEM_READ = 0x00082017
TRC_HVM_IOMEM_WRITE = 0x00082217
TRC_HVM_CPUID = 0x0008200E     # [leaf, eax, ebx, ecx, edx]: a non-I/O exit's handler record

RUNNING, RUNNABLE, BLOCKED, OFFLINE = 0, 1, 2, 3
IDLE_DOMAIN = 32767

# ioreq_t codes, as in iotrace.core.events (kept literal so this file runs without the package).
TYPE_PIO, TYPE_MMIO = 0, 1
DIR_WRITE, DIR_READ = 0, 1

# Exit reasons: VMX (Intel SDM appendix C; xenalyze.c EXIT_REASON_*) and SVM (AMD APM; VMEXIT_*).
VMX_EXTINT, VMX_CPUID, VMX_HLT, VMX_IO, VMX_EPT = 1, 10, 12, 30, 48
SVM_INTR, SVM_CPUID, SVM_HLT, SVM_IOIO, SVM_NPF = 0x60, 0x72, 0x78, 0x7B, 0x400

# xenalyze.c enumerate_mmio: skips MMIO_VGA_START <= gpa < MMIO_VGA_END (0xbffff itself is kept).
XA_VGA_START, XA_VGA_END = 0xA0000, 0xBFFFF

PIO_PORTS = [0x3F8, 0x3FD, 0x3F9, 0xCF8, 0xCFC, 0x1F0, 0x1F7, 0x70, 0x71, 0x61, 0x3C9, 0x3C8,
             0x3D4, 0x402, 0x40, 0x20, 0x64, 0x60, 0xB004]
MMIO32 = [0xFED00000, 0xFED000F0, 0xFEC00000, 0xFEC00010, 0xF0000000, 0xF1000504, 0xFEBF0000,
          0xFEBF00C0, 0xFEBC1008]
MMIO_VGA = [0xA0000, 0xA8000, 0xB8000, 0xB8F9E, 0xBFFFE, 0xBFFFF]
# 64-bit BARs; 0x1_FED00000 aliases 0xFED00000 once xenalyze cuts the address to 32 bits.
MMIO64 = [0x100000000, 0x800001000, 0x1FED00000, 0xE000000010]


def record(event: int, words=(), tsc: int | None = None) -> bytes:
    """One trace record (struct t_rec): header, optional TSC, extra words."""
    words = list(words)
    if len(words) > 7:
        raise ValueError("a trace record holds at most 7 extra words")
    hdr = (event & 0x0FFFFFFF) | (len(words) << 28) | ((1 << 31) if tsc is not None else 0)
    out = struct.pack("<I", hdr)
    if tsc is not None:
        out += struct.pack("<II", tsc & 0xFFFFFFFF, tsc >> 32)
    return out + struct.pack(f"<{len(words)}I", *[w & 0xFFFFFFFF for w in words])


def cpu_change(pcpu: int, nbytes: int) -> bytes:
    """The 12-byte window header xentrace writes before each pCPU buffer read."""
    return record(TRC_TRACE_CPU_CHANGE, [pcpu, nbytes])


def runstate_event(old: int, new: int) -> int:
    return TRC_SCHED_RUNSTATE_CHANGE | (old << 8) | (new << 4)


@dataclass
class _XaExit:
    """xenalyze's per-exit I/O state (hvm_data.inflight + post_process), replayed.

    From tools/xentrace/xenalyze.c: hvm_vmexit_process clears the in-flight data; the first I/O
    record of the exit sets the postprocess (hvm_set_postprocess refuses a second one), later ones
    overwrite port/gpa (and, for MMIO, the direction); hvm_close_vmexit runs it once, at VMENTRY,
    or earlier when the vCPU becomes runnable (sched_runstate_process). An I/O record seen while no
    exit is open (vmexit_valid 0), e.g. a read completed after the wait for qemu, is dropped.
    Port I/O: hvm_io_{read,write}_postprocess count the last port with the first direction.
    MMIO: enumerate_mmio counts the last gpa (cut to 32 bits: io_address.pa is unsigned int) with
    the last direction, only with data (not rep), and skips VGA unless told not to.
    """
    post: str | None = None        # "pio" | "mmio"
    pio_dir: int = 0
    port: int = 0
    gpa: int = 0
    mmio_dir: int = 0
    data_valid: bool = False


@dataclass
class SynthTrace:
    data: bytes
    truth: Counter                              # (domid, vcpu, type, dir, addr) -> records
    xa_counted: Counter = field(default_factory=Counter)  # (dom, vcpu, type, dir, addr32, vga)
    # (domid, vcpu, type, dir, addr, rip, service cycles or -1) -> records
    io_truth: Counter = field(default_factory=Counter)
    pcpus: int = 0
    cpu_hz: int = 0
    records: int = 0                            # trace records, TRC_TRACE_CPU_CHANGE excluded
    windows: int = 0                            # TRC_TRACE_CPU_CHANGE records
    io_records: int = 0
    lost_records: int = 0                       # sum of the TRC_LOST_RECORDS counts
    lost_record_records: int = 0                # TRC_LOST_RECORDS records
    wrap_records: int = 0
    waited_reads: int = 0                       # reads completed after waiting for qemu
    migrations: int = 0                         # vCPUs resumed on another pCPU after a wait/preempt
    first_tsc: int = 0
    last_tsc: int = 0

    def xenalyze_expected(self, skip_vga: bool = True) -> Counter:
        """(domid, vcpu, type, dir, addr32) -> count, as xenalyze enumerates them."""
        out = Counter()
        for (dom, vcpu, typ, d, addr, is_vga), n in self.xa_counted.items():
            if typ == TYPE_MMIO and skip_vga and is_vga:
                continue
            out[(dom, vcpu, typ, d, addr)] += n
        return out

    def write(self, path) -> None:
        with open(path, "wb") as fh:
            fh.write(self.data)

    def summary(self) -> dict:
        return {
            "bytes": len(self.data), "pcpus": self.pcpus, "cpu_hz": self.cpu_hz,
            "records": self.records, "windows": self.windows, "io_records": self.io_records,
            "lost_records": self.lost_records, "lost_record_records": self.lost_record_records,
            "wrap_records": self.wrap_records, "waited_reads": self.waited_reads,
            "migrations": self.migrations,
            "truth": [[*k, v] for k, v in sorted(self.truth.items())],
        }


class _VCpu:
    __slots__ = ("dom", "vid", "hvm", "state", "pcpu", "pending", "wake_at", "wide",
                 "xa_open", "xa", "exit_tsc", "known", "io_in_exit", "in_exit", "exit_end",
                 "exit_rip", "exit_ios")

    def __init__(self, dom: int, vid: int, hvm: bool, wide: bool):
        self.dom, self.vid, self.hvm, self.wide = dom, vid, hvm, wide
        self.state = RUNNABLE
        self.pcpu = -1
        self.pending: list = []        # actions to run when it next runs (rest of an open exit)
        self.wake_at = 0
        self.xa_open = False
        self.xa = _XaExit()
        self.exit_tsc = 0
        self.known = False             # has a scheduler record named it yet
        self.io_in_exit = False
        self.in_exit = False           # between a (traced) VMEXIT and its VMENTRY
        self.exit_end: int | None = None   # when the exit's request was answered
        self.exit_rip = 0
        self.exit_ios: list = []       # I/O keys of the exit waiting for exit_end

    @property
    def word(self) -> int:
        return (self.dom << 16) | self.vid


class _Gen:
    def __init__(self, rng: random.Random, n_pcpus: int, domains, dom0_vcpus: int, amd: bool,
                 cpu_hz: int, opts: dict, keep_io_truth: bool = True):
        self.rng, self.amd, self.o = rng, amd, opts
        self.now = 1_000_000_000 + rng.randrange(1 << 20)
        self.streams: list[list[tuple[int, bytes]]] = [[] for _ in range(n_pcpus)]
        self.current: list[_VCpu | None] = [None] * n_pcpus
        self.known_pcpu = [False] * n_pcpus     # pCPU has written a scheduler record
        self.idle = [_VCpu(IDLE_DOMAIN, p, False, False) for p in range(n_pcpus)]
        self.guests = [_VCpu(d, v, True, d % 2 == 1) for d, n in domains for v in range(n)]
        self.dom0 = [_VCpu(0, v, False, False) for v in range(dom0_vcpus)]
        self.vcpus = self.guests + self.dom0
        self.t = SynthTrace(b"", Counter(), pcpus=n_pcpus, cpu_hz=cpu_hz)
        self.lost_plan: set[int] = set()
        self.keep_io_truth = keep_io_truth

    # -- output ---------------------------------------------------------------------------------
    def tick(self, lo: int = 200, hi: int = 4000) -> int:
        self.now += self.rng.randint(lo, hi)
        return self.now

    def emit(self, p: int, rec: bytes, drop: bool = False) -> None:
        if drop:
            return
        if self.o["p_wrap"] and self.rng.random() < self.o["p_wrap"]:
            self.emit_wrap(p)
        self.streams[p].append((self.now, rec))
        self.t.records += 1

    def emit_wrap(self, p: int) -> None:
        space = 4 * self.rng.randint(1, 10)            # bytes left to the buffer end: 4..40
        extra = space - 4
        tsc = None
        if extra // 4 > 7:                             # trace.c insert_wrap_record
            tsc = self.now
            extra -= 8
        junk = [self.rng.getrandbits(32) for _ in range(extra // 4)]
        self.streams[p].append((self.now, record(TRC_TRACE_WRAP_BUFFER, junk, tsc)))
        self.t.records += 1
        self.t.wrap_records += 1

    # -- scheduling -----------------------------------------------------------------------------
    def sched(self, p: int, v: _VCpu, old: int, new: int, drop: bool = False) -> None:
        self.emit(p, record(runstate_event(old, new), [v.word], self.tick(50, 400)), drop)
        if not drop:
            self.known_pcpu[p] = True
            v.known = True

    def switch_out(self, p: int, new_state: int, drop: bool = False) -> _VCpu:
        v = self.current[p]
        self.sched(p, v, RUNNING, new_state, drop)
        v.state = new_state
        if new_state == RUNNABLE:
            self.exit_answered(v)                      # preempted: its request was served
            self.xa_close(v)                           # xenalyze closes an open exit here
        v.pcpu = p
        self.current[p] = None
        return v

    def switch_in(self, p: int, v: _VCpu, drop: bool = False) -> None:
        if v.pcpu not in (-1, p) and v.hvm:
            self.t.migrations += 1
        self.sched(p, v, RUNNABLE, RUNNING, drop)
        v.state = RUNNING
        v.pcpu = p
        self.current[p] = v
        pending, v.pending = v.pending, []
        for action in pending:
            action(p, v)

    def pick_next(self, p: int) -> _VCpu:
        ready = [v for v in self.vcpus if v.state == RUNNABLE and v not in self.current]
        if ready and self.rng.random() < 0.85:
            return self.rng.choice(ready)
        return self.idle[p]

    def wake_due(self) -> None:
        """Wake vCPUs whose wait is over; the waker is whichever pCPU handles the event."""
        for v in self.vcpus:
            if v.state in (BLOCKED, OFFLINE) and v.wake_at <= self.now:
                w = self.rng.randrange(len(self.streams))
                self.sched(w, v, v.state, RUNNABLE)
                v.state = RUNNABLE
                self.exit_answered(v)                  # woken: qemu answered
                self.xa_close(v)

    # -- service-time truth -----------------------------------------------------------------------
    def exit_answered(self, v: _VCpu) -> None:
        """The first end of v's open exit: its I/O records so far get their service time."""
        if not v.in_exit or v.exit_end is not None:
            return
        v.exit_end = self.now
        for key in v.exit_ios:
            self.io_done(key, v.exit_rip, self.now - v.exit_tsc)
        v.exit_ios = []

    def io_done(self, key, rip: int, cycles: int) -> None:
        if self.keep_io_truth:
            self.t.io_truth[(*key, rip, cycles)] += 1

    # -- xenalyze model ---------------------------------------------------------------------------
    def xa_vmexit(self, v: _VCpu) -> None:
        v.xa_open = True
        v.xa = _XaExit()

    def xa_io(self, v: _VCpu, typ: int, d: int, addr: int, with_data: bool) -> None:
        if not v.xa_open or not v.known:
            return                                     # dropped, or charged to the default domain
        x = v.xa
        if typ == TYPE_PIO:
            x.port = addr
            if x.post is None:
                x.post, x.pio_dir = "pio", d
        else:
            x.gpa, x.mmio_dir = addr & 0xFFFFFFFF, d
            if with_data:
                x.data_valid = True
            if x.post is None:
                x.post = "mmio"

    def xa_close(self, v: _VCpu) -> None:
        if not v.xa_open:
            return
        v.xa_open = False
        x = v.xa
        if not v.known or x.post is None:
            return
        if x.post == "pio":
            self.t.xa_counted[(v.dom, v.vid, TYPE_PIO, x.pio_dir, x.port, False)] += 1
        elif x.data_valid:
            vga = XA_VGA_START <= x.gpa < XA_VGA_END
            self.t.xa_counted[(v.dom, v.vid, TYPE_MMIO, x.mmio_dir, x.gpa, vga)] += 1

    # -- guest actions ----------------------------------------------------------------------------
    def vmexit(self, p: int, v: _VCpu, reason: int, drop: bool = False) -> None:
        # Xen < 4.19 traced SVM exits with the VMX ids too (xenalyze needs --svm-mode for them).
        base = TRC_HVM_SVM_EXIT if self.amd and not self.o["amd_legacy_ids"] else TRC_HVM_VMX_EXIT
        rip = self.rng.randrange(0xFFFFFFFF80000000, 0xFFFFFFFFFFFFF000) if v.wide \
            else self.rng.randrange(0xC0000000, 0xFFFFF000)
        if v.wide:
            rec = record(base | TRC_64_FLAG, [reason, rip & 0xFFFFFFFF, rip >> 32], self.tick())
        else:
            rec = record(base, [reason, rip], self.tick())
        self.emit(p, rec, drop)
        v.exit_tsc = self.now
        v.io_in_exit = False
        if not drop:
            v.in_exit, v.exit_end, v.exit_rip, v.exit_ios = True, None, rip, []
            self.xa_vmexit(v)

    def vmentry(self, p: int, v: _VCpu, drop: bool = False) -> None:
        self.emit(p, record(TRC_HVM_VMENTRY, [], self.tick(100, 3000)), drop)
        if drop:
            return
        self.exit_answered(v)
        v.in_exit = False
        self.xa_close(v)

    def io(self, p: int, v: _VCpu, typ: int, d: int, addr: int, rep: bool,
           drop: bool = False) -> None:
        data = self.rng.getrandbits(32)
        if typ == TYPE_PIO:
            ev = TRC_HVM_IOPORT_READ if d == DIR_READ else TRC_HVM_IOPORT_WRITE
            words = [addr] if rep else [addr, data]
        else:
            ev = TRC_HVM_IOMEM_READ if d == DIR_READ else TRC_HVM_IOMEM_WRITE
            if addr >> 32:                               # hvmtrace_io_assist: 64-bit gpa
                ev |= TRC_64_FLAG
                words = [addr & 0xFFFFFFFF, addr >> 32] + ([] if rep else [data, 0])
            else:
                words = [addr] if rep else [addr, data]
        self.emit(p, record(ev, words), drop)
        if drop:
            return
        v.io_in_exit = True
        self.t.io_records += 1
        owner = (v.dom, v.vid) if self.known_pcpu[p] else (-1, -1)
        key = (*owner, typ, d, addr)
        self.t.truth[key] += 1
        if not v.in_exit:
            self.io_done(key, 0, -1)
        elif v.exit_end is not None:
            self.io_done(key, v.exit_rip, v.exit_end - v.exit_tsc)
        else:
            v.exit_ios.append(key)
        self.xa_io(v, typ, d, addr, not rep)

    def pick_io(self) -> tuple[int, int, int, bool]:
        o, r = self.o, self.rng
        rep = r.random() < o["p_rep"]
        if r.random() < o["p_mmio"]:
            x = r.random()
            if x < o["p_mmio64"]:
                addr = r.choice(MMIO64)
            elif x < o["p_mmio64"] + o["p_vga"]:
                addr = r.choice(MMIO_VGA)
            else:
                addr = r.choice(MMIO32)
            return TYPE_MMIO, r.choice((DIR_READ, DIR_WRITE)), addr, rep
        return TYPE_PIO, r.choice((DIR_READ, DIR_WRITE)), r.choice(PIO_PORTS), rep

    def exit_reason(self, typ: int) -> int:
        if typ == TYPE_PIO:
            return SVM_IOIO if self.amd else VMX_IO
        return SVM_NPF if self.amd else VMX_EPT

    def io_exit(self, p: int, v: _VCpu, drop: bool = False) -> None:
        """One I/O exit of the current vCPU v on pCPU p, in one of the shapes Xen writes."""
        r, o = self.rng, self.o
        typ, d, addr, rep = self.pick_io()
        self.vmexit(p, v, self.exit_reason(typ), drop)
        shape = r.random()
        if not drop and shape < o["p_wait"]:
            # Sent to qemu: the vCPU blocks in Xen (running->offline) until qemu answers. A write
            # is traced before it waits, a read only once it has resumed (emulate.c).
            if d == DIR_WRITE:
                self.io(p, v, typ, d, addr, rep)
            self.switch_out(p, OFFLINE)
            v.wake_at = self.now + r.randint(2_000, 60_000)

            def resume(q, vv, typ=typ, d=d, addr=addr, rep=rep):
                if d == DIR_READ:
                    self.t.waited_reads += 1
                    self.io(q, vv, typ, d, addr, rep)
                self.vmentry(q, vv)
            v.pending.append(resume)
            self.switch_in(p, self.pick_next(p))
            return
        if shape < o["p_wait"] + o["p_pair"] and not rep:
            # Two accesses in one exit: an MMIO read-modify-write (read then write, same gpa), or
            # two port accesses emulated in one go (real-mode emulation loops).
            if typ == TYPE_MMIO:
                self.io(p, v, typ, DIR_READ, addr, False, drop)
                self.io(p, v, typ, DIR_WRITE, addr, False, drop)
            else:
                self.io(p, v, typ, d, addr, False, drop)
                self.io(p, v, typ, r.choice((DIR_READ, DIR_WRITE)), r.choice(PIO_PORTS),
                        False, drop)
        else:
            self.io(p, v, typ, d, addr, rep, drop)
        self.vmentry(p, v, drop)

    def other_exit(self, p: int, v: _VCpu) -> None:
        """An exit Xen handles without I/O (CPUID): VMEXIT, its handler record, VMENTRY."""
        self.vmexit(p, v, SVM_CPUID if self.amd else VMX_CPUID)
        self.emit(p, record(TRC_HVM_CPUID, [self.rng.getrandbits(8), 0, 0, 0, 0]))
        self.vmentry(p, v)

    def preempt(self, p: int, v: _VCpu) -> None:
        """Timer interrupt exit, descheduled (running->runnable), resumed later, maybe elsewhere."""
        self.vmexit(p, v, SVM_INTR if self.amd else VMX_EXTINT)
        self.switch_out(p, RUNNABLE)
        v.pending.append(lambda q, vv: self.vmentry(q, vv))
        self.switch_in(p, self.pick_next(p))

    def halt(self, p: int, v: _VCpu) -> None:
        self.vmexit(p, v, SVM_HLT if self.amd else VMX_HLT)
        self.switch_out(p, BLOCKED)
        v.wake_at = self.now + self.rng.randint(5_000, 200_000)
        v.pending.append(lambda q, vv: self.vmentry(q, vv))
        self.switch_in(p, self.pick_next(p))

    def lost_burst(self, p: int, v: _VCpu) -> None:
        """The pCPU's buffer is full: some exits of v are lost; Xen writes TRC_LOST_RECORDS (with
        the first lost TSC and the current vCPU) before the next record that fits."""
        first = self.tick()
        n = 0
        for _ in range(self.rng.randint(1, 6)):
            self.io_exit(p, v, drop=True)
            n += 3
        self.tick()
        self.emit(p, record(TRC_LOST_RECORDS,
                            [n, (v.dom & 0xFFFF) | (v.vid << 16), first & 0xFFFFFFFF, first >> 32],
                            self.now))
        self.t.lost_records += n
        self.t.lost_record_records += 1
        # xenalyze process_lost_records -> lose_vcpu on every vCPU not running: their open exits
        # are dropped (vmexit_valid = 0), e.g. a write still waiting for qemu is never counted.
        for w in self.guests:
            if w.state != RUNNING:
                w.xa_open = False

    # -- main loop ------------------------------------------------------------------------------
    def start(self) -> None:
        """Each pCPU starts either idle or running a vCPU; optionally with records written before
        its first scheduler record (owner unknown to a reader)."""
        for p in range(len(self.streams)):
            self.tick()
            free = [v for v in self.vcpus if not v.known and v not in self.current]
            v = self.rng.choice(free) if free and self.rng.random() < 0.8 else None
            if v is not None and v.hvm and self.o["unknown_prefix"]:
                # Running since before the trace started: an exit, then descheduled.
                self.current[p] = v
                v.state, v.pcpu = RUNNING, p
                self.io_exit_simple(p, v)
                self.switch_out(p, RUNNABLE)
                self.switch_in(p, self.idle[p] if self.rng.random() < 0.5 else self.pick_next(p))
            elif v is not None:
                v.state = RUNNABLE
                self.switch_in(p, v)
            else:
                self.switch_in(p, self.idle[p])

    def io_exit_simple(self, p: int, v: _VCpu) -> None:
        typ, d, addr, rep = self.pick_io()
        self.vmexit(p, v, self.exit_reason(typ))
        self.io(p, v, typ, d, addr, rep)
        self.vmentry(p, v)

    def step(self) -> None:
        r = self.rng
        self.wake_due()
        p = r.randrange(len(self.streams))
        v = self.current[p]
        if v is None:
            self.switch_in(p, self.pick_next(p))
            return
        if not v.hvm:
            # idle or dom0: pick up runnable work now and then, or keep running.
            if r.random() < self.o["p_idle_switch"]:
                self.switch_out(p, RUNNABLE if v.dom != IDLE_DOMAIN else RUNNABLE)
                self.switch_in(p, self.pick_next(p))
            elif r.random() < 0.3:
                self.emit(p, record(TRC_SCHED_CONTINUE_RUNNING, [v.word], self.tick()))
            else:
                self.tick()
            return
        x = r.random()
        io_end = self.o["p_io_exit"]
        other_end = io_end + self.o["p_other_exit"]
        preempt_end = other_end + self.o["p_preempt"]
        if p in self.lost_plan and x < 0.2:
            self.lost_plan.discard(p)
            self.lost_burst(p, v)
        elif x < io_end:
            self.io_exit(p, v)
        elif x < other_end:
            self.other_exit(p, v)
        elif x < preempt_end:
            self.preempt(p, v)
        elif x < preempt_end + self.o["p_halt"]:
            self.halt(p, v)
        else:
            self.emit(p, record(TRC_SCHED_CONTINUE_RUNNING, [v.word], self.tick()))

    def finish(self) -> None:
        """Run until every vCPU is out of its exit (nothing half-done at the end of the file)."""
        for _ in range(100000):
            waiting = [v for v in self.guests if v.pending or v.state in (BLOCKED, OFFLINE)]
            if not waiting:
                return
            self.now = max(self.now, min(v.wake_at for v in waiting))
            self.wake_due()
            for p in range(len(self.streams)):
                cur = self.current[p]
                if cur is None or not cur.hvm:
                    ready = [v for v in self.vcpus if v.state == RUNNABLE and v.pending
                             and v not in self.current]
                    if ready:
                        if cur is not None:
                            self.switch_out(p, RUNNABLE)
                        self.switch_in(p, ready[0])
                elif cur.hvm and not cur.pending:
                    self.switch_out(p, RUNNABLE)
                    self.switch_in(p, self.idle[p])
        raise RuntimeError("synth: vCPUs still waiting at the end")  # pragma: no cover


def generate(seed: int = 0, *, pcpus: int = 4, domains=((1, 2), (2, 3)), dom0_vcpus: int = 2,
             steps: int = 2000, amd: bool = False, p_mmio: float = 0.4, p_mmio64: float = 0.15,
             p_vga: float = 0.2, p_rep: float = 0.1, p_wait: float = 0.3, p_pair: float = 0.05,
             lost: int = 2, p_wrap: float = 0.01, unknown_prefix: bool = True,
             amd_legacy_ids: bool = False, p_io_exit: float = 0.78, p_other_exit: float = 0.0,
             p_preempt: float = 0.10, p_halt: float = 0.08, p_idle_switch: float = 0.6,
             window_records: int = 40, cpu_hz: int = 2_400_000_000) -> SynthTrace:
    """A xentrace capture of a simulated host, with its ground truth (see the module doc).

    ``steps`` is the number of scheduling decisions (about 0.6 I/O records each); ``lost`` the
    number of TRC_LOST_RECORDS bursts; ``window_records`` the mean records per window. With
    ``amd=True`` exits carry SVM reasons and the Xen >= 4.19 SVM ids (0x81003/0x81103), or the
    older shared ids (0x81002/0x81102) with ``amd_legacy_ids``; the same seed gives the same
    trace either way, ids aside. A guest vCPU's scheduling step is an I/O exit (``p_io_exit``),
    a non-I/O exit (``p_other_exit``), a preemption, a halt, or else a continue_running record;
    an idle or dom0 vCPU yields its pCPU with ``p_idle_switch``.
    """
    if pcpus < 1 or pcpus > 64:
        raise ValueError("pcpus must be 1..64")
    rng = random.Random(seed)
    opts = dict(p_mmio=p_mmio, p_mmio64=p_mmio64, p_vga=p_vga, p_rep=p_rep, p_wait=p_wait,
                p_pair=p_pair, p_wrap=p_wrap, unknown_prefix=unknown_prefix,
                amd_legacy_ids=amd_legacy_ids, p_io_exit=p_io_exit, p_other_exit=p_other_exit,
                p_preempt=p_preempt, p_halt=p_halt, p_idle_switch=p_idle_switch)
    g = _Gen(rng, pcpus, domains, dom0_vcpus, amd, cpu_hz, opts)
    g.start()
    first = g.now
    lost_at = sorted(rng.randrange(steps // 4, steps) for _ in range(lost)) if steps >= 4 else []
    for i in range(steps):
        while lost_at and lost_at[0] == i:
            lost_at.pop(0)
            g.lost_plan.add(rng.randrange(pcpus))
        g.step()
    g.finish()
    t = g.t
    t.first_tsc, t.last_tsc = first, g.now
    t.data, t.windows = _windows(g.streams, rng, window_records)
    return t


def _windows(streams, rng: random.Random, mean: int) -> tuple[bytes, int]:
    """Lay the per-pCPU streams out as xentrace does: rounds over the pCPUs in order, each round
    writing what every pCPU buffer holds up to a read time (one window per non-empty buffer)."""
    pos = [0] * len(streams)
    total = sum(len(s) for s in streams)
    out, nwin = bytearray(), 0
    all_times = sorted(ts for s in streams for ts, _ in s)
    k = 0
    while any(pos[i] < len(s) for i, s in enumerate(streams)):
        k = min(len(all_times) - 1, k + max(1, int(rng.expovariate(1 / max(1, mean))) *
                                              len(streams)))
        cut = all_times[k] if k < len(all_times) - 1 else float("inf")
        for cpu, s in enumerate(streams):
            j = pos[cpu]
            while j < len(s) and s[j][0] <= cut:
                j += 1
            if j > pos[cpu]:
                body = b"".join(rec for _, rec in s[pos[cpu]:j])
                out += cpu_change(cpu, len(body)) + body
                nwin += 1
                pos[cpu] = j
    assert sum(pos) == total
    return bytes(out), nwin


# --- bench mixes, bounded-memory writing, tiling -----------------------------------------------

# Host shapes for bench/xentrace_decode.py (keyword arguments of generate() / stream()).
MIXES: dict[str, dict] = {
    # an I/O storm: ~25% of records are I/O, nearly every record inside a VMEXIT/VMENTRY pair,
    # few scheduler records; 2 pCPUs, 2 domains x 2 vCPUs, half the MMIO above 4 GiB
    "io-dense": dict(pcpus=2, domains=((1, 2), (2, 2)), dom0_vcpus=1, p_io_exit=0.68,
                     p_other_exit=0.30, p_preempt=0.008, p_halt=0.004, p_wait=0.01,
                     p_mmio=0.5, p_mmio64=0.5, p_vga=0.05, p_rep=0.05, p_pair=0.05,
                     p_idle_switch=0.05, p_wrap=0.001, lost_rate=0.0),
    # the bench's historical mix: 8 pCPUs, 10 guest vCPUs, 30% of exits wait for qemu
    "sched-heavy": dict(pcpus=8, domains=((1, 4), (2, 4), (3, 2)), lost_rate=1e-5),
    # an AMD host (exit ids as Xen < 4.19 writes them: xenalyze --svm-mode), mostly MMIO,
    # most of it above 4 GiB
    "mmio64-amd": dict(pcpus=4, domains=((1, 2), (2, 2), (3, 2)), amd=True, amd_legacy_ids=True,
                       p_mmio=0.9, p_mmio64=0.6, p_vga=0.1, p_wait=0.15, lost_rate=0.0),
    # 60 domains x 2 vCPUs on 8 pCPUs, preempted often: vCPUs migrate all the time
    "many-domains": dict(pcpus=8, domains=tuple((d, 2) for d in range(1, 61)), dom0_vcpus=2,
                         p_io_exit=0.6, p_preempt=0.25, p_halt=0.1, p_wait=0.3, lost_rate=1e-5),
    # a tracer that cannot keep up: a lost-records burst every ~40 scheduling steps
    "lost-heavy": dict(pcpus=4, domains=((1, 2), (2, 2), (3, 2)), lost_rate=0.025),
}


def stream(seed: int = 0, *, target_bytes: int, segment_steps: int = 20_000,
           lost_rate: float = 0.0, pcpus: int = 4, domains=((1, 2), (2, 3)),
           dom0_vcpus: int = 2, amd: bool = False, window_records: int = 40,
           cpu_hz: int = 2_400_000_000, **opts):
    """Yield the bytes of a capture of at least ``target_bytes``, in bounded memory.

    The host of ``generate`` (same options; ``lost_rate``: chance per step that a pCPU's next
    exits are lost) is simulated ``segment_steps`` at a time; after each segment every record
    written so far is laid out in windows and yielded. Counters are kept, per-record truth is
    not (``stream_trace`` gives the SynthTrace of counters after the last piece)."""
    rng = random.Random(seed)
    wrng = random.Random(seed ^ 0x5EED5)
    base = dict(p_mmio=0.4, p_mmio64=0.15, p_vga=0.2, p_rep=0.1, p_wait=0.3, p_pair=0.05,
                p_wrap=0.01, unknown_prefix=True, amd_legacy_ids=False, p_io_exit=0.78,
                p_other_exit=0.0, p_preempt=0.10, p_halt=0.08, p_idle_switch=0.6)
    unknown = set(opts) - set(base)
    if unknown:
        raise TypeError(f"stream(): unknown options {sorted(unknown)}")
    base.update(opts)
    g = _Gen(rng, pcpus, domains, dom0_vcpus, amd, cpu_hz, base, keep_io_truth=False)
    g.start()
    g.t.first_tsc = g.now
    written = 0
    while written < target_bytes:
        for _ in range(segment_steps):
            if lost_rate and rng.random() < lost_rate:
                g.lost_plan.add(rng.randrange(pcpus))
            g.step()
        data, nwin = _windows(g.streams, wrng, window_records)
        g.streams = [[] for _ in g.streams]
        g.t.windows += nwin
        written += len(data)
        yield data
    g.finish()
    data, nwin = _windows(g.streams, wrng, window_records)
    g.t.windows += nwin
    g.t.last_tsc = g.now
    stream.last_trace = g.t
    yield data


def write_capture(path, seed: int = 0, **kw) -> SynthTrace:
    """``stream(seed, **kw)`` into a file; returns the counters (SynthTrace without data)."""
    with open(path, "wb") as fh:
        for piece in stream(seed, **kw):
            fh.write(piece)
    return stream.last_trace


def tile(data: bytes, copies: int):
    """Yield ``copies`` copies of a capture, each with every TSC (records' and lost records'
    first TSC) shifted to follow the previous copy's last one: one long capture of the same host
    (the vCPUs' states at the seams are what they are; the bench only times it)."""
    import numpy as np
    w = np.frombuffer(data[:len(data) // 4 * 4], "<u4")
    tsc_at, lost_at = [], []
    off, n = 0, len(w)
    while off + 3 <= n:
        assert w[off] == 0x2001F003, f"window header expected at word {off}"
        end = off + 3 + int(w[off + 2]) // 4
        off += 3
        while off < end:
            h = int(w[off])
            if h >> 31:
                tsc_at.append(off + 1)
                if h & 0x0FFFFFFF == TRC_LOST_RECORDS:
                    lost_at.append(off + 5)
            off += 1 + ((h >> 28) & 7) + 2 * (h >> 31)
    pos = np.array(tsc_at + lost_at, np.int64)
    lo = w[pos].astype(np.uint64) | (w[pos + 1].astype(np.uint64) << np.uint64(32))
    span = int(lo.max() - lo.min()) + 1000
    for k in range(copies):
        out = w.copy()
        val = lo + np.uint64(k * span)
        out[pos] = (val & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        out[pos + 1] = (val >> np.uint64(32)).astype(np.uint32)
        yield out.tobytes()


# --- command line: write a capture, or play one like xentrace does ---------------------------------

def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m iotrace.xentrace.testing.synth",
                                 description="Write a synthetic xentrace capture, or stream one "
                                             "to stdout like xentrace (a stand-in for tests).")
    ap.add_argument("-o", "--output", help="write the capture here; ground truth goes to stdout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--pcpus", type=int, default=4)
    ap.add_argument("--amd", action="store_true", help="SVM exit ids (Xen >= 4.19 on AMD)")
    ap.add_argument("--lost", type=int, default=2)
    ap.add_argument("--stream", action="store_true", help="play the capture to stdout")
    ap.add_argument("--input", help="with --stream: play this file instead of generating one")
    ap.add_argument("--chunk", type=int, default=997, help="bytes per write (default 997)")
    ap.add_argument("--pause", type=float, default=0.01, help="seconds between writes")
    ap.add_argument("--die-after", type=int, default=None,
                    help="with --stream: exit 1 with a message after this many bytes")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="with --stream: stay alive this long after the last byte")
    a = ap.parse_args(argv)
    if not 1 <= a.pcpus <= 64 or a.steps < 0 or a.chunk < 1 or a.lost < 0:
        print("synth: --pcpus must be 1..64, --steps, --lost >= 0, --chunk >= 1",
              file=sys.stderr)
        return 2
    if a.stream:
        if a.input:
            try:
                with open(a.input, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                print(f"synth: {a.input}: {exc.strerror}", file=sys.stderr)
                return 2
        else:
            data = generate(a.seed, steps=a.steps, pcpus=a.pcpus, amd=a.amd, lost=a.lost).data
        # Like xentrace (close_handler): SIGINT/SIGTERM end the run quietly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: sys.exit(0))
        out = sys.stdout.buffer
        limit = len(data) if a.die_after is None else min(a.die_after, len(data))
        try:
            for i in range(0, limit, a.chunk):
                out.write(data[i:min(i + a.chunk, limit)])
                out.flush()
                if a.pause:
                    time.sleep(a.pause)
        except BrokenPipeError:
            return 1
        if a.die_after is not None:
            print("xentrace stand-in: simulated failure", file=sys.stderr)
            return 1
        if a.hold:
            time.sleep(a.hold)
        return 0
    t = generate(a.seed, steps=a.steps, pcpus=a.pcpus, amd=a.amd, lost=a.lost)
    if a.output:
        try:
            t.write(a.output)
        except OSError as exc:
            print(f"synth: {a.output}: {exc.strerror}", file=sys.stderr)
            return 2
    json.dump(t.summary(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
