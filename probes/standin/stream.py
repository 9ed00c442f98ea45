"""Request streams for the stand-in device model: CSV capture -> what Xen forwards -> stream file.

The input is a device-access capture in the CSV format of ``linux-boot-tcg.csv.gz`` (columns
``t_us,vcpu,space,dir,addr,size,value,region``; see docs/data.md). It logs every access
that reached a QEMU device under TCG. Under a Xen HVM guest only some of them become ioreqs to
qemu-dm; :func:`forward` applies Xen's forwarding rules:

* ``vcpu == -1`` rows are device-originated MSI writes, not guest ioreqs: dropped.
* Ports and MMIO ranges Xen emulates itself, or that cause no exit, are dropped:
  ``AddressMap.default().handled_by(type, addr) != "qemu"`` (PIC, ELCR, PIT + speaker 0x61, RTC,
  0xe9, ACPI PM1a/PM timer, HPET, IOAPIC, LAPIC; 0x80 and 0xed pass straight through). This is the
  README's list; the default map carries it (exporter/core/data/pc-default.yaml).
* 0xcf8 is watched by Xen (it latches 4-byte writes: xen/arch/x86/hvm/ioreq.c, hvm_access_cf8) and
  still forwarded as port I/O.
* 0xcfc-0xcff with the latch's enable bit (31) set become ``IOREQ_TYPE_PCI_CONFIG`` with
  addr = SEG[63:48] BUS[47:40] DEV[39:35] FN[34:32] REG[31:0], reg = (cf8 & 0xfc) | (port & 3)
  (xen/include/public/hvm/ioreq.h; Xen's hvm_select_ioreq_server). They reach qemu only for devices
  the device model registered (xen_map_pcidev); a function counts as registered when the capture
  shows its vendor-ID register (reg 0) reading as anything but 0xffff. Others get Xen's all-ones
  null handler and are dropped. Without the enable bit, 0xcfc-0xcff stay port I/O.
* VGA memory writes (0xa0000-0xbffff) become *buffered* requests (buf_ioreq_t; vcpu -1); VGA
  reads stay synchronous ``IOREQ_TYPE_COPY``.
* Everything else is forwarded synchronously as PIO (``space=pio``) or COPY (``space=mmio``), count 1
  (TCG logs each access of a ``rep`` instruction separately, so rep batching cannot be recovered).

Stream file format (version 1, little endian; read by probes/standin/standin.c)::

    header, 48 bytes:
      char[8] magic "IOTSTRM\\0" | u32 version (1) | u32 header_size (48) | u32 key_size (16)
      u32 rec_size (24) | u32 n_keys | u32 reserved (0) | u64 n_recs | u64 duration_ns
    key table, n_keys x 16 bytes (one per distinct (vcpu, type, dir, addr), first-seen order):
      u64 addr | i32 vcpu (-1 = buffered) | u8 type (ioreq type) | u8 dir (1 = read) | u16 pad
    records, n_recs x 24 bytes, in time order:
      u64 t_ns (since the stream start) | u64 data (value written; ignored for reads)
      u32 key (index into the key table) | u16 count | u8 size (1, 2, 4, 8) | u8 flags (bit 0 buffered)

``duration_ns`` is the time of the last record (a replay at speed 1 lasts that long).

API: :func:`read_csv`, :func:`forward`, :func:`write_stream`, :func:`read_stream`,
:func:`csv_to_stream`, :func:`stream_for` (CSV or stream path -> a stream file, cached),
:func:`truth` (the ``io`` rows a replay must produce), :func:`to_events` (EVENT_DTYPE batch).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iotrace.core.addrmap import AddressMap
from iotrace.core.errors import InputError, open_input
from iotrace.core.events import (
    DIR_NAMES,
    DIR_READ,
    DIR_WRITE,
    TYPE_MMIO,
    TYPE_NAMES,
    TYPE_PCI_CONFIG,
    TYPE_PIO,
    empty,
)


def _format_defines() -> dict[str, str]:
    """The #defines of stream_format.h, the one declaration of the file format (shared with
    standin.c; tests/probes/test_standin_build.py checks the structs below against it)."""
    text = Path(__file__).with_name(FORMAT_HEADER).read_text()
    return dict(re.findall(r"^#define\s+(STREAM_\w+)\s+(\S+)", text, re.M))


FORMAT_HEADER = "stream_format.h"
_DEFS = _format_defines()
MAGIC = _DEFS["STREAM_MAGIC"].strip('"').replace("\\0", "\0").encode()
VERSION = int(_DEFS["STREAM_VERSION"])
HEADER = struct.Struct("<8sIIIIIIQQ")
KEY_DTYPE = np.dtype([("addr", "<u8"), ("vcpu", "<i4"), ("type", "u1"), ("dir", "u1"),
                      ("pad", "<u2")])
REC_DTYPE = np.dtype([("t_ns", "<u8"), ("data", "<u8"), ("key", "<u4"), ("count", "<u2"),
                      ("size", "u1"), ("flags", "u1")])
assert HEADER.size == 48 and KEY_DTYPE.itemsize == 16 and REC_DTYPE.itemsize == 24
FLAG_BUFFERED = int(_DEFS["STREAM_REC_BUFFERED"])
MAX_VCPUS = 128                     # slots in one shared ioreq page (the stand-in's limit too)

CSV_COLUMNS = ["t_us", "vcpu", "space", "dir", "addr", "size", "value", "region"]
# One parsed CSV row; space 0 = pio, 1 = mmio; dir as ioreq_t (1 = read).
CSV_DTYPE = np.dtype([("t_us", "<i8"), ("vcpu", "<i4"), ("space", "u1"), ("dir", "u1"),
                      ("size", "u1"), ("addr", "<u8"), ("value", "<u8")])
# One forwarded request.
REQ_DTYPE = np.dtype([("t_ns", "<u8"), ("vcpu", "<i4"), ("type", "u1"), ("dir", "u1"),
                      ("size", "u1"), ("buffered", "u1"), ("count", "<u2"), ("addr", "<u8"),
                      ("data", "<u8")])

VGA_LOWMEM = (0xA0000, 0xBFFFF)
PCI_CONF_ADDR = 0xCF8
PCI_CONF_DATA = range(0xCFC, 0xD00)


@dataclass
class ForwardStats:
    rows: int = 0
    forwarded: int = 0
    buffered: int = 0
    pci_config: int = 0
    dropped_msi: int = 0            # vcpu -1 rows
    dropped_xen: int = 0            # emulated by Xen or no exit at all
    dropped_pci_absent: int = 0     # config cycles to functions the device model did not register
    registered_bdfs: list = field(default_factory=list)


# -- CSV ------------------------------------------------------------------------------------------

def _open_text(path: str | os.PathLike):
    p = str(path)
    with open_input(p, "a CSV capture") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    raw = gzip.open(p, "rb") if gz else open_input(p, "a CSV capture")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def read_csv(path: str | os.PathLike) -> np.ndarray:
    """Parse a device-access CSV(.gz) into a CSV_DTYPE array; InputError names file and line."""
    p = str(path)
    rows = []
    try:
        with _open_text(p) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{p}: empty file, expected a CSV with columns "
                                 f"{','.join(CSV_COLUMNS)}")
            if [h.strip() for h in header[:len(CSV_COLUMNS)]] != CSV_COLUMNS:
                raise InputError(f"{p}:1: expected columns {','.join(CSV_COLUMNS)}, "
                                 f"got {','.join(header)[:120]}")
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    t_us, vcpu, space, d, addr, size, value = row[:7]
                    space_c = {"pio": 0, "mmio": 1}[space]
                    dir_c = {"R": DIR_READ, "W": DIR_WRITE}[d]
                    size_i = int(size)
                    if size_i not in (1, 2, 4, 8):
                        raise ValueError("size")
                    rec = (int(t_us), int(vcpu), space_c, dir_c, size_i, int(addr, 16),
                           int(value, 16))
                    if rec[0] < 0 or not -1 <= rec[1] < 1 << 31 or rec[5] >= 1 << 64 \
                            or not 0 <= rec[6] < 1 << 64:
                        raise ValueError("range")
                    if space_c == 0 and rec[5] > 0xFFFF:
                        raise ValueError("port")
                except (ValueError, KeyError) as exc:
                    raise InputError(f"{p}:{line}: bad row {','.join(row)[:80]!r} "
                                     f"({exc.__class__.__name__}: {exc})") from None
                rows.append(rec)
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{p}: not a readable CSV(.gz): {exc}") from None
    out = np.array(rows, dtype=CSV_DTYPE) if rows else np.zeros(0, dtype=CSV_DTYPE)
    if len(out) and np.any(np.diff(out["t_us"]) < 0):
        i = int(np.argmax(np.diff(out["t_us"]) < 0)) + 3
        raise InputError(f"{p}:{i}: t_us goes back in time")
    return out


# -- forwarding rules -----------------------------------------------------------------------------

def _pci_addr(cf8: int, port: int) -> int:
    bus = (cf8 >> 16) & 0xFF
    devfn = (cf8 >> 8) & 0xFF                   # DEV[15:11] FN[10:8] -> DEV[39:35] FN[34:32]
    reg = (cf8 & 0xFC) | (port & 3)
    return (bus << 40) | (devfn << 32) | reg


def _registered_bdfs(rows: np.ndarray) -> set[int]:
    """Functions whose vendor-ID register reads as something other than 0xffff in the capture."""
    present = set()
    cf8 = 0
    sel = (rows["space"] == 0) & (rows["vcpu"] >= 0) & (rows["addr"] >= PCI_CONF_ADDR) \
        & (rows["addr"] < PCI_CONF_DATA.stop)
    sub = rows[sel]
    for port, d, size, value in zip(sub["addr"].tolist(), sub["dir"].tolist(),
                                    sub["size"].tolist(), sub["value"].tolist()):
        if port == PCI_CONF_ADDR and d == DIR_WRITE and size == 4:
            cf8 = value
        elif port in PCI_CONF_DATA and cf8 & 0x80000000 and d == DIR_READ:
            a = _pci_addr(cf8, port)
            if a & 0xFF == 0 and size >= 2 and value & 0xFFFF != 0xFFFF:
                present.add(a >> 32)
    return present


def forward(rows: np.ndarray, addrmap: AddressMap | None = None) -> tuple[np.ndarray, ForwardStats]:
    """The ioreqs Xen would send qemu-dm for these device accesses (REQ_DTYPE), and counts."""
    amap = addrmap or AddressMap.default()
    stats = ForwardStats(rows=len(rows))
    registered = _registered_bdfs(rows)
    stats.registered_bdfs = sorted(registered)
    # Who handles each address, decided once per distinct (space, addr).
    handled: dict[tuple[int, int], str] = {}
    out = []
    cf8 = 0
    t0 = int(rows["t_us"][0]) if len(rows) else 0
    for t_us, vcpu, space, d, size, addr, value in zip(
            rows["t_us"].tolist(), rows["vcpu"].tolist(), rows["space"].tolist(),
            rows["dir"].tolist(), rows["size"].tolist(), rows["addr"].tolist(),
            rows["value"].tolist()):
        if vcpu < 0:
            stats.dropped_msi += 1
            continue
        if vcpu >= MAX_VCPUS:
            raise InputError(f"vcpu {vcpu} above the stand-in's {MAX_VCPUS} vCPU slots")
        typ = TYPE_PIO if space == 0 else TYPE_MMIO
        key = (typ, addr)
        who = handled.get(key)
        if who is None:
            who = handled[key] = amap.handled_by(typ, addr)
        if who != "qemu":
            stats.dropped_xen += 1
            continue
        buffered = 0
        if typ == TYPE_PIO:
            if addr == PCI_CONF_ADDR and d == DIR_WRITE and size == 4:
                cf8 = value
            elif addr in PCI_CONF_DATA and cf8 & 0x80000000:
                addr = _pci_addr(cf8, addr)
                if (addr >> 32) not in registered:
                    stats.dropped_pci_absent += 1
                    continue
                typ = TYPE_PCI_CONFIG
                stats.pci_config += 1
        elif VGA_LOWMEM[0] <= addr <= VGA_LOWMEM[1] and d == DIR_WRITE:
            buffered = 1
            vcpu = -1
            stats.buffered += 1
        out.append(((t_us - t0) * 1000, vcpu, typ, d, size, buffered, 1, addr,
                    value if d == DIR_WRITE else 0))
    stats.forwarded = len(out)
    return (np.array(out, dtype=REQ_DTYPE) if out else np.zeros(0, dtype=REQ_DTYPE)), stats


# -- stream files ---------------------------------------------------------------------------------

def write_stream(path: str | os.PathLike, reqs: np.ndarray) -> None:
    """Write requests (REQ_DTYPE, time order) as a version-1 stream file (atomically)."""
    reqs = np.asarray(reqs, dtype=REQ_DTYPE)
    if len(reqs) and np.any(np.diff(reqs["t_ns"].astype(np.int64)) < 0):
        raise ValueError("requests must be in time order")
    bad = (reqs["buffered"] == 1) != (reqs["vcpu"] == -1)
    if bad.any():
        raise ValueError("buffered requests and only they have vcpu -1")
    if np.any(reqs["vcpu"] >= MAX_VCPUS) or np.any(reqs["vcpu"] < -1):
        raise ValueError(f"vcpu outside -1..{MAX_VCPUS - 1}")
    if not np.isin(reqs["size"], (1, 2, 4, 8)).all():
        raise ValueError("sizes must be 1, 2, 4 or 8")
    kcols = np.empty(len(reqs), dtype=[("addr", "<u8"), ("vcpu", "<i4"), ("type", "u1"),
                                       ("dir", "u1")])
    for c in ("addr", "vcpu", "type", "dir"):
        kcols[c] = reqs[c]
    uniq, first, inverse = np.unique(kcols, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")          # first-seen order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keys = np.zeros(len(uniq), dtype=KEY_DTYPE)
    for c in ("addr", "vcpu", "type", "dir"):
        keys[c] = uniq[c][order]
    recs = np.zeros(len(reqs), dtype=REC_DTYPE)
    recs["t_ns"] = reqs["t_ns"]
    recs["data"] = reqs["data"]
    recs["key"] = rank[inverse.reshape(-1)] if len(reqs) else 0
    recs["count"] = np.maximum(reqs["count"], 1)
    recs["size"] = reqs["size"]
    recs["flags"] = reqs["buffered"] & FLAG_BUFFERED
    duration = int(reqs["t_ns"][-1]) if len(reqs) else 0
    head = HEADER.pack(MAGIC, VERSION, HEADER.size, KEY_DTYPE.itemsize, REC_DTYPE.itemsize,
                       len(keys), 0, len(recs), duration)
    path = str(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(head)
        fh.write(keys.tobytes())
        fh.write(recs.tobytes())
    os.replace(tmp, path)


def is_stream(head: bytes) -> bool:
    return head[:8] == MAGIC


def read_stream(path: str | os.PathLike) -> np.ndarray:
    """Requests (REQ_DTYPE) of a stream file; InputError (file and offset) when malformed."""
    p = str(path)
    try:
        blob = Path(p).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror}") from None
    if len(blob) < HEADER.size or not is_stream(blob):
        raise InputError(f"{p}: not an iotrace stream file (bad magic at offset 0)")
    magic, ver, hsize, ksize, rsize, n_keys, _, n_recs, _dur = HEADER.unpack_from(blob)
    if ver != VERSION:
        raise InputError(f"{p}: stream version {ver} at offset 8, this iotrace reads {VERSION}")
    if (hsize, ksize, rsize) != (HEADER.size, KEY_DTYPE.itemsize, REC_DTYPE.itemsize):
        raise InputError(f"{p}: unexpected header/key/record sizes at offset 12")
    kend = hsize + n_keys * ksize
    end = kend + n_recs * rsize
    if end > len(blob):
        raise InputError(f"{p}: truncated at offset {len(blob)} (needs {end} bytes)")
    keys = np.frombuffer(blob, KEY_DTYPE, n_keys, hsize)
    recs = np.frombuffer(blob, REC_DTYPE, n_recs, kend)
    if n_recs and int(recs["key"].max()) >= n_keys:
        raise InputError(f"{p}: record key out of range (offset {kend})")
    k = keys[recs["key"]]
    out = np.zeros(n_recs, dtype=REQ_DTYPE)
    out["t_ns"] = recs["t_ns"]
    out["data"] = recs["data"]
    out["count"] = recs["count"]
    out["size"] = recs["size"]
    out["buffered"] = recs["flags"] & FLAG_BUFFERED
    for c in ("addr", "vcpu", "type", "dir"):
        out[c] = k[c]
    return out


def csv_to_stream(csv_path, out_path, addrmap: AddressMap | None = None) -> ForwardStats:
    reqs, stats = forward(read_csv(csv_path), addrmap)
    write_stream(out_path, reqs)
    return stats


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iotrace" / "streams"


def stream_for(path: str | os.PathLike) -> Path:
    """A stream file for ``path``: itself if it is one, else the CSV converted (cached by content)."""
    p = Path(path)
    with open_input(p, "a stream or CSV file") as fh:
        head = fh.read(8)
    if is_stream(head):
        return p
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    out = cache_dir() / f"{h.hexdigest()[:24]}-v{VERSION}.stream"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        csv_to_stream(p, out)
    return out


# -- what a replay issues -------------------------------------------------------------------------

def truth(reqs: np.ndarray, domid: int, passes: int = 1) -> dict:
    """The ``io`` document a replay of ``reqs`` must produce (``--truth``), rows sorted."""
    counts: dict[tuple, int] = {}
    for vcpu, typ, d, addr in zip(reqs["vcpu"].tolist(), reqs["type"].tolist(),
                                  reqs["dir"].tolist(), reqs["addr"].tolist()):
        k = (vcpu, typ, d, addr)
        counts[k] = counts.get(k, 0) + 1
    rows = [{"domid": domid, "vcpu": v, "type": TYPE_NAMES[t], "dir": DIR_NAMES[d], "addr": a,
             "count": c * passes} for (v, t, d, a), c in counts.items()]
    return {"source": "standin", "io": sort_io(rows)}


def sort_io(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["domid"], r["vcpu"], r["type"], r["dir"], r["addr"]))


def load_truth(path) -> dict:
    with open(path) as fh:
        doc = json.load(fh)
    doc["io"] = sort_io(doc["io"])
    return doc


def to_events(reqs: np.ndarray, domid: int) -> np.ndarray:
    """The requests as an iotrace.core.events batch (as a probe on handle_ioreq would see them)."""
    ev = empty(len(reqs))
    ev["ts_ns"] = reqs["t_ns"].astype(np.int64)
    ev["domid"] = domid
    ev["vcpu"] = reqs["vcpu"]
    ev["type"] = reqs["type"]
    ev["dir"] = reqs["dir"]
    ev["size"] = reqs["size"]
    ev["count"] = np.maximum(reqs["count"], 1)
    ev["addr"] = reqs["addr"]
    ev["data"] = reqs["data"]
    return ev
