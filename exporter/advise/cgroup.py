"""The ``cgroup`` backend: the CPU weight of each domain's device-model process inside Dom0.

Linux's proportional-share scheduler (CFS/EEVDF) divides a busy CPU between sibling cgroups in
proportion to their weight; a device model with a higher weight gets its requests served before
the others' (and before Dom0's other work), a lower one after. Advise works on the cgroup v2
scale (``cpu.weight`` 1..10000, default 100, Documentation/admin-guide/cgroup-v2.rst) and
supports both hierarchies, found from ``/proc/PID/cgroup`` and ``/proc/self/mountinfo``:

* **v1** (the ``cpu`` controller mounted as a ``cgroup`` hierarchy, e.g. /sys/fs/cgroup/cpu on a
  hybrid host): ``cpu.shares`` (2..262144, default 1024). A weight maps to shares as the kernel
  maps cpu.weight for v2 (kernel/sched/core.c cpu_weight_write_u64, factored out as
  sched_weight_from_cgroup in kernel/sched/sched.h): shares = round(weight x 1024 / 100), and
  back: weight = round(shares x 100 / 1024).
* **v2** (``cgroup2`` with ``cpu`` in its ``cgroup.controllers``, a systemd Dom0 such as
  Debian's): ``cpu.weight``.

Where the weight is set: the device model's own cgroup when it is alone in it (not the root):
nothing moves. Otherwise advise creates a group of its own for it, ``iotrace-dom<domid>-<pid>``,
and moves the process (all its threads: ``cgroup.procs``) there:

* v1: as a child of its current cgroup. v1 lets tasks and groups be siblings, and a new group's
  default 1024 shares weigh as much as one nice-0 task, so at its default weight the device
  model gets the share it had;
* v2: next to its current cgroup (a child of its parent), because v2's "no internal process"
  rule forbids processes and controller-enabled children in one cgroup; the parent gets
  ``+cpu`` in its ``cgroup.subtree_control`` if it lacks it. At the default weight 100 the
  device model then weighs as much as its former group did, like a libvirt per-VM scope.

Every change is runtime only (nothing is written to a unit file or fstab); the audit log keeps
what was there and ``--rollback`` restores it: the original value, the process moved back to
the cgroup it came from, the group advise created removed.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from iotrace.analysis.host import PROC, read_process_cpu
from iotrace.analysis.settings import CGROUP_DEFAULT, CGROUP_RANGE
from iotrace.core.errors import UserError

V1_SHARES = (2, 262144)          # MIN_SHARES, MAX_SHARES (kernel/sched/sched.h)
V1_DEFAULT = 1024
GROUP_PREFIX = "iotrace-dom"


def weight_to_shares(weight: int) -> int:
    """cgroup v2 weight -> v1 cpu.shares, as the kernel converts cpu.weight."""
    return min(max(int((int(weight) * 1024 + 50) // 100), V1_SHARES[0]), V1_SHARES[1])


def shares_to_weight(shares: int) -> int:
    """v1 cpu.shares -> the cgroup v2 weight scale (the kernel's cpu.weight read-back)."""
    return min(max(int((int(shares) * 100 + 512) // 1024), CGROUP_RANGE[0]), CGROUP_RANGE[1])


class CgroupError(UserError):
    exit_code = 1


@dataclass(frozen=True)
class Mount:
    fstype: str
    root: str            # the hierarchy path mounted there
    point: str
    superopts: tuple


@dataclass(frozen=True)
class Where:
    """Where a process sits in the hierarchy that holds the cpu controller."""
    mode: str            # "v1" | "v2"
    mount: str           # that hierarchy's mount point
    path: str            # the process's cgroup, as /proc/PID/cgroup says ("/" = root)
    dir: str             # its directory

    @property
    def is_root(self) -> bool:
        return self.path == "/"

    @property
    def knob_file(self) -> str:
        return os.path.join(self.dir, "cpu.shares" if self.mode == "v1" else "cpu.weight")


def read_mounts(proc: str = PROC) -> list[Mount]:
    """cgroup and cgroup2 mounts of this mount namespace (/proc/self/mountinfo)."""
    out = []
    try:
        with open(f"{proc}/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        out.append(Mount(rf[0], _unescape(lf[3]), _unescape(lf[4]), tuple(rf[2].split(","))))
    return out


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_proc_cgroup(pid: int, proc: str = PROC) -> list[tuple[str, tuple, str]] | None:
    """(hierarchy id, controllers, path) lines of /proc/PID/cgroup, or None if it is gone."""
    try:
        with open(f"{proc}/{int(pid)}/cgroup") as fh:
            text = fh.read()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrl, _, path = rest.partition(":")
        out.append((hid, tuple(c for c in ctrl.split(",") if c), path or "/"))
    return out


def _dir_of(mount: Mount, path: str) -> str | None:
    root = mount.root.rstrip("/") or "/"
    if root != "/" and not (path == root or path.startswith(root + "/")):
        return None                      # outside what this mount shows
    rel = path[len(root):] if root != "/" else path
    return os.path.normpath(mount.point + "/" + rel.lstrip("/"))


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def locate(pid: int, proc: str = PROC, mounts: list[Mount] | None = None) -> Where:
    """The cgroup of ``pid`` in the hierarchy with the cpu controller (v1 preferred where it
    is bound there: a controller lives in one hierarchy at a time)."""
    lines = read_proc_cgroup(pid, proc)
    if lines is None:
        raise CgroupError(f"process {pid} is gone")
    mounts = read_mounts(proc) if mounts is None else mounts
    for _hid, ctrls, path in lines:
        if "cpu" in ctrls:
            for m in mounts:
                if m.fstype == "cgroup" and "cpu" in m.superopts:
                    d = _dir_of(m, path)
                    if d is not None:
                        return Where("v1", m.point, path, d)
            raise CgroupError(f"process {pid} is in the v1 cpu hierarchy ({path}), which is not "
                              "mounted in this mount namespace")
    v2 = [m for m in mounts if m.fstype == "cgroup2"]
    for _hid, ctrls, path in lines:
        if _hid == "0" and not ctrls:
            for m in v2:
                d = _dir_of(m, path)
                if d is None:
                    continue
                try:
                    avail = _read(os.path.join(m.point, "cgroup.controllers")).split()
                except OSError:
                    avail = []
                if "cpu" in avail:
                    return Where("v2", m.point, path, d)
                raise CgroupError(f"cgroup2 at {m.point} has no cpu controller (it is bound to "
                                  "a v1 hierarchy, or disabled): no CPU weight to set there")
    raise CgroupError(f"process {pid}: no cgroup hierarchy with the cpu controller found")


def read_weight(where: Where) -> tuple[int, int]:
    """(weight on the v2 scale, the file's own value) of a cgroup; a v2 root has no cpu.weight
    (it weighs the default)."""
    try:
        raw = int(_read(where.knob_file).split()[0])
    except FileNotFoundError:
        if where.mode == "v2":
            return CGROUP_DEFAULT, CGROUP_DEFAULT
        raise CgroupError(f"{where.knob_file}: missing (no cpu controller here?)") from None
    except (OSError, ValueError, IndexError) as exc:
        raise CgroupError(f"{where.knob_file}: cannot read: {exc}") from None
    return (shares_to_weight(raw) if where.mode == "v1" else raw), raw


def _procs(d: str) -> set[int]:
    try:
        return {int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()}
    except (OSError, ValueError):
        return set()


@dataclass
class Group:
    """The cgroup advise sets for one device model, and how it got there."""
    mode: str
    dir: str
    file: str
    pid: int
    start_ticks: int
    created: bool               # advise made it (and removes it on rollback)
    moved_from: str | None      # the directory the process was moved from

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class CgroupBackend:
    """Reads and sets device models' CPU weights in Dom0's cgroups (root needed to write)."""

    knob = "cgroup"

    def __init__(self, proc: str = PROC):
        self.proc = proc
        self.groups: dict[tuple[int, int], Group] = {}      # (pid, start) -> its group

    def _alive(self, pid: int, start_ticks: int) -> bool:
        got = read_process_cpu(pid, self.proc)
        return got is not None and got[1] == start_ticks

    def read(self, pid: int) -> int:
        """The weight (v2 scale) the process runs under now."""
        return read_weight(locate(pid, self.proc))[0]

    def prepare(self, pid: int, domid: int) -> Group:
        """The device model's own group, made (and the process moved into it) if needed."""
        got = read_process_cpu(pid, self.proc)
        if got is None:
            raise CgroupError(f"device model {pid} of domain {domid} is gone")
        key = (pid, got[1])
        if key in self.groups and os.path.isdir(self.groups[key].dir):
            return self.groups[key]
        where = locate(pid, self.proc)
        name = f"{GROUP_PREFIX}{int(domid)}-{int(pid)}"
        if os.path.basename(where.dir) == name:          # ours, from an earlier run
            g = Group(where.mode, where.dir, where.knob_file, pid, got[1], False, None)
        elif not where.is_root and _procs(where.dir) == {pid}:
            g = Group(where.mode, where.dir, where.knob_file, pid, got[1], False, None)
            if where.mode == "v2":
                self._enable_cpu(os.path.dirname(where.dir), where)
        else:
            base = where.dir if where.mode == "v1" or where.is_root else os.path.dirname(where.dir)
            if where.mode == "v2":
                self._enable_cpu(base, where)
            d = os.path.join(base, name)
            try:
                os.mkdir(d)
                created = True
            except FileExistsError:
                created = False
            except OSError as exc:
                raise CgroupError(f"cannot create {d}: {exc.strerror}") from None
            file = os.path.join(d, "cpu.shares" if where.mode == "v1" else "cpu.weight")
            g = Group(where.mode, d, file, pid, got[1], created, where.dir)
            self._move(pid, d)
        self.groups[key] = g
        return g

    def _enable_cpu(self, parent: str, where: Where) -> None:
        """The cpu controller enabled in ``parent``'s subtree_control, and so first in each of
        its ancestors' from the mount point down (cgroup v2 offers a child only what its parent
        enabled: writing +cpu below a parent without it fails with ENOENT). Debian 12's systemd
        enables cpu nowhere unless a unit asks for CPUWeight=, so a device model libxl started
        from a service (system.slice/x.service) needs it on the root and on system.slice. The
        controller stays enabled after a rollback (systemd may also take it away again on a
        reload: it owns the tree)."""
        root = os.path.realpath(where.mount)
        chain = [os.path.realpath(parent)]
        while chain[-1] != root and chain[-1].startswith(root + os.sep):
            chain.append(os.path.dirname(chain[-1]))
        for d in reversed(chain):
            ctl = os.path.join(d, "cgroup.subtree_control")
            try:
                if "cpu" in _read(ctl).split():
                    continue
                _write(ctl, "+cpu")
            except OSError as exc:
                why = ("it holds processes of its own (cgroup v2 'no internal process' rule)"
                       if exc.errno == errno.EBUSY else exc.strerror)
                raise CgroupError(f"cannot enable the cpu controller below {d}: {why}") from None

    def _move(self, pid: int, d: str) -> None:
        try:
            _write(os.path.join(d, "cgroup.procs"), str(int(pid)))
        except OSError as exc:
            raise CgroupError(f"cannot move process {pid} into {d}: {exc.strerror}") from None

    def set_weight(self, g: Group, weight: int) -> tuple[int, int]:
        """Write the weight (v2 scale); returns (file value before, file value now), read back."""
        lo, hi = CGROUP_RANGE
        if not lo <= int(weight) <= hi:
            raise ValueError(f"cgroup weight {weight} outside {lo}..{hi}")
        raw = weight_to_shares(weight) if g.mode == "v1" else int(weight)
        try:
            before = int(_read(g.file).split()[0])
            _write(g.file, str(raw))
            after = int(_read(g.file).split()[0])
        except OSError as exc:
            raise CgroupError(f"{g.file}: {exc.strerror}") from None
        if after != raw:
            raise CgroupError(f"{g.file}: wrote {raw}, read back {after}")
        return before, after

    def restore(self, rec: dict) -> str:
        """Undo what one audit record's cgroup change did; returns what was done, in words."""
        cg = rec.get("cgroup") or {}
        pid, start = int(cg.get("pid", -1)), int(cg.get("start_ticks", -1))
        group, file = cg.get("dir"), cg.get("file")
        alive = self._alive(pid, start)
        if not alive:
            done = f"device model {pid} is gone"
            if cg.get("created") and group and os.path.isdir(group) and not _procs(group):
                try:
                    os.rmdir(group)
                    done += f"; removed {group}"
                except OSError:
                    pass
            return done
        if cg.get("created") or cg.get("moved_from"):
            back = cg.get("moved_from")
            if back and os.path.isdir(back):
                self._move(pid, back)
            if cg.get("created") and group and os.path.isdir(group):
                try:
                    os.rmdir(group)
                except OSError as exc:
                    return f"moved {pid} back to {back}; {group} kept: {exc.strerror}"
            self.groups.pop((pid, start), None)
            return f"moved {pid} back to {back}" + (f", removed {group}" if cg.get("created") else "")
        raw = cg.get("raw_original")
        if raw is None or not file:
            return "nothing recorded to restore"
        try:
            _write(file, str(int(raw)))
        except OSError as exc:
            raise CgroupError(f"{file}: {exc.strerror}") from None
        return f"{file} = {raw}"

    def forget(self, pid: int, start_ticks: int) -> str | None:
        """A device model went away: remove the empty group advise made for it."""
        g = self.groups.pop((pid, start_ticks), None)
        if g is None or not g.created or not os.path.isdir(g.dir) or _procs(g.dir):
            return None
        try:
            os.rmdir(g.dir)
        except OSError:
            return None
        return g.dir
