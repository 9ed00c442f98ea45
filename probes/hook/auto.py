"""Find QEMU's handle_ioreq, its two callers and ``send_vcpu`` in a stripped x86-64 binary.

A stripped build has no symbols, but it keeps what it needs to run, and that is enough:

* **Function bounds**: the unwind table (``.eh_frame``, see ``ehframe.py``).
* **handle_ioreq**: QEMU's trace events are compiled into every build. With the ``log`` trace
  backend (Debian) the generated ``trace_handle_ioreq()`` is inlined into handle_ioreq and keeps
  the event's format string from hw/xen/trace-events (hw/i386/xen/trace-events before 8.1) in
  .rodata: ``"handle_ioreq I/O=%p type=%d dir=%d df=%d ptr=%d port=0x%lx ..."``, and its twin
  prefixed with ``"%d@%zu.%06zu:"`` for ``-msg timestamp=on`` (scripts/tracetool/backend/log.py).
  The function holding the RIP-relative ``lea`` (non-PIE: the ``mov $imm32``) that loads them is
  handle_ioreq. With the ``dtrace`` backend (RHEL/Fedora) there is no string but a USDT note
  ``qemu:handle_ioreq`` whose probe point lies inside the same function. Either way that function
  must be the target of direct calls: a reference in a part the compiler split off
  (``handle_ioreq.cold``) is followed to the function that jumps into it.
* **The two call sites**: the ``call rel32`` instructions whose target is that function. QEMU has
  exactly two (hw/xen/xen-hvm-common.c from 8.1, hw/i386/xen/xen-hvm.c before):
  ``handle_buffered_iopage`` (buffered requests, no vCPU) and ``cpu_handle_ioreq`` (synchronous,
  vCPU in ``state->send_vcpu``). Three independent observations tell them apart, each a fact of
  that source: (1) cpu_handle_ioreq calls handle_buffered_iopage before serving its own request, so
  the buffered site's function is called from the synchronous site's function; (2) only the
  synchronous path stores the vCPU index into ``state`` (``state->send_vcpu = i`` in
  cpu_get_ioreq, inlined or not) before its call; (3) only the buffered loop advances the ring
  with ``qatomic_add(&buf_page->read_pointer, qw + 1)``, a ``lock add`` right after its call.
  "sure" needs two observations that agree and none that disagree.
* **send_vcpu's offset**: that store, ``mov %e.., disp(%state)``, where ``%state`` holds the
  pointer the synchronous site passes as handle_ioreq's first argument (followed into
  cpu_get_ioreq when it is not inlined); confirmed by a load of the same field after the call
  (``qemu_xen_evtchn_notify(..., state->ioreq_local_port[state->send_vcpu])``) and by the QEMU
  version in the banner (0x50 up to 8.0, 0x48 from 8.1).

Only x86-64 is decoded (capstone); other machines get a one-line reason.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

import numpy as np

from iotrace.probes.hook.ehframe import EhFrameError, Function, FunctionTable
from iotrace.probes.hook.elf import EM_X86_64, SHF_ALLOC, SHF_EXECINSTR, SHT_NOBITS, ElfFile, UsdtProbe

FUNC = "handle_ioreq"
ET_EXEC = 2                     # e_type of a non-PIE executable (System V gABI)
# The event's format string as QEMU's log backend emits it (the handle_ioreq event of
# hw/xen/trace-events, same text from QEMU 2.x to 10.0). handle_ioreq_read / handle_ioreq_write
# differ right after "handle_ioreq" and do not match.
TRACE_RE = re.compile(rb"handle_ioreq I/O=%p type=%d dir=%d df=%d ptr=%d port=")
TIMESTAMP_PREFIX = b"%d@%zu.%06zu:"

# Confidence, best first. exact: read from symbols or the table; sure: from the code, two or more
# independent observations agreeing; likely: one observation; guess: nothing in the code says it
# (QEMU banner, default); doubt: observations disagree.
CONFIDENCE = ("exact", "sure", "likely", "guess", "doubt")

SEND_VCPU_OFFSET_OLD = 0x50     # QEMU <= 8.0: XenIOState still has shared_vmport_page
SEND_VCPU_OFFSET_81 = 0x48      # QEMU >= 8.1 (include/hw/xen/xen-hvm-common.h)

CALLER_SAVED = frozenset({"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"})
LOCK_WINDOW = 64                # instructions after the buffered call searched for the lock add


def _full_reg_table() -> dict[str, str]:
    t = {}
    for r in "abcd":
        for n in (f"r{r}x", f"e{r}x", f"{r}x", f"{r}l", f"{r}h"):
            t[n] = f"r{r}x"
    for r in ("si", "di", "bp", "sp"):
        for n in (f"r{r}", f"e{r}", r, f"{r}l"):
            t[n] = f"r{r}"
    for i in range(8, 16):
        for n in (f"r{i}", f"r{i}d", f"r{i}w", f"r{i}b"):
            t[n] = f"r{i}"
    return t


FULL_REG = _full_reg_table()


def banner_send_vcpu(version: tuple[int, int] | None) -> int | None:
    if version is None:
        return None
    return SEND_VCPU_OFFSET_81 if version >= (8, 1) else SEND_VCPU_OFFSET_OLD


@dataclass
class Finding:
    """One number, how it was found, and how sure that is (one of CONFIDENCE)."""
    value: int | None
    how: str
    confidence: str

    def at_least(self, level: str) -> bool:
        return CONFIDENCE.index(self.confidence) <= CONFIDENCE.index(level)


@dataclass(frozen=True)
class CallSite:
    addr: int                       # vaddr of the call instruction
    ret: int                        # vaddr of the return address (the next instruction)
    function: Function              # the function holding it


@dataclass
class AutoResult:
    func: Finding | None = None             # handle_ioreq's vaddr
    buffered: Finding | None = None         # return address (vaddr) of the buffered call
    sync: Finding | None = None             # return address (vaddr) of the synchronous call
    send_vcpu: Finding | None = None        # offsetof(XenIOState, send_vcpu)
    sites: list[CallSite] = field(default_factory=list)
    buffered_sites: list[CallSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def buffered_range(self) -> tuple[int, int] | None:
        """Delta range [lo, hi) from handle_ioreq of the buffered calls' return addresses (what
        the BPF program compares the return address at entry with)."""
        if not self.buffered_sites or self.func is None:
            return None
        rets = sorted(s.ret - self.func.value for s in self.buffered_sites)
        return rets[0], rets[-1] + 1


# -- the code of one binary ------------------------------------------------------------------------

class Code:
    """The executable sections of one x86-64 binary: vectorised operand scans, and capstone
    disassembly of single functions (linear sweep over the FDE's range, cached)."""

    def __init__(self, elf: ElfFile, funcs: FunctionTable):
        try:
            import capstone
            from capstone import x86
        except ImportError:
            raise EhFrameError("the automatic resolver needs capstone "
                               "(apt-get install python3-capstone)") from None
        self.x86 = x86
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.md.detail = True
        self.elf, self.funcs = elf, funcs
        self.sections = [s for s in elf.sections
                         if s.flags & SHF_EXECINSTR and s.flags & SHF_ALLOC
                         and s.type != SHT_NOBITS and s.size and elf.in_file(s)]
        self._insns: dict[int, tuple[list, list[int]]] = {}

    # -- scans -----------------------------------------------------------------------------------
    # Every 4-byte window of the code is read as a little-endian uint32 (four zero-copy views of
    # each section, one per alignment). A rel32 ending at window k of a view based at vaddr B
    # targets B + 4k + 4 + disp; comparing ``disp + 4k`` with ``target - B - 4`` modulo 2^32
    # needs one add and one compare per window. Wrap-around can only add candidates, and every
    # candidate is confirmed by capstone in its function's disassembly.
    def _windows(self):
        """(vaddr of window 0, uint32 view of the windows, 4k as uint32) per section and
        alignment."""
        for s in self.sections:
            buf = self.elf.view(s)
            try:
                n = len(buf)
                steps = np.arange(0, 4 * (n // 4 + 1), 4, dtype=np.uint32)
                for a in range(4):
                    cnt = (n - a) // 4
                    if cnt > 0:
                        yield s.addr + a, np.frombuffer(buf, dtype="<u4", count=cnt,
                                                        offset=a), steps[:cnt]
            finally:
                del buf

    @staticmethod
    def _u32(x: int) -> np.uint32:
        return np.uint32(x & 0xFFFFFFFF)

    def rel32_into(self, lo: int, hi: int) -> list[int]:
        """Vaddrs of every 4-byte window that, read as the rel32 displacement ending an
        instruction, points into [lo, hi)."""
        out = []
        for base, val, steps in self._windows():
            rel = val + steps                                   # = target - base - 4 (mod 2^32)
            rel -= self._u32(lo - base - 4)                     # = target - lo (mod 2^32)
            idx = np.flatnonzero(rel < np.uint32(hi - lo))
            out.extend(base + 4 * int(k) for k in idx)
        return sorted(out)

    def rel32_to(self, targets) -> list[tuple[int, int]]:
        """(window vaddr, target) for windows whose rel32 points exactly at one of ``targets``."""
        tg = sorted(set(targets))
        out = []
        for base, val, steps in self._windows():
            rel = val + steps
            for t in tg:
                idx = np.flatnonzero(rel == self._u32(t - base - 4))
                out.extend((base + 4 * int(k), t) for k in idx)
        return sorted(out)

    def abs32_to(self, targets) -> list[tuple[int, int]]:
        """(window vaddr, target) for windows holding a target's address: non-PIE code only
        (ET_EXEC; position-independent code has no absolute addresses in its instructions)."""
        tg = sorted(t for t in set(targets) if t < 1 << 32)
        if not tg or self.elf.e_type != ET_EXEC:
            return []
        out = []
        for base, val, _steps in self._windows():
            for t in tg:
                idx = np.flatnonzero(val == np.uint32(t))
                out.extend((base + 4 * int(k), t) for k in idx)
        return sorted(out)

    def byte(self, vaddr: int) -> int | None:
        off = self.elf.vaddr_to_offset(vaddr)
        b = self.elf.read(off, 1) if off is not None else b""
        return b[0] if b else None

    # -- disassembly -----------------------------------------------------------------------------
    def insns(self, f: Function) -> list:
        got = self._insns.get(f.start)
        if got is None:
            s = self.elf.section_at(f.start)
            if s is None or not s.flags & SHF_EXECINSTR or f.end > s.addr + s.size:
                raise EhFrameError(f"{self.elf.path}: function {f.start:#x}..{f.end:#x} is not "
                                   f"inside an executable section")
            code = self.elf.read(s.offset + (f.start - s.addr), f.size)
            lst = list(self.md.disasm(code, f.start))
            got = self._insns[f.start] = (lst, [i.address for i in lst])
        return got[0]

    def insn_ending_at(self, f: Function, end: int):
        """The instruction of ``f``'s linear disassembly that ends at ``end``, or None."""
        self.insns(f)
        lst, addrs = self._insns[f.start]
        k = bisect.bisect_left(addrs, end) - 1
        if k >= 0 and lst[k].address + lst[k].size == end:
            return lst[k]
        return None

    def index_of(self, f: Function, vaddr: int) -> int | None:
        self.insns(f)
        lst, addrs = self._insns[f.start]
        k = bisect.bisect_left(addrs, vaddr)
        return k if k < len(addrs) and addrs[k] == vaddr else None

    def direct_target(self, insn) -> int | None:
        """Target of a direct call / jmp / jcc (an immediate operand), else None."""
        g = insn.groups
        if self.x86.X86_GRP_CALL in g or self.x86.X86_GRP_JUMP in g:
            ops = insn.operands
            if len(ops) == 1 and ops[0].type == self.x86.X86_OP_IMM:
                return ops[0].imm & 0xFFFFFFFFFFFFFFFF
        return None

    def is_call(self, insn) -> bool:
        return insn.id == self.x86.X86_INS_CALL

    def is_jump(self, insn) -> bool:
        return self.x86.X86_GRP_JUMP in insn.groups

    def loads_address(self, insn, target: int) -> bool:
        """``insn`` puts ``target``'s address in a register: a RIP-relative lea, or an immediate."""
        x = self.x86
        for op in insn.operands:
            if op.type == x.X86_OP_MEM and op.mem.base == x.X86_REG_RIP and not op.mem.index:
                if insn.id == x.X86_INS_LEA and \
                        (insn.address + insn.size + op.mem.disp) & (2**64 - 1) == target:
                    return True
            elif op.type == x.X86_OP_IMM and op.imm & 0xFFFFFFFF == target and target < 1 << 32:
                return True
        return False

    def reg(self, r: int) -> str | None:
        name = self.md.reg_name(r) if r else None
        return FULL_REG.get(name, name)

    def written(self, insn) -> set[str]:
        try:
            _r, w = insn.regs_access()
        except Exception:        # capstone raises for a few instructions without access info
            w = []
        out = {FULL_REG.get(self.md.reg_name(x), self.md.reg_name(x)) for x in w}
        if self.is_call(insn):
            out |= CALLER_SAVED
        return out

    def state_field(self, insn, regs: set[str], write: bool) -> int | None:
        """Displacement of a 4-byte ``mov`` to (write) or load from [reg + disp] with ``reg`` in
        ``regs`` and a register on the other side: ``mov %e.., disp(%state)`` /
        ``mov disp(%state), %e..`` / ``movslq disp(%state), %r..``."""
        x = self.x86
        if insn.id not in (x.X86_INS_MOV, x.X86_INS_MOVSXD) or len(insn.operands) != 2:
            return None
        dst, src = insn.operands
        mem, other = (dst, src) if write else (src, dst)
        if write and insn.id != x.X86_INS_MOV:
            return None
        if mem.type != x.X86_OP_MEM or other.type != x.X86_OP_REG or mem.size != 4:
            return None
        if mem.mem.index or mem.mem.segment or self.reg(mem.mem.base) not in regs:
            return None
        return mem.mem.disp if mem.mem.disp >= 0 else None

    def is_lock_rmw(self, insn) -> bool:
        """A lock-prefixed read-modify-write of memory (``lock add``, ``lock xadd``...)."""
        return 0xF0 in insn.prefix and any(op.type == self.x86.X86_OP_MEM for op in insn.operands)


# -- step 1: where the trace event is referenced ---------------------------------------------------

@dataclass(frozen=True)
class Anchor:
    vaddr: int          # instruction (lea/mov) or USDT probe point
    kind: str           # "format string" | "timestamped format string" | "USDT probe"


def trace_strings(elf: ElfFile) -> dict[int, str]:
    """vaddr -> kind of every copy of the handle_ioreq format string in read-only data (the
    string's start and, for the timestamped twin, the inner ``handle_ioreq`` a linker could
    tail-merge the plain string into)."""
    out: dict[int, str] = {}
    for s in elf.sections:
        if not s.flags & SHF_ALLOC or s.flags & SHF_EXECINSTR or s.type == SHT_NOBITS \
                or not elf.in_file(s) or not s.size:
            continue
        buf = elf.view(s)
        try:
            for m in TRACE_RE.finditer(buf):
                i = m.start()
                back = bytes(buf[max(0, i - len(TIMESTAMP_PREFIX)):i])
                if back == TIMESTAMP_PREFIX:
                    out[s.addr + i - len(TIMESTAMP_PREFIX)] = "timestamped format string"
                    out.setdefault(s.addr + i, "format string")
                elif i == 0 or buf[i - 1] == 0:
                    out[s.addr + i] = "format string"
        finally:
            del buf
    return out


def anchors(code: Code, usdt: list[UsdtProbe]) -> tuple[list[Anchor], list[str]]:
    """Instructions that load a handle_ioreq trace string, and USDT handle_ioreq probe points."""
    notes = []
    strings = trace_strings(code.elf)
    found: list[Anchor] = []
    if strings:
        hits = [(w, t, "rel") for w, t in code.rel32_to(strings)] + \
               [(w, t, "abs") for w, t in code.abs32_to(strings)]
        for w, t, _how in hits:
            f = code.funcs.containing(w)
            if f is None:
                continue
            insn = code.insn_ending_at(f, w + 4)
            if insn is not None and code.loads_address(insn, t):
                found.append(Anchor(insn.address, strings[t]))
        if not found:
            notes.append(f"{len(strings)} handle_ioreq format string(s) in .rodata, but no code "
                         f"loads them")
    for p in usdt:
        if p.name == FUNC:
            found.append(Anchor(p.pc, "USDT probe"))
    return found, notes


# -- step 2: the function -------------------------------------------------------------------------

def call_sites(code: Code, target: int) -> tuple[list[CallSite], list[int]]:
    """Direct calls to ``target`` (checked in the caller's disassembly), and the addresses of
    direct jumps to it (tail calls: no return address of their own)."""
    calls, jumps = [], []
    for w, _t in code.rel32_to([target]):
        op = code.byte(w - 1)
        if op not in (0xE8, 0xE9):
            continue
        f = code.funcs.containing(w - 1)
        if f is None:
            continue
        insn = code.insn_ending_at(f, w + 4)
        if insn is None or insn.address != w - 1 or code.direct_target(insn) != target:
            continue
        if code.is_call(insn):
            calls.append(CallSite(insn.address, insn.address + insn.size, f))
        else:
            jumps.append(insn.address)
    return calls, jumps


def _parents(code: Code, f: Function) -> set[Function]:
    """Functions that jump (jmp/jcc rel32) into ``f``: the hot part of a split ``.cold`` part."""
    out = set()
    for w in code.rel32_into(f.start, f.end):
        g = code.funcs.containing(w)
        if g is None or g == f:
            continue
        insn = code.insn_ending_at(g, w + 4)
        if insn is not None and code.is_jump(insn) and code.direct_target(insn) in f:
            out.add(g)
    return out


def locate_function(code: Code, found: list[Anchor]) -> tuple[Finding | None, list[CallSite],
                                                                 list[str], str | None]:
    """(handle_ioreq, its call sites, notes, error) from the anchors."""
    notes = []
    by_func: dict[Function, set[str]] = {}
    for a in found:
        f = code.funcs.containing(a.vaddr)
        if f is None:
            notes.append(f"{a.kind} reference at {a.vaddr:#x} is in no .eh_frame function")
            continue
        by_func.setdefault(f, set()).add(a.kind)
    cands: dict[Function, tuple[set[str], list[CallSite], list[int], str]] = {}
    for f, kinds in by_func.items():
        calls, jumps = call_sites(code, f.start)
        where = f"{f.start:#x}..{f.end:#x}"
        if not calls and not jumps:
            for g in _parents(code, f):          # a .cold part: the function that jumps into it
                gc, gj = call_sites(code, g.start)
                if gc or gj:
                    old = cands.get(g, (set(), gc, gj, ""))
                    cands[g] = (old[0] | kinds, gc, gj,
                                f"{g.start:#x}..{g.end:#x}, which jumps into its split-off "
                                f"part {where}")
            continue
        old = cands.get(f, (set(), calls, jumps, where))
        cands[f] = (old[0] | kinds, calls, jumps, old[3] or where)
    if not cands:
        what = ", ".join(sorted({a.kind for a in found})) or "nothing"
        return None, [], notes, (f"the {FUNC} trace event ({what}) is referenced only from "
                                 f"functions nobody calls directly")
    if len(cands) > 1:
        lst = ", ".join(f"{f.start:#x}" for f in sorted(cands, key=lambda f: f.start))
        return None, [], notes, (f"the {FUNC} trace event is referenced from {len(cands)} called "
                                 f"functions ({lst}): {FUNC} may be inlined into its callers")
    f, (kinds, calls, jumps, where) = next(iter(cands.items()))
    obs = sorted(kinds)
    if len(calls) == 2 and not jumps:
        obs.append("called from exactly two sites, as in QEMU")
    # A tail jump is not in QEMU's source: its requests would carry the caller's caller as
    # return address (counted as synchronous): never "sure" then.
    conf = "sure" if len(obs) >= 2 and not jumps else "likely"
    what = []
    strings = sorted(k for k in kinds if k != "USDT probe")
    if strings:
        what.append(("loads the " + " and the ".join(strings)) + f" of the {FUNC} trace event")
    if "USDT probe" in kinds:
        what.append(f"holds the USDT probe qemu:{FUNC}")
    how = (f"automatic: the .eh_frame function {where} " + " and ".join(what)
           + f"; {len(calls)} direct call(s)")
    if jumps:
        how += f", {len(jumps)} tail jump(s)"
        notes.append(f"{FUNC} is also reached by {len(jumps)} tail jump(s) (at "
                     + ", ".join(f"{j:#x}" for j in jumps) + "): their requests are attributed "
                     "to the caller's caller")
    return Finding(f.start, how, conf), calls, notes, None


# -- step 3: which call is which ------------------------------------------------------------------

def _calls_function(code: Code, caller: Function, callee: Function) -> bool:
    return any(code.direct_target(i) == callee.start for i in code.insns(caller)
               if code.is_call(i) or code.is_jump(i))


def _track_state(code: Code, f: Function, stop: int | None):
    """Walk ``f`` linearly from its entry, following which registers hold the entry's first
    argument (``state``, in %rdi on entry). Yields (insn, state registers before it)."""
    regs = {"rdi"}
    kept: set[str] | None = None     # callee-saved copies made before the first call
    x = code.x86
    for insn in code.insns(f):
        if stop is not None and insn.address > stop:
            return
        yield insn, set(regs)
        if insn.id == x.X86_INS_MOV and len(insn.operands) == 2 and \
                insn.operands[0].type == x.X86_OP_REG and insn.operands[1].type == x.X86_OP_REG \
                and insn.operands[0].size == 8:
            dst, src = code.reg(insn.operands[0].reg), code.reg(insn.operands[1].reg)
            if src in regs:
                regs.add(dst)
                continue
        if kept is None and code.is_call(insn):
            kept = regs - CALLER_SAVED
        regs -= code.written(insn)
        # After a ret or an unconditional jmp the next block is entered from elsewhere: the
        # epilogue's pops say nothing about it. Compilers keep `state` in the callee-saved
        # register it was copied to on entry for the whole body; assume that again.
        if kept and (insn.id in (x.X86_INS_RET, x.X86_INS_JMP)):
            regs = set(kept)


def state_stores(code: Code, site: CallSite) -> tuple[list[tuple[int, int, int | None]], bool]:
    """([(store vaddr, disp, callee or None)] of 4-byte register stores into ``state`` before the
    call at ``site``: in its function, else in the functions it calls first with ``state`` as
    their first argument (cpu_get_ioreq when it is not inlined); and whether ``state`` is still
    what the site passes to handle_ioreq."""
    out, passed, callees = [], False, []
    for insn, regs in _track_state(code, site.function, site.addr):
        if insn.address == site.addr:
            passed = "rdi" in regs
            break
        d = code.state_field(insn, regs, write=True)
        if d is not None:
            out.append((insn.address, d, None))
        if code.is_call(insn) and "rdi" in regs:
            t = code.direct_target(insn)
            g = code.funcs.starting_at(t) if t is not None else None
            if g is not None and g != site.function:
                callees.append(g)
    if not out:
        for g in callees[:8]:
            for insn, regs in _track_state(code, g, None):
                d = code.state_field(insn, regs, write=True)
                if d is not None:
                    out.append((insn.address, d, g.start))
    return out, passed


def _where(addr: int, callee: int | None) -> str:
    return f"{addr:#x}" + (f" (in {callee:#x}, called first with state)" if callee else "")


def state_loads_after(code: Code, site: CallSite) -> list[tuple[int, int]]:
    """[(vaddr, disp)] of 4-byte loads from ``state`` after the call at ``site``."""
    out = []
    after = False
    for insn, regs in _track_state(code, site.function, None):
        if insn.address == site.addr:
            after = True
            continue
        if after:
            d = code.state_field(insn, regs, write=False)
            if d is not None:
                out.append((insn.address, d))
    return out


def lock_after(code: Code, site: CallSite) -> int | None:
    """Address of a lock-prefixed read-modify-write within LOCK_WINDOW instructions after the
    call at ``site`` (linear order), or None."""
    k = code.index_of(site.function, site.addr)
    if k is None:
        return None
    for insn in code.insns(site.function)[k + 1:k + 1 + LOCK_WINDOW]:
        if code.is_lock_rmw(insn):
            return insn.address
    return None


@dataclass
class Classification:
    buffered: list[CallSite]        # the buffered call sites (one in QEMU)
    sync: CallSite | None           # the synchronous one
    confidence: str
    buffered_how: str
    sync_how: str
    notes: list[str]


def classify(code: Code, sites: list[CallSite], func: int) -> Classification:
    """Which call of handle_ioreq is the buffered one and which the synchronous one, from three
    kinds of observation (see the module doc): "callgraph", "store", "lock"."""
    none = Classification([], None, "doubt", "", "", [])
    if not sites:
        none.notes.append(f"no direct call to {FUNC}")
        return none
    per_func: dict[Function, int] = {}
    for s in sites:
        per_func[s.function] = per_func.get(s.function, 0) + 1
    buf_obs: dict[CallSite, dict[str, str]] = {s: {} for s in sites}
    sync_obs: dict[CallSite, dict[str, str]] = {s: {} for s in sites}
    for s in sites:
        for o in sites:
            if o.function != s.function and _calls_function(code, o.function, s.function):
                buf_obs[s]["callgraph"] = (f"its function {s.function.start:#x} is called by "
                                           f"{o.function.start:#x}, which holds the other call")
                sync_obs[o]["callgraph"] = (f"its function {o.function.start:#x} calls "
                                            f"{s.function.start:#x}, which holds the other call")
        lk = lock_after(code, s)
        if lk is not None:
            buf_obs[s]["lock"] = f"the ring's lock add follows it at {lk:#x}"
        if per_func[s.function] == 1:
            stores, passed = state_stores(code, s)
            if stores and passed:
                sync_obs[s]["store"] = ("a 4-byte store into state precedes it at "
                                        + ", ".join(_where(a, c) for a, _, c in stores[:3]))
    label = {}
    for s in sites:
        b, y = buf_obs[s], sync_obs[s]
        label[s] = "doubt" if b and y else "buffered" if b else "sync" if y else "unknown"
    if len(sites) == 2:                          # one of each, as in QEMU's source
        a, b = sites
        if label[a] == "unknown" and label[b] in ("buffered", "sync"):
            label[a] = "sync" if label[b] == "buffered" else "buffered"
        elif label[b] == "unknown" and label[a] in ("buffered", "sync"):
            label[b] = "sync" if label[a] == "buffered" else "buffered"
    syncs = [s for s in sites if label[s] == "sync"]
    bufs = [s for s in sites if label[s] == "buffered"]
    kinds = {k for s in sites for k in list(buf_obs[s]) + list(sync_obs[s])}
    conf = "sure" if len(kinds) >= 2 else "likely"

    def how(s: CallSite, obs: dict[str, str], other: str) -> str:
        return (f"call at {s.addr:#x} in {s.function.start:#x}: "
                + "; ".join(list(obs.values()) or [f"the other call is the {other} one"]))

    doubt = any(v == "doubt" for v in label.values())
    if doubt or len(syncs) != 1 or len(bufs) != len(sites) - 1:
        none.notes.append(f"cannot tell the {len(sites)} call(s) of {FUNC} apart: " + ", ".join(
            f"{s.addr:#x} {label[s]}" for s in sites) + " (expected one synchronous, the rest "
            "buffered)")
        if len(syncs) == 1 and not doubt:
            s = syncs[0]
            return Classification([], s, "likely", "", how(s, sync_obs[s], "buffered"),
                                  none.notes)
        return none
    s = syncs[0]
    notes = []
    rets = sorted(b.ret for b in bufs)
    if len(rets) > 1 and rets[0] < s.ret < rets[-1]:
        notes.append("the buffered calls' return addresses surround the synchronous one's: "
                     "buffered requests cannot be told apart by one address range")
        return Classification([], s, conf, "", how(s, sync_obs[s], "buffered"), notes)
    return Classification(bufs, s, conf,
                          "; ".join(how(b, buf_obs[b], "synchronous") for b in bufs),
                          how(s, sync_obs[s], "buffered"), notes)


# -- step 4: send_vcpu -----------------------------------------------------------------------------

def send_vcpu(code: Code, sync: CallSite, version: tuple[int, int] | None) -> Finding | None:
    """offsetof(XenIOState, send_vcpu) from the store before the synchronous call."""
    stores, passed = state_stores(code, sync)
    if not passed:
        return None
    disps = sorted({d for _, d, _ in stores})
    if not disps:
        return None
    loads = {d for _, d in state_loads_after(code, sync)}
    confirmed = [d for d in disps if d in loads]
    banner = banner_send_vcpu(version)
    ver = f"QEMU {version[0]}.{version[1]}" if version else None
    if len(confirmed) == 1:
        d, obs = confirmed[0], ["store before the synchronous call", "load after it"]
    elif len(disps) == 1:
        d, obs = disps[0], ["store before the synchronous call"]
    elif banner in disps:
        d, obs = banner, ["one of the stores before the synchronous call"]
    else:
        return Finding(disps[0], "automatic: stores into state at offsets "
                       + ", ".join(f"{x:#x}" for x in disps) + " before the synchronous call, "
                       "none confirmed", "doubt")
    at, callee = next((a, c) for a, x, c in stores if x == d)
    how = f"automatic: mov %e.., {d:#x}(state) at {_where(at, callee)} (" + ", ".join(obs) + ")"
    if banner is not None:
        if banner == d:
            obs.append(f"{ver} layout")
            how += f"; agrees with the {ver} layout"
        else:
            return Finding(d, how + f"; the {ver} banner says {banner:#x}", "doubt")
    return Finding(d, how, "sure" if len(obs) >= 2 else "likely")


# -- all of it ------------------------------------------------------------------------------------

def resolve_stripped(elf: ElfFile, usdt: list[UsdtProbe] | None = None,
                     version: tuple[int, int] | None = None) -> AutoResult:
    """handle_ioreq, its callers and send_vcpu of a binary without symbols (see the module doc).
    Never raises for a readable ELF file: failures are ``AutoResult.error`` (one line)."""
    res = AutoResult()
    if elf.e_machine != EM_X86_64:
        res.error = f"automatic resolution decodes x86-64 only (e_machine {elf.e_machine})"
        return res
    try:
        funcs = FunctionTable(elf)
        code = Code(elf, funcs)
        found, notes = anchors(code, usdt or [])
        res.notes += notes
        if not found:
            res.error = (f"no code loads a {FUNC} trace format string and there is no USDT "
                         f"{FUNC} probe: not a QEMU Xen device model, or one built without "
                         f"its trace events")
            return res
        res.func, res.sites, notes, err = locate_function(code, found)
        res.notes += notes
        if err:
            res.error = err
            return res
        c = classify(code, res.sites, res.func.value)
        res.notes += c.notes
        res.buffered_sites = c.buffered
        if c.buffered:
            res.buffered = Finding(min(b.ret for b in c.buffered), "automatic: " + c.buffered_how,
                                   c.confidence)
        if c.sync is not None:
            res.sync = Finding(c.sync.ret, "automatic: " + c.sync_how, c.confidence)
            res.send_vcpu = send_vcpu(code, c.sync, version)
    except EhFrameError as exc:
        res.error = str(exc)
    return res


def send_vcpu_for(elf: ElfFile, func: int, version: tuple[int, int] | None) -> Finding | None:
    """send_vcpu from the code when handle_ioreq is known (symbols, table): the call that is not
    in a function called by the other call's function is the synchronous one."""
    try:
        funcs = FunctionTable(elf)
        code = Code(elf, funcs)
        calls, _ = call_sites(code, func)
        c = classify(code, calls, func)
        return send_vcpu(code, c.sync, version) if c.sync is not None else None
    except EhFrameError:
        return None
