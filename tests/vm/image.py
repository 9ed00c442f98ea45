"""Bootable Debian images for the VM harness, built once and cached outside the repository.

An ``ImageSpec`` says what goes into an image (a Debian suite, the packages on top of a minbase
debootstrap); ``ensure(spec)`` returns the ``Image`` for it, building it with build-image.sh when no
image of the same inputs is cached. The cache key hashes everything that decides the image's
content: the suite, the package list, and the text of the files that build it (build-image.sh and
guest/init.sh, which it installs). Change any of them and the next ``ensure`` builds a new image; leave
them and it reuses the old one (a cold build takes minutes, a warm ``ensure`` milliseconds).

Layout of the cache (``IOTRACE_VM_CACHE``, default /var/cache/iotrace/vm)::

    <name>-<key>/rootfs.img  vmlinuz  initrd.img  kernel-release  packages.txt  spec.json  build.log
                 boot/       (a copy of the image's /boot)
    <name>-<key>.lock        flock(2) held while building: a second run waits, then reuses
    <name>-<key>.tmp-<pid>/  a build in progress (renamed into place when complete)
    <name>-<key>.failed/     the last failed build of that image: its build.log

Images are only read by the machines that boot them (``tests/vm/machine.py`` attaches them with
``snapshot=on``: a guest's writes go to a temporary overlay), so one image serves many runs at once.

    python3 tests/vm/image.py build bookworm     # build (or find) an image from the command line
    python3 tests/vm/image.py list
    python3 tests/vm/image.py prune --days 14   # images not used for 14 days (also after a build)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-image.sh"
# Files whose text decides an image's content: a change to any of them makes a new image.
BUILD_INPUTS = (BUILD_SCRIPT, HERE / "guest" / "init.sh")
DEFAULT_CACHE = Path("/var/cache/iotrace/vm")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 3600          # seconds; debootstrap + apt on a slow mirror, with margin


class ImageError(RuntimeError):
    """An image cannot be built (one line, plus where the build log is)."""


def cache_dir() -> Path:
    return Path(os.environ.get("IOTRACE_VM_CACHE") or DEFAULT_CACHE)


def mirror() -> str:
    return os.environ.get("IOTRACE_DEBIAN_MIRROR") or DEFAULT_MIRROR


@dataclass(frozen=True)
class ImageSpec:
    """What goes into an image: ``name`` (a label for the cache), the Debian ``suite``, the
    packages installed (``--no-install-recommends``) on a minbase debootstrap, and ``setup``:
    shell commands run with bash in the chroot afterwards (e.g. a Dom0 image enabling Xen's
    services and iotrace-vm-agent.service)."""
    name: str
    suite: str
    packages: tuple[str, ...]
    setup: str = ""

    def key(self) -> str:
        """A hash of every input of the image: suite, packages (order-insensitive), setup, build
        files."""
        h = hashlib.sha256()
        h.update(json.dumps({"suite": self.suite, "packages": sorted(set(self.packages)),
                             "setup": self.setup}, sort_keys=True).encode())
        for path in BUILD_INPUTS:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()[:16]

    def dirname(self) -> str:
        return f"{self.name}-{self.key()}"


@dataclass(frozen=True)
class Image:
    """A built image: the root filesystem and the kernel/initrd to boot it with."""
    spec: ImageSpec
    dir: Path
    rootfs: Path = field(init=False)
    kernel: Path = field(init=False)
    initrd: Path = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "rootfs", self.dir / "rootfs.img")
        object.__setattr__(self, "kernel", self.dir / "vmlinuz")
        object.__setattr__(self, "initrd", self.dir / "initrd.img")

    def boot_file(self, name: str) -> Path:
        """A file of the image's /boot, copied out at build time (e.g. "xen-4.17-amd64.gz")."""
        return self.dir / "boot" / name

    @property
    def kernel_release(self) -> str:
        return (self.dir / "kernel-release").read_text().strip()

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.rootfs, self.kernel, self.initrd,
                                         self.dir / "kernel-release"))


# The guests the kernel matrix boots (make test-kernels): each suite's own kernel and headers (BCC
# compiles against the running kernel's), Debian's BCC, and what iotrace imports.
GUEST_PACKAGES = ("linux-image-amd64", "linux-headers-amd64", "python3-bpfcc",
                  "python3-numpy", "python3-yaml", "python3-prometheus-client", "python3-bcrypt")
# Documentation, manual pages and translations are no use to a test guest (3-8% of the image).
GUEST_SETUP = "rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/*\n"
SPECS = {
    # Debian 12: kernel 6.1 (the Dom0 kernel of Xen 4.17 hosts)
    "bookworm": ImageSpec("bookworm", "bookworm", GUEST_PACKAGES, GUEST_SETUP),
    # Debian 13: kernel 6.12
    "trixie": ImageSpec("trixie", "trixie", GUEST_PACKAGES, GUEST_SETUP),
}


def cached(spec: ImageSpec, cache: Path | None = None) -> Image | None:
    """The cached image of ``spec``, or None."""
    img = Image(spec, (cache or cache_dir()) / spec.dirname())
    return img if img.complete() else None


def ensure(spec: ImageSpec, cache: Path | None = None, log=None) -> Image:
    """The image of ``spec``: from the cache, else built now (as root; minutes). Two processes
    asking for the same image at once: one builds, the other waits for it and reuses it."""
    cache = cache or cache_dir()
    img = cached(spec, cache)
    if img is None:
        cache.mkdir(parents=True, exist_ok=True)
        img = Image(spec, locked_build(cache / spec.dirname(), lambda tmp: _build(spec, tmp, log)))
        prune(cache, spec.name)
    os.utime(img.dir)        # last used (prune goes by it)
    return img


PRUNE_DAYS = 14


def prune(cache: Path, name: str | None = None, days: float = PRUNE_DAYS) -> list[Path]:
    """Remove the images (of ``name``, or all) not used for ``days``: older keys left behind
    by changed inputs. Images in use elsewhere (another checkout's key) were touched recently
    and stay. Returns what was removed."""
    cutoff = time.time() - days * 86400
    pattern = re.compile(rf"{re.escape(name) if name else '.+'}-[0-9a-f]{{16}}")
    gone = []
    for d in sorted(cache.iterdir()):
        if not pattern.fullmatch(d.name) or not d.is_dir() or d.stat().st_mtime >= cutoff:
            continue
        lock = d.with_name(d.name + ".lock")
        with open(lock, "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                # being built or checked right now
            shutil.rmtree(d, ignore_errors=True)
        lock.unlink(missing_ok=True)
        gone.append(d)
    return gone


def locked_build(final: Path, build) -> Path:
    """``final``, made by ``build(tmp)`` under the lock ``final``.lock unless it exists already.
    ``build`` fills a fresh ``final``.tmp-PID directory, which becomes ``final`` only when it
    returns: an interrupted or failed build leaves no ``final`` (a killed one leaves its tmp
    directory, removed by the next build of the same image)."""
    lock_path = final.with_name(final.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.exists():
            for stale in final.parent.glob(f"{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                build(tmp)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build(spec: ImageSpec, tmp: Path, log=None) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"building the {spec.name} image needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "mkfs.ext4", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is not installed (apt-get install debootstrap e2fsprogs "
                             "util-linux)")
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "build.log"
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"vm image {spec.dirname()}: building ({spec.suite}, {len(spec.packages)} packages; "
        f"log {log_path.name} in the image directory)")
    t0 = time.monotonic()
    env = dict(os.environ)
    if spec.setup:
        setup = tmp / "setup.sh"
        setup.write_text(spec.setup)
        env["SETUP_SCRIPT"] = str(setup)
    # build-image.sh wants an OUT_DIR that holds no image yet: tmp itself (rootfs/ goes inside)
    with open(log_path, "w") as out:
        try:
            res = subprocess.run(["bash", str(BUILD_SCRIPT), spec.suite, mirror(), str(tmp),
                                  *spec.packages], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            res = None
    if res is None or res.returncode != 0:
        keep = tmp.with_name(tmp.name.split(".tmp-")[0] + ".failed")     # the last failure's log
        shutil.rmtree(keep, ignore_errors=True)
        (tmp / "rootfs").exists() and shutil.rmtree(tmp / "rootfs", ignore_errors=True)
        os.rename(tmp, keep)
        tail = log_tail(keep / "build.log")
        why = "timed out" if res is None else f"exit {res.returncode}"
        raise ImageError(f"building the {spec.name} image failed ({why}): {tail} "
                         f"(log: {keep / 'build.log'})")
    (tmp / "spec.json").write_text(json.dumps(
        {"name": spec.name, "suite": spec.suite, "packages": list(spec.packages),
         "setup": spec.setup, "key": spec.key(), "mirror": mirror(), "seconds": round(time.monotonic() - t0, 1)},
        indent=1) + "\n")
    say(f"vm image {spec.dirname()}: built in {time.monotonic() - t0:.0f} s")


def log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="tests/vm/image.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the image of a spec")
    b.add_argument("name", choices=sorted(SPECS))
    sub.add_parser("list", help="the specs and whether each is cached")
    pr = sub.add_parser("prune", help="remove images not used for some days")
    pr.add_argument("--days", type=float, default=PRUNE_DAYS)
    args = p.parse_args(argv)
    if args.cmd == "prune":
        for d in prune(cache_dir(), days=args.days):
            print(f"removed {d}")
        return 0
    if args.cmd == "list":
        for name, spec in sorted(SPECS.items()):
            img = cached(spec)
            print(f"{name:10} {spec.dirname():28} {'cached ' + str(img.dir) if img else '-'}")
        return 0
    try:
        img = ensure(SPECS[args.name])
    except ImageError as exc:
        print(f"image.py: {exc}", file=sys.stderr)
        return 1
    print(f"{img.dir} (kernel {img.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
