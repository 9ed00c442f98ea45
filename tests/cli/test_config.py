"""The one --config loader (iotrace.cli.config): every verb applies the same rules to the file."""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from iotrace.cli.config import load_config
from iotrace.core.errors import ConfigError
from iotrace.core.events import TYPE_PIO


def test_report_and_serve_reject_the_same_exporter_section(tmp_path, iotrace_exe, real_xentrace):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pio:\n  - {name: nic, start: 0xc100, end: 0xc1ff}\nexporter:\n"
                   "  vcpu_label: maybe\n")
    for argv in (["report", "--config", str(bad), str(real_xentrace)],
                 ["serve", "--config", str(bad), "--replay", str(real_xentrace),
                  "--web.listen-address", "127.0.0.1:0"]):
        r = subprocess.run([iotrace_exe, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.strip().endswith(f"{bad}:4: exporter.vcpu_label: expected true or false, "
                                         "got 'maybe'"), r.stderr


def test_duplicate_names_and_overlaps_warn_and_say_which_wins(tmp_path, iotrace_exe,
                                                             real_xentrace):
    f = tmp_path / "ranges.yaml"
    f.write_text("pio:\n"
                 "  - {name: nic, start: 0xc100, end: 0xc1ff}\n"
                 "  - {name: nic, start: 0xd000, end: 0xd0ff}\n"
                 "  - {name: nic-doorbell, start: 0xc180, end: 0xc18f}\n")
    cfg = load_config(str(f))
    assert len(cfg.warnings) == 2, cfg.warnings
    dup, over = cfg.warnings
    assert f"{f}:3:" in dup and "'nic' is used again" in dup and f"{f}:2" in dup
    assert f"{f}:4:" in over and "'nic-doorbell' overlaps 'nic'" in over
    assert "0xc180-0xc18f" in over and "'nic-doorbell' wins there" in over
    am = cfg.addrmap
    assert am.name(TYPE_PIO, 0xc185) == "nic-doorbell" and am.name(TYPE_PIO, 0xc1a0) == "nic"
    r = subprocess.run([iotrace_exe, "report", "--config", str(f), str(real_xentrace)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("iotrace report: warning: ")] \
        == [f"iotrace report: warning: {w}" for w in cfg.warnings]


def test_errors_name_yaml_kinds_not_python_classes(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("exporter: [1, 2]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(f))
    assert "got a list" in str(exc.value) and "Marked" not in str(exc.value)


def test_twenty_thousand_ranges_load_and_look_up_right(tmp_path):
    """A generated map of 20,000 disjoint MMIO ranges (each later one inside a 2 MiB stride),
    plus 2,000 that overlap others: every lookup names the right (last covering) range."""
    lines = ["mmio:"]
    for i in range(20000):
        base = 0x1_0000_0000 + i * 0x20_0000
        lines.append(f"  - {{name: r{i}, start: {base:#x}, end: {base + 0xfff:#x}}}")
    for i in range(0, 20000, 10):                  # overlapping: the second page of every 10th
        base = 0x1_0000_0000 + i * 0x20_0000 + 0x800
        lines.append(f"  - {{name: o{i}, start: {base:#x}, end: {base + 0x7ff:#x}}}")
    f = tmp_path / "big.yaml"
    f.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    cfg = load_config(str(f))
    took = time.monotonic() - t0
    am = cfg.addrmap
    probe = np.array([0x1_0000_0000 + i * 0x20_0000 + off for i in (0, 5, 10, 19990)
                      for off in (0, 0x7ff, 0x800, 0xfff, 0x1000)], dtype=np.uint64)
    got = [am.names[i] for i in am.lookup(np.ones(len(probe), dtype=np.uint8), probe)]
    assert got == ["r0", "r0", "o0", "o0", "other", "r5", "r5", "r5", "r5", "other",
                   "r10", "r10", "o10", "o10", "other", "r19990", "r19990", "o19990", "o19990",
                   "other"]
    assert len(cfg.warnings) == 101                # listed up to 100, then "more not listed"
    assert took < 120                              # was quadratic: minutes; see bench/config_load.py
