"""The advise: section of --config (iotrace.analysis.settings): defaults, every key, one-line
errors naming FILE:LINE: KEY."""
from __future__ import annotations

import pytest

from iotrace.analysis.settings import AdviseSettings, Bounds, load_advise
from iotrace.core.addrmap import AddressMap
from iotrace.core.errors import ConfigError

FULL = """\
pio:
  - {name: my-nic, start: 0xc100, end: 0xc1ff}
advise:
  interval: 30
  agree_intervals: 4
  min_history_seconds: 120
  baseline_window_seconds: 1800
  thresholds:
    idle_rate: 2
    io_wait: 0.25
    storm_factor: 20
    storm_min_rate: 100
    storm_dm_cpu: 0.5
    dom0_busy: 0.8
    dom0_pressure: 0.4
    starved_rise: 3
    cpu_bound: 0.7
  xl:
    min: 64
    max: 2048
    dom0_floor: 512
    storm_cap: 25
  cgroup: {min: 20, max: 400}
  domains:
    web:
      xl: {min: 256, max: 1024}
    00000000-0000-4000-8000-000000000007:
      exclude: true
"""


def write(tmp_path, text):
    p = tmp_path / "iotrace.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_without_a_file_or_section(tmp_path):
    assert load_advise(None) == AdviseSettings()
    assert load_advise(write(tmp_path, "pio: []\n")) == AdviseSettings()
    s = AdviseSettings()
    assert (s.interval, s.agree_intervals, s.min_history_seconds) == (60.0, 3, 600.0)
    assert s.bounds["xl"] == Bounds(32, 4096) and s.dom0_floor == 256


def test_every_key_is_read(tmp_path):
    s = load_advise(write(tmp_path, FULL))
    assert (s.interval, s.agree_intervals, s.min_history_seconds, s.baseline_window_seconds) == \
        (30.0, 4, 120.0, 1800.0)
    t = s.thresholds
    assert (t.idle_rate, t.io_wait, t.storm_factor, t.storm_min_rate, t.storm_dm_cpu, t.dom0_busy,
            t.dom0_pressure, t.starved_rise, t.cpu_bound) == (2, 0.25, 20, 100, 0.5, 0.8, 0.4, 3,
                                                               0.7)
    assert s.bounds == {"xl": Bounds(64, 2048), "cgroup": Bounds(20, 400)}
    assert (s.dom0_floor, s.storm_cap) == (512, 25)
    assert s.bounds_for("xl", "web", None) == Bounds(256, 1024)
    assert s.bounds_for("cgroup", "web", None) == Bounds(20, 400)     # the section's
    assert s.rule_for("anything", "00000000-0000-4000-8000-000000000007").exclude
    assert not s.rule_for("web", None).exclude


def test_the_address_map_accepts_the_section(tmp_path):
    amap = AddressMap.load(write(tmp_path, FULL))
    assert "my-nic" in amap.names


@pytest.mark.parametrize("text,line,key,words", [
    ("advise:\n  intervall: 5\n", 2, "advise.intervall", "unknown key"),
    ("advise:\n  interval: 0\n", 2, "advise.interval", "more than 0"),
    ("advise:\n  interval: fast\n", 2, "advise.interval", "expected a number"),
    ("advise:\n  agree_intervals: 2.5\n", 2, "advise.agree_intervals", "whole number"),
    ("advise:\n  agree_intervals: true\n", 2, "advise.agree_intervals", "whole number"),
    ("advise:\n  thresholds:\n    io_wait: 1.5\n", 3, "advise.thresholds.io_wait", "0..1"),
    ("advise:\n  thresholds:\n    storm_factor: 0.5\n", 3, "advise.thresholds.storm_factor",
     "1..1e+06"),
    ("advise:\n  thresholds:\n    zz: 1\n", 3, "advise.thresholds.zz", "unknown key"),
    ("advise:\n  xl:\n    min: 0\n", 3, "advise.xl.min", "1..65535"),
    ("advise:\n  xl:\n    min: 500\n    max: 100\n", 3, "advise.xl.min", "above max"),
    ("advise:\n  cgroup:\n    max: 20000\n", 3, "advise.cgroup.max", "1..10000"),
    ("advise:\n  cgroup:\n    dom0_floor: 5\n", 3, "advise.cgroup.dom0_floor", "unknown key"),
    ("advise:\n  domains:\n    web: 3\n", 3, "advise.domains.web", "expected a mapping"),
    ("advise:\n  domains:\n    web:\n      exclude: maybe\n", 4, "advise.domains.web.exclude",
     "true or false"),
    ("advise:\n  domains:\n    web:\n      xl: {min: 9, max: 3}\n", 4,
     "advise.domains.web.xl.min", "above max"),
    ("advise: [1, 2]\n", 1, "advise", "expected a mapping"),
])
def test_mistakes_are_one_line_with_file_line_and_key(tmp_path, text, line, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_advise(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: {key}: "), msg
    assert words in msg


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_advise(str(tmp_path / "nope.yaml"))
