"""iotrace recordings: a versioned file of I/O request events, readable even if its writer was killed
or the file was damaged.

``iotrace record -o FILE`` writes one; ``iotrace report FILE`` (through ``iotrace.offline.capture``) reads it.

Layout, version 1, all integers little endian::

    file header, 24 bytes, at offset 0
        char[8] magic   b"\\x89IOTREC\\n"   (the 0x89 and \\n catch text-mode and 7-bit mangling)
        u16 version     1
        u16 header_size 24
        u32 meta_len    bytes of the metadata block that follows
        u32 meta_crc    zlib.crc32 of the metadata block
        u32 reserved    0
    metadata block, meta_len bytes, at offset 24: one UTF-8 JSON object
        {"format": "iotrace-recording", "version": 1, "host": ..., "start_time": <unix s>,
         "start_time_iso": ..., "iotrace_version": ..., "source": "qemu"|"xentrace"|...,
         "domains": {"<domid>": "<name>", ...}, "record_size": 60,
         "record_fields": [[name, numpy type string], ...],
         "chunk_header_check": "crc32-low16", ...anything the writer adds}
    then chunks, back to back until the end of the file; each is
        chunk header, 24 bytes
            char[4] magic   b"IOTC"
            u16 kind        1 EVENTS, 2 DOMAINS, 3 END
            u16 check       with "chunk_header_check": "crc32-low16" in the metadata, the low 16
                            bits of zlib.crc32 of these 24 bytes with this field zeroed (CRC-32
                            catches every single-bit error in them); else 0 (reserved, written
                            so by iotrace before the check existed, and ignored)
            u32 payload_len bytes that follow (at most MAX_CHUNK)
            u32 payload_crc zlib.crc32 of the payload
            u64 lost_total  events lost so far (cumulative), as known when the chunk was written
        payload
            EVENTS:  payload_len / record_size records laid out as record_fields
                     (iotrace.core.events.EVENT_DTYPE, little endian, packed)
            DOMAINS: a JSON object {"<domid>": "<name>"}: names learnt since the last one
            END:     empty; written by close(). Its absence means the writer did not finish.

Writing (``RecordingWriter``): the file is private (created 0600 with O_NOFOLLOW; an existing
file is refused unless ``force``). A chunk is appended at every ``flush()``, whenever
``chunk_records`` events are queued, and by ``write()``/``tick()`` once the oldest queued event
has waited ``flush_interval`` seconds (0.5): a writer killed by SIGKILL loses at most that much.
Chunks go to the file with write(2) as they are made (no user-space buffer), so what was written
is in the file even when the process dies the next instant. A failed write (disk full) raises
``OutputError`` (one line) and leaves the file readable up to the failure.

Reading (``RecordingReader``), in one pass from a file, a pipe or a FIFO:

* a short tail (the writer was killed) keeps every whole record in it, with a warning;
* a damaged chunk costs that chunk only: a chunk whose payload fails its checksum (its header
  being intact) is skipped whole; a chunk header that fails its checks (magic, header check,
  kind, a length beyond MAX_CHUNK or not a whole number of records) is skipped up to the next
  chunk magic that starts a valid chunk (resynchronisation). Each is counted (``skipped_chunks``,
  ``skipped_bytes``, ``skipped_records``: exact when the header was intact, estimated from the
  bytes otherwise) and said in a warning;
* a damaged file header or metadata block is read through where one fault explains it (a flipped
  bit in the magic, version, header size or metadata length; a metadata block whose checksum
  fails is replaced by this version's record layout),
  with a warning; what cannot be explained raises ``iotrace.core.errors.InputError``, one line
  naming the file and the offset.

Warnings carry no file name (the caller names the file once). Readers map records by field name,
so a later version may add fields (missing ones take ``events.empty`` defaults).

``data`` is guest data (keystrokes pass through port 0x60): a recording holds it, like ``snoop``
shows it; it never becomes a metric or a label.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from iotrace.core.errors import InputError, OutputError, open_input
from iotrace.core.events import EVENT_DTYPE, empty

MAGIC = b"\x89IOTREC\n"
VERSION = 1
FILE_HEADER = struct.Struct("<8sHHIII")
CHUNK_HEADER = struct.Struct("<4sHHIIQ")
CHUNK_MAGIC = b"IOTC"
KIND_EVENTS, KIND_DOMAINS, KIND_END = 1, 2, 3
KIND_NAMES = {KIND_EVENTS: "events", KIND_DOMAINS: "domains", KIND_END: "end"}
RECORD_DTYPE = EVENT_DTYPE.newbyteorder("<")
MAX_META = 16 << 20
MAX_CHUNK = 16 << 20            # payload bound: a longer length is damage (the writer stays below)
HEADER_CHECK = "crc32-low16"    # the metadata's "chunk_header_check" (see the module doc)
FLUSH_INTERVAL = 0.5            # seconds a queued event waits at most before it is written
MAX_WARNINGS = 20               # damage warnings listed one by one; the rest are summed up
_SCAN_BLOCK = 1 << 20
_INT_TYPE = re.compile(r"^[<|=]?[iu][1248]$")
assert FILE_HEADER.size == 24 and CHUNK_HEADER.size == 24


def is_recording(head: bytes) -> bool:
    """Whether a file starting with ``head`` is an iotrace recording: its magic, or its magic
    with one bit flipped (a damaged recording is still a recording; no other format iotrace
    reads starts within one bit of it)."""
    head = bytes(head[:len(MAGIC)])
    if len(head) < len(MAGIC):
        return False
    diff = int.from_bytes(head, "little") ^ int.from_bytes(MAGIC, "little")
    return diff & (diff - 1) == 0


def header_check(hdr: bytes) -> int:
    """The check field of a chunk header: crc32 of its 24 bytes with the field zeroed, low 16."""
    return zlib.crc32(hdr[:6] + b"\0\0" + hdr[8:24]) & 0xFFFF


def _fields(dtype: np.dtype) -> list[list[str]]:
    return [[name, dtype.fields[name][0].str] for name in dtype.names]


@dataclass
class Recording:
    path: str
    events: np.ndarray
    domains: dict[int, str] = field(default_factory=dict)
    lost_events: int = 0
    warnings: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    complete: bool = False          # an END chunk was found: the writer closed the file
    skipped_chunks: int = 0         # damaged chunks (or runs of bytes) skipped
    skipped_records: int = 0        # records in them (estimated where a header was damaged)


# -- writing -----------------------------------------------------------------------------------
class PrivateFile:
    """An output file for guest data: ``PrivateFile(path, force=False)``.

    Opened with O_NOFOLLOW (a symbolic link is refused, even with ``force``: it could point
    anywhere), created 0600 whatever the umask; an existing file is refused unless ``force``
    (then it is truncated by ``truncate()`` when writing starts, so a run that fails before
    leaves it as it was, and made 0600 if it is a regular file; a device such as /dev/full is
    written as it is). ``created`` says whether this call made the file (``discard()`` removes
    it then). Every problem is one ``OutputError`` line."""

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self.path = p = str(path)
        base = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        self.created = True
        try:
            try:
                self.fd = os.open(p, base | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if os.path.islink(p):
                    raise OSError(errno.ELOOP, "symbolic link") from None
                if os.path.isdir(p):
                    raise OSError(errno.EISDIR, "directory") from None
                if not force:
                    raise OutputError(f"{p}: exists: refused (recordings hold guest data; "
                                      "--force overwrites an existing file)") from None
                self.created = False
                self.fd = os.open(p, base)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{p}: is a symbolic link: refused (name the file itself)") \
                    from None
            if exc.errno == errno.EISDIR:
                raise OutputError(f"{p}: is a directory: name a file to write") from None
            raise OutputError(f"{p}: cannot create the recording: {exc.strerror}") from None
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        if self.regular:
            os.fchmod(self.fd, 0o600)       # exactly 0600, whatever the umask or old mode
        self.offset = 0

    def truncate(self) -> None:
        if self.regular and not self.created:
            os.ftruncate(self.fd, 0)

    def write_all(self, data: bytes) -> None:
        """Write every byte (write(2) may take part of them); OSError as it comes."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.offset += n
            view = view[n:]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def discard(self) -> None:
        """Close; remove the file if this object created it (a run that never started)."""
        self.close()
        if self.created:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class RecordingWriter:
    """Append events to a new recording (see the module docstring for the format).

    ``target``: a path (opened as ``PrivateFile(path, force)``) or a ``PrivateFile`` opened
    earlier (``iotrace record`` opens its output before compiling probes)."""

    def __init__(self, target, meta: dict | None = None, *, chunk_records: int = 8192,
                 flush_interval: float = FLUSH_INTERVAL, force: bool = False):
        from iotrace import __version__
        out = target if isinstance(target, PrivateFile) else PrivateFile(target, force)
        self._out = out
        self.path = out.path
        now = time.time()
        doc = {
            "format": "iotrace-recording",
            "version": VERSION,
            "host": socket.gethostname(),
            "start_time": now,
            "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "iotrace_version": __version__,
            "source": "unknown",
            "domains": {},
        }
        doc.update(meta or {})
        doc["domains"] = {str(int(k)): str(v) for k, v in dict(doc.get("domains") or {}).items()}
        doc["record_size"] = RECORD_DTYPE.itemsize
        doc["record_fields"] = _fields(RECORD_DTYPE)
        doc["chunk_header_check"] = HEADER_CHECK
        self.meta = doc
        self.domains: dict[int, str] = {int(k): v for k, v in doc["domains"].items()}
        self._pending_domains: dict[int, str] = {}
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._pending_since: float | None = None    # monotonic time the oldest queued event came
        self._lost = 0
        self._lost_written = 0
        self._chunk_records = max(1, min(int(chunk_records), MAX_CHUNK // RECORD_DTYPE.itemsize))
        self._flush_interval = flush_interval
        self.events_written = 0
        self.closed = False
        self.failed: str | None = None              # why writing stopped (disk full, ...)
        blob = json.dumps(doc, sort_keys=True).encode("utf-8")
        try:
            out.truncate()
        except OSError as exc:
            self._fail(exc)
        self._write(FILE_HEADER.pack(MAGIC, VERSION, FILE_HEADER.size, len(blob),
                                     zlib.crc32(blob), 0) + blob)

    # -- input -----------------------------------------------------------------------------------
    def write(self, batch: np.ndarray) -> None:
        """Queue a batch of EVENT_DTYPE events; whole chunks go to disk as they fill, and
        everything queued once the oldest has waited ``flush_interval``."""
        if self.closed:
            raise ValueError("recording is closed")
        batch = np.asarray(batch)
        if batch.dtype != EVENT_DTYPE:
            raise TypeError(f"expected an EVENT_DTYPE batch, got {batch.dtype}")
        if len(batch):
            self._pending.append(batch.astype(RECORD_DTYPE, copy=True))
            self._pending_n += len(batch)
            if self._pending_since is None:
                self._pending_since = time.monotonic()
        while self._pending_n >= self._chunk_records:
            self._write_events(self._chunk_records)
        self.tick()

    def tick(self) -> None:
        """Flush if the oldest queued event (or name, or lost count) has waited
        ``flush_interval``: call it when no events come too (traffic stopped)."""
        if self.closed or self._pending_since is None:
            return
        if time.monotonic() - self._pending_since >= self._flush_interval:
            self.flush()

    def _queued(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.monotonic()

    def add_lost(self, n: int) -> None:
        """Count ``n`` events the source lost (ring overruns); carried by the next chunk."""
        if n < 0:
            raise ValueError("lost count cannot be negative")
        if n:
            self._lost += int(n)
            self._queued()

    def set_domain(self, domid: int, name: str) -> None:
        """Record (or change) a domain's name; written with the next flush."""
        domid = int(domid)
        if self.domains.get(domid) != name:
            self.domains[domid] = str(name)
            self._pending_domains[domid] = str(name)
            self._queued()

    # -- output ----------------------------------------------------------------------------------
    def _fail(self, exc: OSError) -> None:
        self.failed = exc.strerror or str(exc)
        self.closed = True
        self._out.close()
        raise OutputError(f"{self.path}: cannot write the recording: {self.failed}: it stops at "
                          f"byte {self._out.offset} with {self.events_written} event(s), "
                          "readable up to there") from None

    def _write(self, data: bytes) -> None:
        try:
            self._out.write_all(data)
        except OSError as exc:
            self._fail(exc)

    def _chunk(self, kind: int, payload: bytes) -> None:
        hdr = bytearray(CHUNK_HEADER.pack(CHUNK_MAGIC, kind, 0, len(payload),
                                          zlib.crc32(payload), self._lost))
        struct.pack_into("<H", hdr, 6, header_check(hdr))
        self._write(bytes(hdr) + payload)
        self._lost_written = self._lost

    def _write_events(self, n: int) -> None:
        allp = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, rest = allp[:n], allp[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_n = len(rest)
        self._chunk(KIND_EVENTS, head.tobytes())
        self.events_written += len(head)

    def flush(self) -> None:
        """Write what is queued (names, events, the lost count) as whole chunks."""
        if self.closed:
            return
        if self._pending_domains:
            payload = json.dumps({str(k): v for k, v in sorted(self._pending_domains.items())})
            self._chunk(KIND_DOMAINS, payload.encode("utf-8"))
            self._pending_domains = {}
        while self._pending_n:
            self._write_events(min(self._pending_n, self._chunk_records))
        if self._lost != self._lost_written:
            self._chunk(KIND_EVENTS, b"")
        self._pending_since = None

    def close(self) -> None:
        """Flush, write the end chunk, close. After a failed write only closes (the file keeps
        what was written before)."""
        if self.closed:
            self._out.close()
            return
        try:
            self.flush()
            self._chunk(KIND_END, b"")
        finally:
            self.closed = True
            self._out.close()

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- reading -----------------------------------------------------------------------------------
def _domains_from(obj, path: str, offset: int) -> dict[int, str]:
    if not isinstance(obj, dict):
        raise InputError(f"{path}: offset {offset}: domain names are not a JSON object")
    out = {}
    for k, v in obj.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError):
            raise InputError(f"{path}: offset {offset}: bad domain id {k!r}") from None
    return out


def _file_dtype(meta: dict, path: str) -> np.dtype:
    fields = meta.get("record_fields")
    size = meta.get("record_size")
    try:
        # Only plain little-endian/native integers of 1-8 bytes: a type string from the file is
        # never handed to NumPy's full dtype parser (sub-arrays, objects, ...).
        if any(not _INT_TYPE.match(str(t)) for _, t in fields):
            raise ValueError("not a plain integer type")
        dt = np.dtype([(str(n), np.dtype(str(t))) for n, t in fields])
    except (TypeError, ValueError):
        raise InputError(f"{path}: offset {FILE_HEADER.size}: bad record_fields in the "
                         "metadata") from None
    if dt.itemsize != size or dt.itemsize == 0:
        raise InputError(f"{path}: offset {FILE_HEADER.size}: record_size {size!r} does not "
                         f"match record_fields ({dt.itemsize} bytes)")
    for n in ("ts_ns", "domid", "vcpu", "type", "dir", "addr"):
        if n not in dt.names:
            raise InputError(f"{path}: offset {FILE_HEADER.size}: records lack field {n!r}")
    if any(dt.fields[n][0].kind not in "iu" for n in dt.names):
        raise InputError(f"{path}: offset {FILE_HEADER.size}: non-integer record field")
    return dt


def _read_exactly(fh, n: int) -> bytes:
    """Up to n bytes: fewer only at the end of the input (pipes return short reads)."""
    parts, got = [], 0
    while got < n:
        b = fh.read(min(n - got, 1 << 24))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Input:
    """A binary stream read forward once, with a step back (to resynchronise after damage: the
    bytes of a chunk found bad are searched again for the next chunk). ``offset``: the input's
    byte offset of the next byte ``read`` returns. ``unread(data)`` takes back the last
    ``len(data)`` bytes read (``data`` must be them). Every byte is looked at a bounded number
    of times: scanning is linear in the input."""

    def __init__(self, fh, head: bytes = b""):
        self.fh = fh
        self._buf = bytes(head)
        self._pos = 0
        self.offset = 0

    def read(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= n:
            self._pos = pos + n
            take = buf[pos:pos + n]
        else:
            take = buf[pos:] + _read_exactly(self.fh, n - (len(buf) - pos))
            self._buf, self._pos = b"", 0
        self.offset += len(take)
        return take

    def unread(self, data: bytes) -> None:
        n = len(data)
        if n <= self._pos:
            self._pos -= n
        elif n:
            self._buf = bytes(data) + self._buf[self._pos:]
            self._pos = 0
        self.offset -= n

    def skip_to(self, magic: bytes, keep: int = 0) -> bytes:
        """Skip to the next ``magic`` (or the end); return the first ``keep`` skipped bytes."""
        kept: list[bytes] = []
        n_kept = 0
        tail = len(magic) - 1
        while True:
            buf, pos = self._buf, self._pos
            i = buf.find(magic, pos)
            end = i if i >= 0 else max(pos, len(buf) - tail)
            if n_kept < keep:
                kept.append(buf[pos:min(end, pos + keep - n_kept)])
                n_kept += len(kept[-1])
            self.offset += end - pos
            self._pos = end
            if i >= 0:
                return b"".join(kept)
            more = self.fh.read(_SCAN_BLOCK)
            if not more:                       # the end: the last bytes are skipped too
                rest = buf[end:]
                if n_kept < keep:
                    kept.append(rest[:keep - n_kept])
                self.offset += len(rest)
                self._buf, self._pos = b"", 0
                return b"".join(kept)
            self._buf, self._pos = buf[end:] + more, 0


class RecordingReader:
    """Read a recording chunk by chunk from a binary stream (a file, a pipe, a FIFO).

    ``RecordingReader(fh, path, head=b"")``: ``head`` holds bytes already read from ``fh`` (by
    a caller sniffing the format). The constructor reads the file header and the metadata
    (InputError when they are damaged beyond what one fault explains); ``batches()`` yields each
    events chunk as an EVENT_DTYPE batch, updating ``domains``, ``lost_events``, ``warnings``,
    ``complete`` and the damage counts (``skipped_chunks``, ``skipped_bytes``,
    ``skipped_records``) as it goes. Memory is one chunk (MAX_CHUNK at most), whatever the
    file's length; resynchronising reads ahead in blocks of 1 MiB."""

    def __init__(self, fh, path: str, head: bytes = b""):
        self.path = str(path)
        self._in = _Input(fh, head)
        self.lost_events = 0
        self.warnings: list[str] = []
        self.complete = False
        self.skipped_chunks = 0
        self.skipped_bytes = 0
        self.skipped_records = 0
        self._unsaid = [0, 0]            # damage past MAX_WARNINGS: chunks, bytes
        self._cut = False                # a truncation was said
        self._read_header()

    @property
    def offset(self) -> int:
        return self._in.offset

    @property
    def truncated(self) -> bool:
        """The input ends before the writer's end chunk (killed writer, cut file, or one
        still being written)."""
        return not self.complete

    # -- file header and metadata ----------------------------------------------------------------
    def _read_header(self) -> None:
        p, inp = self.path, self._in
        blob = inp.read(FILE_HEADER.size)
        if not is_recording(blob):
            raise InputError(f"{p}: offset 0: not an iotrace recording (bad magic)")
        if len(blob) < FILE_HEADER.size:
            raise InputError(f"{p}: offset {len(blob)}: truncated in the file header")
        _, version, hsize, meta_len, meta_crc, _ = FILE_HEADER.unpack_from(blob)
        if blob[:8] != MAGIC:
            self.warnings.append("offset 0: file magic damaged (one bit off): read as a "
                                 "recording")
        mstart = FILE_HEADER.size
        mblob = inp.read(meta_len) if meta_len <= MAX_META else b""
        checked = None
        if meta_len <= MAX_META and len(mblob) == meta_len and zlib.crc32(mblob) == meta_crc:
            meta, trusted = self._parse_meta(mblob), True
        else:
            inp.unread(mblob)
            meta, trusted, checked = self._recover_meta(meta_len, meta_crc, mblob)
        if version != VERSION:
            if not (trusted and meta.get("version") == VERSION):
                shown = meta.get("version") if trusted else version
                raise InputError(f"{p}: offset 8: recording version {shown}, this iotrace "
                                 f"reads version {VERSION}")
            self.warnings.append(f"offset 8: the file header says version {version}, its "
                                 f"metadata version {VERSION}: header damaged, read as version "
                                 f"{VERSION}")
        elif trusted and meta.get("version", VERSION) != VERSION:
            raise InputError(f"{p}: offset {mstart}: recording version {meta.get('version')!r}, "
                             f"this iotrace reads version {VERSION}")
        if hsize != FILE_HEADER.size:
            self.warnings.append(f"offset 10: header size {hsize} (version {VERSION} has "
                                 f"{FILE_HEADER.size}): header damaged, read on")
        self.meta = meta
        self.dtype = _file_dtype(meta, p)
        self.domains = _domains_from(meta.get("domains") or {}, p, mstart)
        self.checked = meta.get("chunk_header_check") == HEADER_CHECK if checked is None \
            else checked

    def _parse_meta(self, mblob: bytes) -> dict:
        p, mstart = self.path, FILE_HEADER.size
        try:
            meta = json.loads(mblob.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InputError(f"{p}: offset {mstart}: metadata is not UTF-8 JSON") from None
        if not isinstance(meta, dict):
            raise InputError(f"{p}: offset {mstart}: metadata is not a JSON object")
        return meta

    def _recover_meta(self, meta_len: int, meta_crc: int, mblob: bytes):
        """The metadata block fails its checksum, is cut short or its length is implausible:
        find the first chunk; the bytes before it are the metadata. Returns (meta, trusted,
        checked: whether that chunk carries the header check)."""
        p, inp, mstart = self.path, self._in, FILE_HEADER.size
        found = self._find_chunk(None, keep=MAX_META)
        if found is None:
            if meta_len > MAX_META:
                raise InputError(f"{p}: offset 12: metadata length {meta_len} is implausible")
            if len(mblob) < meta_len:
                raise InputError(f"{p}: offset {mstart + len(mblob)}: truncated in the metadata "
                                 f"block ({mstart + meta_len} bytes needed)")
            raise InputError(f"{p}: offset {mstart}: metadata checksum mismatch")
        before, checked = found
        at = inp.offset
        if zlib.crc32(before) == meta_crc:
            self.warnings.append(f"offset 12: metadata length {meta_len} damaged (the metadata "
                                 f"is the {len(before)} bytes before the first chunk, at offset "
                                 f"{at}): read on")
            return self._parse_meta(before), True, checked
        # The metadata itself is damaged. Even when it still parses, any field may be the
        # damaged one (a domain id, a field name): only this version's record layout is used.
        self.warnings.append(f"offset {mstart}: metadata damaged (checksum mismatch): read with "
                             f"this iotrace's version {VERSION} record layout "
                             f"({RECORD_DTYPE.itemsize}-byte records); its other fields (host, "
                             "start time, first domain names) are not used")
        meta = {"format": "iotrace-recording", "version": VERSION, "domains": {},
                "record_size": RECORD_DTYPE.itemsize, "record_fields": _fields(RECORD_DTYPE),
                "damaged": True}
        return meta, False, checked

    # -- chunks ----------------------------------------------------------------------------------
    def _bad_header(self, hdr: bytes, checked: bool, itemsize: int | None) -> str | None:
        """Why a 24-byte chunk header cannot be a writer's (None: it can)."""
        magic, kind, check, plen, _, _ = CHUNK_HEADER.unpack_from(hdr)
        if magic != CHUNK_MAGIC:
            return f"bad chunk magic {magic!r}"
        if checked and check != header_check(hdr):
            return "chunk header check mismatch"
        if kind not in KIND_NAMES:
            return f"unknown chunk kind {kind}"
        if plen > MAX_CHUNK:
            return f"implausible chunk length {plen}"
        if kind == KIND_END and plen:
            return f"end chunk with a {plen}-byte payload"
        if kind == KIND_EVENTS and itemsize and plen % itemsize:
            return (f"events chunk of {plen} bytes is not a multiple of the {itemsize}-byte "
                    "record")
        return None

    def _find_chunk(self, checked: bool | None, keep: int = 0):
        """Skip to the next chunk header that can be a writer's: one that passes the header
        check (``checked`` True), or is plausible (False: a file written before the check
        existed), or either (None: the kind of file is not known yet). Leaves the input at it;
        returns (the first ``keep`` bytes skipped, whether it has the check), or None at the end
        of the input. Payloads are not read here: the scan stays linear in the input."""
        inp = self._in
        itemsize = getattr(self, "dtype", None)
        itemsize = itemsize.itemsize if itemsize is not None else None
        skipped: list[bytes] = []
        n_kept = 0
        while True:
            part = inp.skip_to(CHUNK_MAGIC, keep=max(0, keep - n_kept))
            skipped.append(part)
            n_kept += len(part)
            hdr = inp.read(CHUNK_HEADER.size)
            if len(hdr) < CHUNK_HEADER.size:
                return None                 # a few bytes at the very end: skipped with the rest
            if checked is not False and self._bad_header(hdr, True, itemsize) is None:
                inp.unread(hdr)
                return b"".join(skipped), True
            if checked is not True and self._bad_header(hdr, False, itemsize) is None:
                inp.unread(hdr)
                return b"".join(skipped), False
            inp.unread(hdr[1:])
            if n_kept < keep:
                skipped.append(hdr[:1])
                n_kept += 1

    def _damage(self, off: int, nbytes: int, records: int, msg: str) -> None:
        self.skipped_chunks += 1
        self.skipped_bytes += nbytes
        self.skipped_records += records
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)
        else:
            self._unsaid[0] += 1
            self._unsaid[1] += nbytes

    def _resync(self, off: int, why: str) -> None:
        """The chunk header at ``off`` is bad: skip to the next chunk that can be a writer's."""
        inp = self._in
        inp.read(1)
        found = self._find_chunk(self.checked)
        n = inp.offset - off
        about = max(0, n - CHUNK_HEADER.size) // self.dtype.itemsize
        to = f"the next chunk at offset {inp.offset}" if found is not None else \
            "the end of the input"
        self._damage(off, n, about, f"offset {off}: {why}: skipped {n} bytes to {to} (about "
                     f"{about} record(s))")

    def _events(self, payload: bytes, n: int) -> np.ndarray:
        part = np.frombuffer(payload, self.dtype, n)
        events = empty(n)
        for name in self.dtype.names:
            if name in EVENT_DTYPE.names:
                events[name] = part[name]
        return events

    def batches(self):
        inp, fdt = self._in, self.dtype
        while True:
            off = inp.offset
            hdr = inp.read(CHUNK_HEADER.size)
            if not hdr:
                break
            if self.complete:
                rest = len(hdr) + sum(len(b) for b in iter(lambda: inp.read(1 << 20), b""))
                self.warnings.append(f"{rest} bytes after the end chunk at offset {off} "
                                     "ignored")
                break
            if len(hdr) < CHUNK_HEADER.size:
                if hdr.startswith(CHUNK_MAGIC[:len(hdr)]) or not self.checked:
                    self._cut = True
                    self.warnings.append(f"truncated at offset {inp.offset}: incomplete chunk "
                                         "header (writer killed?)")
                else:
                    self._damage(off, len(hdr), 0, f"offset {off}: {len(hdr)} bytes that are "
                                 "not a chunk at the end of the input: skipped")
                break
            why = self._bad_header(hdr, self.checked, fdt.itemsize)
            if why is not None:
                inp.unread(hdr)
                self._resync(off, why)
                continue
            _, kind, _, plen, pcrc, lost = CHUNK_HEADER.unpack_from(hdr)
            payload = inp.read(plen)
            if len(payload) < plen:
                whole = 0
                if kind == KIND_EVENTS:
                    whole = len(payload) // fdt.itemsize
                    if whole:
                        yield self._events(payload, whole)
                self.lost_events = max(self.lost_events, lost)
                self._cut = True
                self.warnings.append(f"truncated at offset {inp.offset} in the "
                                     f"{KIND_NAMES[kind]} chunk at {off} (writer killed?): kept "
                                     f"{whole} whole record(s) of it")
                break
            if zlib.crc32(payload) != pcrc:
                # The header is intact (its check covers the length and the checksum): exactly
                # this chunk's payload is damaged. (In a file without the header check the
                # length is taken as it reads.)
                n = plen // fdt.itemsize if kind == KIND_EVENTS else 0
                self._damage(off, CHUNK_HEADER.size + plen, n,
                             f"offset {off}: {KIND_NAMES[kind]} chunk checksum mismatch: "
                             f"skipped it ({n} record(s))")
                if self.checked:
                    self.lost_events = max(self.lost_events, lost)
                continue
            if kind == KIND_DOMAINS:
                try:
                    names = _domains_from(json.loads(payload.decode("utf-8")), self.path, off)
                except (UnicodeDecodeError, ValueError, InputError):
                    self._damage(off, CHUNK_HEADER.size + plen, 0, f"offset {off}: domains "
                                 "chunk is not a JSON object of names: skipped it")
                    continue
                self.domains.update(names)
            elif kind == KIND_END:
                self.complete = True
            self.lost_events = max(self.lost_events, lost)
            if kind == KIND_EVENTS and plen:
                yield self._events(payload, plen // fdt.itemsize)
        if self._unsaid[0]:
            self.warnings.append(f"and {self._unsaid[0]} more damaged part(s), "
                                 f"{self._unsaid[1]} bytes, skipped")
            self._unsaid = [0, 0]
        if not self.complete and not self._cut:
            self.warnings.append("no end chunk: the writer did not close the file "
                                 "(still running, or killed)")


def read_recording(path: str | os.PathLike) -> Recording:
    """Read a recording (damaged chunks skipped, said in ``warnings``); InputError (file and
    offset) when its header cannot be read."""
    p = str(path)
    with open_input(p, "a recording") as fh:
        reader = RecordingReader(fh, p)
        parts = list(reader.batches())
    events = np.concatenate(parts) if parts else empty(0)
    return Recording(p, events, domains=reader.domains, meta=reader.meta,
                     lost_events=reader.lost_events, warnings=reader.warnings,
                     complete=reader.complete, skipped_chunks=reader.skipped_chunks,
                     skipped_records=reader.skipped_records)
