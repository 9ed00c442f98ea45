"""Shared test fixtures and the root gate (helpers live in tests/support, imported as ``support``).

Tests that need root (BCC uprobes) are marked ``root`` and skipped when not root; CI runs as root,
so they run there.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from support import LINUX_BOOT_CSV, REAL_XENTRACE, REPO, require_shared


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BCC uprobes); CI runs these as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def real_xentrace() -> Path:
    return require_shared(REAL_XENTRACE)


@pytest.fixture
def linux_boot_csv() -> Path:
    return require_shared(LINUX_BOOT_CSV)


@pytest.fixture
def iotrace_exe() -> str:
    exe = REPO / ".venv" / "bin" / "iotrace"
    if exe.exists():
        return str(exe)
    found = shutil.which("iotrace")
    if not found:
        pytest.skip("iotrace is not installed (make install)")
    return found
