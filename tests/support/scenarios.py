"""The labelled scenarios of iotrace.analysis.scenarios, written once per test session.

``scenario_file(name)`` is the recording (with its host samples), ``settings_file()`` the
advise: config they are made for; both live in a private temporary directory removed at exit.
``first_changes(docs)`` reads ``iotrace advise --format json`` output (or the same dicts from the
library): the first change planned for each domain.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from iotrace.analysis import scenarios


@lru_cache(maxsize=None)
def _dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="iotrace-scenarios-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@lru_cache(maxsize=None)
def scenario_file(name: str) -> Path:
    return scenarios.write(scenarios.SCENARIOS[name], _dir() / f"{name}.iotrec")


def settings_file() -> Path:
    p = _dir() / "advise.yaml"
    if not p.exists():
        p.write_text(scenarios.SETTINGS_YAML)
    return p


def first_changes(docs) -> dict:
    """domain -> (t, change dict) of the first interval that planned a change for it."""
    out = {}
    for d in docs:
        for c in d["changes"]:
            out.setdefault(c["domain"], (d["t"], c))
    return out
