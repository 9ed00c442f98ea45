"""The `exporter:` section of the --config file (iotrace.serve.settings)."""
from __future__ import annotations

import pytest

from iotrace.core.addrmap import AddressMap
from iotrace.core.errors import ConfigError
from iotrace.serve.settings import DEFAULT_GRACE_SECONDS, ExporterSettings, load_settings


def write(tmp_path, text):
    p = tmp_path / "iotrace.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_without_file_or_section(tmp_path):
    assert load_settings(None) == ExporterSettings(True, DEFAULT_GRACE_SECONDS)
    assert load_settings(write(tmp_path, "pio:\n  - {name: x, start: 0x300}\n")) == \
        ExporterSettings()
    assert load_settings(write(tmp_path, "")) == ExporterSettings()


def test_values_and_shared_file_with_address_map(tmp_path):
    path = write(tmp_path, "pio:\n  - {name: mydev, start: 0x300, end: 0x307}\n"
                           "exporter:\n  vcpu_label: false\n  domain_grace_seconds: 30\n")
    assert load_settings(path) == ExporterSettings(vcpu_label=False, domain_grace_seconds=30.0)
    assert AddressMap.load(path).name(0, 0x301) == "mydev"   # the map reads the same file


@pytest.mark.parametrize("body,line,key,what", [
    ("exporter:\n  vcpu_label: 'no'\n", 2, "exporter.vcpu_label", "true or false"),
    ("exporter:\n  domain_grace_seconds: -1\n", 2, "exporter.domain_grace_seconds", "0.."),
    ("exporter:\n  domain_grace_seconds: 5m\n", 2, "exporter.domain_grace_seconds",
     "number of seconds"),
    ("exporter:\n  vcpu_label: true\n  grace: 3\n", 3, "exporter.grace", "unknown key"),
    ("exporter: [1, 2]\n", 1, "exporter", "expected a mapping"),
])
def test_errors_name_file_line_key(tmp_path, body, line, key, what):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:{line}: {key}: "), msg
    assert what in msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "nope.yaml"))
