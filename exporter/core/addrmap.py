"""Names for guest addresses: the YAML address map and its vectorised lookup.

A map assigns every (type, address) a *range* name: a named port or MMIO range from the PC default
(``iotrace/data/pc-default.yaml``) or from the operator's ``--config`` file, and ``other`` for
everything else. Label values are therefore bounded by the size of the map, by construction.

Overlapping entries are resolved once at load time by painting: later entries win over earlier
ones and the operator's over the defaults, so lookups are a single ``searchsorted`` per type over
disjoint segments.

MMIO ranges should be page-aligned (start and end + 1 multiples of 4 KiB) for the live qemu source:
its metrics mode counts an MMIO request under its 4 KiB page (iotrace.probes.live.metrics_bucket),
which names the range the page's start falls in.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from iotrace.core.errors import ConfigError
from iotrace.core.events import (
    TYPE_INVALIDATE,
    TYPE_MMIO,
    TYPE_PCI_CONFIG,
    TYPE_PIO,
    TYPE_TIMEOFFSET,
    TYPE_VMWARE_PORT,
)
from iotrace.core.yamlfile import (
    MarkedDict,
    as_int,
    check_keys,
    load_yaml,
    parse_yaml,
    require_mapping,
)

OTHER = "other"
# Range names for request types whose address is not mapped by pio/mmio ranges.
TYPE_RANGE_NAMES = {TYPE_PCI_CONFIG: "pci-config", TYPE_VMWARE_PORT: "vmware-port",
                    TYPE_TIMEOFFSET: "timeoffset", TYPE_INVALIDATE: "invalidate"}
HANDLERS = ("qemu", "xen", "none")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-1]?[0-9a-fA-F])\.([0-7])$")
_LIMITS = {"pio": 0xFFFF, "mmio": 0xFFFFFFFFFFFFFFFF}
CONFIG_SECTIONS = ("pio", "mmio", "pci_config", "replace_defaults", "exporter", "advise")


@dataclass(frozen=True)
class RangeEntry:
    kind: str          # pio | mmio | pci_config
    name: str
    start: int
    end: int           # inclusive
    handled_by: str = "qemu"
    origin: str = ""   # file:line, for messages


class _Segments:
    """Disjoint [start, end] segments with a range-name index each, for vectorised lookup."""

    def __init__(self, entries: list[RangeEntry], names: list[str]):
        index_of = {n: i for i, n in enumerate(names)}
        # Paint: walk the elementary intervals between all boundaries; the last entry covering one
        # wins. A sweep with a heap of the entries begun so far (latest first; ended ones dropped
        # when they come to the top): O(n log n) for n entries. Every start and end + 1 is a
        # boundary, so an entry that covers an interval's first address covers all of it.
        bounds = sorted({e.start for e in entries} | {e.end + 1 for e in entries})
        by_start = sorted(range(len(entries)), key=lambda i: entries[i].start)
        heap: list[tuple[int, int]] = []          # (-priority, end)
        nxt = 0
        starts, ends, idx, handled = [], [], [], []
        for lo, hi in zip(bounds, bounds[1:]):
            while nxt < len(by_start) and entries[by_start[nxt]].start <= lo:
                i = by_start[nxt]
                heapq.heappush(heap, (-i, entries[i].end))
                nxt += 1
            while heap and heap[0][1] < lo:
                heapq.heappop(heap)
            if not heap:
                continue
            winner = entries[-heap[0][0]]
            if idx and idx[-1] == index_of[winner.name] and ends[-1] + 1 == lo \
                    and handled[-1] == winner.handled_by:
                ends[-1] = hi - 1
                continue
            starts.append(lo)
            ends.append(hi - 1)
            idx.append(index_of[winner.name])
            handled.append(winner.handled_by)
        self.starts = np.array(starts, dtype=np.uint64)
        self.ends = np.array(ends, dtype=np.uint64)
        self.index = np.array(idx, dtype=np.int32)
        self.handled = handled

    def lookup(self, addrs: np.ndarray, other: int) -> np.ndarray:
        addrs = np.asarray(addrs, dtype=np.uint64)
        out = np.full(addrs.shape, other, dtype=np.int32)
        if not len(self.starts) or not addrs.size:
            return out
        pos = np.searchsorted(self.starts, addrs, side="right") - 1
        ok = pos >= 0
        posc = np.where(ok, pos, 0)
        ok &= addrs <= self.ends[posc]
        out[ok] = self.index[posc[ok]]
        return out

    def handled_by(self, addr: int) -> str | None:
        if not len(self.starts):
            return None
        pos = int(np.searchsorted(self.starts, np.uint64(addr), side="right")) - 1
        if pos >= 0 and addr <= int(self.ends[pos]):
            return self.handled[pos]
        return None


class AddressMap:
    """Range names for (type, address) pairs. Build with ``AddressMap.load(config_path)``."""

    def __init__(self, entries: list[RangeEntry], warnings: list[str] | None = None):
        self.entries = list(entries)
        self.warnings = list(warnings or [])       # about the operator's file (see overlaps())
        names = []
        for e in self.entries:
            if e.name not in names:
                names.append(e.name)
        for t in TYPE_RANGE_NAMES.values():  # requests without a mapped address: named by type
            if t not in names:
                names.append(t)
        if OTHER not in names:
            names.append(OTHER)
        self.names: list[str] = names
        self.other_index = names.index(OTHER)
        self._segments = {
            kind: _Segments([e for e in self.entries if e.kind == kind], names)
            for kind in ("pio", "mmio", "pci_config")
        }
        self._type_index = {code: names.index(name) for code, name in TYPE_RANGE_NAMES.items()}

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "AddressMap":
        return cls(default_entries())

    @classmethod
    def load(cls, config_path: str | None = None) -> "AddressMap":
        """The PC default map, overridden by the operator's config file when one is given."""
        doc = load_yaml(config_path) if config_path else None
        return cls.from_document(doc, config_path)

    @classmethod
    def from_document(cls, doc, path: str | None) -> "AddressMap":
        """The PC default map with the ranges of an already parsed config document (None: the
        defaults alone); warnings name the operator's duplicate names and overlaps."""
        entries = default_entries()
        if doc is None:
            return cls(entries)
        user, replace = parse_map_document(doc, path or "<config>")
        return cls(user if replace else entries + user, overlaps(user))

    # -- lookup --------------------------------------------------------------------------------
    def lookup(self, types: np.ndarray, addrs: np.ndarray) -> np.ndarray:
        """Range index (into ``names``) for each (type, addr); vectorised over NumPy arrays."""
        types = np.asarray(types)
        addrs = np.asarray(addrs, dtype=np.uint64)
        out = np.full(types.shape, self.other_index, dtype=np.int32)
        for code, kind in ((TYPE_PIO, "pio"), (TYPE_MMIO, "mmio")):
            sel = types == code
            if sel.any():
                out[sel] = self._segments[kind].lookup(addrs[sel], self.other_index)
        sel = types == TYPE_PCI_CONFIG
        if sel.any():
            default = self._type_index[TYPE_PCI_CONFIG]
            out[sel] = self._segments["pci_config"].lookup(addrs[sel] >> np.uint64(32), default)
        for code, idx in self._type_index.items():
            if code != TYPE_PCI_CONFIG:
                out[types == code] = idx
        return out

    def segment_starts(self, kind: str) -> list[int]:
        """The first address of every painted segment of ``kind`` (pio | mmio | pci_config): one
        address per distinct (range, handler) stretch of the map, in address order."""
        return self._segments[kind].starts.tolist()

    def name(self, type_code: int, addr: int) -> str:
        idx = self.lookup(np.array([type_code], dtype=np.uint8), np.array([addr], dtype=np.uint64))
        return self.names[int(idx[0])]

    def handled_by(self, type_code: int, addr: int) -> str:
        """Who serves an access: 'xen', 'none' (no exit) or 'qemu' (the default)."""
        kind = {TYPE_PIO: "pio", TYPE_MMIO: "mmio"}.get(int(type_code))
        if kind is None:
            return "qemu"
        return self._segments[kind].handled_by(int(addr)) or "qemu"


def overlaps(entries: list[RangeEntry]) -> list[str]:
    """One line per name given twice and per pair of overlapping ranges among ``entries`` (an
    operator's file), saying which range wins where they overlap (the later one)."""
    out = []
    seen: dict[tuple[str, str], RangeEntry] = {}
    for e in entries:
        first = seen.setdefault((e.kind, e.name), e)
        if first is not e:
            out.append(f"{e.origin}: {e.kind} range name {e.name!r} is used again (first at "
                       f"{first.origin}); both count as {e.name}")
    for kind in ("pio", "mmio", "pci_config"):
        mine = sorted((e for e in entries if e.kind == kind), key=lambda e: (e.start, e.end))
        active: list[RangeEntry] = []             # those not ended before the next start
        for e in mine:
            active = [a for a in active if a.end >= e.start]
            for a in active:
                later, earlier = (e, a) if entries.index(e) > entries.index(a) else (a, e)
                lo, hi = max(a.start, e.start), min(a.end, e.end)
                out.append(f"{later.origin}: {kind} range {later.name!r} overlaps "
                           f"{earlier.name!r} ({earlier.origin}) at {lo:#x}-{hi:#x}: "
                           f"{later.name!r} wins there (the later entry)")
            active.append(e)
            if len(out) >= 100:                    # a generated file can overlap everywhere
                out.append("... (more overlaps not listed)")
                return out
    return out


def default_entries() -> list[RangeEntry]:
    text = resources.files("iotrace.core").joinpath("data/pc-default.yaml").read_text("utf-8")
    doc = parse_yaml(text, "pc-default.yaml")
    entries, _ = parse_map_document(doc, "pc-default.yaml")
    return entries


def parse_map_document(doc, path: str) -> tuple[list[RangeEntry], bool]:
    """Validate an address-map document; return its entries and whether it replaces the defaults."""
    if doc is None:
        return [], False
    require_mapping(doc, path, "top level")
    check_keys(doc, CONFIG_SECTIONS, path)
    replace = doc.get("replace_defaults", False)
    if not isinstance(replace, bool):
        raise ConfigError("expected true or false", path, doc.line_of("replace_defaults"),
                          "replace_defaults")
    entries: list[RangeEntry] = []
    for kind in ("pio", "mmio", "pci_config"):
        items = doc.get(kind)
        if items is None:
            continue
        if not isinstance(items, list):
            raise ConfigError("expected a list of ranges", path, doc.line_of(kind), kind)
        for i, item in enumerate(items):
            line = items.line_of(i) if hasattr(items, "line_of") else None
            entries.append(_parse_entry(kind, item, path, line, f"{kind}[{i}]"))
    return entries, replace


def _parse_entry(kind: str, item, path: str, line, where: str) -> RangeEntry:
    if not isinstance(item, dict):
        raise ConfigError("expected a mapping such as {name: com1, start: 0x3f8, end: 0x3ff}",
                          path, line, where)
    line = getattr(item, "line", line)
    allowed = ("name", "bdf", "handled_by") if kind == "pci_config" else \
              ("name", "start", "end", "handled_by")
    check_keys(item, allowed, path, where + ".")
    lof = item.line_of if isinstance(item, MarkedDict) else (lambda k: line)
    name = item.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError("needs a name of 1-64 letters, digits or . _ : -", path,
                          lof("name"), where + ".name")
    if name == OTHER:
        raise ConfigError(f"'{OTHER}' is reserved for unmatched addresses", path,
                          lof("name"), where + ".name")
    handled = item.get("handled_by", "qemu")
    if handled not in HANDLERS:
        raise ConfigError(f"expected one of {', '.join(HANDLERS)}, got {handled!r}", path,
                          lof("handled_by"), where + ".handled_by")
    origin = f"{path}:{line}"
    if kind == "pci_config":
        bdf = item.get("bdf")
        m = _BDF_RE.match(bdf) if isinstance(bdf, str) else None
        if not m:
            raise ConfigError("needs bdf as \"BB:DD.F\" (or \"SSSS:BB:DD.F\")", path,
                              lof("bdf"), where + ".bdf")
        seg, bus, dev, fn = (int(x, 16) if x else 0 for x in m.groups())
        if dev > 31:
            raise ConfigError("device number above 0x1f", path, lof("bdf"), where + ".bdf")
        key = (seg << 16) | (bus << 8) | (dev << 3) | fn
        return RangeEntry(kind, name, key, key, handled, origin)
    if "start" not in item:
        raise ConfigError("needs a start address", path, line, where + ".start")
    start = as_int(item["start"], path, lof("start"), where + ".start")
    end = as_int(item.get("end", start), path, lof("end"), where + ".end")
    limit = _LIMITS[kind]
    if not 0 <= start <= limit:
        raise ConfigError(f"start {start:#x} outside 0..{limit:#x}", path, lof("start"),
                          where + ".start")
    if not start <= end <= limit:
        raise ConfigError(f"end {end:#x} before start {start:#x} or above {limit:#x}", path,
                          lof("end"), where + ".end")
    return RangeEntry(kind, name, start, end, handled, origin)
