"""What the tests share: where the repository and the real data are, and the tool gates.

``from support import REPO, require_tool`` in any test; ``support.prometheus`` runs a real Prometheus,
``support.fakes`` holds the hand-fed sources and event-batch builders the unit tests use.

Tests that need an external program skip only when it is absent *and* we are not in CI: in CI
(CI=true) a missing tool is a failure, not a skip.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
REAL_XENTRACE = SHARED_DATA / "xentrace-hvm-real.bin"
LINUX_BOOT_CSV = SHARED_DATA / "linux-boot-tcg.csv.gz"
IN_CI = os.environ.get("CI") == "true"


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
