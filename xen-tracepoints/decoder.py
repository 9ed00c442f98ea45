"""Decode xentrace captures into iotrace event batches (``iotrace.events.EVENT_DTYPE``).

API (used by synth.py's tests, live.py, ``iotrace report`` through ``iotrace.capture``)::

    from iotrace.xentrace.decoder import decode_file, decode_bytes, StreamDecoder, DecodeResult

    res = decode_file(path, cpu_hz=None, xenalyze_compat=False)   # -> DecodeResult
    res = decode_bytes(buf, cpu_hz=None, xenalyze_compat=False, name="<bytes>")
    res.events          # np.ndarray of EVENT_DTYPE, in ts_ns order
    res.records         # every trace record decoded (cpu_change window headers not counted)
    res.lost_records    # sum of TRC_LOST_RECORDS counts
    res.decode_errors   # records that could not be decoded (bad layout, junk ids, overruns)
    res.truncated_at    # byte offset of the first incomplete record/window, or None
    res.warnings        # list[str], one line each
    res.windows         # cpu_change windows seen

    dec = StreamDecoder(cpu_hz=None, xenalyze_compat=False, name="<stream>")
    batch = dec.feed(chunk)   # events of the complete records so far (ts order within the batch);
                              # keeps per-pCPU/per-vCPU state and the partial-record tail
    batch = dec.finish()      # end of input: flushes held-back events, notes truncation
    dec.records, dec.lost_records, dec.decode_errors, dec.warnings, dec.offset (bytes consumed),
    dec.truncated_at (set by finish)

Errors: a file that is not a xentrace capture (empty, random bytes, missing, a directory) raises
``iotrace.errors.InputError`` with one line naming the file and the byte offset. A capture cut in
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
  next VMENTRY, on whichever pCPU it resumes), VMENTRY TSC - VMEXIT TSC; -1 when unknown.

``xenalyze_compat=True`` counts instead like ``xenalyze --summary --with-pio-enumeration
--with-mmio-enumeration`` (tools/xentrace/xenalyze.c): records are replayed in TSC order through a
per-vCPU exit state machine: an I/O counts only if it comes while its vCPU's exit is open
(hvm_handler_process needs vmexit_valid) and nothing claimed the exit's post-process slot first
(hvm_set_postprocess: first I/O, page-fault, CR/MSR write, MSR read or VMCALL handler wins); the
exit closes at VMENTRY or when the vCPU becomes runnable (sched_runstate_process), so a read that
completes after the vCPU waited for qemu is dropped; a lost-records record invalidates the
current exit; 64-bit PIO is an error (dropped); MMIO needs its data words (data_valid), is keyed by
a 32-bit address (``unsigned int pa``) and VGA MMIO 0xa0000 <= gpa < 0xbffff is skipped
(mmio_enumeration_skip_vga defaults to 1); records of unknown owner (xenalyze's default domain,
not shown in its summary) are dropped. service_ns is xenalyze's arc_cycles. Shadow-paging
handlers (TRC_SHADOW) that also claim the slot are not modelled.

Performance: record boundaries can only be found sequentially (a header gives its record's
length), so that single step is a 60-line C loop (``xtwalk.c``, built by ``make`` into
``_xtwalk.so`` and loaded with ctypes); every other step (field gathers, TSC fill, attribution,
service times) is column-wise NumPy over the record table. Without the shared library the walk
falls back to pure NumPy: pointer doubling over each window (next[i] = i + len(i); the chain from a
window's first word is enumerated level by level), O(n log n) instead of O(n), about 5-10x slower
but with the same results (tests run both). Set IOTRACE_XT_NUMPY=1 to force the fallback.
Input is processed in chunks (16 MiB by default), so memory is bounded by the chunk plus the events.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iotrace import events as E
from iotrace.errors import InputError

from . import catalogue as C

CHUNK_BYTES = 16 << 20
_SEG_WORDS = 1 << 18          # NumPy fallback: pointer doubling over at most this many words

# Trace classes of xen/include/public/trace.h (bits 16-27 of an event id); a record whose class
# is none of these is junk (counted in decode_errors).
_KNOWN_CLASSES = np.array([0x001, 0x002, 0x004, 0x008, 0x010, 0x020, 0x040, 0x080, 0x800],
                          dtype=np.uint32)

_XT_END, _XT_PARTIAL, _XT_FULL, _XT_BAD_WINDOW = 0, 1, 2, 3
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


def _chain(h: np.ndarray) -> tuple[np.ndarray, int]:
    """Record starts of the chain from word 0 of ``h`` that fit entirely in ``h``, and the
    position where the chain leaves it (len(h) if it ends exactly there). Pure NumPy."""
    L = len(h)
    ln = 1 + ((h >> 28) & 7).astype(np.int64) + 2 * (h >> 31).astype(np.int64)
    nxt = np.arange(L, dtype=np.int64) + ln
    fits = nxt <= L
    nxt = np.where(fits, nxt, L)
    # Levels J_k = next^(2^k), with L (outside) absorbing.
    jumps = [np.append(nxt, L)]
    span = 1
    while span < L:
        j = jumps[-1]
        jumps.append(j[j])
        span *= 2
    pos = np.zeros(1, dtype=np.int64)
    for j in reversed(jumps):
        nxtpos = j[pos]
        pos = np.stack([pos, nxtpos], axis=1).reshape(-1)
        pos = pos[pos < L]
    pos = np.unique(pos)
    if len(pos) and not fits[pos[-1]]:
        return pos[:-1], int(pos[-1])
    return pos, L


def _walk_numpy(w: np.ndarray, st: np.ndarray):
    """Same contract as xt_walk in xtwalk.c, window by window, with pointer doubling."""
    n = len(w)
    pos, remain, cpu = int(st[_ST_POS]), int(st[_ST_REMAIN]), int(st[_ST_CPU])
    offs, cpus, wfs, wcs = [], [], [], []
    count = 0
    st[_ST_STATUS] = _XT_END
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
            cpu = int(np.int32(np.uint32(w[pos + 1]).view(np.int32)))
            remain = nbytes >> 2
            pos += 3
            st[_ST_WINDOWS] += 1
            wfs.append(count)
            wcs.append(cpu)
            continue
        seg_end = min(pos + remain, n, pos + _SEG_WORDS)
        starts, stop = _chain(w[pos:seg_end])
        if len(starts):
            offs.append(starts + pos)
            cpus.append(np.full(len(starts), cpu, dtype=np.int32))
            count += len(starts)
        used = stop
        pos += used
        remain -= used
        if pos < seg_end:
            # The record at pos does not fit in the segment.
            h = int(w[pos])
            ln = 1 + ((h >> 28) & 7) + 2 * (h >> 31)
            if ln > remain:
                st[_ST_ERRORS] += 1
                st[_ST_SKIP] = 1
            elif pos + ln > n:
                st[_ST_STATUS] = _XT_PARTIAL
                break
            # else: only the segment was cut; continue from pos.
    st[_ST_POS], st[_ST_REMAIN], st[_ST_CPU] = pos, remain, cpu
    wf, wc = np.array(wfs, np.int64), np.array(wcs, np.int32)
    if not offs:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), wf, wc
    return np.concatenate(offs), np.concatenate(cpus), wf, wc


def _walk(w: np.ndarray, st: np.ndarray):
    if _C_WALK is not None:
        return _walk_c(w, st)
    return _walk_numpy(w, st)


# --------------------------------------------------------------------------- column helpers

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
        # per pCPU
        self._last_tsc: dict[int, int] = {}
        self._owner: dict[int, tuple[int, int]] = {}
        # per vCPU key (domid << 16 | vcpu): open exit TSC; events waiting for their VMENTRY
        self._open_exit: dict[int, int] = {}
        self._pending = np.zeros(0, _SROW)      # rows waiting for the watermark or a VMENTRY
        self._feed_no = 0
        self._wm = 0                            # watermark TSC (see _advance_watermark)
        self._pass_last: dict[int, int] = {}
        self._prev_win_cpu: int | None = None
        self._compat = _XenalyzeMachine(self.cpu_hz) if xenalyze_compat else None
        self._finished = False

    # -- public
    def feed(self, chunk: bytes) -> np.ndarray:
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
        self.windows = int(st[_ST_WINDOWS])
        pos = int(st[_ST_POS])
        off = np.concatenate(offs) if len(offs) > 1 else offs[0]
        cpu = np.concatenate(cpus) if len(cpus) > 1 else cpus[0]
        wf = np.concatenate(wfs) if len(wfs) > 1 else wfs[0]
        wc = np.concatenate(wcs) if len(wcs) > 1 else wcs[0]
        out = self._process(w, off, cpu, wf, wc)
        self._tail = buf[pos * 4:]
        self.offset += pos * 4
        return out

    def finish(self) -> np.ndarray:
        if self._finished:
            return E.empty(0)
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
            return self._compat.run(np.zeros(0, _CROW), _TSC_INF)
        z = np.zeros(0, np.int64)
        zb = np.zeros(0, bool)
        # every waiting row is now final; I/O whose VMENTRY never came keep service_ns -1
        return self._service(E.empty(0), z, zb, zb, np.zeros(0, np.int32),
                             np.zeros(0, np.int32), np.zeros(0, np.uint64), 0, final=True)

    # -- internals
    def _warn(self, msg: str) -> None:
        if len(self.warnings) < 100:
            self.warnings.append(f"{self.name}: {msg}")

    @staticmethod
    def _resync(w: np.ndarray, start: int) -> int | None:
        cand = np.flatnonzero(w[start:] == C.CPU_CHANGE_HEADER)
        for c in cand[:1000]:
            p = start + int(c)
            if p + 2 < len(w) and int(w[p + 2]) & 3 == 0 and int(w[p + 1]) < 65536:
                return p
        return None

    def _process(self, w: np.ndarray, off: np.ndarray, cpu: np.ndarray, win_first: np.ndarray,
                 win_cpu: np.ndarray) -> np.ndarray:
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
        return self._service(batch, ii, exit_ok, entry_ok, dom_s, vcpu_s, tsc_s, seq0)

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
        ends = np.append(win_first[1:], n)
        for first, end, c in zip(win_first.tolist(), ends.tolist(), win_cpu.tolist()):
            if self._prev_win_cpu is not None and c <= self._prev_win_cpu:
                if self._pass_last:
                    self._wm = max(self._wm, min(self._pass_last.values()))
                self._pass_last = {}
            self._prev_win_cpu = c
            if end > first:
                self._pass_last[c] = int(tsc_file[end - 1])

    def _watermark(self) -> int:
        return self._wm

    def _service(self, batch, ii, exit_ok, entry_ok, dom_s, vcpu_s, tsc_s, seq0,
                 final: bool = False):
        """Attach VMEXIT -> VMENTRY TSC of the vCPU's exit each I/O record belongs to.

        Done per vCPU in TSC order across pCPUs (a read can complete on another pCPU than the
        one that took the exit), over rows below the watermark; later rows wait."""
        known = dom_s >= 0
        sel = np.flatnonzero((exit_ok | entry_ok) & known)
        io_known = known[ii]
        out = [batch[~io_known]]                     # owner unknown: no vCPU, no service time
        rec = np.concatenate([sel, ii[io_known]])
        rows = np.zeros(len(rec), _SROW)
        rows["key"] = (dom_s[rec].astype(np.int64) << 16) | vcpu_s[rec].astype(np.int64)
        rows["tsc"] = tsc_s[rec]
        rows["kind"][:len(sel)] = np.where(exit_ok[sel], _K_EXIT, _K_ENTRY)
        rows["kind"][len(sel):] = _K_IO
        rows["seq"] = seq0 + rec
        rows["io"][len(sel):] = batch[io_known]
        if len(self._pending):
            rows = np.concatenate([self._pending, rows])
        wm = _TSC_INF if final else self._watermark()
        safe = rows["tsc"] < np.uint64(wm) if wm != _TSC_INF else np.ones(len(rows), bool)
        self._pending = rows[~safe]
        rows = rows[safe]
        if self._open_exit:
            ox = np.zeros(len(self._open_exit), _SROW)
            ox["key"] = list(self._open_exit.keys())
            ox["tsc"] = list(self._open_exit.values())
            ox["kind"] = _K_EXIT
            ox["seq"] = -1                            # before everything of its vCPU
            rows = np.concatenate([ox, rows])
        if len(rows):
            o = np.lexsort((rows["seq"], rows["tsc"], rows["seq"] >= 0, rows["key"]))
            rows = rows[o]
            key, tsc, kind = rows["key"], rows["tsc"], rows["kind"]
            gs, ge = _groups(key)
            lx = _ffill_idx(kind == _K_EXIT, gs)
            le = _ffill_idx(kind == _K_ENTRY, gs)
            ne = _bfill_idx(kind == _K_ENTRY, ge)
            nxx = _bfill_idx(kind == _K_EXIT, ge)
            io = np.flatnonzero(kind == _K_IO)
            inside = (lx[io] >= 0) & (lx[io] > le[io])
            done = inside & (ne[io] >= 0) & ((nxx[io] < 0) | (ne[io] < nxx[io]))
            pending = inside & (ne[io] < 0) & (nxx[io] < 0) & (not final)
            ev = rows["io"][io]
            a = io[done]
            cyc = tsc[ne[a]].astype(np.int64) - tsc[lx[a]].astype(np.int64)
            ev["service_ns"][done] = np.where(
                cyc >= 0, (cyc.astype(np.float64) * (1e9 / self.cpu_hz)).astype(np.int64), -1)
            out.append(ev[~pending])
            if pending.any():
                self._pending = np.concatenate([rows[io[pending]], self._pending])
            self._open_exit.clear()
            last_in_grp = np.flatnonzero(np.append(key[1:] != key[:-1], True))
            for i in last_in_grp.tolist():
                x, e = int(lx[i]), int(le[i])
                if x >= 0 and x > e:
                    self._open_exit[int(key[i])] = int(tsc[x])
            # keys with pending rows but no safe rows keep their open exit
        res = E.concat(out)
        if len(res) > 1:
            res = res[np.argsort(res["ts_ns"], kind="stable")]
        return res


_TSC_INF = (1 << 64) - 1
_K_EXIT, _K_ENTRY, _K_IO, _K_IO_REP, _K_CHANGE, _K_CONT, _K_LOST, _K_CLAIM = range(8)
# per-vCPU service-time rows (default mode)
_SROW = np.dtype([("key", np.int64), ("tsc", np.uint64), ("kind", np.int8), ("seq", np.int64),
                  ("io", E.EVENT_DTYPE)])
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
        ev = ev[np.argsort(ev["ts_ns"], kind="stable")]
    return DecodeResult(ev, dec.records, dec.lost_records, dec.decode_errors, dec.truncated_at,
                        list(dec.warnings), dec.windows)


def decode_bytes(buf: bytes, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                 name: str = "<bytes>") -> DecodeResult:
    """Decode a whole capture held in memory."""
    dec = StreamDecoder(cpu_hz, xenalyze_compat=xenalyze_compat, name=name)
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
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file (byte offset 0)") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not a xentrace capture (byte offset 0)") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror} (byte offset 0)") from None
    dec = StreamDecoder(cpu_hz, xenalyze_compat=xenalyze_compat, name=name)
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
