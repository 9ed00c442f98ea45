"""Build, start and stop stand-in device models (probes/standin/standin.c) from Python.

The stand-in is a C program that looks like qemu-dm to a uprobe: its process runs the binary itself
with ``-xen-domid N`` in its own argv (no Python wrapper), it has a local (static) ``handle_ioreq``
symbol in .symtab, a XenIOState with ``send_vcpu`` at 0x50 (layout "7.2", binary
``iotrace-standin``) or 0x48 (layout "8.1", binary ``iotrace-standin-81``), and it serves a replayed
request stream through QEMU's call chain (cpu_handle_ioreq -> handle_ioreq for synchronous requests,
handle_buffered_iopage -> handle_ioreq for buffered ones; see standin.c's header comment).

Its command line (what ``iotrace standin`` execs; single or double dashes)::

    iotrace-standin -xen-domid N [-name NAME] -replay FILE.stream [-speed X] [-loop] [-hold]
                    [-truth OUT.json]
    iotrace-standin -print-layout     # one JSON line, see below

``-print-layout`` prints ``{"layout": "7.2", "send_vcpu_offset": 80, "handle_ioreq": {"vaddr": V,
"file_offset": F}, "ret_buffered": {...}, "ret_sync": {...}, "checked_at_run_time": true}``:
``ret_buffered`` / ``ret_sync`` are the return addresses of the ``call handle_ioreq`` in
handle_buffered_iopage / cpu_handle_ioreq (read from the code, so an attached uretprobe, which
swaps return addresses for its trampoline, does not disturb them; ``checked_at_run_time`` says
whether serving one request of each kind confirmed them). In a process, runtime address = load
base + vaddr; a uprobe reading ``*(u64 *)sp`` on entry of handle_ioreq compares against those.
The binaries are PIE, built with gcc -O2, symbols kept (``t handle_ioreq`` in ``nm``); each
exports its layout as the u32 object ``iotrace_send_vcpu_offset`` (readable from the file).

API (used by the tests of the probe engineers)::

    from iotrace.probes.standin import runner as sr
    exe = sr.build()                     # Path of the binary, (re)built with make if needed
    info = sr.layout_info()              # {"layout": "7.2", "send_vcpu_offset": 80,
                                         #  "handle_ioreq": {"vaddr", "file_offset"},
                                         #  "ret_buffered": {...}, "ret_sync": {...}}
    with sr.StandIn(domid=7, name="web", speed=0, loop=True) as s:   # bundled stream by default
        s.pid, s.argv, s.exe             # attach uprobes to s.exe at info["handle_ioreq"]["file_offset"]
        ...
    # leaving the block sends SIGTERM and waits (SIGKILL after `timeout`)

    s = sr.StandIn(3, stream="x.csv.gz", hold=True, truth="t.json").start()
    # die_with_parent=True: the stand-in gets SIGTERM if this Python process dies
    s.wait_exit(timeout) / s.stop() -> exit status; s.running(); s.stderr_text()

``stream`` may be a stream file or a CSV(.gz) capture (converted once and cached, see
``iotrace.probes.standin.stream.stream_for``); ``None`` is the bundled ``streams/linux-boot-excerpt.stream``.
A replay with ``speed=0`` and neither ``loop`` nor ``hold`` exits as soon as the stream is served
(milliseconds for the bundled stream): attach the uprobe to the binary (any pid) before ``start()``,
or use ``loop=True``, ``hold=True`` or ``speed=1``.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from iotrace.core.errors import UserError
from iotrace.probes.standin import stream as _stream

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE
BUNDLED_STREAM = HERE.parent / "streams" / "linux-boot-excerpt.stream"
LAYOUTS = {"7.2": "iotrace-standin", "8.1": "iotrace-standin-81"}
SEND_VCPU_OFFSET = {"7.2": 0x50, "8.1": 0x48}


def _out_dir() -> Path:
    """Build next to the source when writable (editable installs), else in the user's cache."""
    if os.access(SRC_DIR, os.W_OK):
        return SRC_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iotrace" / "standin"


def binary_path(layout: str = "7.2") -> Path:
    if layout not in LAYOUTS:
        raise UserError(f"unknown stand-in layout {layout!r} (choose {', '.join(LAYOUTS)})")
    return _out_dir() / LAYOUTS[layout]


def build(layout: str = "7.2", force: bool = False) -> Path:
    """Run make in probes/standin (a no-op when up to date); return the binary's path."""
    exe = binary_path(layout)
    out = exe.parent
    out.mkdir(parents=True, exist_ok=True)
    if not (SRC_DIR / "standin.c").exists():
        raise UserError(f"{SRC_DIR}/standin.c missing: reinstall iotrace")
    cmd = ["make", "-s", "-C", str(SRC_DIR), f"OUT={out}"]
    if force:
        cmd.append("-B")
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # two tests building at once must not race
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise UserError("make is not installed (apt-get install make gcc)") from None
    if res.returncode != 0 or not exe.exists():
        lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
        raise UserError(f"building the stand-in failed: {first.strip()}")
    return exe


def layout_info(layout: str = "7.2") -> dict:
    """What ``-print-layout`` reports for this build (offsets a probe needs)."""
    exe = build(layout)
    res = subprocess.run([str(exe), "-print-layout"], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise UserError(f"{exe} -print-layout failed: {res.stderr.strip()}")
    info = json.loads(res.stdout)
    info["exe"] = str(exe)
    return info


def command(domid: int, stream_file: str | os.PathLike, *, exe: str | os.PathLike,
            name: str | None = None, speed: float = 0.0, loop: bool = False, hold: bool = False,
            truth: str | os.PathLike | None = None) -> list[str]:
    """The stand-in's argv (argv[0] is the binary's path, as exec'd)."""
    argv = [str(exe), "-xen-domid", str(int(domid))]
    if name:
        argv += ["-name", name]
    argv += ["-replay", str(stream_file), "-speed", repr(float(speed))]
    if loop:
        argv.append("-loop")
    if hold:
        argv.append("-hold")
    if truth:
        argv += ["-truth", str(truth)]
    return argv


class StandIn:
    """One stand-in device model process for domain ``domid``."""

    def __init__(self, domid: int, stream: str | os.PathLike | None = None, *,
                 name: str | None = None, speed: float = 0.0, loop: bool = False,
                 hold: bool = False, truth: str | os.PathLike | None = None,
                 layout: str = "7.2", stdout=subprocess.DEVNULL, die_with_parent: bool = False):
        self.domid = int(domid)
        self.layout = layout
        self.exe = build(layout)
        self.stream = _stream.stream_for(stream if stream is not None else BUNDLED_STREAM)
        self.truth = truth
        self.argv = command(self.domid, self.stream, exe=self.exe, name=name, speed=speed,
                            loop=loop, hold=hold, truth=truth)
        self._stdout = stdout
        self._stderr = None
        self._die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("stand-in not started")
        return self.proc.pid

    def start(self) -> "StandIn":
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=self._stdout, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=_pdeathsig if self._die_with_parent else None)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (the stand-in writes its truth file and exits 0); SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def __enter__(self) -> "StandIn":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pdeathsig() -> None:
    """In the child before exec: get SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), so a
    killed demo leaves no device models behind."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)      # PR_SET_PDEATHSIG = 1 (linux/prctl.h)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
