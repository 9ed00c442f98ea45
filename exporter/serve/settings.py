"""The ``exporter:`` section of the ``--config`` YAML file (the same file as the address map).

    exporter:
      vcpu_label: true            # false: drop the vcpu label (sum over vCPUs), fewer series
      domain_grace_seconds: 300   # series of a domain that went away disappear after this long

``iotrace.core.addrmap`` accepts the top-level key ``exporter`` and ignores it; this module is the
one that reads and validates it. Every problem is a ``ConfigError`` naming file:line: key.
"""
from __future__ import annotations

from dataclasses import dataclass

from iotrace.core.errors import ConfigError
from iotrace.core.yamlfile import MarkedDict, check_keys, load_yaml, require_mapping

DEFAULT_GRACE_SECONDS = 300.0
# A week: beyond that a "grace period" is a typo (milliseconds?) more likely than intent.
MAX_GRACE_SECONDS = 7 * 24 * 3600.0
SECTION = "exporter"
KEYS = ("vcpu_label", "domain_grace_seconds")


@dataclass(frozen=True)
class ExporterSettings:
    vcpu_label: bool = True
    domain_grace_seconds: float = DEFAULT_GRACE_SECONDS


def parse_settings(doc, path: str) -> ExporterSettings:
    """Settings from an already parsed config document (None or a mapping)."""
    if doc is None:
        return ExporterSettings()
    require_mapping(doc, path, "top level")
    section = doc.get(SECTION)
    if section is None:
        return ExporterSettings()
    line = doc.line_of(SECTION) if isinstance(doc, MarkedDict) else None
    require_mapping(section, path, SECTION, line)
    check_keys(section, KEYS, path, f"{SECTION}.")
    lof = section.line_of if isinstance(section, MarkedDict) else (lambda k: line)

    vcpu_label = section.get("vcpu_label", True)
    if not isinstance(vcpu_label, bool):
        raise ConfigError(f"expected true or false, got {vcpu_label!r}", path,
                          lof("vcpu_label"), f"{SECTION}.vcpu_label")

    grace = section.get("domain_grace_seconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise ConfigError(f"expected a number of seconds, got {grace!r}", path,
                          lof("domain_grace_seconds"), f"{SECTION}.domain_grace_seconds")
    grace = float(grace)
    if not 0 <= grace <= MAX_GRACE_SECONDS:
        raise ConfigError(f"expected 0..{int(MAX_GRACE_SECONDS)} seconds, got {grace:g}", path,
                          lof("domain_grace_seconds"), f"{SECTION}.domain_grace_seconds")
    return ExporterSettings(vcpu_label=vcpu_label, domain_grace_seconds=grace)


def load_settings(path: str | None) -> ExporterSettings:
    """Settings from the ``--config`` file (defaults when no file is given)."""
    if not path:
        return ExporterSettings()
    return parse_settings(load_yaml(path), path)
