"""ctypes mirrors of the structs in probes/bpf/iotrace_bpf.h, with their sizes checked at import.

The header is the one declaration; these mirrors must match it field for field. ``check_sizes`` runs
at import time, and the loader checks them again against the sizes BCC reports for the maps.
"""
from __future__ import annotations

import ctypes as ct

import numpy as np


class XenIoreq(ct.Structure):
    """ioreq_t, xen/include/public/hvm/ioreq.h (32 bytes)."""
    _fields_ = [("addr", ct.c_uint64), ("data", ct.c_uint64), ("count", ct.c_uint32),
                ("size", ct.c_uint32), ("vp_eport", ct.c_uint32), ("_pad0", ct.c_uint16),
                ("flags", ct.c_uint8), ("type", ct.c_uint8)]


class IoreqKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("vcpu", ct.c_int32), ("type", ct.c_uint8),
                ("dir", ct.c_uint8), ("_pad", ct.c_uint16), ("size", ct.c_uint32),
                ("addr", ct.c_uint64)]


HIST_SLOTS = 256          # HIST_SLOTS in the header: iotrace.core.aggregate.N_SLOTS


class IoreqStats(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("bytes", ct.c_uint64), ("svc_n", ct.c_uint64),
                ("svc_sum_ns", ct.c_uint64), ("hist", ct.c_uint64 * HIST_SLOTS)]


class IoreqEvent(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("tgid", ct.c_uint32), ("tid", ct.c_uint32),
                ("vcpu", ct.c_int32), ("type", ct.c_uint8), ("dir", ct.c_uint8),
                ("data_is_ptr", ct.c_uint8), ("df", ct.c_uint8), ("size", ct.c_uint32),
                ("count", ct.c_uint32), ("addr", ct.c_uint64), ("data", ct.c_uint64),
                ("service_ns", ct.c_int64)]


class Inflight(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("k", IoreqKey), ("data", ct.c_uint64),
                ("count", ct.c_uint32), ("data_is_ptr", ct.c_uint8), ("df", ct.c_uint8),
                ("active", ct.c_uint16), ("req", ct.c_uint64)]


# The sizes written in the header's comments.
EXPECTED_SIZES = {XenIoreq: 32, IoreqKey: 24, IoreqStats: 2080, IoreqEvent: 56,
                  Inflight: 56}

# Metrics-mode address buckets (MMIO_BUCKET_MASK, PCI_BUCKET_MASK and IOREQ_TYPE_* in the header;
# tests/test_probes_bucket.py checks these against it).
IOREQ_TYPE_PIO, IOREQ_TYPE_COPY, IOREQ_TYPE_PCI_CONFIG = 0, 1, 2
MMIO_BUCKET_MASK = 0xFFFF_FFFF_FFFF_F000      # the 4 KiB page
PCI_BUCKET_MASK = 0xFFFF_FFFF_0000_0000       # SEG/BUS/DEV/FN, register dropped

# Counter indices (CNT_* in the header).
CNT_LOST_EVENTS, CNT_STATS_FULL, CNT_READ_ERRORS, CNT_NO_ENTRY = range(4)
N_COUNTERS = 4
COUNTER_NAMES = ("lost_events", "stats_full", "read_errors", "no_entry")

# The ring buffer record as a NumPy dtype (same layout), for batch conversion of many events.
EVENT_RECORD_DTYPE = np.dtype({
    "names": [f[0] for f in IoreqEvent._fields_],
    "formats": ["<u8", "<u4", "<u4", "<i4", "u1", "u1", "u1", "u1", "<u4", "<u4", "<u8", "<u8",
                "<i8"],
    "offsets": [getattr(IoreqEvent, f[0]).offset for f in IoreqEvent._fields_],
    "itemsize": ct.sizeof(IoreqEvent),
})


def check_sizes() -> None:
    for cls, size in EXPECTED_SIZES.items():
        if ct.sizeof(cls) != size:
            raise AssertionError(f"{cls.__name__}: ctypes size {ct.sizeof(cls)} != {size} "
                                 f"declared in iotrace_bpf.h")


check_sizes()
