"""Decode xentrace captures, streaming, in bounded memory: the Python side of the compiled core.

API (live.py, ``iotrace.offline.capture`` and the tests use it)::

    from iotrace.xentrace.decoder import decode_file, decode_bytes, StreamDecoder, DecodeResult

    res = decode_file(path, cpu_hz=None, xenalyze_compat=False)   # -> DecodeResult (all events)
    res = decode_bytes(buf, cpu_hz=None, xenalyze_compat=False, name="<bytes>")
    res.events          # np.ndarray of EVENT_DTYPE, in ts_ns order
    res.records         # every trace record decoded (cpu_change window headers not counted)
    res.lost_records    # sum of TRC_LOST_RECORDS counts
    res.decode_errors   # records that could not be decoded (bad layout, junk ids, overruns)
    res.truncated_at    # byte offset of the first incomplete record/window, or None
    res.warnings        # list[str], one line each (without the file name: the caller adds it)
    res.windows         # cpu_change windows seen

    dec = StreamDecoder(cpu_hz=None, xenalyze_compat=False, name="<stream>",
                        events=True, cells=False, cell_rip=False, ordered=False)
    batch = dec.feed(chunk)        # events resolved so far (ts order within the batch); keeps
                                   # the partial record at the end for the next feed. ordered:
                                   # batches in ts order across feeds too (events resolved
                                   # after an older one still waiting for its exit's end are
                                   # held back until it comes: a listing in time order)
    dec.feed_from(fh, on_batch)    # the same from a binary file object, to its end, in
                                   # CHUNK_BYTES reads into one reused buffer
    batch = dec.finish()           # end of input: the rest, truncation noted
    dec.cells()                    # with cells=True: totals per (domid, vcpu, type, dir, addr
                                   # [, rip]) - native.Cells - for reports that need no events
    dec.records, dec.lost_records, dec.decode_errors, dec.warnings, dec.windows,
    dec.offset (bytes consumed), dec.truncated_at (set by finish)
    dec.stat("tsc_first"), dec.stat("tsc_last")   # lowest / highest record TSC (-1: none);
    dec.tsc_to_ns(tsc)                             # the capture's span, at cpu_hz

Whatever the chunking, the events (multiset) are the same (tested). Memory is bounded by the
chunk, the rows waiting to be put in TSC order (about one xentrace pass; capped), the I/O
records waiting for their exit's end, and the cells (one per distinct key, at most
native.MAX_CELLS exact ones: further keys fold into "other" rows, with a warning), never by the
capture's length - unless the caller keeps every event (``decode_file``/``decode_bytes`` do).

Errors: input that is not a xentrace capture (empty, random bytes, missing, a directory) raises
``iotrace.core.errors.InputError`` with one line naming the input and the byte offset. A capture
cut in the middle of a record decodes every complete record, sets ``truncated_at`` and adds a
warning. Records with junk ids or a wrong layout are counted in ``decode_errors`` and skipped.

What an event is - see xtdecode.c (the default rules) and xtcompat.c (``xenalyze_compat=True``,
xenalyze's rules) for the details, and catalogue.py for the format facts and their sources:

* one event per TRC_HVM_IOPORT_* / TRC_HVM_IOMEM_* record (32- and 64-bit address variants):
  type pio=0 / mmio=1, dir read=1 / write=0, addr, data; a record without its data words is a
  rep access (data_is_ptr=1, data 0). Size, rep count and df are not traced: size 0, count 1.
* domid/vcpu: the vCPU current on the record's pCPU (named by the last record on that pCPU that
  took a vCPU to running, or by a lost-records record); -1/-1 before the first one.
* ts_ns: the record's TSC (records without one take their pCPU's last) times 1e9 / cpu_hz;
  cpu_hz defaults to xenalyze's DEFAULT_CPU_HZ (2.4 GHz).
* rip: the guest RIP of the VM exit the record belongs to (VMEXIT/VMEXIT64), 0 when unknown.
* service_ns: from that VM exit until the request was answered - the vCPU's next VMENTRY, or the
  moment it became runnable again if it was descheduled meanwhile (woken when qemu answered,
  or preempted); the wait for a pCPU after that is CPU contention and is not included. -1 when
  unknown. xenalyze's arc_cycles measure the same interval, so both modes agree per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from iotrace.core import events as E
from iotrace.core.errors import InputError, open_input
from iotrace.xentrace import catalogue as C
from iotrace.xentrace import native

CHUNK_BYTES = 4 << 20
_SLACK = 64                      # room for the partial record carried into the next read
MAX_WARNINGS = 100


@dataclass
class DecodeResult:
    events: np.ndarray
    records: int = 0
    lost_records: int = 0
    decode_errors: int = 0
    truncated_at: int | None = None
    warnings: list[str] = field(default_factory=list)
    windows: int = 0


def _sorted(batch: np.ndarray) -> np.ndarray:
    if len(batch) > 1 and np.any(batch["ts_ns"][1:] < batch["ts_ns"][:-1]):
        batch = np.take(batch, np.argsort(batch["ts_ns"], kind="stable"), axis=0)
    return batch


class StreamDecoder:
    """Incremental decoder: feed bytes as they come, get event batches (or cells) back."""

    def __init__(self, cpu_hz: float | None = None, *, xenalyze_compat: bool = False,
                 name: str = "<stream>", events: bool = True, cells: bool = False,
                 cell_rip: bool = False, ordered: bool = False):
        if cpu_hz is not None and not (cpu_hz > 0):
            raise InputError(f"{name}: cpu_hz must be positive, got {cpu_hz}")
        self.cpu_hz = float(cpu_hz) if cpu_hz else float(C.XENALYZE_DEFAULT_CPU_HZ)
        self.xenalyze_compat = xenalyze_compat
        self.name = name
        self.events = events
        self.warnings: list[str] = []
        self.truncated_at: int | None = None
        self._core = native.Core(self.cpu_hz, events=events, cells=cells, cell_rip=cell_rip,
                                 compat=xenalyze_compat)
        self._tail = b""
        self._finished = False
        self.ordered = ordered
        self._held = E.empty(0)              # ordered: resolved, newer than a waiting one

    # -- counters
    records = property(lambda self: self._core["records"])
    lost_records = property(lambda self: self._core["lost_records"])
    decode_errors = property(lambda self: self._core["decode_errors"])
    windows = property(lambda self: self._core["windows"])
    io_records = property(lambda self: self._core["io_records"])
    offset = property(lambda self: self._core["consumed"])     # bytes consumed

    def stat(self, name: str) -> int:
        """Any counter of the core (native.STATS)."""
        return self._core[name]

    def tsc_to_ns(self, tsc: int) -> int:
        """A TSC value in ns at this decoder's rate, as the core converts (truncated)."""
        return int(float(tsc) * 1e9 / self.cpu_hz)

    # -- input
    def feed(self, chunk) -> np.ndarray:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        buf = self._tail + bytes(chunk) if self._tail else chunk
        used = self._core.feed(buf)
        self._tail = bytes(memoryview(buf)[used:])
        return self._after_feed()

    def feed_from(self, fh, on_batch=None, chunk_bytes: int = CHUNK_BYTES) -> None:
        """Feed everything ``fh`` (a binary file object) holds, to its end. ``on_batch`` gets
        each non-empty event batch. OSError becomes one InputError line; an empty input too."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        buf = bytearray(chunk_bytes + _SLACK)
        mv = memoryview(buf)
        keep = len(self._tail)
        buf[:keep] = self._tail
        seen = self.offset + keep
        try:
            while True:
                try:
                    n = fh.readinto(mv[keep:keep + chunk_bytes])
                except IsADirectoryError:
                    raise InputError(f"{self.name}: is a directory, not a xentrace capture "
                                     f"(byte offset 0)") from None
                except OSError as exc:
                    raise InputError(f"{self.name}: read error at byte offset "
                                     f"{self.offset + keep}: {exc.strerror}") from None
                if not n:
                    break
                seen += n
                total = keep + n
                used = self._core.feed(mv[:total])
                keep = total - used
                buf[:keep] = bytes(mv[used:total])
                batch = self._after_feed()
                if on_batch is not None and len(batch):
                    on_batch(batch)
        finally:
            self._tail = bytes(mv[:keep])
            mv.release()
        if seen == 0:
            raise InputError(f"{self.name}: empty, not a xentrace capture (byte offset 0)")

    def finish(self) -> np.ndarray:
        if self._finished:
            return E.empty(0)
        self._finished = True
        core = self._core
        if not core["started"]:
            raise InputError(f"{self.name}: not a xentrace capture: "
                             + ("empty" if self.offset + len(self._tail) == 0 else
                                "no complete TRC_TRACE_CPU_CHANGE record at byte offset "
                                f"{self.offset}"))
        remain = core["remain_words"]
        if self._tail or (remain and not core["skipping"]):
            self.truncated_at = self.offset
            what = (f"{len(self._tail)} bytes of an incomplete record" if self._tail
                    else "a record boundary")
            self._warn(f"capture truncated at byte offset {self.offset} ({what}; the window "
                       f"announced {remain * 4} more bytes); every complete record was decoded")
        core.finish()
        return self._after_feed()

    def cells(self, in_place: bool = False) -> native.Cells:
        """native.Core.cells: ``in_place`` (after finish) reads the histograms without a copy."""
        return self._core.cells(in_place)

    # -- internals
    def _after_feed(self) -> np.ndarray:
        core = self._core
        if core["n_notes"]:
            for note in core.take_notes().tolist():
                self._note(*note)
        if core["status"] == native.STATUS_NOT_CAPTURE:
            raise InputError(self._not_capture)
        if not self.events:
            return E.empty(0)
        batch = _sorted(core.take_events())
        if not self.ordered:
            return batch
        if len(self._held):
            batch = _sorted(np.concatenate([self._held, batch]))
        cut = int(np.searchsorted(batch["ts_ns"], core["oldest_pending_ns"], side="left"))
        self._held = batch[cut:]
        return batch[:cut]

    def _note(self, kind: int, offset: int, a: int, b: int) -> None:
        if kind == native.N_NOT_CAPTURE:
            self._not_capture = (
                f"{self.name}: not a xentrace capture: expected a TRC_TRACE_CPU_CHANGE record "
                f"(0x{C.CPU_CHANGE_HEADER:08x}) at byte offset {offset}, found 0x{a:08x}")
        elif kind == native.N_OVERRUN:
            self._warn(f"1 record(s) ran past the end of their window at byte offset {offset} "
                       f"(the window had {a} bytes left); rest of the window skipped")
        elif kind == native.N_RESYNC:
            self._warn(f"corrupt window header at byte offset {offset}; skipped {a} bytes to "
                       f"the next window")
        elif kind == native.N_NO_RESYNC:
            self._warn(f"corrupt window header at byte offset {offset}; no later window header "
                       f"found in the data so far")
        elif kind == native.N_CELLS_FULL:
            self._warn(f"more than {a} distinct (domain, vCPU, type, dir, address[, RIP]) keys "
                       f"(from byte offset {offset}): requests of further keys are counted per "
                       f"vCPU under address 'other' (and, past a quarter more, under domain "
                       f"'other'); totals stay exact")
        elif kind == native.N_REORDER_FULL:
            self._warn(f"more than {a} records waited to be put in TSC order across pCPUs "
                       f"(around byte offset {offset}); the oldest were taken in turn anyway, so "
                       f"attribution across pCPUs may be approximate from there")

    def _warn(self, msg: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)          # the caller names the file


# --------------------------------------------------------------------------- entry points

def _result(dec: StreamDecoder, batches: list[np.ndarray]) -> DecodeResult:
    ev = _sorted(E.concat(batches))
    return DecodeResult(ev, dec.records, dec.lost_records, dec.decode_errors, dec.truncated_at,
                        list(dec.warnings), dec.windows)


def decode_bytes(buf, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                 name: str = "<bytes>", chunk_bytes: int = CHUNK_BYTES) -> DecodeResult:
    """Decode a whole capture held in memory (every event kept)."""
    dec = StreamDecoder(cpu_hz, xenalyze_compat=xenalyze_compat, name=name)
    mv = memoryview(buf)
    if not len(mv):
        raise InputError(f"{name}: empty, not a xentrace capture (byte offset 0)")
    batches = [dec.feed(mv[i:i + chunk_bytes]) for i in range(0, len(mv), chunk_bytes)]
    batches.append(dec.finish())
    return _result(dec, batches)


def decode_file(path, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                chunk_bytes: int = CHUNK_BYTES) -> DecodeResult:
    """Decode a xentrace file, reading it in chunks (every event kept: see feed_from and
    ``iotrace.offline.capture`` for the bounded-memory paths)."""
    name = str(path)
    dec = StreamDecoder(cpu_hz, xenalyze_compat=xenalyze_compat, name=name)
    batches: list[np.ndarray] = []
    with open_input(path, "a xentrace capture", " (byte offset 0)") as fh:
        dec.feed_from(fh, batches.append, chunk_bytes)
    batches.append(dec.finish())
    return _result(dec, batches)
