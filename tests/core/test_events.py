"""iotrace.core.events: how an address reads (PCI config as BDF + register)."""
from iotrace.core.events import (
    TYPE_MMIO,
    TYPE_PCI_CONFIG,
    TYPE_PIO,
    format_address,
    pci_config_address,
)


def sbdf(seg, bus, dev, fn, reg):
    # Xen's layout: (sbdf << 32) | reg, sbdf = seg << 16 | bus << 8 | dev << 3 | fn
    return (((seg << 16) | (bus << 8) | (dev << 3) | fn) << 32) | reg


def test_pci_config_reads_as_bdf_and_register():
    assert pci_config_address(sbdf(0, 0, 1, 1, 0x3C)) == "00:01.1+0x3c"
    assert pci_config_address(0x800000000) == "00:01.0+0x0"
    assert pci_config_address(sbdf(0, 0xFF, 0x1F, 7, 0xFFC)) == "ff:1f.7+0xffc"
    assert pci_config_address(sbdf(1, 2, 3, 4, 0x10)) == "0001:02:03.4+0x10"
    assert format_address(TYPE_PCI_CONFIG, sbdf(0, 0, 3, 0, 0x10)) == "00:03.0+0x10"


def test_other_types_read_in_hex():
    assert format_address(TYPE_PIO, 0x3F8) == "0x3f8"
    assert format_address(TYPE_MMIO, 0xFED000F0) == "0xfed000f0"
    assert format_address(TYPE_MMIO, -1) == "0xffffffffffffffff"
