"""Just enough of an ELF64 little-endian file, read by sections through mmap, never whole.

Only regular files are opened (a FIFO, a character device such as /dev/zero or a directory is one
clear ``ElfError`` line, without reading or blocking: the file is opened with O_NONBLOCK and
checked with fstat before anything is read). The headers are read with pread (bounded sizes);
a section's bytes are mapped read-only when asked for (``view``), one mapping per section, so
memory and address space follow the sections the resolver touches, never the file size. Every
header, section and string read is checked against the file size (and sections against
MAX_SECTION), so a truncated file or a corrupt section table is an ``ElfError`` naming what is
wrong, never an IndexError, a struct.error or a MemoryError.

Layouts from the System V gABI and glibc's elf.h: Elf64_Ehdr (64 bytes), Elf64_Shdr (64),
Elf64_Phdr (56), Elf64_Nhdr, Elf64_Sym (24).
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass

from iotrace.core.errors import ProbeError

SHT_NOBITS, SHT_SYMTAB, SHT_NOTE, SHT_DYNSYM = 8, 2, 7, 11
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
PT_LOAD = 1
STT_FUNC = 2
NT_GNU_BUILD_ID = 3
NT_STAPSDT = 3
EM_X86_64 = 62
SHN_XINDEX = 0xFFFF

EHDR_SIZE, SHDR_SIZE, PHDR_SIZE, SYM_SIZE = 64, 64, 56, 24
MAX_NAME = 4096          # longest section/symbol name read (a corrupt table cannot cost MBs)
MAX_SECTION = 1 << 30    # a device model's largest section is tens of MB; more is a corrupt file


class ElfError(ProbeError):
    """The file is not an ELF binary iotrace can read (one line: what and why)."""


@dataclass
class Section:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int

    @property
    def executable(self) -> bool:
        return bool(self.flags & SHF_EXECINSTR)


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


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class ElfFile:
    """An ELF64 little-endian file: sections, segments, notes, symbols, read by pieces.

    ``read(off, n)`` returns bytes (pread); ``view(section)`` a zero-copy memoryview of a
    section's bytes (mmap of that section only, cached). Use as a context manager, or call
    ``close()``."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except IsADirectoryError:
            raise ElfError(f"{path}: is a directory, not an ELF binary") from None
        except OSError as exc:
            raise ElfError(f"cannot read {path}: {exc.strerror}") from None
        self._fd = fd
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ElfError(f"{path}: is {_kind(st.st_mode)}, not an ELF binary")
            self.size = st.st_size
            head = self.read(0, EHDR_SIZE)
            if len(head) < EHDR_SIZE or head[:4] != b"\x7fELF":
                raise ElfError(f"{path} is not an ELF file")
            if head[4] != 2 or head[5] != 1:
                self._fail("only 64-bit little-endian ELF is supported")
            (self.e_type, self.e_machine, _, _, self.e_phoff, self.e_shoff, _, _,
             self.e_phentsize, self.e_phnum, self.e_shentsize, self.e_shnum, self.e_shstrndx) = \
                struct.unpack_from("<HHIQQQIHHHHHH", head, 16)
            self.sections = self._sections()
            self.segments = self._segments()
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for m, v in maps.values():
            try:
                v.release()
                m.close()
            except BufferError:         # a view of it is still held: freed with that view
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- bounded reads ---------------------------------------------------------------------------
    def _fail(self, what: str):
        raise ElfError(f"{self.path}: {what}")

    def read(self, off: int, n: int) -> bytes:
        """At most ``n`` bytes at file offset ``off`` (fewer at the end of the file)."""
        if self._fd is None or off < 0 or off >= self.size or n <= 0:
            return b""
        n = min(n, self.size - off)
        if n > MAX_SECTION:
            self._fail(f"refusing to read {n:#x} bytes at {off:#x} (corrupt file?)")
        try:
            return os.pread(self._fd, n, off)
        except OSError as exc:
            self._fail(f"cannot read at {off:#x}: {exc.strerror}")

    def _unpack(self, fmt: str, off: int, what: str) -> tuple:
        n = struct.calcsize(fmt)
        raw = self.read(off, n) if off + n <= self.size else b""
        if len(raw) != n:
            self._fail(f"truncated or corrupt ELF file ({what} at {off:#x} beyond the end, "
                       f"{self.size:#x} bytes)")
        return struct.unpack(fmt, raw)

    def cstr(self, off: int, limit: int = MAX_NAME) -> str:
        raw = self.read(off, min(limit, MAX_NAME))
        end = raw.find(b"\0")
        return (raw[:end] if end >= 0 else raw).decode("utf-8", "replace")

    # -- headers ---------------------------------------------------------------------------------
    def _segments(self) -> list[tuple]:
        if not self.e_phnum:
            return []
        if self.e_phentsize != PHDR_SIZE:
            self._fail(f"corrupt program header table (entry size {self.e_phentsize}, "
                       f"expected {PHDR_SIZE})")
        return [self._unpack("<IIQQQQQQ", self.e_phoff + i * PHDR_SIZE, "program header")
                for i in range(self.e_phnum)]

    def _sections(self) -> list[Section]:
        if not self.e_shoff:
            return []
        if self.e_shentsize != SHDR_SIZE:
            self._fail(f"corrupt section header table (entry size {self.e_shentsize}, "
                       f"expected {SHDR_SIZE})")
        first = self._unpack("<IIQQQQIIQQ", self.e_shoff, "section header 0")
        shnum = self.e_shnum or first[5]                 # extended numbering: sh_size of [0]
        shstrndx = first[6] if self.e_shstrndx == SHN_XINDEX else self.e_shstrndx
        if self.e_shoff + shnum * SHDR_SIZE > self.size:
            self._fail(f"truncated or corrupt ELF file (section header table of {shnum} "
                       f"entries at {self.e_shoff:#x} ends beyond the file, {self.size:#x} bytes)")
        table = self.read(self.e_shoff, shnum * SHDR_SIZE)
        raw = [struct.unpack_from("<IIQQQQIIQQ", table, i * SHDR_SIZE) for i in range(shnum)]
        if not raw:
            return []
        if shstrndx >= len(raw):
            self._fail(f"corrupt section header table (section name table index {shstrndx} "
                       f"of {len(raw)} sections)")
        _n, strtype, _f, _a, stroff, strsize, *_ = raw[shstrndx]
        if strtype == SHT_NOBITS or stroff + strsize > self.size or strsize > MAX_SECTION:
            self._fail("corrupt section header table (section name table beyond the file)")
        names = self.read(stroff, strsize)
        out = []
        for (name, typ, flags, addr, off, size, link, _info, _align, entsize) in raw:
            nm = ""
            if name < len(names):
                end = names.find(b"\0", name, name + MAX_NAME)
                nm = names[name:end if end >= 0 else name + MAX_NAME].decode("utf-8", "replace")
            out.append(Section(nm, typ, flags, addr, off, size, link, entsize))
        return out

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def in_file(self, s: Section) -> bool:
        """The section's bytes are inside the file (not NOBITS, not cut off by truncation) and
        of a believable size."""
        return (s.type != SHT_NOBITS and 0 <= s.offset and s.offset + s.size <= self.size
                and s.size <= MAX_SECTION)

    def view(self, s: Section) -> memoryview:
        """The bytes of section ``s``, mapped read-only (zero copy, cached per section);
        ElfError when they are not in the file."""
        if s.type == SHT_NOBITS or not s.size:
            return memoryview(b"")
        if not self.in_file(s):
            self._fail(f"truncated or corrupt ELF file (section {s.name or '?'} at "
                       f"{s.offset:#x}+{s.size:#x} ends beyond the file, {self.size:#x} bytes, "
                       f"or is too large)")
        got = self._maps.get(s.offset)
        if got is None or len(got[1]) < s.size:
            start = s.offset - s.offset % mmap.ALLOCATIONGRANULARITY
            try:
                m = mmap.mmap(self._fd, s.offset + s.size - start, offset=start,
                              access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                self._fail(f"cannot map section {s.name or '?'}: {exc}")
            got = self._maps[s.offset] = (m, memoryview(m)[s.offset - start:])
        return got[1][:s.size]

    # -- notes, symbols ----------------------------------------------------------------------------
    def notes(self):
        """(section name, owner, type, desc bytes) of every SHT_NOTE section inside the file."""
        for s in self.sections:
            if s.type != SHT_NOTE or not self.in_file(s):
                continue
            buf = self.view(s)
            pos, end = 0, len(buf)
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", buf, pos)
                pos += 12
                if pos + namesz > end:
                    break
                owner = bytes(buf[pos:pos + namesz]).rstrip(b"\0").decode("ascii", "replace")
                pos += (namesz + 3) & ~3
                if pos + descsz > end:
                    break
                desc = bytes(buf[pos:pos + descsz])
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
            if s.type != kind or s.entsize != SYM_SIZE or not self.in_file(s):
                continue
            strtab = self.sections[s.link] if s.link < len(self.sections) else None
            if strtab is None or not self.in_file(strtab):
                continue
            syms, names = self.view(s), self.view(strtab)
            for i in range(s.size // SYM_SIZE):
                name, info, _other, _shndx, value, size = struct.unpack_from(
                    "<IBBHQQ", syms, i * SYM_SIZE)
                if not name or name >= len(names):
                    continue
                raw = bytes(names[name:min(len(names), name + MAX_NAME)])
                end = raw.find(b"\0")
                out.append(Symbol((raw[:end] if end >= 0 else raw).decode("utf-8", "replace"),
                                  value, size, info & 0xF))
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
                out.append(UsdtProbe(strings[0].decode("ascii", "replace"),
                                     strings[1].decode("ascii", "replace"), pc,
                                     strings[2].decode("ascii", "replace")))
        return out

    # -- addresses -------------------------------------------------------------------------------
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

    def section_at(self, vaddr: int) -> Section | None:
        """The allocated section holding ``vaddr``."""
        for s in self.sections:
            if s.flags & SHF_ALLOC and s.addr <= vaddr < s.addr + s.size:
                return s
        return None

    def qemu_version(self) -> tuple[int, int] | None:
        """QEMU's version from its banner string in .rodata, when the binary is a QEMU."""
        for s in self.sections:
            if s.name != ".rodata" or not self.in_file(s):
                continue
            m = re.search(rb"QEMU emulator version (\d+)\.(\d+)", self.view(s))
            if m:
                return int(m.group(1)), int(m.group(2))
        return None
