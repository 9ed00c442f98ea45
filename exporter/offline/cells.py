"""Cells: I/O totals per key, in columns - what a report needs instead of every event.

A ``CellTable`` has one row per distinct key and, per row, the request count, bytes (size x
count where known), service-time count / sum / min / max and the log-linear histogram of
``iotrace.core.aggregate`` (its N_SLOTS slots, 8 per power of two). Key columns are named
fields; the full key is ``KEY_FIELDS``. ``group(fields, addrmap)`` sums rows over any subset of
``KEY_FIELDS`` plus ``"range"`` (the address map's name for (type, addr)), so a report picks its
grouping by naming fields.

Built from the xentrace core's cells (``from_native``: aggregated in C, no events) or from event
batches (``from_events``: recordings); ``Accumulator`` folds batches in as they come, so memory
follows the number of keys, not the number of requests.
"""
from __future__ import annotations

import numpy as np

from iotrace.core.aggregate import N_SLOTS, hist_quantile_ns, hist_quantiles_ns, hist_slots
from iotrace.core.events import request_bytes

KEY_FIELDS = ("domid", "vcpu", "type", "dir", "addr", "rip")
GROUP_FIELDS = KEY_FIELDS + ("range",)
_KEY_TYPES = {"domid": np.int64, "vcpu": np.int64, "type": np.int64, "dir": np.int64,
              "addr": np.uint64, "rip": np.uint64, "range": np.int64}
_I64_MAX = np.iinfo(np.int64).max
_SLOT_BLOCK = 32                 # histogram columns summed at a time when grouping


class CellTable:
    def __init__(self, keys: dict[str, np.ndarray], count, nbytes, svc_n, svc_sum, svc_min,
                 svc_max, hist, range_names: list[str] | None = None):
        self.keys = {k: np.asarray(v, dtype=_KEY_TYPES[k]) for k, v in keys.items()}
        self.count = np.asarray(count, np.int64)
        self.bytes = np.asarray(nbytes, np.int64)
        self.svc_n = np.asarray(svc_n, np.int64)
        self.svc_sum = np.asarray(svc_sum, np.int64)
        self.svc_min = np.asarray(svc_min, np.int64)      # INT64_MAX where svc_n == 0
        self.svc_max = np.asarray(svc_max, np.int64)      # -1 where svc_n == 0
        self.hist = np.asarray(hist, np.int64).reshape(len(self.count), N_SLOTS)
        self.range_names = range_names                  # names of the "range" key, if any

    # ---- construction
    @classmethod
    def empty(cls, fields=KEY_FIELDS) -> "CellTable":
        z = np.zeros(0, np.int64)
        return cls({f: z for f in fields}, z, z, z, z, z, z, np.zeros((0, N_SLOTS), np.int64))

    @classmethod
    def from_native(cls, cells) -> "CellTable":
        """From ``iotrace.xentrace.native.Cells`` (xentrace records no sizes: bytes 0)."""
        k, v = cells.keys, cells.vals
        n = len(k)
        svc_n = v["svc_n"].astype(np.int64)
        return cls({f: k[f] for f in KEY_FIELDS}, v["count"].astype(np.int64),
                   np.zeros(n, np.int64), svc_n, v["svc_sum_ns"].astype(np.int64),
                   np.where(svc_n > 0, v["svc_min_ns"], _I64_MAX),
                   np.where(svc_n > 0, v["svc_max_ns"], -1), cells.hist)

    @classmethod
    def from_events(cls, batch: np.ndarray, rip: bool = True) -> "CellTable":
        """One row per distinct key of an EVENT_DTYPE batch (rip kept only if ``rip``)."""
        n = len(batch)
        keys = {f: batch[f].astype(_KEY_TYPES[f]) for f in KEY_FIELDS}
        if not rip:
            keys["rip"] = np.zeros(n, np.uint64)
        if n == 0:
            return cls.empty()
        order, first, inv, m = _group_index([keys[f] for f in KEY_FIELDS])
        svc = batch["service_ns"].astype(np.int64)
        known = svc >= 0
        ik = inv[known]
        lo = np.full(m, _I64_MAX, np.int64)
        hi = np.full(m, -1, np.int64)
        np.minimum.at(lo, ik, svc[known])
        np.maximum.at(hi, ik, svc[known])
        hist = np.bincount(ik * N_SLOTS + hist_slots(svc[known]),
                           minlength=m * N_SLOTS).reshape(m, N_SLOTS)
        return cls({f: keys[f][order[first]] for f in KEY_FIELDS},
                   np.bincount(inv, minlength=m),
                   np.bincount(inv, weights=request_bytes(batch).astype(np.float64),
                               minlength=m).round().astype(np.int64),
                   np.bincount(ik, minlength=m),
                   np.bincount(ik, weights=svc[known].astype(np.float64),
                               minlength=m).round().astype(np.int64), lo, hi, hist)

    @classmethod
    def concat(cls, tables: list["CellTable"]) -> "CellTable":
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty()
        if len(tables) == 1:
            return tables[0]
        fields = list(tables[0].keys)
        return cls({f: np.concatenate([t.keys[f] for t in tables]) for f in fields},
                   *(np.concatenate([getattr(t, a) for t in tables])
                     for a in ("count", "bytes", "svc_n", "svc_sum", "svc_min", "svc_max",
                               "hist")),
                   range_names=tables[0].range_names)._grouped(fields)

    # ---- grouping
    def __len__(self) -> int:
        return len(self.count)

    def group(self, fields, addrmap=None) -> "CellTable":
        """Totals grouped by ``fields`` (names of GROUP_FIELDS, in the order given)."""
        fields = tuple(fields)
        bad = [f for f in fields if f not in GROUP_FIELDS]
        if bad:
            raise ValueError(f"cannot group by {bad[0]!r} (fields: {', '.join(GROUP_FIELDS)})")
        keys = dict(self.keys)
        names = self.range_names
        if "range" in fields and "range" not in keys:
            if addrmap is None:
                raise ValueError("grouping by range needs an address map")
            keys["range"] = addrmap.lookup(self.keys["type"].astype(np.uint8),
                                           self.keys["addr"]).astype(np.int64)
            names = list(addrmap.names)
        t = CellTable({f: keys[f] for f in fields}, self.count, self.bytes, self.svc_n,
                      self.svc_sum, self.svc_min, self.svc_max, self.hist, names)
        return t._grouped(fields)

    def with_range(self, addrmap) -> "CellTable":
        """The same rows with a ``range`` key column (the address map's index), not regrouped."""
        if "range" in self.keys:
            return self
        keys = dict(self.keys)
        keys["range"] = addrmap.lookup(self.keys["type"].astype(np.uint8),
                                       self.keys["addr"]).astype(np.int64)
        return CellTable(keys, self.count, self.bytes, self.svc_n, self.svc_sum, self.svc_min,
                         self.svc_max, self.hist, list(addrmap.names))

    def take(self, rows) -> "CellTable":
        """The rows at ``rows`` (indices or a bool mask), in that order."""
        return CellTable({f: v[rows] for f, v in self.keys.items()}, self.count[rows],
                         self.bytes[rows], self.svc_n[rows], self.svc_sum[rows],
                         self.svc_min[rows], self.svc_max[rows], self.hist[rows],
                         self.range_names)

    def _grouped(self, fields) -> "CellTable":
        if len(self) == 0:
            return CellTable({f: self.keys[f][:0] for f in fields},
                             *([np.zeros(0, np.int64)] * 6), np.zeros((0, N_SLOTS), np.int64),
                             self.range_names)
        order, first, inv, m = _group_index([self.keys[f] for f in fields])
        if m == len(self):
            # every row is its own group: the same table under these keys, nothing copied (a
            # report of many keys holds their histograms once)
            return CellTable({f: self.keys[f] for f in fields}, self.count, self.bytes,
                             self.svc_n, self.svc_sum, self.svc_min, self.svc_max, self.hist,
                             self.range_names)
        starts = np.flatnonzero(first)

        def total(a):
            return np.add.reduceat(a[order], starts, axis=0)

        lo = np.full(m, _I64_MAX, np.int64)
        hi = np.full(m, -1, np.int64)
        np.minimum.at(lo, inv, self.svc_min)
        np.maximum.at(hi, inv, self.svc_max)
        # the histograms a block of slots at a time: the sorted copy is a block, not the table
        hist = np.empty((m, N_SLOTS), np.int64)
        for c in range(0, N_SLOTS, _SLOT_BLOCK):
            hist[:, c:c + _SLOT_BLOCK] = total(self.hist[:, c:c + _SLOT_BLOCK])
        return CellTable({f: self.keys[f][order[first]] for f in fields}, total(self.count),
                         total(self.bytes), total(self.svc_n), total(self.svc_sum), lo, hi,
                         hist, self.range_names)

    # ---- reading
    def key(self, i: int, field: str):
        v = int(self.keys[field][i])
        if field == "range" and self.range_names is not None:
            return self.range_names[v]
        return v

    def avg_seconds(self, i: int) -> float | None:
        n = int(self.svc_n[i])
        return int(self.svc_sum[i]) / n / 1e9 if n else None

    def quantiles_seconds(self, q: float) -> np.ndarray:
        """``quantile_seconds`` of every row at once (NaN where a row has no service time)."""
        ns = hist_quantiles_ns(self.hist, q)
        timed = self.svc_n > 0
        ns[timed] = np.minimum(np.maximum(ns[timed], self.svc_min[timed]), self.svc_max[timed])
        return ns / 1e9

    def quantile_seconds(self, i: int, q: float) -> float | None:
        """q-quantile off the histogram, clamped to the exact extremes (as Cell does)."""
        if not self.svc_n[i]:
            return None
        ns = hist_quantile_ns(self.hist[i], q)
        ns = min(max(ns, int(self.svc_min[i])), int(self.svc_max[i]))
        return ns / 1e9


def _group_index(cols):
    """order (sorting the rows by cols), first (a new group starts at that sorted position),
    inv (group of each row) and the number of groups."""
    n = len(cols[0]) if cols else 0
    order = np.lexsort(cols[::-1]) if cols else np.arange(n)
    first = np.zeros(n, bool)
    if n:
        first[0] = True
        for c in cols:
            cs = c[order]
            first[1:] |= cs[1:] != cs[:-1]
    grp = np.cumsum(first) - 1
    inv = np.empty(n, np.int64)
    inv[order] = grp
    return order, first, inv, int(grp[-1]) + 1 if n else 0


class Accumulator:
    """Folds event batches (or tables) into one CellTable, merging every ``every`` parts."""

    def __init__(self, rip: bool = True, every: int = 32):
        self.rip, self.every = rip, every
        self._parts: list[CellTable] = []
        self.requests = 0

    def add_events(self, batch: np.ndarray) -> None:
        if len(batch):
            self.requests += len(batch)
            self.add(CellTable.from_events(batch, rip=self.rip))

    def add(self, table: CellTable) -> None:
        self._parts.append(table)
        if len(self._parts) >= self.every:
            self._parts = [CellTable.concat(self._parts)]

    def table(self) -> CellTable:
        self._parts = [CellTable.concat(self._parts)]
        return self._parts[0]
