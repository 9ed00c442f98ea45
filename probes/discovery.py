"""Device model processes -> Xen domains, from /proc and xenstore.

libxl starts the device model as ``<dm> -xen-domid N -no-shutdown ... -machine xenfv`` (or
``pc,accel=xen``); the per-domain PV backend process has ``-xen-domid N -xen-attach -M xenpv`` and
handles no ioreqs, so it is skipped. A pid is mapped the first time it is seen, and the mapping is
kept for as long as that process lives (its start time guards against pid reuse).

Domain names: xenstore ``/local/domain/N/name`` when ``xenstore-read`` works, else QEMU's ``-name``
(``-name guest=foo,debug-threads=on`` or ``-name foo``), else ``domN``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from iotrace.core import domains

PROC = "/proc"

# Where device models are installed (checked at start; any other path is found from its process):
KNOWN_PATHS = (
    # Debian, Ubuntu: package qemu-system-xen (what Debian's libxl starts by default)
    "/usr/libexec/xen-qemu-system-i386",
    # Upstream Xen's own qemu-xen build: <libexecdir>/xen/bin (Xen's config/Paths.mk.in,
    # LIBEXEC_BIN; libexecdir defaults to $exec_prefix/lib there, m4/paths.m4), for the prefixes
    # and libexecdirs distributions use: /usr/lib, /usr/local/lib (the default prefix), /usr/lib64
    # (SUSE-style), /usr/libexec (Fedora/RHEL-style)
    "/usr/lib/xen/bin/qemu-system-i386",
    "/usr/local/lib/xen/bin/qemu-system-i386",
    "/usr/lib64/xen/bin/qemu-system-i386",
    "/usr/libexec/xen/bin/qemu-system-i386",
)


@dataclass(frozen=True)
class DmProcess:
    pid: int
    domid: int
    name: str
    exe: str | None        # the binary (realpath of /proc/PID/exe), None if unreadable
    start_ticks: int       # /proc/PID/stat field 22: distinguishes a reused pid
    first_seen: float


def read_cmdline(pid: int, proc: str = PROC) -> list[str] | None:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else []


def start_ticks(pid: int, proc: str = PROC) -> int | None:
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields restart after the last ')'.
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(rest[19])            # field 22 overall (starttime)
    except (IndexError, ValueError):
        return None


def _opt(argv: list[str], name: str) -> str | None:
    """Value of a QEMU option given as -name V, --name V or -name=V."""
    for i, a in enumerate(argv):
        bare = a[1:] if a.startswith("--") else a
        if bare == name and i + 1 < len(argv):
            return argv[i + 1]
        if bare.startswith(name + "="):
            return bare[len(name) + 1:]
    return None


def parse_dm_cmdline(argv: list[str]) -> tuple[int, str | None] | None:
    """(domid, -name) of a device model serving ioreqs; None for anything else (including the
    -xen-attach PV backend)."""
    if not argv:
        return None
    flags = {a[1:] if a.startswith("--") else a for a in argv}
    if "-xen-attach" in flags:
        return None
    val = _opt(argv, "-xen-domid")
    if val is None:
        return None
    try:
        domid = int(val, 0)
    except ValueError:
        return None
    if not 0 <= domid < 0x7FF0:        # DOMID_FIRST_RESERVED
        return None
    name = _opt(argv, "-name")
    if name:
        # QEMU: -name [guest=]NAME[,process=...][,debug-threads=on]
        parts = name.split(",")
        guest = [p[len("guest="):] for p in parts if p.startswith("guest=")]
        name = guest[0] if guest else parts[0]
    return domid, name or None


# Names come from iotrace.core.domains (xenstore, else -name, else domN), shared with the xentrace source.
xenstore_name = domains.xenstore_name
domain_name = domains.domain_name


def inspect(pid: int, proc: str = PROC) -> DmProcess | None:
    """The device model behind ``pid``, or None if it is not one (or is gone)."""
    argv = read_cmdline(pid, proc)
    parsed = parse_dm_cmdline(argv) if argv else None
    if parsed is None:
        return None
    ticks = start_ticks(pid, proc)
    if ticks is None:
        return None
    exe = read_exe(pid, proc)
    domid, qname = parsed
    return DmProcess(pid, domid, domain_name(domid, qname), exe, ticks, time.time())


def read_exe(pid: int, proc: str = PROC) -> str | None:
    try:
        exe = os.path.realpath(os.readlink(f"{proc}/{pid}/exe"))
    except OSError:
        return None
    return exe[:-len(" (deleted)")] if exe.endswith(" (deleted)") else exe


def installed_binaries(paths=KNOWN_PATHS) -> list[str]:
    """The known install paths that exist (real paths, each once)."""
    out = []
    for p in paths:
        if os.path.exists(p):
            r = os.path.realpath(p)
            if r not in out:
                out.append(r)
    return out


def default_binaries(proc: str = PROC) -> list[str]:
    """The installed device models, plus the binaries of running device models."""
    out = installed_binaries()
    for dm in scan(proc).values():
        if dm.exe and dm.exe not in out:
            out.append(dm.exe)
    return out


def scan(proc: str = PROC) -> dict[int, DmProcess]:
    """Every running device model process (pid -> DmProcess)."""
    out = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for e in entries:
        if e.isdigit():
            dm = inspect(int(e), proc)
            if dm is not None:
                out[dm.pid] = dm
    return out


class ProcessMap:
    """pid -> DmProcess, captured the first time a pid is seen, dropped when it goes away.

    Processes that are not device models are remembered as such (None) so a busy non-DM process
    running the same binary costs one /proc read, not one per refresh."""

    def __init__(self, proc: str = PROC, grace_s: float = 2.0):
        self.proc = proc
        self.grace_s = grace_s       # keep a dead pid's mapping this long (events still queued)
        self._known: dict[int, DmProcess | None] = {}
        self._ticks: dict[int, int | None] = {}
        self._dead_since: dict[int, float] = {}

    def lookup(self, pid: int) -> DmProcess | None:
        if pid in self._known:
            return self._known[pid]
        dm = inspect(pid, self.proc)
        self._known[pid] = dm
        self._ticks[pid] = dm.start_ticks if dm else start_ticks(pid, self.proc)
        return dm

    def refresh(self) -> tuple[dict[int, DmProcess], set[int]]:
        """Pick up new device models from /proc; return (alive DMs, pids gone for good)."""
        for pid, dm in scan(self.proc).items():
            if pid not in self._known or self._known[pid] is None and \
                    self._ticks.get(pid) != dm.start_ticks:
                self._known[pid] = dm
                self._ticks[pid] = dm.start_ticks
        gone, now = set(), time.monotonic()
        for pid in list(self._known):
            ticks = start_ticks(pid, self.proc)
            if ticks is not None and ticks == self._ticks.get(pid):
                self._dead_since.pop(pid, None)
                continue
            since = self._dead_since.setdefault(pid, now)
            if now - since >= self.grace_s:
                gone.add(pid)
                del self._known[pid]
                self._ticks.pop(pid, None)
                del self._dead_since[pid]
        alive = {p: d for p, d in self._known.items() if d is not None
                 and p not in self._dead_since}
        return alive, gone

    def known(self) -> dict[int, DmProcess]:
        return {p: d for p, d in self._known.items() if d is not None}
