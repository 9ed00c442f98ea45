"""Decode xentrace captures into iotrace event batches (``iotrace.core.events.EVENT_DTYPE``).

API (used by synth.py's tests, live.py, ``iotrace report`` through ``iotrace.offline.capture``)::

    from iotrace.xentrace.decoder import decode_file, decode_bytes, StreamDecoder, DecodeResult

    res = decode_file(path, cpu_hz=None, xenalyze_compat=False)   # -> DecodeResult
    res = decode_bytes(buf, cpu_hz=None, xenalyze_compat=False, name="<bytes>")
    res.events          # np.ndarray of EVENT_DTYPE, in ts_ns order
    res.records         # every trace record decoded (cpu_change window headers not counted)
    res.lost_records    # sum of TRC_LOST_RECORDS counts
    res.decode_errors   # records that could not be decoded (bad layout, junk ids, overruns)
    res.truncated_at    # byte offset of the first incomplete record/window, or None
    res.warnings        # list[str], one line each (without the file name: the caller adds it)
    res.windows         # cpu_change windows seen

    dec = StreamDecoder(cpu_hz=None, xenalyze_compat=False, name="<stream>")
    batch = dec.feed(chunk)   # events of the complete records so far (ts order within the batch);
                              # keeps per-pCPU/per-vCPU state and the partial-record tail. An I/O
                              # whose exit spans a reschedule waits until every pCPU's records up
                              # to its TSC have been read (the watermark, see _advance_watermark)
    batch = dec.finish()      # end of input: flushes waiting events, notes truncation
    dec.records, dec.lost_records, dec.decode_errors, dec.warnings, dec.windows,
    dec.offset (bytes consumed), dec.truncated_at (set by finish)

Whatever the chunking, the events (multiset) are the same as decode_bytes gives (tested).

Errors: a file that is not a xentrace capture (empty, random bytes, missing, a directory) raises
``iotrace.core.errors.InputError`` with one line naming the file and the byte offset. A capture cut in
the middle of a record decodes every complete record, sets ``truncated_at`` and adds a warning.
Records with junk ids or a wrong layout are counted in ``decode_errors`` and skipped.

What an event is (facts in ``catalogue.py``, checked against Xen's sources):

* one event per TRC_HVM_IOPORT_* / TRC_HVM_IOMEM_* record (32- and 64-bit address variants):
  type pio=0 / mmio=1, dir read=1 / write=0, addr, data; a record without its data words is a
  rep access (data_is_ptr=1, data 0). Size, rep count and df are not traced: size 0, count 1.
* domid/vcpu: the vCPU current on the record's pCPU, i.e. named by the last record on that pCPU
  that took a vCPU to running (runstate change to running, continue_running) or by a lost-records
  record (which names the vCPU current when Xen inserted it). Before the first such record a
  pCPU's records have domid -1, vcpu -1 (kept, never dropped). The idle domain is 32767.
* ts_ns: the record's TSC (records without a TSC take the previous TSC of the same pCPU) times
  1e9 / cpu_hz; cpu_hz defaults to xenalyze's DEFAULT_CPU_HZ (2.4 GHz).
* service_ns: for an I/O record inside a VM exit of its vCPU (after a VMEXIT, before that vCPU's
  next VMENTRY, on whichever pCPU it resumes), VMENTRY TSC - VMEXIT TSC; -1 when unknown. Records
  of unknown owner are timed within their pCPU's own stream.

``xenalyze_compat=True`` counts instead like ``xenalyze --summary --with-pio-enumeration
--with-mmio-enumeration`` (tools/xentrace/xenalyze.c), replaying in TSC order (records without a
TSC carry their pCPU's last one) a per-vCPU exit state machine:

* an I/O record counts only while its vCPU's exit is open (hvm_handler_process: vmexit_valid);
  the exit opens at VMEXIT and closes at VMENTRY, or when the vCPU becomes runnable
  (sched_runstate_process, not on a vCPU's first runstate record), so a read that completes after
  the vCPU waited for qemu is dropped; at most one I/O per exit;
* the first I/O record of the exit claims its post-process slot (hvm_set_postprocess), unless a
  page-fault, CR write, MSR read/write or VMCALL handler claimed it first; later I/O records of
  the same exit still update the in-flight data: port I/O counts the first direction with the
  last port; MMIO the last gpa and direction, and only if one of its records had data
  (data_valid); 64-bit port I/O is an error and ignored;
* MMIO is keyed by a 32-bit address (io_address.pa is unsigned int); VGA 0xa0000 <= gpa <
  0xbffff (full gpa) is skipped, mmio_enumeration_skip_vga defaulting to 1;
* a lost-records record is handled at its first lost TSC (process_lost_records: the pCPU's vCPU
  and every vCPU not running lose their open exit) and again at its own TSC
  (process_lost_records_end: the vCPU it names becomes current);
* records of unknown owner (xenalyze's default domain, not shown in its summary) are dropped;
* service_ns is xenalyze's arc_cycles. This mode is a Python loop over the rows above (a parity
  tool: 24 s on the 63 MB bench capture, where xenalyze takes 1 s). Not modelled: shadow-paging
  handlers (TRC_SHADOW) that also claim the slot, and xenalyze's TSC-skew corrections. Checked against the real xenalyze
  (Xen 4.17, which predates the SVM exit ids) on the real capture and on synthetic ones.

Performance (bench/xentrace_decode.py): record boundaries can only be found sequentially (a
header gives its record's length), so that single step is a short C loop (``xtwalk.c``, built by
``make`` into ``_xtwalk.so`` and loaded with ctypes; it also reports where each window starts).
Everything else is column-wise NumPy, in file order, on the subsets that matter (I/O, exits,
entries, scheduler and lost records): "the last record of kind K before record i on i's pCPU" is a
prefix-maximum over the file order checked against i's window, with a per-pCPU carry over earlier
windows and earlier feeds, so nothing is sorted per pCPU. The service time of an I/O is found on
its own pCPU when the exit and the entry enclose it there (the common case); only exits that span
a reschedule go through a per-vCPU pass sorted by TSC across pCPUs. A per-record Python loop is
about 20x slower than xenalyze; this is within 2x (the bench prints the ratio).

Without the shared library the walk falls back to pure NumPy: pointer doubling over all windows
of a chunk at once (next[i] = i + len(i); the chains from the windows' first words are enumerated
level by level), O(n log w) for windows of w words instead of O(n), with the same results (tests
and a fuzz test compare both): 6.2 s instead of 1.5 s on the 63 MB bench capture. Set
IOTRACE_XT_NUMPY=1 to force it. IOTRACE_XT_FULLPATH=1 selects the whole-table per-pCPU path that
the compat mode uses, as a cross-check of the fast path (tests compare them). Input is processed
in chunks (8 MiB by default), so memory is bounded by a chunk's working set plus the events.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iotrace.core import events as E
from iotrace.core.errors import InputError, open_input
from iotrace.xentrace import catalogue as C

CHUNK_BYTES = 8 << 20
_HOLD_WINDOW_BYTES = 4 << 20   # an incomplete window up to this size waits for its end

# Trace classes of xen/include/public/trace.h (bits 16-27 of an event id); a record whose class
# is none of these is junk (counted in decode_errors).
_KNOWN_CLASSES = np.array([0x001, 0x002, 0x004, 0x008, 0x010, 0x020, 0x040, 0x080, 0x800],
                          dtype=np.uint32)

_XT_END, _XT_PARTIAL, _XT_FULL, _XT_BAD_WINDOW = 0, 1, 2, 3
_CLASS_OK = np.zeros(4096, dtype=bool)
_CLASS_OK[_KNOWN_CLASSES] = True
_ST_REMAIN, _ST_CPU, _ST_POS, _ST_STATUS, _ST_ERRORS, _ST_SKIP, _ST_WINDOWS, _ST_WOUT = range(8)


@dataclass
class DecodeResult:
    events: np.ndarray
    records: int = 0
    lost_records: int = 0
    decode_errors: int = 0
    truncated_at: int | None = None
    warnings: list[str] = field(default_factory=list)
    windows: int = 0


# --------------------------------------------------------------------------- the boundary walk

def _load_walker():
    if os.environ.get("IOTRACE_XT_NUMPY") == "1":
        return None
    lib_path = Path(__file__).with_name("_xtwalk.so")
    if not lib_path.exists():
        return None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError:
        return None
    fn = lib.xt_walk
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


_C_WALK = _load_walker()


def walker_name() -> str:
    return "c" if _C_WALK is not None else "numpy"


def _walk_c(w: np.ndarray, st: np.ndarray):
    n = len(w) - int(st[_ST_POS])
    cap = max(16, n // 2 + 16)
    wcap = max(16, n // 8 + 16)
    offs, cpus, wfs, wcs = [], [], [], []
    done = 0
    while True:
        off = np.empty(cap, dtype=np.int64)
        cpu = np.empty(cap, dtype=np.int32)
        wf = np.empty(wcap, dtype=np.int64)
        wc = np.empty(wcap, dtype=np.int32)
        k = _C_WALK(w.ctypes.data, len(w), off.ctypes.data, cpu.ctypes.data, cap,
                    wf.ctypes.data, wc.ctypes.data, wcap, st.ctypes.data)
        nwin = int(st[_ST_WOUT])
        offs.append(off[:k])
        cpus.append(cpu[:k])
        wfs.append(wf[:nwin] + done)
        wcs.append(wc[:nwin])
        done += k
        if st[_ST_STATUS] != _XT_FULL:
            break
    if len(offs) == 1:
        return offs[0], cpus[0], wfs[0], wcs[0]
    return (np.concatenate(offs), np.concatenate(cpus), np.concatenate(wfs),
            np.concatenate(wcs))


def _walk_numpy(w: np.ndarray, st: np.ndarray):
    """Same contract as xt_walk in xtwalk.c, in NumPy.

    Windows are delimited by their headers, so a Python loop finds them (3 words each). Records
    inside all windows are then found at once by pointer doubling: next[i] = i + len(i) (a sink
    past the window's data), J_k = next^(2^k), and the chain from each window's first word is
    enumerated level by level - O(n log w) for windows of w words."""
    n = len(w)
    pos, remain, cpu = int(st[_ST_POS]), int(st[_ST_REMAIN]), int(st[_ST_CPU])
    st[_ST_STATUS] = _XT_END
    seg_s, seg_e, seg_cpu, seg_wend = [], [], [], []
    win_start, win_cpu = [], []                 # data start and pCPU of each window begun here
    while pos < n:
        if st[_ST_SKIP]:
            take = min(remain, n - pos)
            pos += take
            remain -= take
            if remain == 0:
                st[_ST_SKIP] = 0
            continue
        if remain == 0:
            if pos + 3 > n:
                st[_ST_STATUS] = _XT_PARTIAL
                break
            nbytes = int(w[pos + 2])
            if int(w[pos]) != C.CPU_CHANGE_HEADER or nbytes & 3:
                st[_ST_STATUS] = _XT_BAD_WINDOW
                break
            cpu = int(np.uint32(w[pos + 1]).view(np.int32))
            remain = nbytes >> 2
            pos += 3
            st[_ST_WINDOWS] += 1
            win_start.append(pos)
            win_cpu.append(cpu)
            continue
        end = min(pos + remain, n)
        seg_s.append(pos)
        seg_e.append(end)
        seg_cpu.append(cpu)
        seg_wend.append(pos + remain)
        remain -= end - pos
        pos = end
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int32))
    wf_out = np.zeros(0, np.int64)
    wc_out = np.array(win_cpu, np.int32)
    recs = empty[0]
    if seg_s:
        ss, se = np.array(seg_s, np.int64), np.array(seg_e, np.int64)
        sink = n
        ar = np.arange(n, dtype=np.int64)
        ln = 1 + ((w >> 28) & 7).astype(np.int64) + 2 * (w >> 31).astype(np.int64)
        sid = np.searchsorted(ss, ar, side="right") - 1
        lim = np.where(sid >= 0, se[np.maximum(sid, 0)], 0)
        inside = ar < lim
        nxt = ar + ln
        over = inside & (nxt > lim)
        jump = np.where(inside & ~over, nxt, sink)
        jump = np.where(jump == lim, sink, jump)            # chain ends exactly at the end
        jumps = [np.append(jump, sink).astype(np.int32)]
        span, longest = 1, int((se - ss).max())
        while span < longest:
            j = jumps[-1]
            jumps.append(j[j])
            span *= 2
        cur = ss.copy()
        for j in reversed(jumps):
            nx_ = j[cur]
            cur = np.concatenate([cur, nx_[nx_ < sink]])
        recs = np.sort(cur)
        recs = recs[recs < se[np.searchsorted(ss, recs, side="right") - 1]]
        stop = recs[over[recs]]                 # records that do not fit their segment
        if len(stop):
            recs = recs[~over[recs]]
            for p in stop.tolist():
                i = int(np.searchsorted(ss, p, side="right") - 1)
                wend = seg_wend[i]
                if p + int(ln[p]) > wend:        # runs past its window: count, skip the rest
                    st[_ST_ERRORS] += 1
                    if wend > n:
                        st[_ST_SKIP] = 1
                        remain = wend - n
                        pos = n
                else:                            # cut by the end of the data: wait for more
                    st[_ST_STATUS] = _XT_PARTIAL
                    pos, remain = p, wend - p
        rcpu = np.array(seg_cpu, np.int32)[np.searchsorted(ss, recs, side="right") - 1]
        if win_start:
            wf_out = np.searchsorted(recs, np.array(win_start, np.int64)).astype(np.int64)
    elif win_start:
        wf_out = np.zeros(len(win_start), np.int64)
    if not seg_s:
        rcpu = empty[1]
    if win_start and len(wf_out) != len(win_start):   # pragma: no cover - defensive
        wf_out = np.searchsorted(recs, np.array(win_start, np.int64)).astype(np.int64)
    st[_ST_POS], st[_ST_REMAIN], st[_ST_CPU] = pos, remain, cpu
    return recs.astype(np.int64), rcpu, wf_out, wc_out


def _walk(w: np.ndarray, st: np.ndarray):
    if _C_WALK is not None:
        return _walk_c(w, st)
    return _walk_numpy(w, st)


# --------------------------------------------------------------------------- column helpers

def _sel(arr: np.ndarray, ix) -> np.ndarray:
    """arr[ix] for structured arrays, via np.take (NumPy's fancy indexing of structured rows is
    about 10x slower); ix may be a boolean mask."""
    ix = np.asarray(ix)
    if ix.dtype == bool:
        ix = np.flatnonzero(ix)
    return np.take(arr, ix, axis=0)


def _ffill_idx(cond: np.ndarray, grp_start: np.ndarray) -> np.ndarray:
    """Index of the last i' <= i with cond[i'] in the same group (groups are contiguous runs
    beginning at grp_start[i]), else -1."""
    idx = np.where(cond, np.arange(len(cond)), -1)
    last = np.maximum.accumulate(idx) if len(idx) else idx
    return np.where(last >= grp_start, last, -1)


def _bfill_idx(cond: np.ndarray, grp_end: np.ndarray) -> np.ndarray:
    """Index of the first i' >= i with cond[i'] in the same group (grp_end exclusive), else -1."""
    n = len(cond)
    if not n:
        return np.zeros(0, np.int64)
    idx = np.where(cond, np.arange(n), n)
    nxt = np.minimum.accumulate(idx[::-1])[::-1]
    return np.where(nxt < grp_end, nxt, -1)


def _groups(sorted_keys: np.ndarray):
    """grp_start / grp_end (exclusive) per element of an array sorted by key."""
    n = len(sorted_keys)
    if not n:
        z = np.zeros(0, np.int64)
        return z, z
    brk = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [n]])
    sizes = ends - starts
    return np.repeat(starts, sizes), np.repeat(ends, sizes)


# --------------------------------------------------------------------------- the decoder

class StreamDecoder:
    """Incremental decoder: feed bytes as they come, get event batches back."""

    def __init__(self, cpu_hz: float | None = None, *, xenalyze_compat: bool = False,
                 name: str = "<stream>"):
        if cpu_hz is not None and not (cpu_hz > 0):
            raise InputError(f"{name}: cpu_hz must be positive, got {cpu_hz}")
        self.cpu_hz = float(cpu_hz) if cpu_hz else float(C.XENALYZE_DEFAULT_CPU_HZ)
        self.xenalyze_compat = xenalyze_compat
        self.name = name
        self.records = 0
        self.lost_records = 0
        self.decode_errors = 0
        self.windows = 0
        self.warnings: list[str] = []
        self.offset = 0                  # bytes consumed (whole records and window headers)
        self.truncated_at: int | None = None
        self._tail = b""
        self._st = np.zeros(8, dtype=np.int64)
        self._started = False
        self._errs_seen = 0
        # per pCPU
        self._last_tsc: dict[int, int] = {}
        self._owner: dict[int, tuple[int, int]] = {}
        # per vCPU key (domid << 16 | vcpu): open exit TSC; events waiting for their VMENTRY
        self._open_exit: dict[int, int] = {}
        self._pending = np.zeros(0, _PROW)      # rows waiting for the watermark or a VMENTRY
        self._pending_ev = E.empty(0)
        self._feed_no = 0
        self._wm = 0                            # watermark TSC (see _advance_watermark)
        self._pass_last: dict[int, int] = {}
        self._prev_win_cpu: int | None = None
        self._compat = _XenalyzeMachine(self.cpu_hz) if xenalyze_compat else None
        self._finished = False
        # cross-check switch: the whole-table per-pCPU path, which the compat mode uses
        self._full_path = os.environ.get("IOTRACE_XT_FULLPATH") == "1"
        # feed() returns each batch in ts order; decode_bytes/decode_file sort once at the end
        self._sort_batches = True

    # -- public
    def feed(self, chunk: bytes, *, _final: bool = False) -> np.ndarray:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        buf = self._tail + bytes(chunk) if self._tail else bytes(chunk)
        nwords = len(buf) // 4
        w = np.frombuffer(buf, dtype="<u4", count=nwords)
        offs, cpus, wfs, wcs = [], [], [], []
        nrec = 0
        st = self._st
        st[_ST_POS] = 0
        while True:
            errs_before = st[_ST_ERRORS]
            off, cpu, wf, wc = _walk(w, st)
            offs.append(off)
            cpus.append(cpu)
            wfs.append(wf + nrec)
            wcs.append(wc)
            nrec += len(off)
            if st[_ST_ERRORS] != errs_before:
                n_err = int(st[_ST_ERRORS] - errs_before)
                self.decode_errors += n_err
                self._warn(f"{n_err} record(s) ran past the end of their window; rest of the "
                           f"window skipped")
            if st[_ST_WINDOWS]:
                self._started = True
            if st[_ST_STATUS] != _XT_BAD_WINDOW:
                break
            pos = int(st[_ST_POS])
            at = self.offset + pos * 4
            if not self._started:
                raise InputError(
                    f"{self.name}: not a xentrace capture: expected a TRC_TRACE_CPU_CHANGE record "
                    f"(0x{C.CPU_CHANGE_HEADER:08x}) at byte offset {at}, found 0x{int(w[pos]):08x}")
            nxt = self._resync(w, pos + 1)
            self.decode_errors += 1
            if nxt is None:
                self._warn(f"corrupt window header at byte offset {at}; no later window header "
                           f"found in the data so far")
                st[_ST_POS] = nwords
                st[_ST_REMAIN] = 0
                # keep the last 2 words in case a header straddles the chunk end
                st[_ST_POS] = max(pos + 1, nwords - 2)
                break
            self._warn(f"corrupt window header at byte offset {at}; skipped "
                       f"{(nxt - pos) * 4} bytes to the next window")
            st[_ST_POS] = nxt
        pos = int(st[_ST_POS])
        off = np.concatenate(offs) if len(offs) > 1 else offs[0]
        cpu = np.concatenate(cpus) if len(cpus) > 1 else cpus[0]
        wf = np.concatenate(wfs) if len(wfs) > 1 else wfs[0]
        wc = np.concatenate(wcs) if len(wcs) > 1 else wcs[0]
        # A window begun in this feed but not complete yet waits for the rest (up to
        # _HOLD_WINDOW_BYTES): xentrace writes a window at once, and an exit decoded together
        # with its entry is timed on the spot instead of waiting for the watermark.
        if (not _final and st[_ST_REMAIN] > 0 and not st[_ST_SKIP] and len(wf)
                and st[_ST_STATUS] != _XT_BAD_WINDOW and st[_ST_ERRORS] == self._errs_seen):
            first = int(wf[-1])
            hdr_pos = int(off[first]) - 3 if first < len(off) else pos - 3
            if (nwords - hdr_pos) * 4 <= _HOLD_WINDOW_BYTES:
                off, cpu, wf, wc = off[:first], cpu[:first], wf[:-1], wc[:-1]
                st[_ST_POS] = pos = hdr_pos
                st[_ST_REMAIN] = 0
                st[_ST_WINDOWS] -= 1
        self._errs_seen = int(st[_ST_ERRORS])
        self.windows = int(st[_ST_WINDOWS])
        out = self._process(w, off, cpu, wf, wc)
        self._tail = buf[pos * 4:]
        self.offset += pos * 4
        return out

    def finish(self) -> np.ndarray:
        if self._finished:
            return E.empty(0)
        held = self.feed(b"", _final=True) if self._tail else E.empty(0)
        self._finished = True
        if not self._started:
            raise InputError(f"{self.name}: not a xentrace capture: "
                             + ("empty" if self.offset + len(self._tail) == 0 else
                                f"no complete TRC_TRACE_CPU_CHANGE record at byte offset {self.offset}"))
        remain = int(self._st[_ST_REMAIN])
        if self._tail or (remain and not self._st[_ST_SKIP]):
            self.truncated_at = self.offset
            what = (f"{len(self._tail)} bytes of an incomplete record" if self._tail
                    else "a record boundary")
            self._warn(f"capture truncated at byte offset {self.offset} ({what}; the window "
                       f"announced {remain * 4} more bytes); every complete record was decoded")
        if self._compat is not None:
            return E.concat([held, self._compat.run(np.zeros(0, _CROW), _TSC_INF)])
        z = np.zeros(0, np.int64)
        zb = np.zeros(0, bool)
        # every waiting row is now final; I/O whose VMENTRY never came keep service_ns -1
        rest = self._service(E.empty(0), z, zb, zb, np.zeros(0, np.int32),
                             np.zeros(0, np.int32), np.zeros(0, np.uint64), 0, final=True,
                             cpu_s=z)
        out = E.concat([held, rest])
        if len(out) > 1 and self._sort_batches:
            out = _sel(out, np.argsort(out["ts_ns"], kind="stable"))
        return out

    # -- internals
    def _warn(self, msg: str) -> None:
        if len(self.warnings) < 100:
            self.warnings.append(msg)          # the caller names the file

    @staticmethod
    def _resync(w: np.ndarray, start: int) -> int | None:
        cand = np.flatnonzero(w[start:] == C.CPU_CHANGE_HEADER)
        for c in cand[:1000]:
            p = start + int(c)
            if p + 2 < len(w) and int(w[p + 2]) & 3 == 0 and int(w[p + 1]) < 65536:
                return p
        return None

    def _process(self, w, off, cpu, win_first, win_cpu) -> np.ndarray:
        if self._compat is None and len(off) and not self._full_path:
            return self._process_fast(w, off, cpu, win_first, win_cpu)
        return self._process_full(w, off, cpu, win_first, win_cpu)

    def _process_full(self, w: np.ndarray, off: np.ndarray, cpu: np.ndarray,
                      win_first: np.ndarray, win_cpu: np.ndarray) -> np.ndarray:
        """All records sorted per pCPU (used by the xenalyze-compatible mode)."""
        n = len(off)
        if n == 0:
            self._advance_watermark(win_first, win_cpu, np.zeros(0, np.uint64))
            return E.empty(0)
        self.records += n
        nw = len(w)
        hdr = w[off]
        ev = hdr & np.uint32(C.EVENT_MASK)
        nx = ((hdr >> 28) & 7).astype(np.int64)
        has_tsc = (hdr >> 31).astype(bool)
        d0 = off + 1 + 2 * has_tsc

        def word(k):
            return w[np.minimum(d0 + k, nw - 1)]

        # Junk: a class no Xen version defines.
        cls = (ev >> 16) & np.uint32(0xFFF)
        junk = ~np.isin(cls, _KNOWN_CLASSES)

        # ---- per-pCPU order (each pCPU's records are in order in the file)
        order = np.argsort(cpu, kind="stable")
        cpu_s = cpu[order]
        gs, _ = _groups(cpu_s)
        has_tsc_s = has_tsc[order]
        off_s = off[order]
        tsc_rec = (w[np.minimum(off_s + 1, nw - 1)].astype(np.uint64)
                   | (w[np.minimum(off_s + 2, nw - 1)].astype(np.uint64) << np.uint64(32)))
        li = _ffill_idx(has_tsc_s, gs)
        tsc_s = np.where(li >= 0, tsc_rec[np.maximum(li, 0)], np.uint64(0))
        ucpu, first = np.unique(cpu_s, return_index=True)
        if (li < 0).any():
            carried = np.array([self._last_tsc.get(int(c), 0) for c in ucpu], dtype=np.uint64)
            grp = np.searchsorted(ucpu, cpu_s)
            tsc_s = np.where(li >= 0, tsc_s, carried[grp])

        # ---- owner per record: runstate -> running, continue_running, lost records
        ev_s = ev[order]
        nx_s = nx[order]
        w0 = word(0)[order]
        w1 = word(1)[order]
        is_change = (ev_s & np.uint32(C.RUNSTATE_MASK)) == C.TRC_SCHED_RUNSTATE_CHANGE
        to_running = is_change & (((ev_s >> 4) & 0xF) == C.RUNSTATE_RUNNING)
        sched_ok = nx_s >= 1
        setter_sched = (to_running | (ev_s == C.TRC_SCHED_CONTINUE_RUNNING)) & sched_ok
        is_lost = ev_s == C.TRC_LOST_RECORDS
        lost_ok = is_lost & (nx_s == 4)
        bad = junk[order] | (is_lost & ~lost_ok) | ((is_change | (ev_s == C.TRC_SCHED_CONTINUE_RUNNING)) & ~sched_ok)
        if lost_ok.any():
            self.lost_records += int(w0[lost_ok].astype(np.int64).sum())
        # owner words: sched (domid<<16|vcpu); lost (did low16 | vid high16), trace.c
        own_dom = np.where(lost_ok, w1 & 0xFFFF, w0 >> 16).astype(np.int32)
        own_vcpu = np.where(lost_ok, w1 >> 16, w0 & 0xFFFF).astype(np.int32)
        setter = setter_sched | lost_ok
        si = _ffill_idx(setter, gs)
        dom_s = np.where(si >= 0, own_dom[np.maximum(si, 0)], -1).astype(np.int32)
        vcpu_s = np.where(si >= 0, own_vcpu[np.maximum(si, 0)], -1).astype(np.int32)
        if (si < 0).any() and self._owner:
            grp = np.searchsorted(ucpu, cpu_s)
            cd = np.array([self._owner.get(int(c), (-1, -1))[0] for c in ucpu], dtype=np.int32)
            cv = np.array([self._owner.get(int(c), (-1, -1))[1] for c in ucpu], dtype=np.int32)
            dom_s = np.where(si >= 0, dom_s, cd[grp])
            vcpu_s = np.where(si >= 0, vcpu_s, cv[grp])

        tsc_file = np.empty(n, np.uint64)
        tsc_file[order] = tsc_s
        self._advance_watermark(win_first, win_cpu, tsc_file)

        # carry per-pCPU state to the next feed
        last = np.concatenate([first[1:], [n]]) - 1
        for c, i in zip(ucpu.tolist(), last.tolist()):
            self._last_tsc[c] = int(tsc_s[i])
            if dom_s[i] >= 0:
                self._owner[c] = (int(dom_s[i]), int(vcpu_s[i]))

        # ---- I/O records
        io_type = np.full(n, 255, np.uint8)
        for eid, (t, _d, _64) in C.IO_EVENTS.items():
            io_type[ev_s == eid] = t
        is_io = io_type != 255
        is64 = (ev_s & np.uint32(C.TRC_64_FLAG)) != 0
        aw = np.where(is64, 2, 1)
        io_full = is_io & (nx_s == 2 * aw)
        io_rep = is_io & (nx_s == aw)
        io_ok = io_full | io_rep
        bad |= is_io & ~io_ok

        # ---- exits / entries
        is_exit = np.isin(ev_s, np.array(C.VMEXIT_IDS, np.uint32))
        exit_ok = is_exit & has_tsc_s & (nx_s == np.where(is64, 3, 2))
        is_entry = ev_s == C.TRC_HVM_VMENTRY
        entry_ok = is_entry & has_tsc_s
        bad |= (is_exit & ~exit_ok) | (is_entry & ~entry_ok)
        self.decode_errors += int(bad.sum())

        ii = np.flatnonzero(io_ok)
        k = len(ii)
        batch = E.empty(k)
        if k:
            d0s = d0[order][ii]
            i64 = is64[ii]
            a_lo = w[d0s].astype(np.uint64)
            a_hi = np.where(i64, w[np.minimum(d0s + 1, nw - 1)], 0).astype(np.uint64)
            addr = a_lo | (a_hi << np.uint64(32))
            full = io_full[ii]
            dpos = d0s + np.where(i64, 2, 1)
            dl = np.where(full, w[np.minimum(dpos, nw - 1)], 0).astype(np.uint64)
            dh = np.where(full & i64, w[np.minimum(dpos + 1, nw - 1)], 0).astype(np.uint64)
            batch["ts_ns"] = (tsc_s[ii].astype(np.float64) * (1e9 / self.cpu_hz)).astype(np.int64)
            batch["domid"] = dom_s[ii]
            batch["vcpu"] = vcpu_s[ii]
            batch["type"] = io_type[ii]
            batch["dir"] = ((ev_s[ii] & np.uint32(C.IO_WRITE_BIT)) == 0).astype(np.uint8)
            batch["data_is_ptr"] = (~full).astype(np.uint8)
            batch["addr"] = addr
            batch["data"] = dl | (dh << np.uint64(32))

        self._feed_no += 1
        seq0 = self._feed_no << 32
        if self._compat is not None:
            # The rows xenalyze's state machine looks at, with the event each I/O row would give.
            is_cont = (ev_s == C.TRC_SCHED_CONTINUE_RUNNING) & sched_ok
            claiming = np.isin(ev_s, np.array(C.XENALYZE_CLAIMING_IDS, np.uint32))
            kind = np.full(n, -1, np.int8)
            kind[claiming] = _K_CLAIM
            kind[is_change & sched_ok] = _K_CHANGE
            kind[is_cont] = _K_CONT
            kind[lost_ok] = _K_LOST
            kind[exit_ok] = _K_EXIT
            kind[entry_ok] = _K_ENTRY
            kind[ii] = np.where(io_full[ii], _K_IO, _K_IO_REP)
            rel = np.flatnonzero(kind >= 0)
            rows = np.zeros(len(rel), _CROW)
            rows["cpu"], rows["tsc"], rows["kind"] = cpu_s[rel], tsc_s[rel], kind[rel]
            rows["ev"], rows["w0"], rows["w1"] = ev_s[rel], w0[rel], w1[rel]
            rows["seq"] = seq0 + rel
            # xenalyze handles a lost-records record twice: at its first lost TSC (order_tsc)
            # and again, as TRC_LOST_RECORDS_END, at its own TSC (process_records).
            lr = np.flatnonzero(rows["kind"] == _K_LOST)
            if len(lr):
                ends = rows[lr].copy()
                ends["kind"] = _K_LOST_END
                first_lost = (word(2)[order][rel[lr]].astype(np.uint64)
                              | (word(3)[order][rel[lr]].astype(np.uint64) << np.uint64(32)))
                rows["tsc"][lr] = first_lost
                rows = np.concatenate([rows, ends])
            evrow = np.full(n, -1, np.int64)
            evrow[ii] = np.arange(k)
            r_io = evrow[rel] >= 0
            rows["io"][:len(rel)][r_io] = batch[evrow[rel][r_io]]
            return self._compat.run(rows, self._watermark())
        return self._service(batch, ii, exit_ok, entry_ok, dom_s, vcpu_s, tsc_s, seq0,
                             cpu_s=cpu_s)

    # ---- the fast path: per-pCPU questions answered on subsets, in file order
    def _process_fast(self, w, off, cpu, win_first, win_cpu) -> np.ndarray:
        """Default mode. Nothing is sorted per pCPU: each pCPU's stream is the file order of its
        windows, so "the last record with property P before record i on i's pCPU" is a search
        in the (sorted) indices of P-records, checked against i's window, with a per-pCPU carry
        over earlier windows. Only the subsets that matter (I/O, exits, entries, scheduler and
        lost records) are gathered."""
        n = len(off)
        self.records += n
        nw = len(w)
        hdr = w[off]
        ev = hdr & np.uint32(C.EVENT_MASK)
        # windows covering this feed's records (the first may continue one from the last feed)
        if len(win_first) == 0 or win_first[0] > 0:
            wf = np.concatenate([[0], win_first]).astype(np.int64)
            wc = np.concatenate([[cpu[0]], win_cpu]).astype(np.int32)
        else:
            wf, wc = win_first.astype(np.int64), win_cpu.astype(np.int32)
        we = np.append(wf[1:], n)
        self._win = (wf, we, wc, np.argsort(wc, kind="stable"))
        self._wid = np.repeat(np.arange(len(wf), dtype=np.int32), we - wf)
        self._prefix = {}

        x = ev & np.uint32(0x0FFFFCFF)               # I/O ids without the 64-bit/write bits
        io_i = np.flatnonzero((x == C.TRC_HVM_IOPORT_READ) | (x == C.TRC_HVM_IOMEM_READ))
        xe = ev & np.uint32(0x0FFFFEFF)              # exit ids without TRC_64_FLAG
        ex_c = np.flatnonzero((xe == C.TRC_HVM_VMX_EXIT) | (xe == C.TRC_HVM_SVM_EXIT))
        en_c = np.flatnonzero(ev == C.TRC_HVM_VMENTRY)
        rs = (ev & np.uint32(C.RUNSTATE_MASK)) == C.TRC_SCHED_RUNSTATE_CHANGE
        sch_c = np.flatnonzero(rs | (ev == C.TRC_SCHED_CONTINUE_RUNNING))
        lost_c = np.flatnonzero(ev == C.TRC_LOST_RECORDS)
        junk = int((~_CLASS_OK[(ev >> 16) & np.uint32(0xFFF)]).sum())

        def nx_of(i):
            return ((hdr[i] >> 28) & 7).astype(np.int64)

        def tsc_flag(i):
            return hdr[i] >= np.uint32(C.TSC_BIT)

        # validate layouts (bad ones are counted and ignored)
        ex_is64 = (ev[ex_c] & np.uint32(C.TRC_64_FLAG)) != 0
        ok = tsc_flag(ex_c) & (nx_of(ex_c) == np.where(ex_is64, 3, 2))
        ex_i, bad = ex_c[ok], int((~ok).sum())
        ok = tsc_flag(en_c)
        en_i, bad = en_c[ok], bad + int((~ok).sum())
        ok = nx_of(sch_c) >= 1
        sch_i, bad = sch_c[ok], bad + int((~ok).sum())
        ok = nx_of(lost_c) == 4
        lost_i, bad = lost_c[ok], bad + int((~ok).sum())
        io_is64 = (ev[io_i] & np.uint32(C.TRC_64_FLAG)) != 0
        aw = np.where(io_is64, 2, 1)
        io_nx = nx_of(io_i)
        io_full_all = io_nx == 2 * aw
        ok = io_full_all | (io_nx == aw)
        bad += int((~ok).sum())
        io_i, io_is64, io_full = io_i[ok], io_is64[ok], io_full_all[ok]
        self.decode_errors += bad + junk

        def d0(i):                                  # first data word of records i
            return off[i] + 1 + 2 * (hdr[i] >> 31).astype(np.int64)

        def wrd(i, k):
            return w[np.minimum(d0(i) + k, nw - 1)]

        if len(lost_i):
            self.lost_records += int(wrd(lost_i, 0).astype(np.int64).sum())
        # who is current: runstate change to running, continue_running, lost records
        sev = ev[sch_i]
        to_run = ((sev & np.uint32(C.RUNSTATE_MASK)) != C.TRC_SCHED_RUNSTATE_CHANGE) | \
            (((sev >> 4) & 0xF) == C.RUNSTATE_RUNNING)
        set_i = np.concatenate([sch_i[to_run], lost_i])
        sw0 = wrd(sch_i[to_run], 0)
        lw1 = wrd(lost_i, 1)
        set_dom = np.concatenate([sw0 >> 16, lw1 & 0xFFFF]).astype(np.int32)
        set_vcpu = np.concatenate([sw0 & 0xFFFF, lw1 >> 16]).astype(np.int32)
        o = np.argsort(set_i, kind="stable")
        set_i, set_dom, set_vcpu = set_i[o], set_dom[o], set_vcpu[o]

        has_tsc = hdr >= np.uint32(C.TSC_BIT)
        tsc_i = np.flatnonzero(has_tsc)

        def tsc_at(j):                              # own TSC of records j (which have one)
            return (w[np.minimum(off[j] + 1, nw - 1)].astype(np.uint64)
                    | (w[np.minimum(off[j] + 2, nw - 1)].astype(np.uint64) << np.uint64(32)))

        # carries from earlier feeds, per pCPU
        def carried(q, table, default):
            out = np.full(len(q), default, dtype=np.int64)
            if table:
                qc = cpu[q]
                for c, v in table.items():
                    out[qc == c] = v
            return out

        # TSC of every record we use: exits and entries carry their own; an I/O record takes
        # the last one before it on its pCPU - usually the record just before it (its exit)
        nio, nex = len(io_i), len(ex_i)
        ex_tsc, en_tsc = tsc_at(ex_i), tsc_at(en_i)
        prv = np.maximum(io_i - 1, 0)
        wid_io = self._wid[io_i]
        quick = (io_i > 0) & has_tsc[prv] & (prv >= wf[wid_io])
        jt = np.where(quick, prv, -1)
        rest = np.flatnonzero(~quick)
        if len(rest):
            jt[rest] = self._last_on_cpu(tsc_i, io_i[rest], strict=True)
        io_tsc = np.where(jt >= 0, tsc_at(np.maximum(jt, 0)), 0).astype(np.uint64)
        miss = np.flatnonzero(jt < 0)
        if len(miss):
            io_tsc[miss] = carried(io_i[miss], self._last_tsc, 0).astype(np.uint64)

        # owner of I/O, exits, entries
        q_own = np.concatenate([io_i, ex_i, en_i])
        js = self._last_on_cpu(set_i, q_own)
        if len(set_i):
            rank = np.zeros(n, np.int32)
            rank[set_i] = np.arange(len(set_i), dtype=np.int32)
            pos = rank[np.maximum(js, 0)]
            dom = np.where(js >= 0, set_dom[pos], -1).astype(np.int32)
            vcp = np.where(js >= 0, set_vcpu[pos], -1).astype(np.int32)
        else:
            dom = np.full(len(q_own), -1, np.int32)
            vcp = np.full(len(q_own), -1, np.int32)
        miss = np.flatnonzero(js < 0)
        if len(miss) and self._owner:
            qm = q_own[miss]
            dom[miss] = carried(qm, {c: v[0] for c, v in self._owner.items()}, -1)
            vcp[miss] = carried(qm, {c: v[1] for c, v in self._owner.items()}, -1)
        io_dom, ex_dom, en_dom = dom[:nio], dom[nio:nio + nex], dom[nio + nex:]
        io_vcpu, ex_vcpu, en_vcpu = vcp[:nio], vcp[nio:nio + nex], vcp[nio + nex:]

        # per-pCPU state for the next feed: last TSC, current vCPU
        tsc_before = dict(self._last_tsc)
        ne_w = np.flatnonzero(we > wf)                   # windows holding records
        rc = wc[ne_w][::-1]
        cpus_u, last_pos = np.unique(rc, return_index=True)   # each pCPU's last such window
        lq = (we[ne_w][::-1][last_pos] - 1).astype(np.int64)
        has_rec = np.ones(len(lq), bool)
        if len(lq):
            jl = self._last_on_cpu(tsc_i, lq)
            for c, j in zip(cpus_u[has_rec].tolist(), jl.tolist()):
                if j >= 0:
                    self._last_tsc[c] = int(tsc_at(np.array([j]))[0])
            jo = self._last_on_cpu(set_i, lq)
            for c, j in zip(cpus_u[has_rec].tolist(), jo.tolist()):
                if j >= 0:
                    p = int(np.searchsorted(set_i, j))
                    self._owner[c] = (int(set_dom[p]), int(set_vcpu[p]))
        # watermark: needs each window's last TSC
        tsc_file = np.zeros(n, np.uint64)
        lastw = we - 1
        nonempty = we > wf
        jw = self._last_on_cpu(tsc_i, lastw[nonempty])
        tw = np.where(jw >= 0, tsc_at(np.maximum(jw, 0)), 0).astype(np.uint64)
        if (jw < 0).any():                  # no TSC yet in this feed: the pCPU's carried one
            cw = np.array([tsc_before.get(int(c), 0) for c in wc[nonempty]], dtype=np.uint64)
            tw = np.where(jw >= 0, tw, cw)
        tsc_file[lastw[nonempty]] = tw
        self._advance_watermark(win_first, win_cpu, tsc_file)

        # the events
        batch = E.empty(nio)
        if nio:
            dd = d0(io_i)
            a_lo = w[dd].astype(np.uint64)
            a_hi = np.where(io_is64, w[np.minimum(dd + 1, nw - 1)], 0).astype(np.uint64)
            dpos = dd + np.where(io_is64, 2, 1)
            dl = np.where(io_full, w[np.minimum(dpos, nw - 1)], 0).astype(np.uint64)
            dh = np.where(io_full & io_is64, w[np.minimum(dpos + 1, nw - 1)], 0).astype(np.uint64)
            iev = ev[io_i]
            batch["ts_ns"] = (io_tsc.astype(np.float64) * (1e9 / self.cpu_hz)).astype(np.int64)
            batch["domid"] = io_dom
            batch["vcpu"] = io_vcpu
            batch["type"] = ((iev & 1) == 1).astype(np.uint8)       # 0x..16 pio, 0x..17 mmio
            batch["dir"] = ((iev & np.uint32(C.IO_WRITE_BIT)) == 0).astype(np.uint8)
            batch["data_is_ptr"] = (~io_full).astype(np.uint8)
            batch["addr"] = a_lo | (a_hi << np.uint64(32))
            batch["data"] = dl | (dh << np.uint64(32))

        # service time, local case: exit and entry of the I/O on its own pCPU, with no change
        # of vCPU in between (the common case)
        # One combined index of the records that open/close an exit or change the vCPU: the
        # I/O is local when the last of them before it is an exit and the next one an entry.
        rkind = np.zeros(n, np.int8)                 # 1 exit, 2 entry, 3 vCPU change
        rkind[ex_i], rkind[en_i], rkind[set_i] = 1, 2, 3
        r_i = np.flatnonzero(rkind)
        lr = self._last_on_cpu(r_i, io_i)
        nr = self._next_on_cpu(r_i, io_i)
        local = (lr >= 0) & (nr >= 0)
        local &= (rkind[np.maximum(lr, 0)] == 1) & (rkind[np.maximum(nr, 0)] == 2)
        if local.any():
            rk = np.zeros(n, np.int32)
            rk[ex_i] = np.arange(nex, dtype=np.int32)
            tx = ex_tsc[rk[lr[local]]]
            rk[en_i] = np.arange(len(en_i), dtype=np.int32)
            tn = en_tsc[rk[nr[local]]]
            cyc = tn.astype(np.int64) - tx.astype(np.int64)
            batch["service_ns"][local] = np.where(
                cyc >= 0, (cyc.astype(np.float64) * (1e9 / self.cpu_hz)).astype(np.int64), -1)
        # the rest go through the per-vCPU pass, with only the exits/entries that can matter:
        # exits not closed on their pCPU (the vCPU left first) and entries whose exit is not
        # on their pCPU (the first entry after the vCPU came back)
        nx_r = self._next_on_cpu(r_i, ex_i, strict=True)
        ex_closed = (nx_r >= 0) & (rkind[np.maximum(nx_r, 0)] == 2)
        lx_r = self._last_on_cpu(r_i, en_i, strict=True)
        en_local = (lx_r >= 0) & (rkind[np.maximum(lx_r, 0)] == 1)
        bx, bn, fi = ~ex_closed, ~en_local, ~local
        self._feed_no += 1
        seq0 = self._feed_no << 32
        u_idx = np.concatenate([ex_i[bx], en_i[bn], io_i[fi]])
        u_exit = np.concatenate([np.ones(int(bx.sum()), bool), np.zeros(int(bn.sum()) + int(fi.sum()), bool)])
        u_entry = np.concatenate([np.zeros(int(bx.sum()), bool), np.ones(int(bn.sum()), bool),
                                  np.zeros(int(fi.sum()), bool)])
        u_dom = np.concatenate([ex_dom[bx], en_dom[bn], io_dom[fi]])
        u_vcpu = np.concatenate([ex_vcpu[bx], en_vcpu[bn], io_vcpu[fi]])
        u_tsc = np.concatenate([ex_tsc[bx], en_tsc[bn], io_tsc[fi]])
        nb = int(bx.sum()) + int(bn.sum())
        slow = self._service(_sel(batch, fi), nb + np.arange(int(fi.sum())), u_exit, u_entry,
                             u_dom, u_vcpu, u_tsc, seq0, rank=u_idx, cpu_s=cpu[u_idx])
        fast = _sel(batch, local)
        out = np.concatenate([fast, slow]) if len(slow) else fast
        if len(out) > 1 and len(slow) and self._sort_batches:
            out = _sel(out, np.argsort(out["ts_ns"], kind="stable"))
        return out

    def _prefix_last(self, idx):
        """lastp[i] = largest index of idx that is <= i (file order), -1 if none; cached."""
        hit = self._prefix.get(("l", id(idx)))
        if hit is not None and hit[0] is idx:
            return hit[1]
        n = len(self._wid)
        m = np.full(n, -1, np.int32)
        m[idx] = idx
        lastp = np.maximum.accumulate(m)
        self._prefix[("l", id(idx))] = (idx, lastp)
        return lastp

    def _prefix_next(self, idx):
        """nextp[i] = smallest index of idx that is >= i, -1 if none; cached."""
        hit = self._prefix.get(("n", id(idx)))
        if hit is not None and hit[0] is idx:
            return hit[1]
        n = len(self._wid)
        m = np.full(n, n, np.int32)
        m[idx] = idx
        nextp = np.minimum.accumulate(m[::-1])[::-1]
        nextp = np.where(nextp < n, nextp, -1).astype(np.int32)
        self._prefix[("n", id(idx))] = (idx, nextp)
        return nextp

    def _last_on_cpu(self, idx: np.ndarray, q: np.ndarray, strict: bool = False) -> np.ndarray:
        """For each record index in q: the largest index in idx (sorted) that is <= q (< q when
        strict) on q's pCPU stream in this feed (q's window, else an earlier window of that
        pCPU); -1 when there is none in this feed."""
        wf, we, wc, wo = self._win
        if len(q) == 0:
            return np.zeros(0, np.int64)
        if len(idx) == 0:
            return np.full(len(q), -1, np.int64)
        small = len(q) * 16 < len(self._wid) and ("l", id(idx)) not in self._prefix
        if small:                           # few queries: binary search beats a prefix scan
            k = np.searchsorted(idx, q, side="left" if strict else "right") - 1
            cand = np.where(k >= 0, idx[np.maximum(k, 0)], -1).astype(np.int64)
        else:
            lastp = self._prefix_last(idx)
            qq = q - 1 if strict else q
            cand = np.where(qq >= 0, lastp[np.maximum(qq, 0)], -1).astype(np.int64)
        wid = self._wid[q]
        ok = cand >= wf[wid]
        if ok.all():
            return cand
        # per window: last idx inside it; then, per pCPU, the last such of an earlier window
        if small:
            kw = np.searchsorted(idx, we, side="left") - 1
            wl = np.where(kw >= 0, idx[np.maximum(kw, 0)], -1).astype(np.int64)
        else:
            wl = np.where(we > 0, lastp[np.maximum(we - 1, 0)], -1).astype(np.int64)
        wl = np.where(wl >= wf, wl, -1)
        wls = wl[wo]
        cs = wc[wo]
        pos = np.arange(len(wo))
        gstart = np.concatenate([[0], np.flatnonzero(cs[1:] != cs[:-1]) + 1])
        gs = np.repeat(gstart, np.diff(np.append(gstart, len(wo))))
        best = np.maximum.accumulate(np.where(wls >= 0, pos, -1))
        prev = np.concatenate([[-1], best[:-1]])            # strictly earlier windows
        prev = np.where(prev >= gs, prev, -1)
        before = np.full(len(wo), -1, np.int64)
        before[wo] = np.where(prev >= 0, wls[np.maximum(prev, 0)], -1)
        return np.where(ok, cand, before[wid])

    def _next_on_cpu(self, idx: np.ndarray, q: np.ndarray, strict: bool = False) -> np.ndarray:
        """For each record index in q: the smallest index in idx that is >= q (> q when
        strict) on q's pCPU stream in this feed; -1 when there is none."""
        wf, we, wc, wo = self._win
        if len(q) == 0:
            return np.zeros(0, np.int64)
        if len(idx) == 0:
            return np.full(len(q), -1, np.int64)
        nextp = self._prefix_next(idx)
        n = len(nextp)
        qq = q + 1 if strict else q
        cand = np.where(qq < n, nextp[np.minimum(qq, n - 1)], -1).astype(np.int64)
        wid = self._wid[q]
        ok = (cand >= 0) & (cand < we[wid])
        if ok.all():
            return cand
        wn = np.where(wf < n, nextp[np.minimum(wf, n - 1)], -1).astype(np.int64)
        wn = np.where((wn >= 0) & (wn < we), wn, -1)
        wns = wn[wo]
        cs = wc[wo]
        m = len(wo)
        pos = np.arange(m)
        gend = np.append(np.flatnonzero(cs[1:] != cs[:-1]) + 1, m)
        ge = np.repeat(gend, np.diff(np.concatenate([[0], gend])))
        nxt = np.where(wns >= 0, pos, m)
        best = np.minimum.accumulate(nxt[::-1])[::-1]
        after = np.concatenate([best[1:], [m]])              # strictly later windows
        after = np.where(after < ge, after, -1)
        later = np.full(m, -1, np.int64)
        later[wo] = np.where(after >= 0, wns[np.minimum(np.maximum(after, 0), m - 1)], -1)
        return np.where(ok, cand, later[wid])

    def _advance_watermark(self, win_first, win_cpu, tsc_file) -> None:
        """Move the watermark: the TSC below which every pCPU's records have been read.

        xentrace reads the pCPU buffers in passes, in increasing pCPU order (xentrace.c,
        monitor_tbufs: ``for ( i = 0; i < num; i++ )``), writing a window for each non-empty
        one. A window whose pCPU is not above the previous window's starts a new pass; when a
        pass is complete, every record older than the oldest last-TSC among its windows has been
        written (a pCPU with no window in the pass had no records before it was read)."""
        n = len(tsc_file)
        # records continuing the window left open by the previous feed
        head = int(win_first[0]) if len(win_first) else n
        if head > 0 and self._prev_win_cpu is not None:
            self._pass_last[self._prev_win_cpu] = int(tsc_file[head - 1])
        nwin = len(win_first)
        if nwin == 0:
            return
        ends = np.append(win_first[1:], n)
        has = ends > win_first
        vals = (np.where(has, tsc_file[np.maximum(ends - 1, 0)], np.uint64(_TSC_INF)) if n
                else np.full(nwin, _TSC_INF, np.uint64))
        prev = np.empty(nwin, np.int64)
        prev[1:] = win_cpu[:-1]
        prev[0] = self._prev_win_cpu if self._prev_win_cpu is not None else np.iinfo(np.int64).min
        starts = np.flatnonzero(win_cpu <= prev)            # windows that begin a new pass
        self._prev_win_cpu = int(win_cpu[-1])
        head_end = int(starts[0]) if len(starts) else nwin
        for c, v, h in zip(win_cpu[:head_end].tolist(), vals[:head_end].tolist(),
                           has[:head_end].tolist()):
            if h:
                self._pass_last[c] = v                      # the pass carried over
        if not len(starts):
            return
        mins = []
        if self._pass_last:
            mins.append(min(self._pass_last.values()))
        if len(starts) > 1:                                 # passes wholly inside this feed
            seg = np.minimum.reduceat(vals[:starts[-1]], starts[:-1])
            mins.extend(int(m) for m in seg if int(m) != _TSC_INF)
        if mins:
            self._wm = max(self._wm, max(mins))
        last = slice(int(starts[-1]), nwin)
        self._pass_last = {c: v for c, v, h in zip(win_cpu[last].tolist(), vals[last].tolist(),
                                                   has[last].tolist()) if h}

    def _watermark(self) -> int:
        return self._wm

    def _service(self, batch, ii, exit_ok, entry_ok, dom_s, vcpu_s, tsc_s, seq0,
                 final: bool = False, rank=None, cpu_s=None):
        """Attach VMEXIT -> VMENTRY TSC of the vCPU's exit each I/O record belongs to.

        Done per vCPU in TSC order across pCPUs (a read can complete on another pCPU than the
        one that took the exit), over rows below the watermark; later rows wait (with their
        events) for the next feed. Rows are plain columns; events stay in a side array."""
        # Records of unknown owner are grouped per pCPU instead (key -2 - pCPU): without a
        # known vCPU, the pCPU's own stream is the best that can be said.
        known = dom_s >= 0
        sel = np.flatnonzero(exit_ok | entry_ok)
        io_known = np.ones(len(ii), bool)
        out = []
        rec = np.concatenate([sel, ii])
        ns = len(sel)
        p = self._pending
        pev = self._pending_ev
        key = np.where(known[rec],
                       (dom_s[rec].astype(np.int64) << 16) | vcpu_s[rec].astype(np.int64),
                       -2 - cpu_s[rec].astype(np.int64))
        kind = np.empty(len(rec), np.int8)
        kind[:ns] = np.where(exit_ok[sel], _K_EXIT, _K_ENTRY)
        kind[ns:] = _K_IO
        evi = np.full(len(rec), -1, np.int64)
        evi[ns:] = len(pev) + np.arange(len(rec) - ns)
        key = np.concatenate([p["key"], key])
        tsc = np.concatenate([p["tsc"], tsc_s[rec]])
        kind = np.concatenate([p["kind"], kind])
        seq = np.concatenate([p["seq"], seq0 + (rec if rank is None else rank[rec])])
        evi = np.concatenate([p["evi"], evi])
        bk = _sel(batch, io_known)
        evs = np.concatenate([pev, bk]) if len(pev) else bk
        if not final:
            late = tsc >= np.uint64(self._wm)
            if late.any():
                self._keep_pending(late, key, tsc, kind, seq, evi, evs)
                early = ~late
                key, tsc, kind, seq, evi = key[early], tsc[early], kind[early], seq[early], evi[early]
            else:
                self._keep_pending(late, key, tsc, kind, seq, evi, evs)
        else:
            self._keep_pending(np.zeros(len(key), bool), key, tsc, kind, seq, evi, evs)
        if self._open_exit:
            m = len(self._open_exit)
            key = np.concatenate([np.fromiter(self._open_exit.keys(), np.int64, m), key])
            tsc = np.concatenate([np.fromiter(self._open_exit.values(), np.uint64, m), tsc])
            kind = np.concatenate([np.full(m, _K_EXIT, np.int8), kind])
            seq = np.concatenate([np.full(m, -1, np.int64), seq])   # first of its vCPU
            evi = np.concatenate([np.full(m, -1, np.int64), evi])
        if len(key):
            o = np.lexsort((seq, tsc, key))
            key, tsc, kind, seq, evi = key[o], tsc[o], kind[o], seq[o], evi[o]
            gs, ge = _groups(key)
            lx = _ffill_idx(kind == _K_EXIT, gs)
            le = _ffill_idx(kind == _K_ENTRY, gs)
            ne = _bfill_idx(kind == _K_ENTRY, ge)
            nxx = _bfill_idx(kind == _K_EXIT, ge)
            io = np.flatnonzero(kind == _K_IO)
            lxi, lei, nei, nxi = lx[io], le[io], ne[io], nxx[io]
            inside = (lxi >= 0) & (lxi > lei)
            done = inside & (nei >= 0) & ((nxi < 0) | (nei < nxi))
            pending = inside & (nei < 0) & (nxi < 0) & (not final)
            ev = _sel(evs, evi[io])
            a = io[done]
            cyc = tsc[ne[a]].astype(np.int64) - tsc[lx[a]].astype(np.int64)
            ev["service_ns"][done] = np.where(
                cyc >= 0, (cyc.astype(np.float64) * (1e9 / self.cpu_hz)).astype(np.int64), -1)
            out.append(_sel(ev, ~pending))
            if pending.any():
                pi = io[pending]
                self._add_pending(key[pi], tsc[pi], kind[pi], seq[pi], _sel(ev, pending))
            self._open_exit.clear()
            last_in_grp = np.flatnonzero(np.append(key[1:] != key[:-1], True))
            x, e = lx[last_in_grp], le[last_in_grp]
            op = (x >= 0) & (x > e)
            self._open_exit.update(zip(key[last_in_grp][op].tolist(), tsc[x[op]].tolist()))
        res = E.concat(out)
        if len(res) > 1 and self._sort_batches:
            res = _sel(res, np.argsort(res["ts_ns"], kind="stable"))
        return res

    def _keep_pending(self, late, key, tsc, kind, seq, evi, evs):
        """Rows not yet below the watermark wait, with the events of their I/O rows."""
        p = np.zeros(int(late.sum()), _PROW)
        p["key"], p["tsc"], p["kind"], p["seq"] = key[late], tsc[late], kind[late], seq[late]
        old = evi[late]
        has = old >= 0
        p["evi"] = -1
        p["evi"][has] = np.arange(int(has.sum()))
        self._pending = p
        self._pending_ev = _sel(evs, old[has])

    def _add_pending(self, key, tsc, kind, seq, ev):
        p = np.zeros(len(key), _PROW)
        p["key"], p["tsc"], p["kind"], p["seq"] = key, tsc, kind, seq
        p["evi"] = len(self._pending_ev) + np.arange(len(key))
        self._pending = np.concatenate([self._pending, p])
        self._pending_ev = np.concatenate([self._pending_ev, ev])


_TSC_INF = (1 << 64) - 1
_K_EXIT, _K_ENTRY, _K_IO, _K_IO_REP, _K_CHANGE, _K_CONT, _K_LOST, _K_CLAIM = range(8)
# per-vCPU service-time rows waiting for the watermark or a VMENTRY (default mode)
_PROW = np.dtype([("key", np.int64), ("tsc", np.uint64), ("kind", np.int8), ("seq", np.int64),
                  ("evi", np.int64)])
# xenalyze state-machine rows (compat mode)
_CROW = np.dtype([("cpu", np.int32), ("tsc", np.uint64), ("kind", np.int8), ("ev", np.uint32),
                  ("w0", np.uint32), ("w1", np.uint32), ("seq", np.int64), ("io", E.EVENT_DTYPE)])
_K_LOST_END = 8


class _XenalyzeMachine:
    """Per-vCPU exit state machine reproducing xenalyze's I/O enumeration (see module doc).

    A sequential pass in TSC order over the rows that matter to it (runstate, lost, exits,
    entries, I/O and the handlers that claim the exit's post-process slot)."""

    def __init__(self, hz: float):
        self.hz = hz
        self.cur: dict[int, int | None] = {}        # pCPU -> vCPU key
        self.valid: dict[int, bool] = {}
        self.exit_tsc: dict[int, int] = {}
        self.claim: dict[int, object] = {}          # None | "other" | event row
        self.seen_runstate: set[int] = set()
        self.rstate: dict[int, int] = {}            # vCPU key -> runstate (-1: lost)
        self.pending = np.zeros(0, _CROW)

    def _close(self, key, tsc, out):
        """hvm_close_vmexit: run the exit's post-process (count its I/O), close the exit."""
        fl = self.claim.get(key)
        if fl is not None and fl[0] != "other":
            post, pio_dir, port, gpa, mmio_dir, data_valid, io = fl
            ext = self.exit_tsc.get(key, 0)
            arc = tsc - ext if ext <= tsc else 0      # arc_cycles
            if post == "pio":                         # hvm_io_{read,write}_postprocess
                io["type"], io["dir"], io["addr"] = E.TYPE_PIO, pio_dir, port
            elif data_valid and not (C.XENALYZE_VGA_START <= gpa < C.XENALYZE_VGA_END):
                # enumerate_mmio: needs data; VGA test on the full gpa; pa is unsigned int
                io["type"], io["dir"], io["addr"] = E.TYPE_MMIO, mmio_dir, gpa & 0xFFFFFFFF
            else:
                io = None
            if io is not None:
                io["service_ns"] = int(arc * 1e9 / self.hz)
                io["data_is_ptr"] = 0
                out.append(io)
        self.valid[key] = False
        self.claim[key] = None

    def run(self, rows: np.ndarray, wm: int) -> np.ndarray:
        if len(self.pending):
            rows = np.concatenate([self.pending, rows])
        if wm != _TSC_INF:
            safe = rows["tsc"] < np.uint64(wm)
            self.pending = rows[~safe]
            rows = rows[safe]
        else:
            self.pending = np.zeros(0, _CROW)
        # xenalyze merges pCPUs by TSC (records without one carry their pCPU's last TSC)
        rows = rows[np.lexsort((rows["seq"], rows["tsc"]))]
        out = []
        cur, valid, claim = self.cur, self.valid, self.claim
        ios = rows["io"]
        for i, (c, t, kind, e, a) in enumerate(zip(
                rows["cpu"].tolist(), rows["tsc"].tolist(), rows["kind"].tolist(),
                rows["ev"].tolist(), rows["w0"].tolist())):
            if kind == _K_CHANGE or kind == _K_CONT:
                key = a                               # domid << 16 | vcpu
                new = C.RUNSTATE_RUNNING if kind == _K_CONT else (e >> 4) & 0xF
                if kind == _K_CHANGE and new == C.RUNSTATE_RUNNABLE \
                        and key in self.seen_runstate and valid.get(key):
                    self._close(key, t, out)          # sched_runstate_process closes the exit
                self.seen_runstate.add(key)
                if self.rstate.get(key) != -1 or new == C.RUNSTATE_RUNNING:
                    self.rstate[key] = new            # a lost vCPU stays lost until it runs
                if new == C.RUNSTATE_RUNNING:
                    cur[c] = key
                elif kind == _K_CHANGE and ((e >> 8) & 0xF) == C.RUNSTATE_RUNNING \
                        and cur.get(c) == key:
                    cur[c] = None
                continue
            key = cur.get(c)
            if kind == _K_LOST:
                # process_lost_records: the pCPU's current vCPU and every vCPU not running
                # lose their open exit (lose_vcpu); the pCPU has no current vCPU ...
                if key is not None:
                    valid[key] = False
                    claim[key] = None
                for k2, st2 in self.rstate.items():
                    if st2 != C.RUNSTATE_RUNNING:
                        valid[k2] = False
                        claim[k2] = None
                        self.rstate[k2] = -1
                cur[c] = None
                continue
            if kind == _K_LOST_END:
                # ... until process_lost_records_end makes the vCPU named in the record current
                w1 = int(rows["w1"][i])
                cur[c] = ((w1 & 0xFFFF) << 16) | (w1 >> 16)
                continue
            if key is None:
                continue                              # xenalyze's default domain: not shown
            if kind == _K_EXIT:
                valid[key] = True
                claim[key] = None
                self.exit_tsc[key] = t
            elif kind == _K_ENTRY:
                if valid.get(key):
                    self._close(key, t, out)
            elif not valid.get(key):
                continue                              # needs_vmexit: dropped
            elif kind == _K_CLAIM:
                if claim.get(key) is None:            # hvm_set_postprocess by another handler
                    claim[key] = ["other"]
            else:
                io = ios[i]
                typ = int(io["type"])
                if typ == E.TYPE_PIO and e & C.TRC_64_FLAG:
                    continue                          # "FATAL: Unexpected 64-bit PIO": ignored
                fl = claim.get(key)
                if fl is None:
                    # first I/O of the exit: sets the post-process; later ones only update
                    # the in-flight data (hvm_io_assist_process / hvm_mmio_assist_process)
                    fl = claim[key] = [None, 0, 0, 0, 0, False, io.copy()]
                    fl[6]["domid"], fl[6]["vcpu"] = key >> 16, key & 0xFFFF
                if fl[0] == "other":
                    continue
                d = int(io["dir"])
                if typ == E.TYPE_PIO:
                    fl[2] = int(io["addr"]) & 0xFFFFFFFF          # inflight.io.port
                    if fl[0] is None:
                        fl[0], fl[1] = "pio", d
                else:
                    fl[3], fl[4] = int(io["addr"]), d               # inflight.mmio.gpa/is_write
                    if kind == _K_IO:
                        fl[5] = True                                # data_valid
                    if fl[0] is None:
                        fl[0] = "mmio"
        batch = np.array(out, dtype=E.EVENT_DTYPE) if out else E.empty(0)
        if len(batch) > 1:
            batch = batch[np.argsort(batch["ts_ns"], kind="stable")]
        return batch


# --------------------------------------------------------------------------- entry points

def _result(dec: StreamDecoder, batches: list[np.ndarray]) -> DecodeResult:
    ev = E.concat(batches)
    if len(ev) > 1:
        ev = _sel(ev, np.argsort(ev["ts_ns"], kind="stable"))
    return DecodeResult(ev, dec.records, dec.lost_records, dec.decode_errors, dec.truncated_at,
                        list(dec.warnings), dec.windows)


def decode_bytes(buf: bytes, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                 name: str = "<bytes>") -> DecodeResult:
    """Decode a whole capture held in memory."""
    dec = StreamDecoder(cpu_hz, xenalyze_compat=xenalyze_compat, name=name)
    dec._sort_batches = False
    mv = memoryview(buf)
    batches = []
    if not len(mv):
        raise InputError(f"{name}: empty, not a xentrace capture (byte offset 0)")
    for start in range(0, len(mv), CHUNK_BYTES):
        batches.append(dec.feed(mv[start:start + CHUNK_BYTES]))
    batches.append(dec.finish())
    return _result(dec, batches)


def decode_file(path, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                chunk_bytes: int = CHUNK_BYTES) -> DecodeResult:
    """Decode a xentrace file, reading it in chunks (bounded memory)."""
    name = str(path)
    fh = open_input(path, "a xentrace capture", " (byte offset 0)")
    dec = StreamDecoder(cpu_hz, xenalyze_compat=xenalyze_compat, name=name)
    dec._sort_batches = False
    batches = []
    with fh:
        first = True
        while True:
            try:
                chunk = fh.read(chunk_bytes)
            except IsADirectoryError:
                raise InputError(f"{name}: is a directory, not a xentrace capture "
                                 f"(byte offset 0)") from None
            except OSError as exc:
                raise InputError(f"{name}: read error at byte offset {dec.offset}: "
                                 f"{exc.strerror}") from None
            if not chunk:
                if first:
                    raise InputError(f"{name}: empty file, not a xentrace capture (byte offset 0)")
                break
            first = False
            batches.append(dec.feed(chunk))
    batches.append(dec.finish())
    return _result(dec, batches)
