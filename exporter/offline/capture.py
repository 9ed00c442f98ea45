"""Offline inputs: read a capture of any supported kind in one pass, in bounded memory.

Kinds, told apart by their first bytes:
* an iotrace recording (``iotrace record``; see ``iotrace.offline.recording``);
* a xentrace capture (no header: it starts with a TRC_TRACE_CPU_CHANGE record, header word
  0x2001f003; see ``iotrace.xentrace.decoder``);
* either of them gzip-compressed (decompressed as it is read: ``iotrace.offline.inputs``).
Anything else is one InputError line saying what it looks like and what is accepted.

The input is opened once and read from the start to the end, never reopened or sought: a file,
``-`` (standard input), ``/dev/stdin``, a pipe or a named FIFO all work
(``xentrace ... | iotrace report -``).

A summary carries the capture's time span: xentrace, the lowest to the highest TSC of its
records (every record, I/O or not, at ``cpu_hz``); a recording, its first to its last event.

* ``summarize_capture(path, ...)`` -> ``CaptureSummary``: the totals per key (``CellTable``),
  never every event - the xentrace core aggregates in C; a recording is folded in chunk by
  chunk. ``on_events`` (optional) also gets every event batch as it is decoded, in time order
  (``iotrace report --events``).
* ``CaptureStream(path, ...)``: the same single pass as event batches from a generator
  (``batches()``), with the counters (records, lost, decode errors, damaged chunks skipped,
  truncation, warnings, domain names) kept current as it reads: a replay feeds it as it goes.
* ``load_capture(path, ...)`` -> ``Capture``: every event in memory, in time order.

Damage is counted, never fatal past the start: ``decode_errors`` (xentrace: records that could not
be decoded; recordings: records in the chunks skipped as damaged), ``skipped_chunks`` (recordings:
damaged chunks or runs of bytes skipped), ``truncated`` (the input ends inside a record, or a
recording has no end chunk: its writer was killed). Warnings carry no file name: the caller names
the input once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from iotrace.core import events as E
from iotrace.core.errors import InputError
from iotrace.offline.cells import Accumulator, CellTable
from iotrace.offline.inputs import STDIN, looks_like_xentrace, not_a_capture, open_input_stream

__all__ = ["STDIN", "Capture", "CaptureStream", "CaptureSummary", "load_capture",
           "summarize_capture"]


@dataclass
class Capture:
    source: str                     # "xentrace" | "recording"
    path: str
    events: np.ndarray              # EVENT_DTYPE batch, in time order
    records: int = 0                # records decoded (xentrace: every trace record)
    lost_records: int = 0
    decode_errors: int = 0
    warnings: list[str] = field(default_factory=list)
    domain_names: dict[int, str] = field(default_factory=dict)
    skipped_chunks: int = 0
    truncated: bool = False


@dataclass
class CaptureSummary:
    source: str                     # "xentrace" | "recording"
    path: str
    cells: CellTable                # totals per (domid, vcpu, type, dir, addr, rip)
    requests: int = 0               # I/O requests counted
    records: int = 0
    lost_records: int = 0
    decode_errors: int = 0
    warnings: list[str] = field(default_factory=list)
    domain_names: dict[int, str] = field(default_factory=dict)
    first_ns: int | None = None     # the capture's first and last timestamps (ns, the source's
    last_ns: int | None = None      # clock; xentrace: TSC / cpu_hz); None when it has none
    compressed: bool = False        # it was gzip-compressed
    cpu_hz: float | None = None     # xentrace: the TSC rate its times were converted at
    skipped_chunks: int = 0         # recordings: damaged chunks (or runs of bytes) skipped
    truncated: bool = False         # ends inside a record, or a recording without its end

    @property
    def span_seconds(self) -> float | None:
        """Seconds from the first to the last timestamp; None without two distinct ones."""
        if self.first_ns is None or self.last_ns is None or self.last_ns <= self.first_ns:
            return None
        return (self.last_ns - self.first_ns) / 1e9


def summarize_capture(path: str, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                      rip: bool = False, on_events=None, on_names=None) -> CaptureSummary:
    """Decode a recording or a xentrace capture into cells (``rip``: keyed by guest RIP too);
    InputError (one line) if it is neither. ``on_events(batch)`` sees every event batch;
    ``on_names(names)`` the domain names a recording carries, before the first batch and
    whenever they change."""
    with open_input_stream(path) as src:
        head, name = src.head, src.name
        from iotrace.offline import recording
        if recording.is_recording(head):
            if xenalyze_compat:
                from iotrace.core.errors import InputError
                raise InputError(f"{name}: --xenalyze-compat applies to xentrace captures only")
            s = _summarize_recording(src.fh, name, head, rip, on_events, on_names)
        elif looks_like_xentrace(head):
            s = _summarize_xentrace(src.fh, name, head, cpu_hz, xenalyze_compat, rip, on_events)
        else:
            raise not_a_capture(name, head, src.gzip)
        s.compressed = src.gzip
        s.warnings[:0] = src.warnings
        return s


def _summarize_recording(fh, name, head, rip, on_events, on_names=None) -> CaptureSummary:
    from iotrace.offline.recording import RecordingReader
    reader = RecordingReader(fh, name, head)
    acc = Accumulator(rip=rip)
    lo = hi = None
    told: dict | None = None
    for batch in reader.batches():
        if on_names is not None and reader.domains != told:
            told = dict(reader.domains)
            on_names(told)
        acc.add_events(batch)
        if len(batch):
            ts = batch["ts_ns"]
            b_lo, b_hi = int(ts.min()), int(ts.max())
            lo = b_lo if lo is None else min(lo, b_lo)
            hi = b_hi if hi is None else max(hi, b_hi)
        if on_events is not None:
            on_events(batch)
    return CaptureSummary("recording", name, acc.table(), requests=acc.requests,
                          records=acc.requests, lost_records=reader.lost_events,
                          decode_errors=reader.skipped_records, warnings=list(reader.warnings),
                          domain_names=dict(reader.domains), skipped_chunks=reader.skipped_chunks,
                          truncated=reader.truncated, first_ns=lo, last_ns=hi)


def _summarize_xentrace(fh, name, head, cpu_hz, compat, rip, on_events) -> CaptureSummary:
    from iotrace.xentrace.decoder import StreamDecoder
    dec = StreamDecoder(cpu_hz, xenalyze_compat=compat, name=name,
                        events=on_events is not None, cells=True, cell_rip=rip, ordered=True)
    first = dec.feed(head)
    if on_events is not None and len(first):
        on_events(first)
    dec.feed_from(fh, on_events)
    last = dec.finish()
    if on_events is not None and len(last):
        on_events(last)
    cells = CellTable.from_native(dec.cells(in_place=True))
    lo, hi = dec.stat("tsc_first"), dec.stat("tsc_last")
    return CaptureSummary("xentrace", name, cells, requests=int(cells.count.sum()),
                          records=dec.records, lost_records=dec.lost_records,
                          decode_errors=dec.decode_errors, warnings=list(dec.warnings),
                          truncated=dec.truncated_at is not None,
                          cpu_hz=dec.cpu_hz, first_ns=dec.tsc_to_ns(lo) if lo >= 0 else None,
                          last_ns=dec.tsc_to_ns(hi) if hi >= 0 else None)


class CaptureStream:
    """One pass over a capture as a generator of event batches, in bounded memory.

    ``CaptureStream(path, cpu_hz=None)`` opens the input and reads its head (InputError, one
    line, when it is neither kind, or a recording's header is damaged beyond repair);
    ``batches()`` yields EVENT_DTYPE batches in time order (a recording: chunk by chunk;
    xentrace: ordered across reads) and closes the input at the end. The counters below follow
    the reading; ``finished`` is set once the end was reached (``truncated`` is final then)."""

    def __init__(self, path: str, *, cpu_hz: float | None = None):
        self._src = open_input_stream(path)
        fh, name, head = self._src.fh, self._src.name, self._src.head
        self._fh, self.path = fh, name
        self.finished = False
        self.events = 0
        self._reader = self._dec = None
        try:
            from iotrace.offline import recording
            if recording.is_recording(head):
                self.source = "recording"
                self._reader = recording.RecordingReader(fh, name, head)
            elif looks_like_xentrace(head):
                from iotrace.xentrace.decoder import StreamDecoder
                self.source = "xentrace"
                self._dec = StreamDecoder(cpu_hz, name=name, events=True, ordered=True)
                self._first = self._dec.feed(head)
            else:
                raise not_a_capture(name, head, self._src.gzip)
        except BaseException:
            self.close()
            raise

    # -- counters, current while reading
    @property
    def records(self) -> int:
        return self.events if self._reader is not None else self._dec.records

    @property
    def lost_records(self) -> int:
        return self._reader.lost_events if self._reader is not None else self._dec.lost_records

    @property
    def decode_errors(self) -> int:
        return self._reader.skipped_records if self._reader is not None else \
            self._dec.decode_errors

    @property
    def skipped_chunks(self) -> int:
        return self._reader.skipped_chunks if self._reader is not None else 0

    @property
    def truncated(self) -> bool:
        if not self.finished:
            return False
        return self._reader.truncated if self._reader is not None else \
            self._dec.truncated_at is not None

    @property
    def warnings(self) -> list[str]:
        own = self._reader.warnings if self._reader is not None else self._dec.warnings
        return self._src.warnings + own

    @property
    def domain_names(self) -> dict[int, str]:
        return self._reader.domains if self._reader is not None else {}

    # -- reading
    def batches(self):
        try:
            for batch in self._read():
                if len(batch):
                    self.events += len(batch)
                    yield batch
            self.finished = True
        finally:
            self.close()

    def _read(self):
        if self._reader is not None:
            yield from self._reader.batches()
            return
        from iotrace.xentrace.decoder import CHUNK_BYTES
        dec, fh = self._dec, self._fh
        yield self._first
        buf = memoryview(bytearray(CHUNK_BYTES))     # one buffer, reused (the decoder copies
        while True:                                  # only a partial record at its end)
            try:
                n = fh.readinto(buf)
            except OSError as exc:
                raise InputError(f"{self.path}: read error at byte offset {dec.offset}: "
                                 f"{exc.strerror}") from None
            if not n:
                break
            yield dec.feed(buf[:n])
        yield dec.finish()

    def close(self) -> None:
        self._src.close()


def load_capture(path: str, *, cpu_hz: float | None = None,
                 xenalyze_compat: bool = False) -> Capture:
    """Decode a recording or a xentrace file with every event kept; InputError (one line) if
    it is neither."""
    batches: list[np.ndarray] = []
    s = summarize_capture(path, cpu_hz=cpu_hz, xenalyze_compat=xenalyze_compat,
                          on_events=batches.append)
    events = E.concat(batches)
    if len(events) > 1 and np.any(np.diff(events["ts_ns"]) < 0):
        events = events[np.argsort(events["ts_ns"], kind="stable")]
    records = s.records if s.source == "xentrace" else len(events)
    return Capture(s.source, s.path, events, records=records, lost_records=s.lost_records,
                   decode_errors=s.decode_errors, warnings=s.warnings,
                   domain_names=s.domain_names, skipped_chunks=s.skipped_chunks,
                   truncated=s.truncated)
