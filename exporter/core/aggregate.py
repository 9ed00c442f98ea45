"""The one aggregator: counts, bytes and service-time distributions per
(domid, vcpu, type, dir, named range, address).

Batches (``iotrace.core.events``) are grouped column-wise with NumPy, so the Python work per batch is
proportional to the number of distinct keys, not to the number of requests. Pre-aggregated sources
(the in-kernel BPF maps of the live probes) add whole cells with ``add_cell``.

Service times are kept as log-linear histograms (as HDR histograms are), with the same slots on
the BPF side (probes/bpf/iotrace_bpf.h ``hist_slot``) and in the xentrace core (xtcore.h
``xt_slot``): durations below 16 ns have a slot each; from there every power of two
[2^(e-1), 2^e) is cut into ``HIST_SUB`` = 8 equal slots, up to 2^34 ns (17.2 s); the last slot
also takes anything longer. ``N_SLOTS`` = 256. ``hist_slots`` computes the slot of each duration,
``SLOT_LOWER_NS``/``SLOT_UPPER_NS`` are the bounds of each slot ([lower, upper), integers lower
.. upper - 1). p50/p95 are read off the histogram by linear interpolation inside a slot and
clamped to the exact minimum and maximum where the source saw them; since a slot is at most
1/8 of its lower bound wide, a quantile is within ``QUANTILE_RELATIVE_ERROR`` = 12.5% of the
exact one for durations below 2^34 ns (exact below 16 ns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np

from iotrace.core.addrmap import AddressMap
from iotrace.core.events import request_bytes

HIST_SUB_BITS = 3                   # 2^3 = 8 slots per power of two
HIST_SUB = 1 << HIST_SUB_BITS
HIST_MAX_EXP = 34                   # full resolution below 2^34 ns (17.2 s)
N_SLOTS = (HIST_MAX_EXP - HIST_SUB_BITS + 1) << HIST_SUB_BITS        # 256


def _slot_bounds(k: int) -> tuple[int, int]:
    """[lower, upper) of slot k in ns."""
    if k < HIST_SUB:
        return k, k + 1
    e = (k >> HIST_SUB_BITS) + HIST_SUB_BITS        # the power of two: [2^(e-1), 2^e)
    j = k & (HIST_SUB - 1)
    shift = e - 1 - HIST_SUB_BITS
    return (HIST_SUB + j) << shift, (HIST_SUB + j + 1) << shift


SLOT_LOWER_NS = np.array([_slot_bounds(k)[0] for k in range(N_SLOTS)], dtype=np.float64)
SLOT_UPPER_NS = np.array([_slot_bounds(k)[1] for k in range(N_SLOTS)], dtype=np.float64)
# A quantile read off the histogram (interpolated inside its slot, clamped to the exact min and
# max) lies in the same slot as the exact one, so it is off by at most the slot's width, which
# is at most 1/HIST_SUB of the slot's lower bound: at most this fraction of the exact value, for
# durations below 2^HIST_MAX_EXP ns (tests/core/test_aggregate.py checks the layout gives it,
# tests/offline/test_rollup.py checks it on samples).
QUANTILE_RELATIVE_ERROR = 1.0 / HIST_SUB


def slot_ending_at(ns: int) -> int:
    """The slot whose upper bound is ``ns`` (ValueError if no slot ends there): the cumulative
    count of slots 0..k is the number of durations below ``ns``."""
    k = int(np.searchsorted(SLOT_UPPER_NS, ns))
    if k >= N_SLOTS or SLOT_UPPER_NS[k] != ns:
        raise ValueError(f"no histogram slot ends at {ns} ns")
    return k

class Key(NamedTuple):
    domid: int
    vcpu: int
    type: int
    dir: int
    range: str
    addr: int


@dataclass
class Cell:
    count: int = 0                 # requests (ioreqs / trace records)
    bytes: int = 0                 # size x count, summed where the size is known
    service_n: int = 0             # requests with a known service time
    service_sum_ns: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(N_SLOTS, dtype=np.int64))
    # Exact extremes where the source saw each duration (events); None for map-only sources.
    # Quantiles read off the histogram are clamped to them (a lone sample reads back exactly).
    service_min_ns: int | None = None
    service_max_ns: int | None = None

    def add(self, other: "Cell") -> None:
        self.count += other.count
        self.bytes += other.bytes
        self.service_n += other.service_n
        self.service_sum_ns += other.service_sum_ns
        self.hist += other.hist
        self.service_min_ns = _opt(min, self.service_min_ns, other.service_min_ns)
        self.service_max_ns = _opt(max, self.service_max_ns, other.service_max_ns)

    def service_avg_seconds(self) -> float | None:
        return self.service_sum_ns / self.service_n / 1e9 if self.service_n else None

    def service_quantile_seconds(self, q: float) -> float | None:
        if not self.service_n:
            return None
        ns = hist_quantile_ns(self.hist, q)
        if self.service_min_ns is not None:
            ns = max(ns, self.service_min_ns)
        if self.service_max_ns is not None:
            ns = min(ns, self.service_max_ns)
        return ns / 1e9


def _opt(fn, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return fn(a, b)


def hist_slots(ns: np.ndarray) -> np.ndarray:
    """Slot index of each duration in ns (see the module doc); negative durations go to slot
    0, durations of 2^34 ns and more to the last slot."""
    ns = np.asarray(ns, dtype=np.int64)
    v = np.maximum(ns, 0)
    # frexp gives e with 2^(e-1) <= x < 2^e: the bit length, exact for integers below 2^53 (and
    # larger ones are past 2^34 anyway)
    _, e = np.frexp(v.astype(np.float64))
    e = e.astype(np.int64)
    shift = np.maximum(e - 1 - HIST_SUB_BITS, 0)
    sub = (v >> shift) & (HIST_SUB - 1)
    out = np.where(e <= HIST_SUB_BITS, v, ((e - HIST_SUB_BITS) << HIST_SUB_BITS) | sub)
    return np.where(e > HIST_MAX_EXP, N_SLOTS - 1, out)


def hist_quantile_ns(hist: np.ndarray, q: float) -> float:
    """The q-quantile (0..1) of a histogram, interpolating linearly within the slot between the
    first and the last duration it can hold (a slot of one value reads back exactly)."""
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    rank = q * total
    cum = np.cumsum(hist)
    k = int(np.searchsorted(cum, rank, side="left"))
    k = min(k, N_SLOTS - 1)
    before = int(cum[k - 1]) if k else 0
    inside = int(hist[k])
    frac = (rank - before) / inside if inside else 0.0
    lo, hi = SLOT_LOWER_NS[k], SLOT_UPPER_NS[k] - 1
    return float(lo + (hi - lo) * min(max(frac, 0.0), 1.0))


def hist_quantiles_ns(hist: np.ndarray, q: float) -> np.ndarray:
    """``hist_quantile_ns`` of each row of a 2-D array of histograms (NaN for empty rows)."""
    hist = np.asarray(hist, dtype=np.int64).reshape(-1, N_SLOTS)
    out = np.full(len(hist), np.nan)
    total = hist.sum(axis=1)
    rows = np.flatnonzero(total)
    if not len(rows):
        return out
    h = hist[rows]
    cum = np.cumsum(h, axis=1)
    rank = q * total[rows]
    k = np.minimum((cum < rank[:, None]).sum(axis=1), N_SLOTS - 1)   # searchsorted, left
    r = np.arange(len(rows))
    before = np.where(k > 0, cum[r, np.maximum(k - 1, 0)], 0)
    inside = h[r, k]
    frac = np.divide(rank - before, inside, out=np.zeros(len(rows)), where=inside > 0)
    lo, hi = SLOT_LOWER_NS[k], SLOT_UPPER_NS[k] - 1
    out[rows] = lo + (hi - lo) * np.clip(frac, 0.0, 1.0)
    return out


def _unique_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for the key records above, same order and result,
    without NumPy's slow generic sort of structured arrays (about 13x faster): the fields are
    packed, order-preserving, into three uint64 columns and lexsorted."""
    n = len(keys)
    if n == 0:
        return keys[:0], np.zeros(0, dtype=np.int64)
    dom, vcpu, rng = keys["domid"], keys["vcpu"], keys["range"]
    if (dom.min() >= -1 and dom.max() < 1 << 16 and vcpu.min() >= -1 and vcpu.max() < 1 << 16
            and rng.min() >= 0 and rng.max() < 1 << 21 and keys["dir"].max() <= 1):
        # the usual case: everything but the address fits one uint64, order-preserving
        k1 = ((dom.astype(np.int64) + 1).astype(np.uint64) << np.uint64(47)) \
            | ((vcpu.astype(np.int64) + 1).astype(np.uint64) << np.uint64(30)) \
            | (keys["type"].astype(np.uint64) << np.uint64(22)) \
            | (keys["dir"].astype(np.uint64) << np.uint64(21)) | rng.astype(np.uint64)
        order = np.lexsort((keys["addr"], k1))
        s1, s3 = k1[order], keys["addr"][order]
        first = np.ones(n, dtype=bool)
        first[1:] = (s1[1:] != s1[:-1]) | (s3[1:] != s3[:-1])
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.cumsum(first) - 1
        return keys[order[first]], inverse
    bias = np.int64(1 << 31)
    k1 = ((keys["domid"].astype(np.int64) + bias).astype(np.uint64) << np.uint64(32)) \
        | (keys["vcpu"].astype(np.int64) + bias).astype(np.uint64)
    k2 = (keys["type"].astype(np.uint64) << np.uint64(40)) \
        | (keys["dir"].astype(np.uint64) << np.uint64(32)) \
        | (keys["range"].astype(np.int64) + bias).astype(np.uint64)
    k3 = keys["addr"]
    order = np.lexsort((k3, k2, k1))
    s1, s2, s3 = k1[order], k2[order], k3[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1]) | (s3[1:] != s3[:-1])
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return keys[order[first]], inverse


class Aggregator:
    """Per-key totals over everything added so far. Not thread-safe: one writer, or lock it."""

    def __init__(self, addrmap: AddressMap | None = None, keep_addr: bool = True):
        self.addrmap = addrmap or AddressMap.default()
        self.keep_addr = keep_addr
        self.cells: dict[Key, Cell] = {}
        self.events = 0

    def add_batch(self, batch: np.ndarray) -> None:
        """Fold a batch of ``EVENT_DTYPE`` rows into the totals (column-wise)."""
        n = len(batch)
        if n == 0:
            return
        self.events += n
        rng = self.addrmap.lookup(batch["type"], batch["addr"])
        addr = batch["addr"] if self.keep_addr else np.zeros(n, dtype=np.uint64)
        keys = np.empty(n, dtype=[("domid", "<i4"), ("vcpu", "<i4"), ("type", "u1"),
                                  ("dir", "u1"), ("range", "<i4"), ("addr", "<u8")])
        keys["domid"], keys["vcpu"] = batch["domid"], batch["vcpu"]
        keys["type"], keys["dir"] = batch["type"], batch["dir"]
        keys["range"], keys["addr"] = rng, addr
        uniq, inverse = _unique_keys(keys)
        m = len(uniq)
        counts = np.bincount(inverse, minlength=m)
        nbytes = np.bincount(inverse, weights=request_bytes(batch).astype(np.float64), minlength=m)
        svc = batch["service_ns"]
        known = svc >= 0
        svc_n = np.bincount(inverse[known], minlength=m)
        svc_sum = np.bincount(inverse[known], weights=svc[known].astype(np.float64), minlength=m)
        hist = np.bincount(inverse[known] * N_SLOTS + hist_slots(svc[known]),
                           minlength=m * N_SLOTS).reshape(m, N_SLOTS)
        svc_min = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
        svc_max = np.full(m, -1, dtype=np.int64)
        if known.any():
            np.minimum.at(svc_min, inverse[known], svc[known])
            np.maximum.at(svc_max, inverse[known], svc[known])
        names = self.addrmap.names
        cells = self.cells
        # Python numbers for the per-key loop (indexing NumPy arrays per key costs several times
        # more); rint rounds half to even like round() did.
        for u, c, nb, sn, ss, lo, hi, h in zip(
                uniq.tolist(), counts.tolist(), np.rint(nbytes).tolist(), svc_n.tolist(),
                np.rint(svc_sum).tolist(), svc_min.tolist(), svc_max.tolist(), hist):
            key = Key(u[0], u[1], u[2], u[3], names[u[4]], u[5])
            cell = cells.get(key)
            if cell is None:
                cell = cells[key] = Cell()
            cell.count += c
            cell.bytes += int(nb)
            if sn:
                cell.service_n += sn
                cell.service_sum_ns += int(ss)
                cell.hist += h
                old = cell.service_min_ns
                cell.service_min_ns = lo if old is None or lo < old else old
                old = cell.service_max_ns
                cell.service_max_ns = hi if old is None or hi > old else old

    def add_cell(self, key: Key, cell: Cell) -> None:
        """Add pre-aggregated totals (e.g. one BPF map entry) under ``key``."""
        if not self.keep_addr and key.addr:
            key = key._replace(addr=0)
        mine = self.cells.get(key)
        if mine is None:
            mine = self.cells[key] = Cell()
        mine.add(cell)
        self.events += cell.count

    def rows(self) -> list[tuple[Key, Cell]]:
        return sorted(self.cells.items(), key=lambda kv: kv[0])

    def rollup(self, fields: Iterable[str]) -> dict[tuple, Cell]:
        """Totals grouped by a subset of the key fields, e.g. ("domid", "vcpu", "range")."""
        fields = tuple(fields)
        out: dict[tuple, Cell] = {}
        for key, cell in self.cells.items():
            k = tuple(getattr(key, f) for f in fields)
            acc = out.get(k)
            if acc is None:
                acc = out[k] = Cell()
            acc.add(cell)
        return out

    def drop_domain(self, domid: int) -> None:
        for key in [k for k in self.cells if k.domid == domid]:
            del self.cells[key]
