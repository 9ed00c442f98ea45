"""A snapshot's totals as columns, with the deltas to the previous one, grouped column-wise.

``Frame`` holds one row per ``Key`` (domid, vcpu, type, dir, range index, address, counts, service
histograms) and the interval's deltas (a key whose counters went down restarts from zero, as
Prometheus' ``rate()`` treats a reset). ``Frame.group(rows, columns)`` sums the chosen rows per
distinct value of the key columns into ``Group`` s, with a few NumPy passes (``np.unique`` +
``bincount``/``reduceat``) rather than Python work per key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from iotrace.core.aggregate import N_SLOTS, Cell, Key
from iotrace.core.events import DIR_READ, DIR_WRITE


@dataclass
class Group:
    """Sums over a group of keys: totals since start, the interval's deltas, service stats."""
    reqs: int = 0
    bytes: int = 0
    d_count: int = 0
    d_bytes: int = 0
    reads: int = 0             # requests in the interval, by direction
    writes: int = 0
    svc_n: int = 0             # the interval's service times
    svc_sum: int = 0
    hist: np.ndarray | None = None
    svc_min: float = math.inf  # exact extremes since start, where the source keeps them
    svc_max: float = -math.inf


class Frame:
    """A snapshot's totals as columns (one row per Key), with the deltas to the previous frame.

    Grouping is column-wise (``np.unique`` + ``bincount``/``reduceat``), so a refresh costs a few
    NumPy passes over all keys rather than Python work per key and group.
    """

    def __init__(self, totals: dict[Key, Cell], prev: "Frame | None"):
        keys = list(totals)
        cells = [totals[k] for k in keys]
        n = len(keys)
        same_keys = prev is not None and prev.keys == keys   # the usual case between refreshes
        if same_keys:
            self.keys, self.index, self.range_names = prev.keys, prev.index, prev.range_names
            self.domid, self.vcpu, self.type = prev.domid, prev.vcpu, prev.type
            self.dir, self.range, self.addr = prev.dir, prev.range, prev.addr
        else:
            self.keys = keys
            self.index = {k: i for i, k in enumerate(keys)}
            self.range_names = sorted({k.range for k in keys})
            rix = {r: i for i, r in enumerate(self.range_names)}
            cols = np.array([(k.domid, k.vcpu, k.type, k.dir, rix[k.range]) for k in keys],
                            dtype=np.int64).reshape(n, 5)
            self.domid, self.vcpu, self.type, self.dir, self.range = \
                (cols[:, i] for i in range(5))
            self.addr = np.array([k.addr for k in keys], dtype=np.uint64)
        nums = np.array([(c.count, c.bytes, c.service_n, c.service_sum_ns) for c in cells],
                        dtype=np.int64).reshape(n, 4)
        self.count, self.bytes, self.svc_n, self.svc_sum = (nums[:, i] for i in range(4))
        self.hist = np.stack([c.hist for c in cells]).astype(np.int64) if n else \
            np.zeros((0, N_SLOTS), dtype=np.int64)
        self.svc_min = np.array([math.inf if getattr(c, "service_min_ns", None) is None
                                 else c.service_min_ns for c in cells], dtype=np.float64)
        self.svc_max = np.array([-math.inf if getattr(c, "service_max_ns", None) is None
                                 else c.service_max_ns for c in cells], dtype=np.float64)
        # Deltas: cur - prev per key; a key whose counters went down restarts from zero.
        if prev is None:
            self.has_prev = False
            self.d_count = np.zeros(n, dtype=np.int64)
            self.d_bytes = np.zeros(n, dtype=np.int64)
            self.d_svc_n = np.zeros(n, dtype=np.int64)
            self.d_svc_sum = np.zeros(n, dtype=np.int64)
            self.d_hist = np.zeros_like(self.hist)
            return
        self.has_prev = True
        j = np.arange(n, dtype=np.int64) if same_keys else \
            np.array([prev.index.get(k, -1) for k in keys], dtype=np.int64)
        had = j >= 0
        jj = np.where(had, j, 0)

        def sub(cur, old):
            if not len(old):
                return cur.copy()
            return cur - np.where(had.reshape((-1,) + (1,) * (cur.ndim - 1)), old[jj], 0)
        self.d_count = sub(self.count, prev.count)
        self.d_bytes = sub(self.bytes, prev.bytes)
        self.d_svc_n = sub(self.svc_n, prev.svc_n)
        self.d_svc_sum = sub(self.svc_sum, prev.svc_sum)
        self.d_hist = sub(self.hist, prev.hist)
        reset = (self.d_count < 0) | (self.d_bytes < 0) | (self.d_svc_n < 0)
        if len(self.d_hist):
            reset |= (self.d_hist < 0).any(axis=1)
        if reset.any():
            self.d_count[reset] = self.count[reset]
            self.d_bytes[reset] = self.bytes[reset]
            self.d_svc_n[reset] = self.svc_n[reset]
            self.d_svc_sum[reset] = self.svc_sum[reset]
            self.d_hist[reset] = self.hist[reset]

    def group(self, idx: np.ndarray, cols: list[np.ndarray], service: bool = True) -> dict:
        """Sums of the rows ``idx`` grouped by the given key columns: {tuple: Group}."""
        if not len(idx):
            return {}
        # One int64 code per row (mixed radix over each column's distinct values), so a single
        # 1-D np.unique does the grouping.
        code = np.zeros(len(idx), dtype=np.int64)
        levels = []
        for c in cols:
            vals, pos = np.unique(c[idx], return_inverse=True)
            levels.append(vals)
            code = code * len(vals) + pos.reshape(-1)
        ucode, inv = np.unique(code, return_inverse=True)
        inv = inv.reshape(-1)
        g = len(ucode)
        parts = []
        rest = ucode
        for vals in reversed(levels):
            parts.append(vals[rest % len(vals)])
            rest = rest // len(vals)
        uniq_cols = [p.tolist() for p in reversed(parts)]

        def bsum(arr):
            return np.bincount(inv, weights=arr[idx].astype(np.float64), minlength=g)
        reqs, nbytes = bsum(self.count), bsum(self.bytes)
        d_count, d_bytes = bsum(self.d_count), bsum(self.d_bytes)
        d_read = np.where(self.dir == DIR_READ, self.d_count, 0)
        d_write = np.where(self.dir == DIR_WRITE, self.d_count, 0)
        reads, writes = bsum(d_read), bsum(d_write)
        if service:
            svc_n, svc_sum = bsum(self.d_svc_n), bsum(self.d_svc_sum)
            order = np.argsort(inv, kind="stable")
            starts = np.searchsorted(inv[order], np.arange(g))
            rows = idx[order]
            hist = np.add.reduceat(self.d_hist[rows], starts, axis=0)
            smin = np.minimum.reduceat(self.svc_min[rows], starts)
            smax = np.maximum.reduceat(self.svc_max[rows], starts)
        out = {}
        for i, u in enumerate(zip(*uniq_cols)):
            gr = Group(int(reqs[i]), int(nbytes[i]), int(d_count[i]), int(d_bytes[i]),
                    int(reads[i]), int(writes[i]))
            if service:
                gr.svc_n, gr.svc_sum, gr.hist = int(svc_n[i]), int(svc_sum[i]), hist[i]
                gr.svc_min, gr.svc_max = float(smin[i]), float(smax[i])
            out[u] = gr
        return out
