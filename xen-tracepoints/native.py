"""ctypes binding of the compiled xentrace core (``_xtcore.so``, built by ``make xtcore`` from
``xt*.c``; see ``xtcore.h`` for what each C module does).

``Core(cpu_hz, events=..., cells=..., cell_rip=..., compat=...)`` wraps one ``xt_state``: ``feed``
takes a buffer and returns the bytes it consumed (whole records and window headers; the caller
feeds the rest again with more data), ``finish`` ends the input, ``stats`` is a live NumPy view of
the C counters, ``take_events`` / ``take_notes`` / ``cells`` copy the outputs out. The struct
layouts are declared once per side and checked against each other when the library is loaded.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iotrace.core import events as E
from iotrace.core.errors import UserError

LIBRARY = Path(__file__).with_name("_xtcore.so")

# xt_stats, in order (xtcore.h)
STATS = ("records", "windows", "decode_errors", "lost_records", "io_records", "started",
         "remain_words", "skipping", "status", "consumed", "forced_rows", "late_rows",
         "queued_rows", "pending_io", "cells", "overflow_requests", "events_ready", "pcpus",
         "vcpus", "watermark",
         "oldest_pending_ns", "n_notes", "tsc_first", "tsc_last")
ST = {name: i for i, name in enumerate(STATS)}
STATUS_OK, STATUS_NOT_CAPTURE, STATUS_NO_MEMORY = 0, 1, 2

CELL_KEY = np.dtype([("domid", "<i4"), ("vcpu", "<i4"), ("type", "u1"), ("dir", "u1"),
                     ("pad", "V6"), ("addr", "<u8"), ("rip", "<u8")])
CELL_VAL = np.dtype([("count", "<u8"), ("svc_n", "<u8"), ("svc_sum_ns", "<u8"),
                     ("svc_min_ns", "<i8"), ("svc_max_ns", "<i8")])
NOTE = np.dtype([("kind", "<i8"), ("offset", "<i8"), ("a", "<i8"), ("b", "<i8")])
N_OVERRUN, N_RESYNC, N_NO_RESYNC, N_NOT_CAPTURE, N_REORDER_FULL, N_CELLS_FULL = 1, 2, 3, 4, 5, 6
KEY_OTHER = (1 << 64) - 1      # addr / rip of the cells gathering keys beyond the bound
MAX_CELLS = 65536
F_EVENTS, F_CELLS, F_CELL_RIP, F_COMPAT = 1, 2, 4, 8
SLOTS = 256                    # XT_SLOTS: iotrace.core.aggregate.N_SLOTS

_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError:
        raise UserError(f"the xentrace decoder's compiled core {LIBRARY} is missing or cannot "
                        "be loaded: run `make install` (it builds it with the C compiler)"
                        ) from None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, res, args in [
            ("xt_new", vp, [ctypes.c_double, ctypes.c_int]),
            ("xt_free", None, [vp]),
            ("xt_feed", i64, [vp, vp, i64]),
            ("xt_finish", None, [vp]),
            ("xt_stats_of", vp, [vp]),
            ("xt_take_events", i64, [vp, vp, i64]),
            ("xt_take_notes", i64, [vp, vp, i64]),
            ("xt_export_cells", i64, [vp, vp, vp, vp, i64]),
            ("xt_cells_hist", vp, [vp]),
            ("xt_sizeof", i64, [ctypes.c_int]),
            ("xt_constants", i64, [vp, i64])]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    want = [8 * len(STATS), E.EVENT_DTYPE.itemsize, CELL_KEY.itemsize, CELL_VAL.itemsize,
            NOTE.itemsize, SLOTS, MAX_CELLS]
    got = [lib.xt_sizeof(i) for i in range(len(want))]
    if got != want:
        raise UserError(f"{LIBRARY} does not match this iotrace (struct sizes {got}, expected "
                        f"{want}): rebuild it with `make install`")
    _lib = lib
    return lib


def constants() -> list[int]:
    """The event ids and masks the core was compiled with (xt_constants in xtcore.c)."""
    lib = _load()
    out = np.zeros(64, np.int64)
    n = lib.xt_constants(out.ctypes.data, len(out))
    return [int(x) for x in out[:n]]


@dataclass
class Cells:
    """Cells aggregated by the core: key columns, totals and histograms (n x SLOTS, the slots of
    iotrace.core.aggregate)."""
    keys: np.ndarray     # CELL_KEY
    vals: np.ndarray     # CELL_VAL
    hist: np.ndarray     # int64, (n, SLOTS)


class Core:
    """One decoding pass of the compiled core over one input stream."""

    def __init__(self, cpu_hz: float, *, events: bool = True, cells: bool = False,
                 cell_rip: bool = False, compat: bool = False):
        self._lib = _load()
        flags = ((F_EVENTS if events else 0) | (F_CELLS if cells else 0)
                 | (F_CELL_RIP if cell_rip else 0) | (F_COMPAT if compat else 0))
        self._s = self._lib.xt_new(float(cpu_hz), flags)
        if not self._s:
            raise MemoryError("xentrace core: out of memory")
        addr = self._lib.xt_stats_of(self._s)
        self.stats = np.ctypeslib.as_array(
            (ctypes.c_int64 * len(STATS)).from_address(addr))

    def __getitem__(self, name: str) -> int:
        return int(self.stats[ST[name]])

    def feed(self, buf) -> int:
        """Walk and merge what ``buf`` holds; returns the bytes consumed."""
        arr = np.frombuffer(buf, dtype=np.uint8)
        if arr.ctypes.data % 8:
            arr = arr.copy()
        n = self._lib.xt_feed(self._s, arr.ctypes.data, len(arr))
        self._check()
        return int(n)

    def finish(self) -> None:
        self._lib.xt_finish(self._s)
        self._check()

    def _check(self) -> None:
        if self.stats[ST["status"]] == STATUS_NO_MEMORY:
            raise MemoryError("xentrace core: out of memory")

    def take_events(self) -> np.ndarray:
        n = self["events_ready"]
        out = np.empty(n, E.EVENT_DTYPE)
        if n:
            self._lib.xt_take_events(self._s, out.ctypes.data, n)
        return out

    def take_notes(self) -> np.ndarray:
        n = self["n_notes"]
        out = np.zeros(n, NOTE)
        if n:
            self._lib.xt_take_notes(self._s, out.ctypes.data, n)
        return out

    def cells(self, in_place: bool = False) -> Cells:
        """The cells, copied out; ``in_place``: the histograms (the biggest part, n x 256 x 8
        bytes) as a read-only view of the core's own table instead of a copy; the view keeps
        this Core alive and is valid only while nothing more is fed (after finish)."""
        n = self["cells"]
        keys, vals = np.zeros(n, CELL_KEY), np.zeros(n, CELL_VAL)
        if not n:
            return Cells(keys, vals, np.zeros((0, SLOTS), np.int64))
        if not in_place:
            hist = np.zeros((n, SLOTS), np.int64)
            self._lib.xt_export_cells(self._s, keys.ctypes.data, vals.ctypes.data,
                                      hist.ctypes.data, n)
            return Cells(keys, vals, hist)
        self._lib.xt_export_cells(self._s, keys.ctypes.data, vals.ctypes.data, None, n)
        buf = (ctypes.c_int64 * (n * SLOTS)).from_address(self._lib.xt_cells_hist(self._s))
        buf._core = self                        # the view keeps the core (and its memory)
        hist = np.frombuffer(buf, dtype=np.int64).reshape(n, SLOTS)
        hist.flags.writeable = False
        return Cells(keys, vals, hist)

    def close(self) -> None:
        if self._s:
            self.stats = self.stats.copy()      # the view must not outlive the state
            self._lib.xt_free(self._s)
            self._s = None

    def __del__(self):
        try:
            self.close()
        except Exception:                       # pragma: no cover - interpreter shutdown
            pass
