"""Domain names, as an operator knows them, and the one way every part spells a domain.

The name comes from xenstore ``/local/domain/N/name`` (every source asks here, so the qemu and the
xentrace sources agree), else the device model's ``-name``, else ``dom<N>``. ``xenstore-read``
(xen-utils) is used when present, and ``xenstore-list /local/domain`` tells which domains exist; on a
host without a running xenstore (or in tests) they fail fast and callers fall back.

``display_name(domid, names)`` is what the collector's ``domain`` label, ``top``, ``report`` and
``snoop`` show for a domain: the known name, else ``fallback_name``: ``unknown`` for domid -1 (a
record no pCPU owner could be found for), ``idle`` for Xen's idle domain, ``dom<N>`` otherwise.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Mapping

XENSTORE_READ = shutil.which("xenstore-read")
XENSTORE_LIST = shutil.which("xenstore-list")

DOMID_IDLE = 0x7FFF               # idle vCPUs' domain (xen/include/public/xen.h DOMID_IDLE)
DOMID_FIRST_RESERVED = 0x7FF0     # guests are 0 .. 0x7fef (xen/include/public/xen.h)
UNKNOWN_NAME = "unknown"
IDLE_NAME = "idle"


def fallback_name(domid: int) -> str:
    """The name of a domain nobody named: ``unknown`` (-1), ``idle`` (32767) or ``dom<N>``."""
    if domid < 0:
        return UNKNOWN_NAME
    if domid == DOMID_IDLE:
        return IDLE_NAME
    return f"dom{domid}"


def display_name(domid: int, names: Mapping[int, str] | None = None) -> str:
    """``names[domid]`` when it is a non-empty name, else ``fallback_name(domid)``."""
    if names:
        name = names.get(domid)
        if name:
            return name
    return fallback_name(domid)


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


def xenstore_domids(timeout: float = 2.0) -> set[int] | None:
    """The domids xenstore lists under /local/domain (the domains that exist now), or None when
    xenstore cannot tell. libxl removes a domain's /local/domain/N when it destroys it."""
    if not XENSTORE_LIST:
        return None
    try:
        out = subprocess.run([XENSTORE_LIST, "/local/domain"], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {int(w) for w in out.stdout.split() if w.isdigit()}


def domain_name(domid: int, qemu_name: str | None = None) -> str:
    """xenstore's name, else the device model's ``-name``, else ``fallback_name``."""
    return xenstore_name(domid) or qemu_name or fallback_name(domid)
