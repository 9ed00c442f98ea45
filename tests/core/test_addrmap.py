"""The address map: PC defaults, operator overrides, vectorised lookup, and config errors."""
import numpy as np
import pytest

from iotrace.core.addrmap import OTHER, AddressMap
from iotrace.core.errors import ConfigError
from iotrace.core.events import TYPE_MMIO, TYPE_PCI_CONFIG, TYPE_PIO, TYPE_TIMEOFFSET


@pytest.fixture(scope="module")
def default_map():
    return AddressMap.default()


@pytest.mark.parametrize("type_, addr, name", [
    (TYPE_PIO, 0x3f8, "com1"), (TYPE_PIO, 0x3fd, "com1"), (TYPE_PIO, 0x2f8, "com2"),
    (TYPE_PIO, 0x3e8, "com3"), (TYPE_PIO, 0x2e8, "com4"), (TYPE_PIO, 0x20, "pic"),
    (TYPE_PIO, 0xa1, "pic"), (TYPE_PIO, 0x40, "pit"), (TYPE_PIO, 0x61, "pcspk"),
    (TYPE_PIO, 0x70, "rtc"), (TYPE_PIO, 0x1f0, "ide-primary"), (TYPE_PIO, 0x3f6, "ide-primary"),
    (TYPE_PIO, 0x170, "ide-secondary"), (TYPE_PIO, 0x376, "ide-secondary"),
    (TYPE_PIO, 0x3da, "vga"), (TYPE_PIO, 0x3c9, "vga"), (TYPE_PIO, 0xcf8, "pci-conf-addr"),
    (TYPE_PIO, 0xcfe, "pci-conf-data"), (TYPE_PIO, 0xb008, "acpi-pm-timer"),
    (TYPE_PIO, 0xb004, "acpi-pm"), (TYPE_PIO, 0x402, "qemu-debug"), (TYPE_PIO, 0x378, "lpt1"),
    (TYPE_PIO, 0x10, "xen-platform"), (TYPE_PIO, 0x60, "i8042"), (TYPE_PIO, 0x64, "i8042"),
    (TYPE_PIO, 0x65, OTHER), (TYPE_PIO, 0x3f7, "floppy"),
    (TYPE_MMIO, 0xa0000, "vga-lowmem"), (TYPE_MMIO, 0xbffff, "vga-lowmem"),
    (TYPE_MMIO, 0xc0000, OTHER), (TYPE_MMIO, 0xfee00300, "lapic"), (TYPE_MMIO, 0xfec00010, "ioapic"),
    (TYPE_MMIO, 0xfed000f0, "hpet"), (TYPE_MMIO, 0x1_0000_0000, OTHER),
    (TYPE_PCI_CONFIG, 0x0000_0008_0000_0004, "pci-config"), (TYPE_TIMEOFFSET, 0, "timeoffset"),
])
def test_default_names(default_map, type_, addr, name):
    assert default_map.name(type_, addr) == name


def test_handled_by_follows_xen_forwarding_rules(default_map):
    assert default_map.handled_by(TYPE_PIO, 0x61) == "xen"
    assert default_map.handled_by(TYPE_PIO, 0x21) == "xen"
    assert default_map.handled_by(TYPE_PIO, 0x80) == "none"
    assert default_map.handled_by(TYPE_PIO, 0xb000) == "xen"
    assert default_map.handled_by(TYPE_PIO, 0xb004) == "qemu"   # PM1a control reaches qemu
    assert default_map.handled_by(TYPE_PIO, 0x3f8) == "qemu"
    assert default_map.handled_by(TYPE_PIO, 0x9999) == "qemu"   # unknown: forwarded
    assert default_map.handled_by(TYPE_MMIO, 0xfee00000) == "xen"
    assert default_map.handled_by(TYPE_MMIO, 0xa0000) == "qemu"


def test_vectorised_lookup_matches_scalar(default_map):
    rng = np.random.default_rng(1)
    addrs = np.concatenate([rng.integers(0, 0x10000, 500), [0, 0xffff, 0x3f8, 0x3ff, 0x400]])
    types = np.zeros(len(addrs), dtype=np.uint8)
    idx = default_map.lookup(types, addrs.astype(np.uint64))
    for a, i in zip(addrs, idx):
        assert default_map.names[i] == default_map.name(TYPE_PIO, int(a))


def test_names_are_bounded(default_map):
    rng = np.random.default_rng(2)
    addrs = rng.integers(0, 2**63, 10000, dtype=np.int64).astype(np.uint64)
    idx = default_map.lookup(np.ones(len(addrs), dtype=np.uint8), addrs)
    assert set(idx.tolist()) <= set(range(len(default_map.names)))


def test_operator_override_wins_and_adds(tmp_path):
    cfg = tmp_path / "ranges.yaml"
    cfg.write_text("pio:\n  - {name: my-nic, start: 0xc100, end: 0xc1ff}\n"
                   "  - {name: console, start: 0x3f8, end: 0x3ff}\n"
                   "pci_config:\n  - {name: nic-cfg, bdf: '00:04.0'}\n")
    m = AddressMap.load(str(cfg))
    assert m.name(TYPE_PIO, 0xc150) == "my-nic"
    assert m.name(TYPE_PIO, 0xc000) == "pci-bar-io"       # default still there around it
    assert m.name(TYPE_PIO, 0x3f8) == "console"
    assert m.name(TYPE_PIO, 0x2f8) == "com2"
    assert m.name(TYPE_PCI_CONFIG, (4 << 35) | 0x10) == "nic-cfg"
    assert m.name(TYPE_PCI_CONFIG, (5 << 35) | 0x10) == "pci-config"


def test_replace_defaults(tmp_path):
    cfg = tmp_path / "ranges.yaml"
    cfg.write_text("replace_defaults: true\npio:\n  - {name: only, start: 0x100}\n")
    m = AddressMap.load(str(cfg))
    assert m.name(TYPE_PIO, 0x100) == "only"
    assert m.name(TYPE_PIO, 0x3f8) == OTHER


@pytest.mark.parametrize("text, line, key, words", [
    ("pio:\n  - {name: a, start: 0x10}\n  - {name: b, start: zz}\n", 3, "pio[1].start", "integer"),
    ("pio:\n  - {name: a, start: 0x20, end: 0x10}\n", 2, "pio[0].end", "before start"),
    ("pio:\n  - {name: a, start: 0x10000}\n", 2, "pio[0].start", "outside"),
    ("pio:\n  - {start: 0x10}\n", 2, "pio[0].name", "name"),
    ("pio:\n  - {name: other, start: 0x10}\n", 2, "pio[0].name", "reserved"),
    ("pio:\n  - {name: a, start: 1, colour: red}\n", 2, "pio[0].colour", "unknown key"),
    ("pio:\n  - {name: a, start: 1, handled_by: qemu-dm}\n", 2, "pio[0].handled_by", "expected one of"),
    ("mmio: 12\n", 1, "mmio", "list"),
    ("ranges: []\n", 1, "ranges", "unknown key"),
    ("replace_defaults: yes please\n", 1, "replace_defaults", "true or false"),
    ("pci_config:\n  - {name: x, bdf: '00:40.0'}\n", 2, "pci_config[0].bdf", "bdf"),
    ("pio:\n  - {name: a, start: 1}\n  name: b\n", 3, None, "invalid YAML"),
    ("pio: []\npio: []\n", 2, "pio", "duplicate"),
])
def test_config_errors_name_file_line_key(tmp_path, text, line, key, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        AddressMap.load(str(cfg))
    msg = str(err.value)
    assert msg.startswith(f"{cfg}:{line}: "), msg
    if key:
        assert f": {key}: " in msg, msg
    assert words in msg, msg
    assert "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        AddressMap.load(str(tmp_path / "absent.yaml"))


def test_empty_config_keeps_defaults(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing\n")
    assert AddressMap.load(str(cfg)).name(TYPE_PIO, 0x3f8) == "com1"
