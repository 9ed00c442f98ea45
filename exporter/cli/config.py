"""The one loader of the ``--config`` file, for every verb: one read, one set of rules.

The file holds the address map (``pio:``, ``mmio:``, ``pci_config:``, ``replace_defaults:``;
``iotrace.core.addrmap``) and the exporter's settings (``exporter:``; ``iotrace.serve.settings``).
Every verb validates all of it, so a file ``report`` accepts is a file ``serve`` accepts; each
mistake is one ``FILE:LINE: KEY: reason`` line and exit 2. What is legal but probably not meant
(a range name used twice, overlapping ranges) comes back as warnings, which the verb prints.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from iotrace.core.addrmap import AddressMap
from iotrace.core.yamlfile import load_yaml
from iotrace.serve.settings import ExporterSettings, parse_settings


@dataclass
class Config:
    path: str | None
    addrmap: AddressMap
    exporter: ExporterSettings
    warnings: list[str] = field(default_factory=list)

    def print_warnings(self, verb: str, out=None) -> None:
        for w in self.warnings:
            print(f"iotrace {verb}: warning: {w}", file=out or sys.stderr)


def load_config(path: str | None) -> Config:
    """The defaults when ``path`` is None; else the file, every section checked."""
    doc = load_yaml(path) if path else None
    settings = parse_settings(doc, path)
    addrmap = AddressMap.from_document(doc, path)
    return Config(path, addrmap, settings, list(addrmap.warnings))
