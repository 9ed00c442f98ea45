"""Where to hook a device model binary: ELF parsing, build-id, symbols, the per-build table.

QEMU's ``handle_ioreq`` is ``static`` (hw/i386/xen/xen-hvm.c up to QEMU 8.0, hw/xen/xen-hvm-common.c
from 8.1), so it is not in ``.dynsym``. It is resolved, in this order, from:

1. the binary's own ``.symtab`` (unstripped builds, the stand-in device model);
2. detached debug info found by build-id (``/usr/lib/debug/.build-id/xx/yyyy.debug``, e.g. Debian's
   ``-dbgsym`` packages), whose ``.symtab`` uses the same virtual addresses;
3. the per-build table ``offsets.yaml`` shipped beside this module, keyed by build-id.

The two callers matter as much as the function: ``handle_buffered_iopage`` passes a zeroed local
ioreq_t with no vCPU, ``cpu_handle_ioreq`` a copy of the vCPU's slot (the vCPU index is then in
``state->send_vcpu``, set by ``cpu_get_ioreq``). The BPF side tells them apart by the return
address at function entry, as a *delta* from handle_ioreq's own address (so the load base of a PIE
binary cancels out): with a symbol table the whole caller body is one delta range, with the table
the exact return address after the call is.

USDT: QEMU built with the ``dtrace`` trace backend (RHEL-style) has a ``qemu:handle_ioreq`` probe in
``.note.stapsdt``; it is detected and reported (``iotrace probe-info``), but not attached to: it
fires inside handle_ioreq after the prologue, where neither the return address (buffered or not)
nor ``state`` (for send_vcpu) is reliably at hand, so the function entry stays the hook. Debian
builds use the ``log`` backend and have no USDT, so this could not be tested here.

No third-party ELF library: the few structures needed (ELF64 header, section and program headers,
notes, Elf64_Sym) are read with ``struct`` (layouts from the System V gABI / elf.h).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from importlib import resources

import yaml

from iotrace.core.errors import ProbeError

DEBUG_ROOT = "/usr/lib/debug"
TABLE_FILE = "offsets.yaml"
FUNC = "handle_ioreq"
BUFFERED_CALLER = "handle_buffered_iopage"
SYNC_CALLER = "cpu_handle_ioreq"

# state->send_vcpu in XenIOState (QEMU's hw/i386/xen/xen-hvm.c, hw/xen/xen-hvm-common.c): 0x50 in
# QEMU <= 8.0 (the struct still
# has shared_vmport_page), 0x48 from 8.1 (hw/xen/xen-hvm-common.c).
SEND_VCPU_OFFSET_OLD = 0x50
SEND_VCPU_OFFSET_81 = 0x48

SHT_SYMTAB, SHT_NOTE, SHT_DYNSYM = 2, 7, 11
PT_LOAD = 1
STT_FUNC = 2
NT_GNU_BUILD_ID = 3
NT_STAPSDT = 3


class ElfError(ProbeError):
    pass


@dataclass
class Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


@dataclass
class Symbol:
    name: str
    value: int      # virtual address
    size: int
    type: int


@dataclass
class UsdtProbe:
    provider: str
    name: str
    pc: int         # virtual address of the probe point
    args: str


class ElfFile:
    """Just enough of an ELF64 little-endian file: sections, segments, notes, symbols."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.data = f.read()
        except OSError as exc:
            raise ElfError(f"cannot read {path}: {exc.strerror}") from None
        d = self.data
        if len(d) < 64 or d[:4] != b"\x7fELF":
            raise ElfError(f"{path} is not an ELF file")
        if d[4] != 2 or d[5] != 1:
            raise ElfError(f"{path}: only 64-bit little-endian ELF is supported")
        (self.e_type, self.e_machine, _, _, self.e_phoff, self.e_shoff, _, _, self.e_phentsize,
         self.e_phnum, self.e_shentsize, self.e_shnum, self.e_shstrndx) = \
            struct.unpack_from("<HHIQQQIHHHHHH", d, 16)
        try:
            self.sections = self._sections()
            self.segments = [struct.unpack_from("<IIQQQQQQ", d, self.e_phoff + i * self.e_phentsize)
                             for i in range(self.e_phnum)]
        except struct.error:
            raise ElfError(f"{path}: truncated or corrupt ELF headers") from None

    def _sections(self) -> list[Section]:
        d = self.data
        raw = [struct.unpack_from("<IIQQQQIIQQ", d, self.e_shoff + i * self.e_shentsize)
               for i in range(self.e_shnum)]
        if not raw:
            return []
        strtab_off = raw[self.e_shstrndx][4] if self.e_shstrndx < len(raw) else 0
        out = []
        for (name, typ, _flags, addr, off, size, link, _info, _align, entsize) in raw:
            out.append(Section(self._cstr(strtab_off + name), typ, addr, off, size, link, entsize))
        return out

    def _cstr(self, off: int) -> str:
        end = self.data.find(b"\0", off)
        return self.data[off:end if end >= 0 else len(self.data)].decode("utf-8", "replace")

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def notes(self):
        """(owner, type, desc bytes) of every SHT_NOTE section."""
        for s in self.sections:
            if s.type != SHT_NOTE:
                continue
            pos, end = s.offset, s.offset + s.size
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                pos += 12
                owner = self.data[pos:pos + namesz].rstrip(b"\0").decode("ascii", "replace")
                pos += (namesz + 3) & ~3
                desc = self.data[pos:pos + descsz]
                pos += (descsz + 3) & ~3
                yield s.name, owner, ntype, desc

    def build_id(self) -> str | None:
        for _sec, owner, ntype, desc in self.notes():
            if owner == "GNU" and ntype == NT_GNU_BUILD_ID:
                return desc.hex()
        return None

    def symbols(self, kind: int = SHT_SYMTAB) -> list[Symbol]:
        out = []
        for s in self.sections:
            if s.type != kind or not s.entsize:
                continue
            strtab = self.sections[s.link] if s.link < len(self.sections) else None
            if strtab is None:
                continue
            for i in range(s.size // s.entsize):
                name, info, _other, _shndx, value, size = struct.unpack_from(
                    "<IBBHQQ", self.data, s.offset + i * s.entsize)
                if not name:
                    continue
                out.append(Symbol(self._cstr(strtab.offset + name), value, size, info & 0xF))
        return out

    def has_symtab(self) -> bool:
        return any(s.type == SHT_SYMTAB for s in self.sections)

    def usdt_probes(self) -> list[UsdtProbe]:
        """SystemTap SDT notes (.note.stapsdt): pc, base, semaphore, then provider, name, args."""
        out = []
        for sec, owner, ntype, desc in self.notes():
            if sec != ".note.stapsdt" or owner != "stapsdt" or ntype != NT_STAPSDT:
                continue
            if len(desc) < 24:
                continue
            pc = struct.unpack_from("<Q", desc, 0)[0]
            strings = desc[24:].split(b"\0")
            if len(strings) >= 3:
                out.append(UsdtProbe(strings[0].decode(), strings[1].decode(), pc,
                                     strings[2].decode()))
        return out

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        for (ptype, _flags, off, va, _pa, filesz, _memsz, _align) in self.segments:
            if ptype == PT_LOAD and va <= vaddr < va + filesz:
                return vaddr - va + off
        return None

    def offset_to_vaddr(self, offset: int) -> int | None:
        for (ptype, _flags, off, va, _pa, filesz, _memsz, _align) in self.segments:
            if ptype == PT_LOAD and off <= offset < off + filesz:
                return offset - off + va
        return None

    def qemu_version(self) -> tuple[int, int] | None:
        """QEMU's version from its banner string in .rodata, when the binary is a QEMU."""
        m = re.search(rb"QEMU emulator version (\d+)\.(\d+)", self.data)
        return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass
class Resolution:
    """How to probe one binary. Addresses are virtual addresses of the binary (bcc translates them
    to file offsets for the uprobe); caller ranges are deltas from handle_ioreq, [lo, hi)."""
    path: str
    build_id: str | None
    method: str | None = None             # symtab | debuginfo | table | usdt
    func_vaddr: int | None = None
    func_offset: int | None = None        # file offset (what a uprobe attaches to)
    buffered: tuple[int, int] | None = None
    sync: tuple[int, int] | None = None
    send_vcpu_offset: int | None = None
    send_vcpu_from: str = ""
    usdt: list[UsdtProbe] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.func_vaddr is not None


def load_table() -> dict:
    """The per-build table: {build_id: {handle_ioreq, buffered_ret, sync_ret, send_vcpu, ...}}."""
    text = resources.files("iotrace.probes.hook").joinpath(TABLE_FILE).read_text("utf-8")
    doc = yaml.safe_load(text) or {}
    builds = doc.get("builds") or {}
    return {str(k).lower(): v for k, v in builds.items()}


def _caller_range(syms: dict[str, Symbol], name: str, func: int) -> tuple[int, int] | None:
    s = syms.get(name)
    if s is None or not s.size:
        return None
    return (s.value - func, s.value + s.size - func)


def _from_symbols(res: Resolution, elf: ElfFile, symelf: ElfFile, method: str) -> bool:
    syms = {s.name: s for s in symelf.symbols(SHT_SYMTAB) if s.type == STT_FUNC}
    func = syms.get(FUNC)
    if func is None:
        res.notes.append(f"{method}: {len(syms)} function symbols, no {FUNC}")
        return False
    off = elf.vaddr_to_offset(func.value)
    if off is None:
        res.notes.append(f"{method}: {FUNC} at {func.value:#x} is outside every PT_LOAD segment")
        return False
    res.method, res.func_vaddr, res.func_offset = method, func.value, off
    res.buffered = _caller_range(syms, BUFFERED_CALLER, func.value)
    res.sync = _caller_range(syms, SYNC_CALLER, func.value)
    if res.buffered is None:
        res.notes.append(f"{method}: no {BUFFERED_CALLER}: buffered requests cannot be told apart")
    # A build can say where send_vcpu lives (the stand-in exports it as a symbol of its own).
    sv = next((s for s in symelf.symbols(SHT_SYMTAB) if s.name == "iotrace_send_vcpu_offset"),
              None)
    if sv is not None:
        voff = elf.vaddr_to_offset(sv.value)
        if voff is not None and sv.size in (4, 8):
            res.send_vcpu_offset = int.from_bytes(elf.data[voff:voff + sv.size], "little")
            res.send_vcpu_from = "symbol iotrace_send_vcpu_offset"
    return True


def debug_file_for(build_id: str | None, root: str = DEBUG_ROOT) -> str | None:
    if not build_id or len(build_id) < 3:
        return None
    path = os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
    return path if os.path.exists(path) else None


def resolve(path: str, table: dict | None = None, debug_root: str = DEBUG_ROOT) -> Resolution:
    """Find handle_ioreq, its callers and send_vcpu's offset in one binary. Never raises for a
    binary that exists: a failure is ``Resolution.error`` (one line, with the fix)."""
    real = os.path.realpath(path)
    elf = ElfFile(real)
    res = Resolution(path=real, build_id=elf.build_id())
    res.usdt = [p for p in elf.usdt_probes() if p.name == FUNC]
    if res.usdt:
        res.notes.append(f"USDT {res.usdt[0].provider}:{FUNC} present (dtrace trace backend)")
    found = False
    if elf.has_symtab():
        found = _from_symbols(res, elf, elf, "symtab")
    else:
        res.notes.append("no .symtab (stripped)")
    if not found:
        dbg = debug_file_for(res.build_id, debug_root)
        if dbg:
            try:
                found = _from_symbols(res, elf, ElfFile(dbg), "debuginfo")
            except ElfError as exc:
                res.notes.append(f"debuginfo {dbg}: {exc}")
        else:
            res.notes.append(f"no debug file under {debug_root}/.build-id")
    table = load_table() if table is None else table
    entry = table.get((res.build_id or "").lower())
    if entry is not None:
        if not found:
            res.method = "table"
            res.func_offset = int(entry["handle_ioreq"])
            res.func_vaddr = elf.offset_to_vaddr(res.func_offset)
            if "buffered_ret" in entry:
                d = elf.offset_to_vaddr(int(entry["buffered_ret"])) - res.func_vaddr
                res.buffered = (d, d + 1)
            if "sync_ret" in entry:
                d = elf.offset_to_vaddr(int(entry["sync_ret"])) - res.func_vaddr
                res.sync = (d, d + 1)
            found = True
        if res.send_vcpu_offset is None and "send_vcpu" in entry:
            res.send_vcpu_offset = int(entry["send_vcpu"])
            res.send_vcpu_from = f"table ({entry.get('name', res.build_id)})"
    if not found:
        usdt = (" (its USDT probe qemu:handle_ioreq alone cannot give the vCPU or tell buffered "
                "requests apart)") if res.usdt else ""
        res.error = (f"{real}: cannot find {FUNC} (build-id {res.build_id or 'none'}){usdt}: "
                     f"install its debug symbols (/usr/lib/debug/.build-id/...), or add an entry "
                     f"for this build-id to probes/{TABLE_FILE} (see `iotrace probe-info --help`)")
        return res
    if res.send_vcpu_offset is None:
        ver = elf.qemu_version()
        if ver is not None:
            res.send_vcpu_offset = SEND_VCPU_OFFSET_81 if ver >= (8, 1) else SEND_VCPU_OFFSET_OLD
            res.send_vcpu_from = f"QEMU {ver[0]}.{ver[1]} banner"
        else:
            res.send_vcpu_offset = SEND_VCPU_OFFSET_OLD
            res.send_vcpu_from = "default (QEMU <= 8.0 layout; not a QEMU banner)"
    return res
