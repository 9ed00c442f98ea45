"""Offline inputs: open a path or ``-`` once, decompress gzip as it is read, tell what it holds.

``open_input_stream(path)`` -> ``InputStream``: ``fh`` (a binary stream positioned after
``head``), ``head`` (the first bytes, up to ``SNIFF``, already read from ``fh``: the caller
feeds them first), ``name`` (the path, ``<stdin>`` for ``-``), ``gzip`` (whether it was
compressed) and ``warnings`` (a gzip stream cut short: the data before the cut is kept, as for
an uncompressed capture cut short). The input is never reopened or sought, so pipes and FIFOs
work compressed too (``xentrace ... | gzip > t.bin.gz``, ``zcat``-free).

Formats a report reads (``ACCEPTED``): xentrace captures and iotrace recordings, either of
them gzip-compressed. ``not_a_capture(name, head)`` is the one line for anything else, saying
what it looks like (text, the CSV device-access logs the stand-in replays, a gzip inside the
gzip) and what is accepted.
"""
from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass, field

from iotrace.core.errors import InputError, open_input

STDIN = "-"
SNIFF = 256                    # bytes read to tell formats apart (a CSV header line fits)
GZIP_MAGIC = b"\x1f\x8b"       # RFC 1952, 2.3.1: ID1 ID2
CPU_CHANGE_HEADER = 0x2001F003  # a xentrace capture's first word (iotrace.xentrace.catalogue)
ACCEPTED = ("xentrace captures (xentrace -D -e hvm -e sched FILE) and iotrace recordings "
            "(iotrace record -o FILE), either of them gzip-compressed")
# the CSV device-access log of a real boot (QEMU's memory_region_ops trace events; the
# stand-in device model replays it: probes/standin/stream.py)
_DEVICE_LOG_HEADER = b"t_us,vcpu,space,dir,addr"


@dataclass
class InputStream:
    fh: object
    head: bytes
    name: str
    gzip: bool = False
    warnings: list[str] = field(default_factory=list)
    _owned: list = field(default_factory=list)

    def close(self) -> None:
        for f in reversed(self._owned):
            f.close()
        self._owned.clear()

    def __enter__(self) -> "InputStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Prefixed:
    """A read-only stream that returns ``head`` first, then what ``fh`` holds."""

    def __init__(self, head: bytes, fh):
        self._head, self._fh = head, fh

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._fh.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._fh.read(n)


class _Gunzip:
    """gzip decompression as a stream (``read``/``readinto``), in bounded steps: members one
    after the other (as gzip(1) reads concatenated files), zero padding after a member skipped
    (as Python's gzip module does), the CRC and length of each checked by zlib. A stream cut
    short ends the data with a warning, everything decompressed before the cut kept; corrupt
    data is one InputError line naming the input."""

    STEP_IN = 1 << 16            # compressed bytes read at a time
    STEP_OUT = 1 << 20           # decompressed bytes produced at a time

    def __init__(self, raw, name: str, warnings: list[str]):
        self._raw, self.name, self.warnings = raw, name, warnings
        self._d = None           # zlib state of the current member, None before the first
        self._in = b""           # compressed bytes read, not yet consumed
        self._raw_eof = False
        self._out = bytearray()  # decompressed, not yet returned
        self.out = 0             # bytes returned so far
        self.compressed_in = 0   # compressed bytes read so far

    def _step(self) -> bytes:
        """Some more decompressed bytes; b"" at the end of the data."""
        while True:
            if not self._in:
                if self._raw_eof:
                    if self._d is not None and not self._d.eof:
                        self._d = None
                        self.warnings.append(
                            f"gzip stream cut short after {self.compressed_in} compressed bytes "
                            f"(no end-of-stream marker): the {self.out + len(self._out)} bytes "
                            "decompressed before the cut were read")
                    return b""
                self._in = self._raw.read(self.STEP_IN)
                self.compressed_in += len(self._in)
                self._raw_eof = not self._in
                continue
            if self._d is None or self._d.eof:
                if self._d is not None:              # after a member: padding, another, junk
                    self._in = self._in.lstrip(b"\0")
                    if not self._in:
                        continue
                    if len(self._in) < 2 and not self._raw_eof:
                        more = self._raw.read(self.STEP_IN)
                        self.compressed_in += len(more)
                        self._raw_eof = not more
                        self._in += more
                        continue
                    if not self._in.startswith(GZIP_MAGIC):
                        at = self.compressed_in - len(self._in)
                        self.warnings.append(f"data after the end of the gzip stream (from "
                                             f"compressed byte offset {at}) ignored, as gzip "
                                             "-d does")
                        self._in, self._raw_eof, self._d = b"", True, None
                        return b""
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)       # gzip wrapper
            try:
                got = self._d.decompress(self._in, self.STEP_OUT)
            except zlib.error as exc:
                raise InputError(f"{self.name}: corrupt gzip data after "
                                 f"{self.out + len(self._out)} decompressed bytes: {exc}"
                                 ) from None
            self._in = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
            if got:
                return got

    def read(self, n: int = -1) -> bytes:
        while n is None or n < 0 or len(self._out) < n:
            got = self._step()
            if not got:
                break
            self._out += got
        take = len(self._out) if n is None or n < 0 else min(n, len(self._out))
        out = bytes(self._out[:take])
        del self._out[:take]
        self.out += take
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def _read_head(fh, name: str, n: int = SNIFF) -> bytes:
    parts, got = [], 0
    while got < n:
        try:
            b = fh.read(n - got)
        except IsADirectoryError:
            raise InputError(f"{name}: is a directory, not a capture file") from None
        except OSError as exc:
            raise InputError(f"{name}: cannot read: {exc.strerror}") from None
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def open_input_stream(path: str) -> InputStream:
    """Open ``path`` (``-``: standard input, refused on a terminal) for one pass from its start;
    gzip-compressed data is decompressed as it is read."""
    if path == STDIN:
        if sys.stdin.isatty():
            raise InputError("-: standard input is a terminal: pipe a capture in "
                             "(xentrace ... | iotrace report -) or name a file")
        raw, name, owned = sys.stdin.buffer, "<stdin>", []
    else:
        raw = open_input(path, "a capture file")
        name, owned = path, [raw]
    head = _read_head(raw, name)
    if not head.startswith(GZIP_MAGIC):
        return InputStream(raw, head, name, _owned=owned)
    warnings: list[str] = []
    gz = _Gunzip(_Prefixed(head, raw), name, warnings)
    owned.append(gz)
    return InputStream(gz, _read_head(gz, name), name, gzip=True, warnings=warnings,
                       _owned=owned)


def looks_like_xentrace(head: bytes) -> bool:
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == CPU_CHANGE_HEADER


def not_a_capture(name: str, head: bytes, compressed: bool) -> InputError:
    """The one line for an input that is neither format: what it looks like, what is read."""
    inside = "gzip-compressed " if compressed else ""
    if not head:
        what = f"{inside}empty"
    elif head.startswith(_DEVICE_LOG_HEADER):
        what = (f"a {inside}CSV device-access log (t_us,vcpu,space,...: QEMU's "
                "memory_region_ops trace of a boot, as linux-boot-tcg.csv.gz); to see it as "
                "iotrace would, replay it through a stand-in device model (iotrace standin "
                "--replay FILE) under iotrace record -o FILE.iotrec and report that")
    elif head.startswith(GZIP_MAGIC):
        what = "gzip-compressed twice (decompress it once first)"
    elif all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        what = f"{inside}text"
    else:
        word = int.from_bytes(head[:4].ljust(4, b"\0"), "little")
        what = (f"{inside}data starting with 0x{word:08x} (a xentrace capture starts with "
                f"TRC_TRACE_CPU_CHANGE, 0x{CPU_CHANGE_HEADER:08x})")
    return InputError(f"{name}: not a xentrace capture nor an iotrace recording: {what}. "
                      f"iotrace report reads {ACCEPTED}")
