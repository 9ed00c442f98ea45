"""Shared test fixtures: where the real data lives, and the root/tool gates.

Tests that need root (BCC uprobes) are marked ``root`` and skipped when not root; CI runs as root,
so they run there. Tests that need an external program skip only when it is absent *and* we are not
in CI: in CI (CI=true) a missing tool is a failure, not a skip.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
REAL_XENTRACE = SHARED_DATA / "xentrace-hvm-real.bin"
LINUX_BOOT_CSV = SHARED_DATA / "linux-boot-tcg.csv.gz"
IN_CI = os.environ.get("CI") == "true"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BCC uprobes); CI runs these as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def require_tool(name: str) -> str:
    """Path of an external program; skip outside CI when absent, fail in CI."""
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is not installed: make install should have installed it")
    pytest.skip(f"{name} not installed")


def require_shared(path: Path) -> Path:
    if path.exists():
        return path
    if IN_CI:
        pytest.fail(f"{path} missing: CI must have ../shared beside the clone")
    pytest.skip(f"{path} missing")


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
