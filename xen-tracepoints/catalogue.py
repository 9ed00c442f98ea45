"""The Xen trace events iotrace reads: ids, names, payload layout and version notes.

Every fact here was checked against Xen's own sources (xen-project/xen, master of 2026-08):

* ids: ``xen/include/public/trace.h`` (TRC_GEN 0x0001f000, TRC_SCHED_MIN 0x00021000,
  TRC_HVM_ENTRYEXIT 0x00081000, TRC_HVM_HANDLER 0x00082000, TRC_64_FLAG 0x100).
* record layout: ``struct t_rec`` in the same header: u32 header = event (bits 0-27),
  extra_u32 (bits 28-30, 0..7 words), cycles_included (bit 31); then ``cycles_lo, cycles_hi`` when
  bit 31 is set; then the extra words.
* file layout: ``tools/xentrace/xentrace.c``: no file header; each read of a pCPU buffer is written as
  ``struct cpu_change_record { u32 header; int cpu; unsigned window_size; }`` whose header is
  ``TRC_TRACE_CPU_CHANGE | (2 << 28)`` = 0x2001f003 (no TSC), followed by window_size bytes of that
  pCPU's records. A window may be written in two write() calls, but has one cpu_change record.
* I/O payloads: ``hvmtrace_io_assist`` in ``xen/arch/x86/hvm/emulate.c``: event IOPORT/IOMEM
  READ/WRITE; ``TRC_64_FLAG`` is or-ed in when the address does not fit in 32 bits; the address is
  followed by the data (same width as the address) unless ``data_is_ptr`` (rep), in which case
  the data words are omitted. Traced with ``trace()``, i.e. without TSC. The size of the access,
  the rep count and df are not recorded.
* runstate: ``trace_runstate_change`` in ``xen/common/sched/core.c``: event
  ``TRC_SCHED_RUNSTATE_CHANGE | (old & 3) << 8 | (new & 3) << 4``, with TSC, one word
  ``struct { u16 vcpu, domain; }`` i.e. word = domain << 16 | vcpu. ``trace_continue_running``:
  TRC_SCHED_CONTINUE_RUNNING, same word. Runstates: 0 running, 1 runnable, 2 blocked, 3 offline
  (``xen/include/public/vcpu.h``).
* lost records: ``insert_lost_records`` in ``xen/common/trace.c``: TSC, 4 words
  ``struct __packed { u32 lost_records; u16 did, vid; u64 first_tsc; }`` — domain in the LOW half
  of word 1, the opposite packing to the scheduler records. did/vid are the vCPU current on the
  pCPU when the record is inserted.
* wrap: ``insert_wrap_record`` in the same file: TRC_TRACE_WRAP_BUFFER pads a buffer to its end;
  it carries no data (it may carry a TSC just to take up space).
* exits: TRC_HVM_VMENTRY (TSC, no words); TRC_HVM_VMX_EXIT [reason, eip] and
  TRC_HVM_VMX_EXIT64 [reason, rip_lo, rip_hi], with TSC. TRC_HVM_SVM_EXIT / _EXIT64 (0x81003 /
  0x81103) are the AMD ids in Xen >= 4.19; older Xen traced AMD exits with the VMX ids.
* idle vCPUs belong to DOMID_IDLE = 0x7fff (``xen/include/public/xen.h``).
* ``tools/xentrace/xenalyze.c`` defaults: ``DEFAULT_CPU_HZ 2400000000LL``; pio enumeration on,
  mmio enumeration off, ``mmio_enumeration_skip_vga = 1`` (its --help text says "Default: 0", the
  code says 1; the code wins).
"""
from __future__ import annotations

from dataclasses import dataclass

# --- record header fields (struct t_rec, xen/include/public/trace.h) ---
EVENT_MASK = 0x0FFFFFFF
EXTRA_SHIFT = 28
EXTRA_MASK = 0x7
TSC_BIT = 0x80000000
TRC_64_FLAG = 0x100

# --- TRC_GEN ---
TRC_LOST_RECORDS = 0x0001F001
TRC_TRACE_WRAP_BUFFER = 0x0001F002
TRC_TRACE_CPU_CHANGE = 0x0001F003
# The header word xentrace writes before every window: CPU_CHANGE with 2 extra words, no TSC.
CPU_CHANGE_HEADER = TRC_TRACE_CPU_CHANGE | (2 << EXTRA_SHIFT)   # 0x2001f003

# --- TRC_SCHED_MIN ---
TRC_SCHED_RUNSTATE_CHANGE = 0x00021001
TRC_SCHED_CONTINUE_RUNNING = 0x00021002
RUNSTATE_RUNNING, RUNSTATE_RUNNABLE, RUNSTATE_BLOCKED, RUNSTATE_OFFLINE = 0, 1, 2, 3
RUNSTATE_NAMES = {0: "running", 1: "runnable", 2: "blocked", 3: "offline"}
# The runstate-change id with the old/new states masked out: event & RUNSTATE_MASK == CHANGE.
RUNSTATE_MASK = 0x0FFFF00F

DOMID_IDLE = 0x7FFF            # idle vCPUs (xen/include/public/xen.h)
XENALYZE_DEFAULT_DOMAIN = 32768  # xenalyze's pseudo-domain for records of unknown owner

# --- TRC_HVM_ENTRYEXIT ---
TRC_HVM_VMENTRY = 0x00081001
TRC_HVM_VMX_EXIT = 0x00081002
TRC_HVM_VMX_EXIT64 = 0x00081102
TRC_HVM_SVM_EXIT = 0x00081003      # Xen >= 4.19 (AMD)
TRC_HVM_SVM_EXIT64 = 0x00081103    # Xen >= 4.19 (AMD)
VMEXIT_IDS = (TRC_HVM_VMX_EXIT, TRC_HVM_VMX_EXIT64, TRC_HVM_SVM_EXIT, TRC_HVM_SVM_EXIT64)

# --- TRC_HVM_HANDLER: the I/O emitter (hvmtrace_io_assist) ---
TRC_HVM_IOPORT_READ = 0x00082016
TRC_HVM_IOPORT_WRITE = 0x00082216
TRC_HVM_IOMEM_READ = 0x00082017
TRC_HVM_IOMEM_WRITE = 0x00082217
TRC_HVM_IOPORT_READ64 = TRC_HVM_IOPORT_READ | TRC_64_FLAG     # never seen (ports are 16 bit)
TRC_HVM_IOPORT_WRITE64 = TRC_HVM_IOPORT_WRITE | TRC_64_FLAG   # but emitted if addr > 32 bit
TRC_HVM_IOMEM_READ64 = TRC_HVM_IOMEM_READ | TRC_64_FLAG      # 0x82117
TRC_HVM_IOMEM_WRITE64 = TRC_HVM_IOMEM_WRITE | TRC_64_FLAG    # 0x82317
IO_WRITE_BIT = 0x200                                          # xenalyze: mevt.write (bits 9-10)

# --- id masks the decoder classifies with (xtwalk.c mirrors them; a test compares) ---
IO_ID_MASK = EVENT_MASK & ~(TRC_64_FLAG | IO_WRITE_BIT)       # 0x0ffffcff: I/O id -> READ id
EXIT_ID_MASK = EVENT_MASK & ~TRC_64_FLAG                      # 0x0ffffeff: VMEXIT64 -> VMEXIT
MAX_PCPU_ID = 0xFFFF            # a window header naming a pCPU above this is taken as corrupt

# Handlers that claim xenalyze's per-exit post-process slot before an I/O record can
# (hvm_set_postprocess callers in xenalyze.c: pf_xen, cr_write, msr_write, msr_read, vmcall).
TRC_HVM_PF_XEN = 0x00082001
TRC_HVM_PF_XEN64 = 0x00082101
TRC_HVM_CR_WRITE = 0x00082009
TRC_HVM_CR_WRITE64 = 0x00082109
TRC_HVM_MSR_READ = 0x0008200C
TRC_HVM_MSR_WRITE = 0x0008200D
TRC_HVM_VMMCALL = 0x00082012
XENALYZE_CLAIMING_IDS = (TRC_HVM_PF_XEN, TRC_HVM_PF_XEN64, TRC_HVM_CR_WRITE, TRC_HVM_CR_WRITE64,
                         TRC_HVM_MSR_READ, TRC_HVM_MSR_WRITE, TRC_HVM_VMMCALL)

XENALYZE_DEFAULT_CPU_HZ = 2_400_000_000     # DEFAULT_CPU_HZ in tools/xentrace/xenalyze.c
XENALYZE_VGA_START = 0xA0000                # MMIO_VGA_START in xenalyze.c
XENALYZE_VGA_END = 0xBFFFF                  # MMIO_VGA_END, compared with '<' (end excluded)


@dataclass(frozen=True)
class TraceEvent:
    id: int
    name: str
    tsc: bool | None          # True: always has a TSC; False: never; None: either
    words: tuple[int, ...]    # allowed extra-word counts
    fields: str               # payload layout, in order
    note: str = ""


def _io(eid, name, is64, write, mmio):
    aw = 2 if is64 else 1
    width = "64" if is64 else "32"
    addr = "addr_lo, addr_hi" if is64 else ("port" if not mmio else "gpa")
    return TraceEvent(eid, name, False, (aw, 2 * aw),
                      f"{addr}, data ({width}-bit, omitted when data_is_ptr: rep)",
                      ("64-bit address variant: TRC_64_FLAG set when addr > 32 bits. " if is64 else "")
                      + ("writes traced before dispatch" if write else "reads traced at completion"))


EVENTS: dict[int, TraceEvent] = {e.id: e for e in [
    TraceEvent(TRC_LOST_RECORDS, "lost_records", True, (4,),
               "lost_count, did (low 16) | vid (high 16), first_tsc_lo, first_tsc_hi",
               "inserted by Xen when its buffer overflowed; did/vid = vCPU current at insertion"),
    TraceEvent(TRC_TRACE_WRAP_BUFFER, "wrap_buffer", None, tuple(range(8)), "padding",
               "pads a buffer to its end; skip"),
    TraceEvent(TRC_TRACE_CPU_CHANGE, "cpu_change", False, (2,), "pcpu (s32), window_bytes (u32)",
               "written by xentrace, starts every window"),
    TraceEvent(TRC_SCHED_RUNSTATE_CHANGE, "runstate_change", True, (1, 5),
               "vcpu (low 16) | domain (high 16)",
               "id = 0x21001 | old << 8 | new << 4; 5 words on builds tracing perf counters"),
    TraceEvent(TRC_SCHED_CONTINUE_RUNNING, "continue_running", True, (1, 5),
               "vcpu (low 16) | domain (high 16)"),
    TraceEvent(TRC_HVM_VMENTRY, "vmentry", True, (0,), ""),
    TraceEvent(TRC_HVM_VMX_EXIT, "vmexit", True, (2,), "exit_reason, eip"),
    TraceEvent(TRC_HVM_VMX_EXIT64, "vmexit64", True, (3,), "exit_reason, rip_lo, rip_hi"),
    TraceEvent(TRC_HVM_SVM_EXIT, "svm_exit", True, (2,), "exit_reason, eip", "Xen >= 4.19, AMD"),
    TraceEvent(TRC_HVM_SVM_EXIT64, "svm_exit64", True, (3,), "exit_reason, rip_lo, rip_hi",
               "Xen >= 4.19, AMD"),
    _io(TRC_HVM_IOPORT_READ, "ioport_read", False, False, False),
    _io(TRC_HVM_IOPORT_WRITE, "ioport_write", False, True, False),
    _io(TRC_HVM_IOMEM_READ, "iomem_read", False, False, True),
    _io(TRC_HVM_IOMEM_WRITE, "iomem_write", False, True, True),
    _io(TRC_HVM_IOPORT_READ64, "ioport_read64", True, False, False),
    _io(TRC_HVM_IOPORT_WRITE64, "ioport_write64", True, True, False),
    _io(TRC_HVM_IOMEM_READ64, "iomem_read64", True, False, True),
    _io(TRC_HVM_IOMEM_WRITE64, "iomem_write64", True, True, True),
]}

# I/O event id -> (type, dir, is64): types pio=0 / mmio=1 and dir read=1 as in iotrace.core.events.
IO_EVENTS: dict[int, tuple[int, int, bool]] = {
    TRC_HVM_IOPORT_READ: (0, 1, False),
    TRC_HVM_IOPORT_WRITE: (0, 0, False),
    TRC_HVM_IOMEM_READ: (1, 1, False),
    TRC_HVM_IOMEM_WRITE: (1, 0, False),
    TRC_HVM_IOPORT_READ64: (0, 1, True),
    TRC_HVM_IOPORT_WRITE64: (0, 0, True),
    TRC_HVM_IOMEM_READ64: (1, 1, True),
    TRC_HVM_IOMEM_WRITE64: (1, 0, True),
}


def event_name(event: int) -> str:
    """A readable name for an event id (runstate changes get their old/new states)."""
    event &= EVENT_MASK
    if event & RUNSTATE_MASK == TRC_SCHED_RUNSTATE_CHANGE:
        old, new = (event >> 8) & 0xF, (event >> 4) & 0xF
        return f"runstate_change {RUNSTATE_NAMES.get(old, old)}->{RUNSTATE_NAMES.get(new, new)}"
    ev = EVENTS.get(event)
    return ev.name if ev else f"0x{event:x}"


def runstate_event(old: int, new: int) -> int:
    """The TRC_SCHED_RUNSTATE_CHANGE id for a transition (xen/common/sched/core.c)."""
    return TRC_SCHED_RUNSTATE_CHANGE | (old & 3) << 8 | (new & 3) << 4


def header(event: int, n_extra: int, tsc: bool) -> int:
    """The u32 record header (struct t_rec) for an event with n_extra words."""
    if not 0 <= n_extra <= 7:
        raise ValueError("a trace record has 0..7 extra words")
    return (event & EVENT_MASK) | (n_extra << EXTRA_SHIFT) | (TSC_BIT if tsc else 0)


# What the compiled core (xtcore.c, xt_constants) was built with, in its order.
CORE_CONSTANTS = (CPU_CHANGE_HEADER, EVENT_MASK, TRC_LOST_RECORDS, TRC_SCHED_RUNSTATE_CHANGE,
                  RUNSTATE_MASK, TRC_SCHED_CONTINUE_RUNNING, TRC_HVM_VMENTRY, TRC_HVM_VMX_EXIT,
                  TRC_HVM_SVM_EXIT, TRC_64_FLAG, EXIT_ID_MASK, IO_ID_MASK, TRC_HVM_IOPORT_READ,
                  TRC_HVM_IOMEM_READ, IO_WRITE_BIT, XENALYZE_VGA_START, XENALYZE_VGA_END,
                  MAX_PCPU_ID) + XENALYZE_CLAIMING_IDS
