"""Metrics-mode address buckets (no root): the user-space mirror agrees with the BPF header, the
default MMIO ranges name a bucket as they name its addresses, and the Linux boot shrinks to a few
hundred keys."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from iotrace.core.addrmap import AddressMap
from iotrace.core.events import TYPE_MMIO, TYPE_PCI_CONFIG, TYPE_PIO
from iotrace.probes.bpf import types as T
from iotrace.probes.live import metrics_bucket
from iotrace.probes.standin import stream as st

HEADER = Path(__file__).resolve().parents[2] / "probes" / "bpf" / "iotrace_bpf.h"
PAGE = 0x1000


def header_defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)(?:ULL)?\s*$",
                         HEADER.read_text(), re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def test_mirror_matches_the_header():
    d = header_defines()
    assert d["MMIO_BUCKET_MASK"] == T.MMIO_BUCKET_MASK
    assert d["PCI_BUCKET_MASK"] == T.PCI_BUCKET_MASK
    assert (d["IOREQ_TYPE_PIO"], d["IOREQ_TYPE_COPY"], d["IOREQ_TYPE_PCI_CONFIG"]) == \
        (TYPE_PIO, TYPE_MMIO, TYPE_PCI_CONFIG) == \
        (T.IOREQ_TYPE_PIO, T.IOREQ_TYPE_COPY, T.IOREQ_TYPE_PCI_CONFIG)


def test_bucket_per_type():
    assert metrics_bucket(TYPE_MMIO, 0xB8F9E) == 0xB8000
    assert metrics_bucket(TYPE_MMIO, 0xFEBF0FFF) == 0xFEBF0000
    assert metrics_bucket(TYPE_MMIO, 0xFFFF_FFFF_FFFF_FFFF) == 0xFFFF_FFFF_FFFF_F000
    # PCI config: SEG[63:48] BUS[47:40] DEV[39:35] FN[34:32] kept, REG[31:0] dropped
    sbdf = (0x0001 << 48) | (0x02 << 40) | (0x1F << 35) | (0x7 << 32)
    assert metrics_bucket(TYPE_PCI_CONFIG, sbdf | 0x3C) == sbdf
    assert metrics_bucket(TYPE_PCI_CONFIG, sbdf) == sbdf
    # ports (and the other types) stay exact
    for port in (0x0, 0x3FD, 0xCFC, 0xFFFF):
        assert metrics_bucket(TYPE_PIO, port) == port
    assert metrics_bucket(3, 0x5658) == 0x5658


def test_default_mmio_ranges_name_a_bucket_like_its_addresses():
    """Every default MMIO range starts on a page; all but hpet (0x400 bytes, Xen's) also end on
    one. So an address and its bucket name the same range, except in the rest of hpet's page,
    which counts as hpet: a bucketed address names the range its page START falls in."""
    am = AddressMap.default()
    mmio = [e for e in am.entries if e.kind == "mmio"]
    assert mmio
    unaligned_end = set()
    for e in mmio:
        assert e.start % PAGE == 0, e
        if (e.end + 1) % PAGE:
            unaligned_end.add(e.name)
        for a in (e.start, e.start + 0x3FF, (e.start + e.end) // 2, e.end):
            assert am.name(TYPE_MMIO, metrics_bucket(TYPE_MMIO, a)) == am.name(TYPE_MMIO, a), \
                (e, hex(a))
    assert unaligned_end == {"hpet"}
    assert am.name(TYPE_MMIO, 0xFED00400) == "other"
    assert am.name(TYPE_MMIO, metrics_bucket(TYPE_MMIO, 0xFED00400)) == "hpet"


def test_linux_boot_keys_shrink(linux_boot_csv):
    """The boot the bench replays: 41,592 exact keys, a few hundred buckets; every request's
    range name is unchanged by bucketing."""
    reqs = st.read_stream(st.stream_for(linux_boot_csv))
    cols = list(zip(reqs["vcpu"].tolist(), reqs["type"].tolist(), reqs["dir"].tolist(),
                    reqs["size"].tolist(), reqs["addr"].tolist()))
    exact = set(cols)
    bucketed = {(v, t, d, s, metrics_bucket(t, a)) for v, t, d, s, a in exact}
    assert len(exact) > 40_000
    assert len(bucketed) < 300
    am = AddressMap.default()
    for v, t, d, s, a in exact:
        if t == TYPE_MMIO:
            assert am.name(t, metrics_bucket(t, a)) == am.name(t, a), hex(a)


@pytest.mark.parametrize("typ", [TYPE_MMIO, TYPE_PCI_CONFIG, TYPE_PIO])
def test_bucket_is_idempotent(typ):
    for a in (0, 0xA0001, 0xCF8, 0x0000_0100_0000_0004, 0xFFFF_FFFF_FFFF_FFFF):
        b = metrics_bucket(typ, a)
        assert metrics_bucket(typ, b) == b and b <= a
