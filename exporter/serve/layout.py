"""How one source's cells fold into Prometheus series, column-wise (the scrape's hot path).

A ``Layout`` says which cells (``iotrace.core.source.TotalsColumns`` rows) make which series and
holds the label text of every series; it is kept between scrapes while the source's keys and
domain names stay the same (extended when keys are added), so a scrape sums columns with NumPy
group sums (``Groups``) and formats numbers. ``fold`` does one source's sums and adds its blocks
(``CounterBlock``, ``RowsBlock``, ``HistBlock``: the series of one family from one source, ready to
be rendered by ``iotrace.serve.render`` or listed as samples by ``collect()``) to the families.

Histogram buckets (``iotrace.core.metrics.BUCKET_BOUNDS_NS``) are read off the log-linear
histograms of iotrace.core.aggregate: every bound is the upper bound of a slot
(``slot_ending_at``), so the cumulative count of the slots up to it is the number of durations
below it. (A duration equal to a bound lands in the next slot, so it is counted from the next
bucket on: Prometheus' le is "less or equal"; the difference is one ns.)
"""
from __future__ import annotations

import copy

import numpy as np

from iotrace.core.addrmap import OTHER
from iotrace.core.aggregate import N_SLOTS, slot_ending_at
from iotrace.core.domains import display_name
from iotrace.core.events import DIR_NAMES, TYPE_NAMES
from iotrace.core.metrics import BUCKET_BOUNDS_NS, BY_NAME
from iotrace.serve.exposition import (
    BUCKET_LE,
    FIRST,
    FIRST_LABELS,
    HIST,
    HIST_LABELS,
    HIST_LINES,
    fmt_values,
    hist_prefixes,
    line_prefix,
    pieces,
)

_TYPE_LABEL = dict(TYPE_NAMES)
_DIR_LABEL = dict(DIR_NAMES)
_BUCKET_COLS = [slot_ending_at(b) for b in BUCKET_BOUNDS_NS]
# Slot segments [0, c0], (c0, c1], ... of the histogram (and the rest): their cumulative sums are
# the bucket counts (slots 0..c_j).
_SEG_STARTS = np.array([0] + [c + 1 for c in _BUCKET_COLS], dtype=np.intp)
assert _SEG_STARTS[-1] < N_SLOTS and (np.diff(_SEG_STARTS) > 0).all()


def select(mask, vis):
    """Row indices where ``mask`` (None: all) and ``vis`` (None: all) hold; None for all rows."""
    if mask is None:
        mask = vis
    elif vis is not None:
        mask = mask & vis
    if mask is None or mask.all():
        return None
    return np.flatnonzero(mask)


class Groups:
    """Rows of a column summed per group (``gid``: group index of each row, 0..n_groups-1)."""

    __slots__ = ("identity", "order", "starts")

    def __init__(self, gid: np.ndarray, n_groups: int):
        n = len(gid)
        self.identity = n == n_groups and bool((gid == np.arange(n)).all())
        self.order = self.starts = None
        if not self.identity:
            self.order = np.argsort(gid, kind="stable")
            s = gid[self.order]
            self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])

    def sum(self, col: np.ndarray) -> np.ndarray:
        if self.identity:
            return col
        return np.add.reduceat(col[self.order], self.starts, axis=0)


class Layout:
    """How one source's cells fold into series, with the label strings of every series: kept
    while the source's keys and domain names stay the same, extended (as a new object: blocks
    of earlier scrapes may still read the old one) when keys are added, rebuilt otherwise."""

    def __init__(self, name, names, vcpu_label, pcache):
        self.name, self.names, self.vcpu_label = name, names, vcpu_label
        self._pcache = pcache
        self.keys: list = []
        self._cidx: dict = {}        # count key -> count group (series of the counters)
        self._sidx: dict = {}        # service key -> service group (histogram series)
        self._dri: dict = {}         # (domid, range) -> pair
        self._domi: dict = {}        # domid -> index in domids
        self._dlab: dict = {}        # domid -> (source, domain, domid) label values
        self._vcpus: dict = {}       # vcpu -> its label value
        self._cg = self._sg = np.zeros(0, dtype=np.int64)    # group of every key
        self.c_labels, self.s_labels, self.dr_labels = [], [], []
        self.domids, self.dr_pairs = [], []
        self.c_domi = self.s_domi = self.c_dr = self.dr_domi = np.zeros(0, dtype=np.intp)
        self.io_labelnames = BY_NAME["iotrace_ioreqs"].labels_without(
            () if vcpu_label else ("vcpu",))
        self._prefix_lists: dict[str, list] = {}
        self._row: dict | None = None            # Key -> row, for order_of()
        self.c = self.s = None

    def labels_hold(self, names: dict) -> bool:
        """Whether the domains of this layout keep their domain labels under ``names``."""
        return names == self.names or all(display_name(d, names) == lab[1]
                                          for d, lab in self._dlab.items())

    def extended(self, keys: list, kcache: dict, names: dict) -> "Layout":
        """A new layout for ``keys``, which start with ``self.keys``: this one's series plus
        those of the keys after them (work in proportion to the new keys only). ``names``:
        domain names, under which this layout's labels hold."""
        new = copy.copy(self)
        new.names = names
        for attr in ("_cidx", "_sidx", "_dri", "_domi", "_dlab", "_vcpus", "c_labels",
                     "s_labels", "dr_labels", "domids", "dr_pairs", "_prefix_lists"):
            setattr(new, attr, copy.copy(getattr(self, attr)))
        new._row = None
        new._add(keys[len(self.keys):], kcache)
        new.keys = keys
        return new

    def _add(self, keys, kcache) -> None:
        vcpu_label = self.vcpu_label
        # Key -> (count key, service key): label work done once per key.
        pairs = []
        for key in keys:
            kc = kcache.get(key)
            if kc is None:
                tlabel = _TYPE_LABEL.get(key.type) or OTHER
                kc = kcache[key] = (
                    (key.domid, key.vcpu if vcpu_label else None, tlabel,
                     _DIR_LABEL.get(key.dir) or OTHER, key.range),
                    (key.domid, tlabel, key.range))
            pairs.append(kc)
        cidx, sidx, dri, domi = self._cidx, self._sidx, self._dri, self._domi
        nc0, ns0, nd0, ndom0 = len(cidx), len(sidx), len(dri), len(domi)
        n = len(pairs)
        cg = np.fromiter((cidx.setdefault(ck, len(cidx)) for ck, _ in pairs), np.int64, n)
        sg = np.fromiter((sidx.setdefault(sk, len(sidx)) for _, sk in pairs), np.int64, n)
        self._cg = np.concatenate([self._cg, cg])
        self._sg = np.concatenate([self._sg, sg])
        self.c = Groups(self._cg, len(cidx))
        self.s = Groups(self._sg, len(sidx))
        new_c = list(cidx)[nc0:]
        new_s = list(sidx)[ns0:]
        # (source, domain, domid) labels per domain, vcpu label strings: made once
        dlab, vcpus, name = self._dlab, self._vcpus, self.name
        for d in {ck[0] for ck in new_c} | {sk[0] for sk in new_s}:
            if d not in dlab:
                dlab[d] = (name, display_name(d, self.names), str(d))
                domi[d] = len(domi)
        if vcpu_label:
            for v in {ck[1] for ck in new_c} - vcpus.keys():
                vcpus[v] = str(v)
        c_labels = [dlab[d] + ((vcpus[v], tl, dl, rng) if vcpu_label else (tl, dl, rng))
                    for d, v, tl, dl, rng in new_c]
        s_labels = [dlab[d] + (tl, rng) for d, tl, rng in new_s]
        self.c_labels += c_labels
        self.s_labels += s_labels
        c_dr = np.fromiter((dri.setdefault((ck[0], ck[4]), len(dri)) for ck in new_c),
                           np.intp, len(new_c))
        new_dr = list(dri)[nd0:]
        self.c_domi = np.concatenate([self.c_domi, np.fromiter(
            (domi[ck[0]] for ck in new_c), np.intp, len(new_c))])
        self.s_domi = np.concatenate([self.s_domi, np.fromiter(
            (domi[sk[0]] for sk in new_s), np.intp, len(new_s))])
        self.c_dr = np.concatenate([self.c_dr, c_dr])
        self.dr_domi = np.concatenate([self.dr_domi, np.fromiter(
            (domi[d] for d, _ in new_dr), np.intp, len(new_dr))])
        self.domids += list(domi)[ndom0:]
        self.dr_pairs += new_dr
        self.dr_labels += [dlab[d] + (rng,) for d, rng in new_dr]
        # label text of the new series, where the old ones' was made already
        for sample, lst in self._prefix_lists.items():
            self._prefix_lists[sample] = lst + self._make_prefixes(
                sample, {HIST: s_labels, FIRST: self.dr_labels[nd0:]}.get(sample, c_labels),
                {})

    def order_of(self, keys: list):
        """For the same keys in another order (a source that lists its cells in map order,
        with new Key objects), the rows of ``keys`` to take, in this layout's order; None when
        ``keys`` are not the same set."""
        n = len(self.keys)
        if len(keys) != n:
            return None
        if self._row is None:
            self._row = {k: i for i, k in enumerate(self.keys)}
        try:
            rows = np.fromiter(map(self._row.__getitem__, keys), np.intp, n)
        except KeyError:
            return None
        if n and np.bincount(rows, minlength=n).max() != 1:
            return None
        order = np.empty(n, dtype=np.intp)
        order[rows] = np.arange(n)
        return order

    def prefixes(self, sample: str) -> list:
        """The "\\n<sample>{labels} " of every series of ``sample`` (16 per histogram series:
        13 buckets, +Inf, _count, _sum), made on first use and kept with the layout."""
        out = self._prefix_lists.get(sample)
        if out is not None:
            return out
        labels = {HIST: self.s_labels, FIRST: self.dr_labels}.get(sample, self.c_labels)
        new: dict = {}
        out = self._make_prefixes(sample, labels, self._pcache.get(sample, {}), new)
        self._pcache[sample] = new     # only the series of this layout: bounded
        self._prefix_lists[sample] = out
        return out

    def _make_prefixes(self, sample, all_labels, old, new=None) -> list:
        out = []
        if sample == HIST:
            for labels in all_labels:
                pre = old.get(labels)
                if pre is None:
                    pre = hist_prefixes(HIST, HIST_LABELS, labels)
                if new is not None:
                    new[labels] = pre
                out.extend(pre)
        else:
            labelnames = FIRST_LABELS if sample == FIRST else self.io_labelnames
            for labels in all_labels:
                pre = old.get(labels)
                if pre is None:
                    pre = "\n" + line_prefix(sample, labelnames, labels)
                if new is not None:
                    new[labels] = pre
                out.append(pre)
        return out


def gather(items: list, rows) -> list:
    if rows is None:
        return items
    rows = rows.tolist()
    if not rows:
        return []
    return [items[i] for i in rows]


class CounterBlock:
    """The series of one counter family from one source: values of the layout's count groups
    (``rows``: the groups to export, None for all)."""

    __slots__ = ("lay", "sample", "rows", "values")

    def __init__(self, lay, sample, rows, values):
        self.lay, self.sample, self.rows = lay, sample, rows
        self.values = values if rows is None else values[rows]

    def iter_samples(self, names):
        labels = gather(self.lay.c_labels, self.rows)
        for lab, v in zip(labels, self.values.tolist()):
            yield self.sample, names, lab, v

    def render(self):
        pre = self.lay.prefixes(self.sample)
        if self.rows is not None:
            pre = gather(pre, self.rows)
        return pieces(pre, list(map(str, self.values.tolist())))


class RowsBlock:
    """Gauge values of the layout's (domain, range) pairs (``rows``: the pairs to export, None
    for all), ``values`` in that order."""

    __slots__ = ("lay", "sample", "rows", "values")

    def __init__(self, lay, sample, rows, values):
        self.lay, self.sample, self.rows, self.values = lay, sample, rows, values

    def iter_samples(self, names):
        for lab, v in zip(gather(self.lay.dr_labels, self.rows), self.values):
            yield self.sample, names, lab, v

    def render(self):
        return pieces(gather(self.lay.prefixes(self.sample), self.rows),
                       fmt_values(self.values))


class HistBlock:
    """The histogram series of one source: cumulative bucket counts, count and sum per service
    group of the layout (``rows``: the groups to export, None for all)."""

    __slots__ = ("lay", "rows", "cum", "n", "sums")

    def __init__(self, lay, rows, cum, n, sums):
        self.lay, self.rows = lay, rows
        if rows is not None:
            cum, n, sums = cum[rows], n[rows], sums[rows]
        self.cum, self.n, self.sums = cum, n, sums

    def iter_samples(self, names):
        b, c, s = HIST + "_bucket", HIST + "_count", HIST + "_sum"
        le_names = names + ("le",)
        labels = gather(self.lay.s_labels, self.rows)
        for lab, buckets, n, total in zip(labels, self.cum.tolist(), self.n.tolist(),
                                          self.sums.tolist()):
            for le, v in zip(BUCKET_LE, buckets):
                yield b, le_names, lab + (le,), v
            yield b, le_names, lab + ("+Inf",), n
            yield c, names, lab, n
            yield s, names, lab, total

    def render(self):
        k = len(self.n)
        pre = self.lay.prefixes(HIST)
        if self.rows is not None:
            pre = gather(pre, (self.rows[:, None] * HIST_LINES +
                                np.arange(HIST_LINES)).ravel())
        nb = len(BUCKET_LE)
        ints = np.empty((k, nb + 2), dtype=np.int64)
        ints[:, :nb] = self.cum
        ints[:, nb] = ints[:, nb + 1] = self.n           # +Inf bucket and _count
        istr = list(map(str, ints.ravel().tolist()))
        del ints
        vals = [None] * (k * HIST_LINES)
        for j in range(nb + 2):
            vals[j::HIST_LINES] = istr[j::nb + 2]
        del istr
        vals[nb + 2::HIST_LINES] = fmt_values(self.sums.tolist())
        return pieces(pre, vals)


def fold(lay: "Layout", cols, order, is_visible, fam: dict):
    """Sum the cells of one source into its series (all NumPy, no step per cell).

    Returns the (domain, range) pairs (``lay.dr_pairs`` indices, None for all) the visible
    domains touched."""
    count, nbytes, sn, ssum = cols.count, cols.bytes, cols.service_n, cols.service_sum_ns
    # per cell: the counts of the slots between two bucket bounds (13 columns, not 64)
    seg = np.add.reduceat(cols.hist, _SEG_STARTS, axis=1)[:, :len(BUCKET_LE)]
    if order is not None:           # the layout's row order
        count, nbytes, sn, ssum, seg = count[order], nbytes[order], sn[order], ssum[order], \
            seg[order]
    # cells with neither requests nor service times make no series
    active = (count != 0) | (sn != 0)
    if active.all():
        g_act = None
    else:
        count = np.where(active, count, 0)
        nbytes = np.where(active, nbytes, 0)
        g_act = lay.c.sum(active.astype(np.int64)) > 0
    g_count = lay.c.sum(count)
    g_bytes = lay.c.sum(nbytes)
    g_touch = lay.c.sum((count != 0).astype(np.int64)) > 0
    # histogram: slot segments summed per series, then cumulated: durations < 2^k ns
    svc = sn != 0
    if svc.all():
        g_svc = None
    else:
        sn, ssum = np.where(svc, sn, 0), np.where(svc, ssum, 0)
        seg[~svc] = 0
        g_svc = lay.s.sum(svc.astype(np.int64)) > 0
    g_sn = lay.s.sum(sn)
    g_sum = lay.s.sum(ssum) / 1e9
    g_cum = np.cumsum(lay.s.sum(seg), axis=1)
    del seg

    vis = np.fromiter(map(is_visible, lay.domids), dtype=bool, count=len(lay.domids))
    all_vis = bool(vis.all())
    c_vis = None if all_vis else vis[lay.c_domi]
    s_vis = None if all_vis else vis[lay.s_domi]

    rows = select(g_act, c_vis)
    fam["iotrace_ioreqs"].blocks.append(
        CounterBlock(lay, "iotrace_ioreqs_total", rows, g_count))
    fam["iotrace_ioreq_bytes"].blocks.append(
        CounterBlock(lay, "iotrace_ioreq_bytes_total", select(g_bytes > 0, c_vis),
                      g_bytes))
    rows = select(g_svc, s_vis)
    if rows is None or len(rows):
        fam["iotrace_ioreq_service_seconds"].blocks.append(
            HistBlock(lay, rows, g_cum, g_sn, g_sum))

    # ranges touched per visible domain
    t = g_touch if c_vis is None else g_touch & c_vis
    pairs = np.zeros(len(lay.dr_pairs), dtype=bool)
    pairs[lay.c_dr[t]] = True
    return select(pairs, None)
