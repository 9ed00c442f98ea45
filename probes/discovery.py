"""Device model processes -> Xen domains, from /proc and xenstore; where device models live.

libxl starts the device model as ``<dm> -xen-domid N -no-shutdown ... -machine xenfv`` (or
``pc,accel=xen``); the per-domain PV backend process has ``-xen-domid N -xen-attach -M xenpv`` and
handles no ioreqs, so it is skipped. A pid is mapped the first time it is seen, and the mapping is
kept for as long as that process lives (its start time guards against pid reuse). Any binary can
be a device model (``device_model_override=`` in a guest config): the ``-xen-domid`` argument
decides, not the path.

Discovery runs at every scrape and refresh, so it is incremental: one ``scandir`` of /proc, whose
entries carry the inode of each /proc/PID directory (a new one for every new process), and
/proc/PID files are read only for processes not seen before -- and, while they are young
(``YOUNG_S``), for processes that were not device models yet (a wrapper that execs the device
model, a fork that has not exec'd), whose command line can still change.

Domain names: xenstore ``/local/domain/N/name`` when ``xenstore-read`` works, else QEMU's ``-name``
(``-name guest=foo,debug-threads=on`` or ``-name foo``), else ``domN``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from iotrace.core import domains
from iotrace.core.domains import DOMID_FIRST_RESERVED
from iotrace.core.procfs import STARTTIME, stat_fields

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
YOUNG_S = 30.0          # a process this young may still exec: its command line is read again
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class DmProcess:
    pid: int
    domid: int
    name: str
    exe: str | None        # the binary (realpath of /proc/PID/exe), None if unreadable
    start_ticks: int       # /proc/PID/stat field 22: distinguishes a reused pid
    first_seen: float
    exe_id: tuple[int, int] | None = None   # (st_dev, st_ino) of the file it runs


def read_cmdline(pid: int, proc: str = PROC) -> list[str] | None:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else []


def start_ticks(pid: int, proc: str = PROC) -> int | None:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    rest = stat_fields(pid, proc)
    try:
        return int(rest[STARTTIME]) if rest is not None else None
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
    if not 0 <= domid < DOMID_FIRST_RESERVED:
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
    return DmProcess(pid, domid, domain_name(domid, qname), exe, ticks, time.time(),
                     exe_id(pid, proc))


def read_exe(pid: int, proc: str = PROC) -> str | None:
    try:
        exe = os.path.realpath(os.readlink(f"{proc}/{pid}/exe"))
    except OSError:
        return None
    return exe[:-len(" (deleted)")] if exe.endswith(" (deleted)") else exe


def exe_id(pid: int, proc: str = PROC) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file process ``pid`` runs: the file itself, even once it has been
    replaced or deleted on disk (a package upgrade), unlike its path."""
    try:
        st = os.stat(f"{proc}/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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

    Processes that are not device models are remembered as such (None), so a busy non-DM process
    costs nothing per refresh once it is older than YOUNG_S (see the module doc)."""

    def __init__(self, proc: str = PROC, grace_s: float = 2.0, young_s: float = YOUNG_S):
        self.proc = proc
        self.grace_s = grace_s       # keep a dead pid's mapping this long (events still queued)
        self.young_s = young_s
        self._known: dict[int, DmProcess | None] = {}
        self._ticks: dict[int, int | None] = {}
        self._ino: dict[int, int] = {}             # inode of /proc/PID when last checked
        self._dead_since: dict[int, float] = {}
        self.reads = 0                             # /proc/PID files read (for the bench)

    def lookup(self, pid: int) -> DmProcess | None:
        if pid in self._known:
            return self._known[pid]
        dm = inspect(pid, self.proc)
        self.reads += 3
        self._known[pid] = dm
        self._ticks[pid] = dm.start_ticks if dm else start_ticks(pid, self.proc)
        return dm

    def _young(self, ticks: int | None) -> bool:
        if ticks is None:
            return False
        try:
            now = time.clock_gettime(time.CLOCK_BOOTTIME)
        except (AttributeError, OSError):
            return False
        return now - ticks / CLK_TCK < self.young_s

    def _listing(self) -> dict[int, int]:
        out = {}
        try:
            with os.scandir(self.proc) as it:
                for e in it:
                    if e.name.isdigit():
                        try:
                            out[int(e.name)] = e.inode()
                        except OSError:
                            pass
        except OSError:
            pass
        return out

    def refresh(self) -> tuple[dict[int, DmProcess], set[int]]:
        """Pick up new device models from /proc; return (alive DMs, pids gone for good)."""
        listing = self._listing()
        now = time.monotonic()
        for pid, ino in listing.items():
            known = pid in self._known
            if known and self._ino.get(pid) == ino and pid not in self._dead_since:
                old = self._known[pid]
                if self._young(self._ticks.get(pid)):
                    self._recheck(pid, old)
                continue
            ticks = start_ticks(pid, self.proc)
            self.reads += 1
            if ticks is None:
                continue                            # gone already
            if known:
                if ticks == self._ticks.get(pid):   # same process (its /proc inode was redone)
                    self._ino[pid] = ino
                    self._dead_since.pop(pid, None)
                    continue
                self._dead_since.setdefault(pid, now)   # pid reused: the old one is dead
                continue
            dm = inspect(pid, self.proc)
            self.reads += 3
            self._known[pid] = dm
            self._ticks[pid] = ticks if dm is None else dm.start_ticks
            self._ino[pid] = ino
        gone = set()
        for pid in list(self._known):
            if pid in listing and pid not in self._dead_since:
                continue
            since = self._dead_since.setdefault(pid, now)
            if now - since >= self.grace_s:
                gone.add(pid)
                del self._known[pid]
                self._ticks.pop(pid, None)
                self._ino.pop(pid, None)
                del self._dead_since[pid]
        alive = {p: d for p, d in self._known.items() if d is not None
                 and p not in self._dead_since}
        return alive, gone

    def _recheck(self, pid: int, old: DmProcess | None) -> None:
        """A young process: it may have exec'd since (into a device model, or from a wrapper
        into the real binary)."""
        if old is None:
            argv = read_cmdline(pid, self.proc)
            self.reads += 1
            if argv and parse_dm_cmdline(argv) is not None:
                dm = inspect(pid, self.proc)
                self.reads += 3
                if dm is not None:
                    self._known[pid] = dm
            return
        ident = exe_id(pid, self.proc)
        self.reads += 1
        if ident is not None and ident != old.exe_id:
            self._known[pid] = DmProcess(old.pid, old.domid, old.name,
                                         read_exe(pid, self.proc) or old.exe, old.start_ticks,
                                         old.first_seen, ident)

    def known(self) -> dict[int, DmProcess]:
        return {p: d for p, d in self._known.items() if d is not None}
