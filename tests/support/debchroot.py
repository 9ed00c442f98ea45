"""A fresh Debian 12 for package tests: a debootstrap chroot cached by its inputs, a private
copy-on-write copy of it per session, commands run inside in a private mount namespace.

    base = debchroot.base()          # /var/cache/iotrace/chroot/bookworm-<key>: built once, reused
    with debchroot.Session(base, binds={"/mnt/data": SHARED_DATA}) as s:
        r = s.run("apt-get", "update")                   # CompletedProcess (text), check=False
        r = s.sh("iotrace --version")                    # a shell command line

The base is ``debootstrap --variant=minbase`` of bookworm plus what a Dom0 has before iotrace
(``BASE_PACKAGES``: Debian 12's Xen device model), keyed by every input of its recipe (suite,
mirrors, packages, debootstrap's version, ``RECIPE``): a changed input builds a new one, an
unchanged one is reused. It is built under a lock into a temporary directory and renamed when
complete, so an interrupted build never passes for a base. A session mounts an overlayfs over it
(the changes go to a per-session directory, deleted at the end), so every session starts from the
same fresh system. Mounts (the overlay, /proc, /dev, binds) exist only in the namespace of each
command: nothing is mounted on the host. Downloaded .debs are kept in one shared apt archive
directory, so a warm run downloads nothing it already has. Needs root and Debian's archive.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("IOTRACE_CHROOT_CACHE", "/var/cache/iotrace/chroot"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
BASE_PACKAGES = ("qemu-system-xen",)      # /usr/libexec/xen-qemu-system-i386, as on a Dom0
RECIPE = 1                                # bump when the steps below change

SOURCES = f"""\
Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

ENV = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
       "DEBIAN_FRONTEND=noninteractive"]

# Runs in a fresh private mount namespace (unshare): $1 lower, $2 upper ("" = none: write to the
# lower directly, for building the base), $3 work, $4 merged, $5 apt archives, then pairs of
# (source, target in the chroot) bound read-only, "--", and the command.
_ENTER = r"""
set -e
lower=$1 upper=$2 work=$3 root=$4 archives=$5; shift 5
if [ -n "$upper" ]; then
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
else
    mount --bind "$lower" "$root"
fi
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
mkdir -p "$root/var/cache/apt/archives"
mount --bind "$archives" "$root/var/cache/apt/archives"
while [ "$1" != "--" ]; do
    mkdir -p "$root$2"
    mount --bind "$1" "$root$2"
    mount -o remount,bind,ro "$root$2"
    shift 2
done
shift
cp /etc/resolv.conf "$root/etc/resolv.conf"
exec chroot "$root" /usr/bin/env -i "$@"
"""


def _debootstrap_version() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def inputs() -> dict:
    return {"suite": SUITE, "mirror": MIRROR, "security": SECURITY, "variant": "minbase",
            "arch": subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                                   text=True).stdout.strip(),
            "packages": list(BASE_PACKAGES), "debootstrap": _debootstrap_version(),
            "recipe": RECIPE}


def base_path() -> Path:
    key = hashlib.sha256(json.dumps(inputs(), sort_keys=True).encode()).hexdigest()[:16]
    return CACHE / f"{SUITE}-{key}"


COMPLETE = ".iotrace-base-complete"


def base(log=print) -> Path:
    """The cached base chroot for the current inputs, built first if there is none."""
    path = base_path()
    if (path / COMPLETE).exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / COMPLETE).exists():                  # built while we waited
            return path
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{path.name}-", dir=CACHE))
        tmp.chmod(0o755)                                # it becomes a system's "/"
        try:
            _build(tmp, log)
            (tmp / COMPLETE).write_text(json.dumps(inputs(), indent=1) + "\n")
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")


def _build(root: Path, log) -> None:
    debs = CACHE / "debootstrap-debs"
    debs.mkdir(exist_ok=True)
    log(f"debchroot: debootstrap {SUITE} into {root}")
    # in a private mount namespace: what debootstrap mounts in the target goes away with it
    _check(subprocess.run(["unshare", "--mount", "--propagation", "private", "debootstrap",
                           "--variant=minbase", f"--cache-dir={debs}", SUITE, str(root), MIRROR],
                          capture_output=True, text=True),
           "debootstrap")
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES)
    # no service starts inside a chroot (Debian's policy-rc.d convention)
    rc = root / "usr/sbin/policy-rc.d"
    rc.write_text("#!/bin/sh\nexit 101\n")
    rc.chmod(0o755)
    s = Session(root, overlay=False)
    try:
        log("debchroot: " + " ".join(BASE_PACKAGES))
        _check(s.run("apt-get", "update"), "apt-get update")
        _check(s.run("apt-get", "install", "-y", "--no-install-recommends", *BASE_PACKAGES),
               "apt-get install " + " ".join(BASE_PACKAGES))
        _check(s.run("apt-get", "clean"), "apt-get clean")
    finally:
        s.close()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)


class Session:
    """Commands in a copy-on-write copy of ``base`` (``overlay=False``: in ``base`` itself)."""

    def __init__(self, base: Path, binds: dict[str, Path] | None = None, overlay: bool = True):
        self.base = Path(base)
        self.binds = {k: Path(v) for k, v in (binds or {}).items()}
        self.archives = CACHE / "apt-archives"
        (self.archives / "partial").mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
        self.upper = self.dir / "upper" if overlay else None
        self.work = self.dir / "work"
        self.root = self.dir / "root"
        for d in (self.upper, self.work, self.root):
            if d is not None:
                d.mkdir()

    def argv(self, *cmd: str) -> list[str]:
        pairs = [str(x) for target, src in self.binds.items() for x in (src, target)]
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, "sh",
                str(self.base), str(self.upper or ""), str(self.work), str(self.root),
                str(self.archives), *pairs, "--", *ENV, *cmd]

    def run(self, *cmd: str, timeout: float = 1800, input: str | None = None):
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True,
                              timeout=timeout, input=input)

    def sh(self, script: str, timeout: float = 1800):
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
