"""Function boundaries of a stripped binary from its unwind tables (.eh_frame, .eh_frame_hdr).

Every function a C compiler emits for x86-64 Linux has a Frame Description Entry (FDE) in
``.eh_frame`` giving its first address and length (``pc_begin``, ``pc_range``), and stripping
keeps it (the unwinder needs it at run time). ``.eh_frame_hdr`` (linker-made, ``PT_GNU_EH_FRAME``)
adds a table of (initial location, FDE address) pairs sorted by location: read as one NumPy array,
it gives every function start at once, and only the FDEs of the functions asked about are decoded.
Without a usable header the whole ``.eh_frame`` is walked (record headers only).

Formats: the LSB Core specification, "Exception Frames" (.eh_frame, CIE/FDE, augmentation string
"zR"/"zPLR", DW_EH_PE_* pointer encodings) and ".eh_frame_hdr". pyelftools can decode the same
table, but it also interprets every call-frame instruction: 78 s for Debian 13's 24 MB device
model, against milliseconds here; the tests use it as an independent oracle on small binaries.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from iotrace.probes.hook.elf import ElfError, ElfFile

# DW_EH_PE_* (LSB Core, "DWARF Exception Header Encoding")
PE_OMIT = 0xFF
PE_ABSPTR, PE_ULEB128, PE_UDATA2, PE_UDATA4, PE_UDATA8 = 0x00, 0x01, 0x02, 0x03, 0x04
PE_SLEB128, PE_SDATA2, PE_SDATA4, PE_SDATA8 = 0x09, 0x0A, 0x0B, 0x0C
PE_PCREL, PE_DATAREL = 0x10, 0x30
PE_INDIRECT = 0x80
HDR_TABLE_DATAREL_SDATA4 = PE_DATAREL | PE_SDATA4       # 0x3b: what GNU ld and lld write

_FIXED = {PE_ABSPTR: "<Q", PE_UDATA2: "<H", PE_UDATA4: "<I", PE_UDATA8: "<Q",
          PE_SDATA2: "<h", PE_SDATA4: "<i", PE_SDATA8: "<q"}


class EhFrameError(ElfError):
    pass


def _uleb(buf, pos: int) -> tuple[int, int]:
    val = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise EhFrameError("corrupt LEB128 in .eh_frame")
        b = buf[pos]
        pos += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return val, pos


def _sleb(buf, pos: int) -> tuple[int, int]:
    start = pos
    val, pos = _uleb(buf, pos)
    bits = 7 * (pos - start)
    if val & (1 << (bits - 1)):
        val -= 1 << bits
    return val, pos


def read_encoded(buf, pos: int, enc: int, field_vaddr: int, datarel: int = 0) -> tuple[int, int]:
    """A DW_EH_PE-encoded pointer at ``buf[pos]``; ``field_vaddr`` is the vaddr of that byte (for
    pcrel), ``datarel`` the base for datarel (the .eh_frame_hdr section's address)."""
    fmt, app = enc & 0x0F, enc & 0x70
    if enc & PE_INDIRECT:
        raise EhFrameError(f"indirect pointer encoding {enc:#x} in .eh_frame is not supported")
    if fmt == PE_ULEB128:
        val, new = _uleb(buf, pos)
    elif fmt == PE_SLEB128:
        val, new = _sleb(buf, pos)
    elif fmt in _FIXED:
        n = struct.calcsize(_FIXED[fmt])
        if pos + n > len(buf):
            raise EhFrameError("truncated .eh_frame entry")
        val, new = struct.unpack_from(_FIXED[fmt], buf, pos)[0], pos + n
    else:
        raise EhFrameError(f"unknown pointer encoding {enc:#x} in .eh_frame")
    if app == PE_PCREL:
        val += field_vaddr
    elif app == PE_DATAREL:
        val += datarel
    elif app != 0:
        raise EhFrameError(f"unsupported pointer application {app:#x} in .eh_frame")
    return val & 0xFFFFFFFFFFFFFFFF, new


@dataclass(frozen=True)
class Function:
    start: int      # vaddr of the first instruction
    end: int        # vaddr after the last byte

    def __contains__(self, vaddr: int) -> bool:
        return self.start <= vaddr < self.end

    @property
    def size(self) -> int:
        return self.end - self.start


class FunctionTable:
    """Function bounds of one binary, from its FDEs. ``source`` says which table was read."""

    def __init__(self, elf: ElfFile):
        self.elf = elf
        sec = elf.section(".eh_frame")
        if sec is None or not elf.in_file(sec) or not sec.size:
            raise EhFrameError(f"{elf.path}: no .eh_frame section: function bounds unknown")
        self.sec = sec
        self.buf = elf.view(sec)
        self._cies: dict[int, int] = {}           # CIE offset -> FDE pointer encoding
        self._fde_at: np.ndarray | None = None    # section offset of each FDE (header table)
        self._ends: np.ndarray | None = None      # function ends (full walk)
        hdr = self._read_header()
        if hdr is not None:
            self.starts, self._fde_at = hdr
            self.source = ".eh_frame_hdr"
        else:
            self.starts, self._ends = self._walk()
            self.source = ".eh_frame"

    def __len__(self) -> int:
        return len(self.starts)

    # -- .eh_frame_hdr ---------------------------------------------------------------------------
    def _read_header(self):
        """(starts, FDE offsets in .eh_frame) from the binary search table, or None."""
        elf = self.elf
        h = elf.section(".eh_frame_hdr")
        if h is None or not elf.in_file(h) or h.size < 12:
            return None
        buf = elf.view(h)
        version, ptr_enc, cnt_enc, tab_enc = buf[0], buf[1], buf[2], buf[3]
        if version != 1 or tab_enc != HDR_TABLE_DATAREL_SDATA4 or cnt_enc == PE_OMIT:
            return None
        try:
            eh_ptr, pos = read_encoded(buf, 4, ptr_enc, h.addr + 4, h.addr)
            count, pos = read_encoded(buf, pos, cnt_enc, h.addr + pos, h.addr)
        except EhFrameError:
            return None
        if eh_ptr != self.sec.addr or pos + count * 8 > h.size:
            return None
        table = np.frombuffer(buf, dtype="<i4", count=2 * count, offset=pos).astype(np.int64)
        starts = table[0::2] + h.addr
        fde_at = table[1::2] + h.addr - self.sec.addr
        if len(starts) > 1 and np.any(np.diff(starts) < 0):
            return None                           # not sorted: not a search table we trust
        if np.any(fde_at < 0) or np.any(fde_at >= self.sec.size):
            return None
        return starts, fde_at

    # -- .eh_frame records -----------------------------------------------------------------------
    def _record(self, off: int) -> tuple[int, int, int]:
        """(length of the record's body, body offset, id/CIE-pointer value) at ``off``."""
        buf = self.buf
        if off + 4 > len(buf):
            raise EhFrameError("truncated .eh_frame")
        length = struct.unpack_from("<I", buf, off)[0]
        body = off + 4
        if length == 0xFFFFFFFF:
            if off + 12 > len(buf):
                raise EhFrameError("truncated .eh_frame")
            length = struct.unpack_from("<Q", buf, off + 4)[0]
            body = off + 12
        if length and body + length > len(buf):
            raise EhFrameError(f"corrupt .eh_frame record at {off:#x} (length {length:#x})")
        cid = struct.unpack_from("<I", buf, body)[0] if length >= 4 else 0
        return length, body, cid

    def _cie_encoding(self, cie_off: int) -> int:
        """The FDE pointer encoding (augmentation 'R') of the CIE at ``cie_off``."""
        enc = self._cies.get(cie_off)
        if enc is not None:
            return enc
        length, body, cid = self._record(cie_off)
        if not length or cid != 0:
            raise EhFrameError(f"corrupt .eh_frame: no CIE at {cie_off:#x}")
        buf, end = self.buf, body + length
        pos = body + 4
        version = buf[pos]
        pos += 1
        aug_end = bytes(buf[pos:min(end, pos + 16)]).find(b"\0")
        if aug_end < 0:
            raise EhFrameError(f"corrupt .eh_frame CIE at {cie_off:#x}")
        aug = bytes(buf[pos:pos + aug_end]).decode("ascii", "replace")
        pos += aug_end + 1
        enc = PE_ABSPTR
        if "eh" in aug:
            pos += 8
        _, pos = _uleb(buf, pos)                  # code alignment
        _, pos = _sleb(buf, pos)                  # data alignment
        if version == 1:
            pos += 1                              # return address register
        else:
            _, pos = _uleb(buf, pos)
        if aug.startswith("z"):
            _, pos = _uleb(buf, pos)              # augmentation data length
            for ch in aug[1:]:
                if ch == "R":
                    enc = buf[pos]
                    pos += 1
                elif ch == "P":
                    penc = buf[pos]
                    _, pos = read_encoded(buf, pos + 1, penc & 0x7F, self.sec.addr + pos + 1)
                elif ch == "L":
                    pos += 1
                elif ch in "SBG":
                    pass
                else:
                    break                         # unknown: the rest does not matter for 'R'
        self._cies[cie_off] = enc
        return enc

    def _fde(self, off: int) -> Function:
        length, body, cptr = self._record(off)
        if not length or cptr == 0:
            raise EhFrameError(f"corrupt .eh_frame: no FDE at {off:#x}")
        enc = self._cie_encoding(body - cptr)
        pos = body + 4
        begin, pos = read_encoded(self.buf, pos, enc, self.sec.addr + pos)
        rng, _ = read_encoded(self.buf, pos, enc & 0x0F, self.sec.addr + pos)
        return Function(begin, begin + rng)

    def _walk(self) -> tuple[np.ndarray, np.ndarray]:
        starts, ends = [], []
        off, n = 0, len(self.buf)
        while off + 4 <= n:
            length, body, cid = self._record(off)
            if length == 0:
                break                             # terminator
            if cid != 0:
                f = self._fde(off)
                if f.end > f.start:
                    starts.append(f.start)
                    ends.append(f.end)
            off = body + length
        order = np.argsort(np.array(starts, dtype=np.int64), kind="stable")
        return (np.array(starts, dtype=np.int64)[order], np.array(ends, dtype=np.int64)[order])

    # -- queries ---------------------------------------------------------------------------------
    def function(self, i: int) -> Function:
        if self._ends is not None:
            return Function(int(self.starts[i]), int(self._ends[i]))
        f = self._fde(int(self._fde_at[i]))
        if f.start != int(self.starts[i]):
            raise EhFrameError(f"{self.elf.path}: .eh_frame_hdr and .eh_frame disagree at "
                               f"{int(self.starts[i]):#x}")
        return f

    def containing(self, vaddr: int) -> Function | None:
        """The function whose FDE covers ``vaddr``, or None."""
        i = int(np.searchsorted(self.starts, vaddr, side="right")) - 1
        if i < 0:
            return None
        f = self.function(i)
        return f if vaddr in f else None

    def starting_at(self, vaddr: int) -> Function | None:
        """The function whose FDE starts exactly at ``vaddr``, or None."""
        i = int(np.searchsorted(self.starts, vaddr, side="left"))
        if i < len(self.starts) and int(self.starts[i]) == vaddr:
            return self.function(i)
        return None

    def all(self) -> list[Function]:
        """Every function (decodes every FDE: for tests and diagnostics)."""
        return [self.function(i) for i in range(len(self.starts))]
