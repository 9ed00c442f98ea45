"""Xen's forwarding rules (iotrace.probes.standin.stream) and the stream file format."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from iotrace.core.errors import InputError
from iotrace.core.events import DIR_READ, DIR_WRITE, TYPE_MMIO, TYPE_PCI_CONFIG, TYPE_PIO
from iotrace.probes.standin import stream

HEADER = "t_us,vcpu,space,dir,addr,size,value,region\n"


def csv_file(tmp_path, rows, name="c.csv", gz=False):
    text = HEADER + "".join(r + "\n" for r in rows)
    p = tmp_path / (name + (".gz" if gz else ""))
    if gz:
        with gzip.open(p, "wt") as fh:
            fh.write(text)
    else:
        p.write_text(text)
    return p


def fwd(tmp_path, rows):
    return stream.forward(stream.read_csv(csv_file(tmp_path, rows)))


@pytest.mark.parametrize("port", [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x43, 0x61, 0x70,
                                  0x71, 0xe9, 0x80, 0xed, 0x600, 0x603, 0x608, 0xb000, 0xb008])
def test_ports_xen_emulates_or_passes_through_are_not_forwarded(tmp_path, port):
    reqs, st = fwd(tmp_path, [f"10,0,pio,R,{port:#x},1,0x0,x", "20,0,pio,W,0x3f8,1,0x41,serial"])
    assert reqs["addr"].tolist() == [0x3f8] and st.dropped_xen == 1


@pytest.mark.parametrize("addr", [0xfed00000, 0xfec00000, 0xfee00300])
def test_mmio_xen_emulates_is_not_forwarded(tmp_path, addr):
    reqs, st = fwd(tmp_path, [f"5,0,mmio,R,{addr:#x},4,0x0,x"])
    assert len(reqs) == 0 and st.dropped_xen == 1


def test_msi_rows_without_a_vcpu_are_skipped(tmp_path):
    reqs, st = fwd(tmp_path, ["0,-1,mmio,W,0xfee00000,4,0x0,apic-msi", "3,1,pio,R,0x3fd,1,0x60,s"])
    assert st.dropped_msi == 1 and reqs["vcpu"].tolist() == [1]


def test_vga_writes_are_buffered_and_reads_synchronous(tmp_path):
    reqs, st = fwd(tmp_path, ["1,0,mmio,W,0xb8000,2,0x0741,vga-lowmem",
                              "2,1,mmio,R,0xa0010,1,0x0,vga-lowmem",
                              "3,0,mmio,W,0xfd000000,4,0x1,vga.vram"])
    assert reqs["buffered"].tolist() == [1, 0, 0]
    assert reqs["vcpu"].tolist() == [-1, 1, 0]
    assert reqs["type"].tolist() == [TYPE_MMIO] * 3
    assert reqs["data"].tolist() == [0x0741, 0, 1]          # a read carries no data to qemu
    assert st.buffered == 1


def test_pci_config_conversion(tmp_path):
    rows = [
        # SeaBIOS probes 00:01.1 (present) and 00:1f.0 (absent)
        "1,0,pio,W,0xcf8,4,0x80000900,pci-conf-idx",
        "2,0,pio,R,0xcfc,2,0x8086,pci-conf-data",           # vendor of 00:01.1
        "3,0,pio,W,0xcf8,4,0x8000f800,pci-conf-idx",
        "4,0,pio,R,0xcfc,4,0xffffffff,pci-conf-data",       # 00:1f.0 absent
        "5,0,pio,W,0xcf8,4,0x80000910,pci-conf-idx",
        "6,1,pio,W,0xcfe,2,0xc001,pci-conf-data",           # reg (0x10 & 0xfc) | (0xcfe & 3) = 0x12
        "7,0,pio,W,0xcf8,4,0x00000910,pci-conf-idx",        # enable bit clear
        "8,0,pio,R,0xcfc,4,0x0,pci-conf-data",              # stays port I/O
        "9,0,pio,W,0xcf8,4,0x01020304,pci-conf-idx",        # only 4-byte writes latch...
        "10,0,pio,W,0xcfb,1,0x80,pci-conf-idx",             # ...a byte write to 0xcfb does not
        "11,0,pio,R,0xcfd,1,0x0,pci-conf-data",
    ]
    reqs, st = fwd(tmp_path, rows)
    got = [(int(r["vcpu"]), int(r["type"]), int(r["dir"]), int(r["addr"])) for r in reqs]
    devfn_01_1 = (1 << 3) | 1
    assert got == [
        (0, TYPE_PIO, DIR_WRITE, 0xcf8),
        (0, TYPE_PCI_CONFIG, DIR_READ, (devfn_01_1 << 32) | 0x00),
        (0, TYPE_PIO, DIR_WRITE, 0xcf8),
        (0, TYPE_PIO, DIR_WRITE, 0xcf8),
        (1, TYPE_PCI_CONFIG, DIR_WRITE, (devfn_01_1 << 32) | 0x12),
        (0, TYPE_PIO, DIR_WRITE, 0xcf8),
        (0, TYPE_PIO, DIR_READ, 0xcfc),
        (0, TYPE_PIO, DIR_WRITE, 0xcf8),
        (0, TYPE_PIO, DIR_WRITE, 0xcfb),
        (0, TYPE_PIO, DIR_READ, 0xcfd),
    ]
    assert st.dropped_pci_absent == 1 and st.registered_bdfs == [devfn_01_1]
    assert st.pci_config == 2


def test_pci_bus_and_segment_bits(tmp_path):
    # bus 2, dev 3, fn 4, reg 0x40: addr = BUS[47:40] DEV[39:35] FN[34:32] REG[31:0]
    cf8 = 0x80000000 | (2 << 16) | (3 << 11) | (4 << 8) | 0x40
    rows = [f"1,0,pio,W,0xcf8,4,{cf8 - 0x40:#x},i", "2,0,pio,R,0xcfc,2,0x1234,d",
            f"3,0,pio,W,0xcf8,4,{cf8:#x},i", "4,0,pio,R,0xcff,1,0x0,d"]
    reqs, _ = fwd(tmp_path, rows)
    assert int(reqs["addr"][-1]) == (2 << 40) | (3 << 35) | (4 << 32) | 0x43


def test_times_are_rebased_to_ns(tmp_path):
    reqs, _ = fwd(tmp_path, ["100,0,pio,W,0x402,1,0x41,dbg", "350,0,pio,W,0x402,1,0x42,dbg"])
    assert reqs["t_ns"].tolist() == [0, 250_000]


@pytest.mark.parametrize("rows,pattern", [
    (["1,0,pio,X,0x3f8,1,0x0,s"], r"c.csv:2: bad row"),
    (["1,0,disk,R,0x3f8,1,0x0,s"], r"c.csv:2: bad row"),
    (["1,0,pio,R,0x3f8,3,0x0,s"], r"c.csv:2: bad row"),
    (["1,0,pio,R,0x13f80,1,0x0,s"], r"c.csv:2: bad row"),
    (["5,0,pio,R,0x3f8,1,0x0,s", "4,0,pio,R,0x3f8,1,0x0,s"], r"c.csv:3: t_us goes back"),
])
def test_bad_csv_is_one_line_naming_file_and_line(tmp_path, rows, pattern):
    with pytest.raises(InputError, match=pattern) as ei:
        stream.read_csv(csv_file(tmp_path, rows))
    assert "\n" not in str(ei.value)


def test_wrong_header_and_not_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match=r"x.csv:1: expected columns"):
        stream.read_csv(p)
    p.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(InputError, match=r"x.csv: not a readable CSV"):
        stream.read_csv(p)


def test_stream_file_round_trip_and_layout(tmp_path):
    rows = ["0,0,pio,W,0x3f8,1,0x41,s", "10,1,mmio,W,0xb8000,8,0x1122334455667788,v",
            "20,0,pio,W,0x3f8,1,0x42,s", "30,1,mmio,R,0xa0000,4,0x0,v"]
    reqs, _ = fwd(tmp_path, rows)
    path = tmp_path / "s.stream"
    stream.write_stream(path, reqs)
    blob = path.read_bytes()
    magic, ver, hsize, ksize, rsize, n_keys, _, n_recs, dur = struct.unpack_from("<8sIIIIIIQQ",
                                                                                 blob)
    assert (magic, ver, hsize, ksize, rsize) == (b"IOTSTRM\0", 1, 48, 16, 24)
    assert (n_keys, n_recs, dur) == (3, 4, 30_000)
    assert len(blob) == 48 + 3 * 16 + 4 * 24
    # first key is the first request's (vcpu, type, dir, addr); records point at keys
    addr, vcpu, typ, d = struct.unpack_from("<QiBB", blob, 48)
    assert (addr, vcpu, typ, d) == (0x3f8, 0, TYPE_PIO, DIR_WRITE)
    keys_of_recs = [struct.unpack_from("<I", blob, 48 + 48 + i * 24 + 16)[0] for i in range(4)]
    assert keys_of_recs == [0, 1, 0, 2]
    back = stream.read_stream(path)
    np.testing.assert_array_equal(back, reqs)


def test_read_stream_rejects_damage(tmp_path):
    p = tmp_path / "s.stream"
    reqs, _ = fwd(tmp_path, ["0,0,pio,W,0x3f8,1,0x41,s"])
    stream.write_stream(p, reqs)
    blob = p.read_bytes()
    p.write_bytes(blob[:-1])
    with pytest.raises(InputError, match="truncated"):
        stream.read_stream(p)
    p.write_bytes(b"XXXXXXXX" + blob[8:])
    with pytest.raises(InputError, match="bad magic at offset 0"):
        stream.read_stream(p)


def test_whole_linux_boot_matches_the_readme(linux_boot_csv):
    rows = stream.read_csv(linux_boot_csv)
    assert len(rows) == 248_296
    reqs, st = stream.forward(rows)
    assert st.dropped_msi == 133
    ports = int(np.isin(reqs["type"], (TYPE_PIO, TYPE_PCI_CONFIG)).sum())
    # README: 93,464 port accesses reach qemu-dm when every 0xcfc-0xcff cycle counts; Xen
    # forwards config cycles only for functions QEMU registered (00.0, 01.0, 01.1, 01.3, 02.0).
    assert ports + st.dropped_pci_absent == 93_464
    assert st.registered_bdfs == [0x00, 0x08, 0x09, 0x0B, 0x10]
    assert st.buffered == int(((rows["space"] == 1) & (rows["dir"] == DIR_WRITE)
                               & (rows["addr"] >= 0xA0000) & (rows["addr"] <= 0xBFFFF)).sum())
    assert stream.truth(reqs, 1)["io"]  # non-empty, well-formed
