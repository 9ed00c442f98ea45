"""Domain names, as an operator knows them: xenstore ``/local/domain/N/name``.

Every source asks here, so names agree between the qemu and xentrace sources. ``xenstore-read``
(xen-utils) is used when present; on a host without a running xenstore (or in tests) it fails
fast and callers fall back to QEMU's ``-name`` and then to ``dom<N>``.
"""
from __future__ import annotations

import shutil
import subprocess

XENSTORE_READ = shutil.which("xenstore-read")


def xenstore_name(domid: int, timeout: float = 2.0) -> str | None:
    """The domain's name from xenstore, or None when xenstore cannot tell."""
    if not XENSTORE_READ or domid < 0:
        return None
    try:
        out = subprocess.run([XENSTORE_READ, f"/local/domain/{int(domid)}/name"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = out.stdout.strip()
    return name if out.returncode == 0 and name else None


def domain_name(domid: int, qemu_name: str | None = None) -> str:
    """xenstore's name, else the device model's ``-name``, else ``dom<N>``."""
    return xenstore_name(domid) or qemu_name or f"dom{domid}"
