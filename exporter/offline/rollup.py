"""Roll-ups: the rows a report shows, from a capture's cells - grouped, filtered, sorted, cut.

A grouping is a set of *levels* (``--by``, comma-separated): ``domain``, ``vcpu``, ``range``,
``addr``, ``rip``. The rows are keyed by the domain plus the key fields each level adds
(``LEVEL_FIELDS``), in one canonical order (``FIELD_ORDER``)::

    --by domain        domid
    --by vcpu          domid, vcpu
    --by range         domid, range, type                  (the default)
    --by addr          domid, range, type, dir, addr
    --by rip           domid, rip, range, type
    --by vcpu,addr     domid, vcpu, range, type, dir, addr (every key the cells have)

``build(summary, addrmap, by, filt, sort, top)`` -> ``Rollup``: the filter (``Filter``, the
same as ``top``'s) is applied to the cells first, so totals, shares and rates cover the
requests that pass it; rows are then grouped, sorted (``SORTS``: largest first, rows without
the value last, ties by count then by key) and cut to the first ``top``. ``Rollup.domains``
holds the per-domain totals of the same requests. ``Rollup.values(table, i)`` gives one row's
numbers, raw (counts, seconds, bytes, per second), for every output format.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iotrace.core.domains import display_name
from iotrace.core.events import dir_name, format_address, type_name
from iotrace.core.filters import Filter
from iotrace.offline.capture import CaptureSummary
from iotrace.offline.cells import CellTable

LEVELS = ("domain", "vcpu", "range", "addr", "rip")
LEVEL_FIELDS = {"domain": ("domid",), "vcpu": ("vcpu",), "range": ("range", "type"),
                "addr": ("range", "type", "dir", "addr"), "rip": ("rip", "range", "type")}
FIELD_ORDER = ("domid", "vcpu", "rip", "range", "type", "dir", "addr")
DEFAULT_BY = ("range",)
SORTS = ("count", "share", "avg", "p95", "bytes")
KEY_OTHER = (1 << 64) - 1    # addr / rip of the rows gathering keys beyond the core's bound
DOMID_OTHER = -2             # domid / vcpu of the rows beyond the bound (cells.py)


def parse_by(text: str) -> tuple[str, ...]:
    """``"vcpu,range"`` -> ``("vcpu", "range")`` (levels in LEVELS order, no repeats);
    ValueError saying what is accepted."""
    words = [w.strip().lower() for w in str(text).split(",") if w.strip()]
    aliases = {"domains": "domain", "dom": "domain", "vcpus": "vcpu", "ranges": "range",
               "address": "addr", "addrs": "addr", "addresses": "addr", "rips": "rip"}
    words = [aliases.get(w, w) for w in words]
    bad = [w for w in words if w not in LEVELS]
    if bad or not words:
        raise ValueError(f"expected one or more of {', '.join(LEVELS)} (comma-separated), "
                         f"got {text!r}")
    return tuple(lv for lv in LEVELS if lv in words)


def key_fields(by) -> tuple[str, ...]:
    """The key fields of a grouping's rows, in FIELD_ORDER."""
    want = {"domid"}
    for lv in by:
        want.update(LEVEL_FIELDS[lv])
    return tuple(f for f in FIELD_ORDER if f in want)


def needs_rip(by) -> bool:
    return "rip" in by


@dataclass
class Rollup:
    summary: CaptureSummary
    by: tuple[str, ...]
    fields: tuple[str, ...]       # key fields of a row (key_fields(by))
    table: CellTable              # every row of the grouping that passed the filter
    order: list[int]              # the rows shown: sorted, cut to ``top``
    domains: CellTable            # per-domain totals of the same requests, busiest first
    domain_order: list[int]
    filter: Filter
    sort: str
    top: int | None
    requests: int                 # requests that passed the filter
    requests_seen: int            # every request of the capture

    @property
    def span_seconds(self) -> float | None:
        return self.summary.span_seconds

    def rate(self, count: int) -> float | None:
        span = self.span_seconds
        return count / span if span else None

    def _columns(self, t: CellTable) -> dict:
        """Every row's numbers as Python lists, computed once per table (column-wise)."""
        cache = self.__dict__.setdefault("_cache", {})
        cols = cache.get(id(t))
        if cols is None:
            n = t.svc_n
            with np.errstate(invalid="ignore", divide="ignore"):
                avg = np.where(n > 0, t.svc_sum / np.maximum(n, 1) / 1e9, np.nan)
            cols = {"count": t.count.tolist(), "bytes": t.bytes.tolist(), "n": n.tolist(),
                    "avg": avg.tolist(), "p50": t.quantiles_seconds(0.50).tolist(),
                    "p95": t.quantiles_seconds(0.95).tolist(),
                    "min": (t.svc_min / 1e9).tolist(), "max": (t.svc_max / 1e9).tolist(),
                    "keys": {f: v.tolist() for f, v in t.keys.items()}}
            cache[id(t)] = (t, cols)          # t kept alive: its id stays its own
        else:
            cols = cols[1]
        return cols

    def values(self, t: CellTable, i: int, fields=None) -> dict:
        """Row ``i`` of ``t``: its key ``fields`` (default: the grouping's) and numbers, raw:
        count, rate (per second), share (0..1), bytes (None where the source records no
        sizes: xentrace), service times in seconds."""
        names = self.summary.domain_names
        cols = self._columns(t)
        keys = cols["keys"]
        out: dict = {}
        for f in fields or self.fields:
            v = keys[f][i]
            if f == "domid":
                out["domid"] = v
                out["domain"] = "other" if v == DOMID_OTHER else display_name(v, names)
            elif f == "type":
                out["type"] = type_name(v)
            elif f == "dir":
                out["dir"] = dir_name(v)
            elif f == "addr":
                out["addr"] = v
                out["addr_text"] = "other" if v == KEY_OTHER else \
                    format_address(keys["type"][i], v)
            elif f == "range":
                out["range"] = t.range_names[v]
            else:
                out[f] = v
        c = cols["count"][i]
        out["count"] = c
        out["rate"] = self.rate(c)
        out["share"] = c / self.requests if self.requests else None
        out["bytes"] = cols["bytes"][i] if self.summary.source != "xentrace" else None
        n = cols["n"][i]
        out["service"] = None if not n else {
            "n": n, "avg": cols["avg"][i], "p50": cols["p50"][i], "p95": cols["p95"][i],
            "min": cols["min"][i], "max": cols["max"][i]}
        return out

    def rows(self):
        """The rows shown, as ``values`` dicts, in order."""
        for i in self.order:
            yield self.values(self.table, i)

    def domain_rows(self):
        for i in self.domain_order:
            yield self.values(self.domains, i, ("domid",))


def _sort_order(t: CellTable, fields, sort: str) -> list[int]:
    if not len(t):
        return []
    count = t.count.astype(np.float64)
    if sort in ("count", "share"):
        value = count
    elif sort == "bytes":
        value = t.bytes.astype(np.float64)
    elif sort == "avg":
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(t.svc_n > 0, t.svc_sum / np.maximum(t.svc_n, 1), np.nan)
    elif sort == "p95":
        value = t.quantiles_seconds(0.95)
    else:
        raise ValueError(f"cannot sort by {sort!r} (use {', '.join(SORTS)})")
    missing = np.isnan(value)
    value = np.where(missing, 0.0, value)
    # np.lexsort: the last key is the primary one
    keys = [t.keys[f] for f in reversed(fields)] + [-count, -value, missing]
    return np.lexsort(keys).tolist()


def build(summary: CaptureSummary, addrmap, by=DEFAULT_BY, filt: Filter | None = None,
          sort: str = "count", top: int | None = None) -> Rollup:
    """The rows of grouping ``by`` over the requests ``filt`` lets through (see the module)."""
    by = tuple(by)
    fields = key_fields(by)
    filt = filt or Filter()
    cells = summary.cells.with_range(addrmap)
    seen = int(cells.count.sum())
    if filt.active():
        k = cells.keys
        keep = filt.mask(k["domid"], k["vcpu"], k["type"], k["dir"], k["range"],
                         cells.range_names, summary.domain_names)
        if not keep.all():                      # (all kept: no copy of the histograms)
            cells = cells.take(keep)
    table = cells.group(fields, addrmap)
    domains = cells.group(("domid",), addrmap)
    order = _sort_order(table, fields, sort)
    if top is not None:
        order = order[:top]
    return Rollup(summary, by, fields, table, order, domains,
                  _sort_order(domains, ("domid",), "count"), filt, sort, top,
                  int(cells.count.sum()), seen)
