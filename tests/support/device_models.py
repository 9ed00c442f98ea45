"""Real distro device models the resolver tests run against (resolved and attached to, never run).

* Debian 12's comes with ``apt-get install --no-install-recommends qemu-system-xen`` (make install
  does it): /usr/libexec/xen-qemu-system-i386, the known answer (probes/hook/offsets.yaml).
* Debian 13's is fetched from Debian's archive by ``scripts/fetch-device-model.sh`` into a cache
  outside the repository (/var/cache/iotrace/device-models/..., reused when present), so a fresh
  CI machine gets it by itself.

Outside CI a device model that cannot be had is a skip; in CI (CI=true) it is a failure.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import IN_CI, REPO

FETCH = REPO / "scripts" / "fetch-device-model.sh"


@dataclass(frozen=True)
class Build:
    name: str
    suite: str | None            # None: installed by make install
    package: str
    version: str
    path: str                    # inside the package / on the host
    build_id: str
    qemu: tuple[int, int]


DEBIAN12 = Build("Debian 12", None, "qemu-system-xen", "1:7.2+dfsg-7+deb12u18",
                 "/usr/libexec/xen-qemu-system-i386", "c1a56521a4a247be10c1564f57d5f7598eb5500b",
                 (7, 2))
DEBIAN13 = Build("Debian 13", "trixie", "qemu-system-xen", "1:10.0.13+ds-0+deb13u1",
                 "/usr/libexec/xen-qemu-system-i386", "2d2e917153c25206ebfdfa8d605a8c62eb719f51",
                 (10, 0))

# Debian 12's known answer (DESIGN.md, probes/hook/offsets.yaml): file offsets.
DEBIAN12_ANSWER = {"handle_ioreq": 0x520FE0, "buffered_ret": 0x521DFB, "sync_ret": 0x523039,
                   "send_vcpu": 0x50}


def _unavailable(msg: str):
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def path_of(build: Build) -> Path:
    """The binary of ``build`` on this machine (fetched into the cache when needed)."""
    if build.suite is None:
        p = Path(build.path)
        if not p.exists():
            _unavailable(f"{build.path} missing: apt-get install --no-install-recommends "
                         f"{build.package} (make install does it)")
        return p
    try:
        r = subprocess.run([str(FETCH), build.suite, build.package, build.version, build.path,
                            build.build_id], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _unavailable(f"fetching {build.name}'s {build.package} timed out")
    if r.returncode != 0:
        _unavailable(r.stderr.strip() or f"{FETCH} failed")
    return Path(r.stdout.strip().splitlines()[-1])
