"""iotrace recordings: a versioned file of I/O request events, readable even if its writer was killed.

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
         "record_fields": [[name, numpy type string], ...], ...anything the writer adds}
    then chunks, back to back until the end of the file; each is
        chunk header, 24 bytes
            char[4] magic   b"IOTC"
            u16 kind        1 EVENTS, 2 DOMAINS, 3 END
            u16 reserved    0
            u32 payload_len bytes that follow
            u32 payload_crc zlib.crc32 of the payload
            u64 lost_total  events lost so far (cumulative), as known when the chunk was written
        payload
            EVENTS:  payload_len / record_size records laid out as record_fields
                     (iotrace.core.events.EVENT_DTYPE, little endian, packed)
            DOMAINS: a JSON object {"<domid>": "<name>"}: names learnt since the last one
            END:     empty; written by close(). Its absence means the writer did not finish.

The writer appends a chunk at every ``flush()`` (and on its own every ``chunk_records`` events or
``flush_interval`` seconds), so a killed writer leaves a file whose whole chunks are all readable.
Reading: a short tail (incomplete chunk header or payload) keeps every whole record in it and adds
a warning; a damaged file header, metadata block, chunk magic or checksum raises
``iotrace.core.errors.InputError`` with one line naming the file and the offset. Readers map records by
field name, so a later version may add fields (missing ones take ``events.empty`` defaults).

``data`` is guest data (keystrokes pass through port 0x60): a recording holds it, like ``snoop``
shows it; it never becomes a metric or a label.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from iotrace.core.errors import InputError, open_input
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
_INT_TYPE = re.compile(r"^[<|=]?[iu][1248]$")
assert FILE_HEADER.size == 24 and CHUNK_HEADER.size == 24


def is_recording(head: bytes) -> bool:
    """Whether a file starting with ``head`` is an iotrace recording (by its magic)."""
    return bytes(head[:len(MAGIC)]) == MAGIC


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


class RecordingWriter:
    """Append events to a new recording at ``path`` (see the module docstring for the format)."""

    def __init__(self, path: str | os.PathLike, meta: dict | None = None, *,
                 chunk_records: int = 8192, flush_interval: float = 1.0):
        from iotrace import __version__
        self.path = str(path)
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
        self.meta = doc
        self.domains: dict[int, str] = {int(k): v for k, v in doc["domains"].items()}
        self._pending_domains: dict[int, str] = {}
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._lost = 0
        self._lost_written = 0
        self._chunk_records = max(1, int(chunk_records))
        self._flush_interval = flush_interval
        self._last_flush = time.monotonic()
        self.events_written = 0
        self.closed = False
        blob = json.dumps(doc, sort_keys=True).encode("utf-8")
        try:
            self._fh = open(self.path, "wb")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot create recording: {exc.strerror}") from None
        self._fh.write(FILE_HEADER.pack(MAGIC, VERSION, FILE_HEADER.size, len(blob),
                                        zlib.crc32(blob), 0))
        self._fh.write(blob)
        self._fh.flush()

    # -- input -----------------------------------------------------------------------------------
    def write(self, batch: np.ndarray) -> None:
        """Queue a batch of EVENT_DTYPE events; whole chunks go to disk as they fill."""
        if self.closed:
            raise ValueError("recording is closed")
        batch = np.asarray(batch)
        if batch.dtype != EVENT_DTYPE:
            raise TypeError(f"expected an EVENT_DTYPE batch, got {batch.dtype}")
        if len(batch):
            self._pending.append(batch.astype(RECORD_DTYPE, copy=True))
            self._pending_n += len(batch)
        while self._pending_n >= self._chunk_records:
            self._write_events(self._chunk_records)
        if time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()

    def add_lost(self, n: int) -> None:
        """Count ``n`` events the source lost (ring overruns); carried by the next chunk."""
        if n < 0:
            raise ValueError("lost count cannot be negative")
        self._lost += int(n)

    def set_domain(self, domid: int, name: str) -> None:
        """Record (or change) a domain's name; written with the next flush."""
        domid = int(domid)
        if self.domains.get(domid) != name:
            self.domains[domid] = str(name)
            self._pending_domains[domid] = str(name)

    # -- output ----------------------------------------------------------------------------------
    def _chunk(self, kind: int, payload: bytes) -> None:
        self._fh.write(CHUNK_HEADER.pack(CHUNK_MAGIC, kind, 0, len(payload), zlib.crc32(payload),
                                         self._lost))
        self._fh.write(payload)
        self._lost_written = self._lost

    def _write_events(self, n: int) -> None:
        allp = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, rest = allp[:n], allp[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_n = len(rest)
        self._chunk(KIND_EVENTS, head.tobytes())
        self.events_written += len(head)

    def flush(self) -> None:
        """Write what is queued (names, events, the lost count) as whole chunks; flush the file."""
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
        self._fh.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self._chunk(KIND_END, b"")
        self._fh.close()
        self.closed = True

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


class RecordingReader:
    """Read a recording chunk by chunk from a binary stream (a file, a pipe, a FIFO).

    ``RecordingReader(fh, path, head=b"")``: ``head`` holds bytes already read from ``fh`` (by
    a caller sniffing the format). The constructor reads the file header and the metadata
    (InputError when damaged); ``batches()`` yields each events chunk as an EVENT_DTYPE batch,
    updating ``domains``, ``lost_events``, ``warnings`` and ``complete`` as it goes. Memory is
    one chunk, whatever the file's length."""

    def __init__(self, fh, path: str, head: bytes = b""):
        self.fh, self.path = fh, str(path)
        self._head = head
        self.offset = 0
        p = self.path
        blob = self._read(FILE_HEADER.size)
        if not is_recording(blob):
            raise InputError(f"{p}: offset 0: not an iotrace recording (bad magic)")
        if len(blob) < FILE_HEADER.size:
            raise InputError(f"{p}: offset {len(blob)}: truncated in the file header")
        _, version, hsize, meta_len, meta_crc, _ = FILE_HEADER.unpack_from(blob)
        if version != VERSION:
            raise InputError(f"{p}: offset 8: recording version {version}, this iotrace reads "
                             f"version {VERSION}")
        if hsize != FILE_HEADER.size:
            raise InputError(f"{p}: offset 10: header size {hsize}, expected {FILE_HEADER.size}")
        if meta_len > MAX_META:
            raise InputError(f"{p}: offset 12: metadata length {meta_len} is implausible")
        mstart = FILE_HEADER.size
        mblob = self._read(meta_len)
        if len(mblob) < meta_len:
            raise InputError(f"{p}: offset {self.offset}: truncated in the metadata block "
                             f"({mstart + meta_len} bytes needed)")
        if zlib.crc32(mblob) != meta_crc:
            raise InputError(f"{p}: offset {mstart}: metadata checksum mismatch")
        try:
            meta = json.loads(mblob.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InputError(f"{p}: offset {mstart}: metadata is not UTF-8 JSON") from None
        if not isinstance(meta, dict):
            raise InputError(f"{p}: offset {mstart}: metadata is not a JSON object")
        self.meta = meta
        self.dtype = _file_dtype(meta, p)
        self.domains = _domains_from(meta.get("domains") or {}, p, mstart)
        self.lost_events = 0
        self.warnings: list[str] = []
        self.complete = False

    def _read(self, n: int) -> bytes:
        if self._head:
            take, self._head = self._head[:n], self._head[n:]
            if len(take) < n:
                take += _read_exactly(self.fh, n - len(take))
        else:
            take = _read_exactly(self.fh, n)
        self.offset += len(take)
        return take

    def _events(self, payload: bytes, n: int) -> np.ndarray:
        part = np.frombuffer(payload, self.dtype, n)
        events = empty(n)
        for name in self.dtype.names:
            if name in EVENT_DTYPE.names:
                events[name] = part[name]
        return events

    def batches(self):
        p, fdt = self.path, self.dtype
        while True:
            off = self.offset
            hdr = self._read(CHUNK_HEADER.size)
            if not hdr:
                break
            if self.complete:
                rest = len(hdr) + sum(len(b) for b in iter(lambda: self._read(1 << 20), b""))
                self.warnings.append(f"{p}: {rest} bytes after the end chunk at offset {off} "
                                     "ignored")
                break
            if len(hdr) < CHUNK_HEADER.size:
                self.warnings.append(f"{p}: truncated at offset {self.offset}: incomplete chunk "
                                     f"header (writer killed?)")
                break
            magic, kind, _, plen, pcrc, lost = CHUNK_HEADER.unpack_from(hdr)
            if magic != CHUNK_MAGIC:
                raise InputError(f"{p}: offset {off}: bad chunk magic {magic!r}")
            if kind not in KIND_NAMES:
                raise InputError(f"{p}: offset {off + 4}: unknown chunk kind {kind}")
            pstart = off + CHUNK_HEADER.size
            payload = self._read(plen)
            if len(payload) < plen:
                whole = 0
                if kind == KIND_EVENTS:
                    whole = len(payload) // fdt.itemsize
                    if whole:
                        yield self._events(payload, whole)
                self.lost_events = max(self.lost_events, lost)
                self.warnings.append(f"{p}: truncated at offset {self.offset} in the "
                                     f"{KIND_NAMES[kind]} chunk at {off} (writer killed?): kept "
                                     f"{whole} whole record(s) of it")
                break
            if zlib.crc32(payload) != pcrc:
                raise InputError(f"{p}: offset {pstart}: {KIND_NAMES[kind]} chunk checksum "
                                 "mismatch")
            if kind == KIND_EVENTS:
                if plen % fdt.itemsize:
                    raise InputError(f"{p}: offset {off + 8}: events chunk of {plen} bytes is "
                                     f"not a multiple of the {fdt.itemsize}-byte record")
                self.lost_events = max(self.lost_events, lost)
                if plen:
                    yield self._events(payload, plen // fdt.itemsize)
                continue
            if kind == KIND_DOMAINS:
                try:
                    obj = json.loads(payload.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise InputError(f"{p}: offset {pstart}: domains chunk is not UTF-8 "
                                     "JSON") from None
                self.domains.update(_domains_from(obj, p, pstart))
            else:
                self.complete = True
            self.lost_events = max(self.lost_events, lost)
        if not self.complete and not self.warnings:
            self.warnings.append(f"{p}: no end chunk: the writer did not close the file "
                                 "(still running, or killed)")


def read_recording(path: str | os.PathLike) -> Recording:
    """Read a recording; InputError (file and offset) when its header or a chunk is damaged."""
    p = str(path)
    with open_input(p, "a recording") as fh:
        reader = RecordingReader(fh, p)
        parts = list(reader.batches())
    events = np.concatenate(parts) if parts else empty(0)
    rec = Recording(p, events, domains=reader.domains, meta=reader.meta,
                    lost_events=reader.lost_events, warnings=reader.warnings,
                    complete=reader.complete)
    return rec
