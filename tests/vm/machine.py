"""Boot a guest under QEMU (TCG: no KVM needed) and run commands in it.

``Machine`` starts ``qemu-system-x86_64 -accel tcg`` with a kernel, an initrd, a command line, disks,
9p shares and a virtio-serial port for the harness agent (guest/agent.py, started by the guest's
init), waits for the agent's hello, runs commands (exit code, stdout, stderr, time) and shuts the
guest down. Everything is a parameter, so the same runner boots a Debian guest for the kernel
matrix (``Machine.for_image``) or Xen with a Dom0 (``kernel=xen``, ``append`` = Xen's arguments,
``initrd=multiboot_modules([(vmlinuz, dom0_args), (initrd, "")])``, ``cpu="EPYC,+svm,+npt,..."``).

Every wait is bounded (boot, each command, shutdown). A failure raises ``MachineError`` whose
message holds what went wrong and the guest console's relevant lines (panics, oopses, init and agent
messages, then the last lines), so a test failure reads like the guest's own story. The QEMU
process dies with its owner: ``shutdown()`` (context manager exit, test finalizer), an ``atexit``
hook for machines still running, and the kernel's PR_SET_PDEATHSIG (SIGKILL to QEMU when the Python
process that started it dies, whatever killed it).

    from vm.image import SPECS, ensure
    from vm.machine import Machine
    with Machine.for_image(ensure(SPECS["bookworm"]), shares=[Share(repo, "project")]) as m:
        r = m.run("uname -r")            # Result(rc, stdout, stderr, seconds, timed_out)
        m.check(["python3", "-c", "import bcc"], timeout=120)   # raises on rc != 0
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"              # shared read-only as tag "harness": agent.py lives there
AGENT_PORT = "iotrace.agent"
QEMU = "qemu-system-x86_64"
INIT = "/usr/local/sbin/iotrace-vm-init"
DEFAULT_BOOT_TIMEOUT = 300.0            # seconds to the agent's hello (TCG: 20-60 s usually)
ANSWER_MARGIN = 30.0                    # seconds the host waits beyond a command's own timeout
SHUTDOWN_TIMEOUT = 30.0
# Console lines worth showing first when something fails.
RELEVANT = re.compile(r"panic|oops|BUG:|WARNING:|Call Trace|segfault|error|fail|denied|"
                      r"iotrace-vm|Out of memory|killed process|blocked for more than|"
                      r"unable to|cannot|not found|timed out", re.IGNORECASE)


class MachineError(RuntimeError):
    """Boot, command or shutdown failure, with the guest console's relevant lines."""


@dataclass(frozen=True)
class Share:
    """A host directory offered to the guest over 9p (virtio), mounted at /mnt/<tag> by init."""
    path: Path
    tag: str
    readonly: bool = True


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


def multiboot_modules(modules) -> str:
    """QEMU's multiboot ``-initrd`` value for [(path, args), ...]: "path args,path args" (QEMU
    splits modules at commas, so neither paths nor arguments may hold one)."""
    parts = []
    for path, args in modules:
        text = f"{path} {args}".strip()
        if "," in text:
            raise ValueError(f"multiboot module {text!r}: QEMU cannot pass a comma")
        parts.append(text)
    return ",".join(parts)


_live: "weakref.WeakSet[Machine]" = weakref.WeakSet()


@atexit.register
def _kill_all() -> None:
    for m in list(_live):
        m.kill()


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL when the starting process dies (prctl(2)
    PR_SET_PDEATHSIG = 1), so no guest outlives a killed test run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    os.setpgrp()        # a Ctrl-C in the terminal goes to pytest, which then shuts QEMU down


class Machine:
    """One QEMU guest. Start it with ``start()`` or ``with``; see the module docstring."""

    def __init__(self, kernel: str | os.PathLike, *, initrd: str | os.PathLike | None = None,
                 append: str = "", disks=(), shares=(), name: str = "vm",
                 memory_mb: int = 1536, smp: int = 1, cpu: str = "max", accel: str = "tcg",
                 machine: str = "q35", extra_args=(), boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
                 workdir: str | os.PathLike | None = None, agent: bool = True):
        self.kernel, self.initrd, self.append = str(kernel), initrd, append
        self.disks = [Path(d) for d in disks]
        self.shares = list(shares)
        if agent and not any(s.tag == "harness" for s in self.shares):
            self.shares.append(Share(GUEST_DIR, "harness"))
        self.name, self.memory_mb, self.smp, self.cpu = name, memory_mb, smp, cpu
        self.accel, self.machine, self.extra_args = accel, machine, list(extra_args)
        self.boot_timeout, self.agent = boot_timeout, agent
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"iotrace-vm-{name}-"))
        self.console_log = self.workdir / "console.log"
        self.agent_sock = self.workdir / "agent.sock"
        self.proc: subprocess.Popen | None = None
        self.hello: dict | None = None
        self.boot_seconds: float | None = None
        self._sock: socket.socket | None = None
        self._rbuf = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.failed = False

    @classmethod
    def for_image(cls, image, *, append_extra: str = "", **kw) -> "Machine":
        """A machine booting ``image`` (vm.image.Image): its kernel and initrd, its root disk
        (``snapshot=on``: the image is never written), init = the harness init."""
        shares = list(kw.pop("shares", ()))
        ro = ",".join(s.tag for s in shares if s.readonly) or "-"
        append = (f"root=/dev/vda rw console=ttyS0,115200 init={INIT} panic=-1 "
                  f"iotrace.ro=harness,{ro} {append_extra}").strip()
        kw.setdefault("name", image.spec.name)
        return cls(image.kernel, initrd=image.initrd, append=append, disks=[image.rootfs],
                   shares=shares, **kw)

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """QEMU's argv."""
        argv = [QEMU, "-accel", self.accel, "-machine", self.machine, "-cpu", self.cpu,
                "-smp", str(self.smp), "-m", str(self.memory_mb), "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot",
                "-chardev", f"file,id=console,path={self.console_log}",
                "-serial", "chardev:console",
                "-kernel", self.kernel]
        if self.append:
            argv += ["-append", self.append]
        if self.initrd:
            argv += ["-initrd", str(self.initrd)]
        for i, disk in enumerate(self.disks):
            argv += ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on,index={i}"]
        for i, share in enumerate(self.shares):
            ro = ",readonly=on" if share.readonly else ""
            argv += ["-fsdev", f"local,id=fs{i},path={share.path},security_model=none{ro}",
                     "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={share.tag}"]
        if self.agent:
            argv += ["-device", "virtio-serial-pci,id=vser",
                     "-chardev", f"socket,id=agent,path={self.agent_sock},server=on,wait=off",
                     "-device", f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}"]
        return argv + self.extra_args

    def start(self) -> "Machine":
        if shutil.which(QEMU) is None:
            raise MachineError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        for path in [Path(self.kernel), *self.disks]:
            if not path.exists():
                raise MachineError(f"{self.name}: {path} does not exist")
        self.console_log.touch()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=open(self.workdir / "qemu.out", "wb"),
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _live.add(self)
        if not self.agent:
            return self
        try:
            self._connect(t0 + 30)
            self.hello = self._read_message(t0 + self.boot_timeout, waiting_for="the agent's hello")
            if self.hello.get("event") != "hello":
                raise self._error(f"unexpected first message from the agent: {self.hello}")
            self.boot_seconds = time.monotonic() - t0
        except BaseException:
            self.kill()
            raise
        return self

    def _connect(self, deadline: float) -> None:
        while True:
            self._check_alive("while starting")
            if self.agent_sock.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.agent_sock))
                    self._sock = s
                    return
                except OSError:
                    s.close()
            if time.monotonic() > deadline:
                raise self._error("QEMU did not open the agent socket within 30 s")
            time.sleep(0.05)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Ask the agent to power off; wait (bounded); then make sure QEMU is gone. The work
        directory (console log, sockets) is removed when this object made it and nothing failed;
        after a failure it stays for a look (its path is in the error)."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self._sock is not None:
            try:
                self._request({"op": "poweroff"}, timeout=10)
                self.proc.wait(timeout)
            except (MachineError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        if self._own_workdir and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """QEMU terminated now (SIGTERM, then SIGKILL) and the agent socket closed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _live.discard(self)

    def __enter__(self) -> "Machine":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- commands --------------------------------------------------------------------------------
    def run(self, cmd, timeout: float = 600, env: dict | None = None, cwd: str | None = None,
            stdin: bytes | None = None) -> Result:
        """Run ``cmd`` (a shell string, or an argv list) in the guest; its Result. Raises
        MachineError only when the guest cannot answer (dead, or silent past the timeout)."""
        req = {"op": "run", "timeout": timeout, "env": env or {}, "cwd": cwd or "/"}
        if isinstance(cmd, str):
            req["sh"] = cmd
        else:
            req["argv"] = [str(a) for a in cmd]
        if stdin is not None:
            req["stdin"] = base64.b64encode(stdin).decode()
        ans = self._request(req, timeout=timeout + ANSWER_MARGIN, what=_show(cmd))
        return Result(ans["rc"], base64.b64decode(ans["stdout"]).decode("utf-8", "replace"),
                      base64.b64decode(ans["stderr"]).decode("utf-8", "replace"),
                      ans["seconds"], ans["timed_out"])

    def check(self, cmd, timeout: float = 600, **kw) -> Result:
        """``run`` that raises MachineError unless the command exits 0 in time."""
        r = self.run(cmd, timeout=timeout, **kw)
        if not r.ok:
            why = f"timed out after {timeout:g} s" if r.timed_out else f"exited {r.rc}"
            raise self._error(f"`{_show(cmd)}` {why}", stderr=r.stderr or r.stdout)
        return r

    def ping(self, timeout: float = 30) -> bool:
        return bool(self._request({"op": "ping"}, timeout=timeout).get("pong"))

    def _request(self, req: dict, timeout: float, what: str = "") -> dict:
        with self._lock:
            if self._sock is None:
                raise self._error("no agent connection (machine not started or already shut down)")
            rid = next(self._ids)
            req = dict(req, id=rid)
            try:
                self._sock.sendall((json.dumps(req) + "\n").encode())
            except OSError as exc:
                raise self._error(f"cannot send to the agent: {exc}") from None
            deadline = time.monotonic() + timeout
            while True:
                msg = self._read_message(deadline, waiting_for=f"the answer to {what or req['op']}")
                if msg.get("id") == rid:
                    return msg

    def _read_message(self, deadline: float, waiting_for: str) -> dict:
        assert self._sock is not None
        while b"\n" not in self._rbuf:
            self._check_alive(f"while waiting for {waiting_for}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(f"no {waiting_for} within the time allowed")
            self._sock.settimeout(min(1.0, left))
            try:
                chunk = self._sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                raise self._error(f"agent connection lost ({exc}) while waiting for "
                                  f"{waiting_for}") from None
            if not chunk:
                self._check_alive(f"while waiting for {waiting_for}")
                time.sleep(0.2)
                continue
            self._rbuf += chunk
        line, self._rbuf = self._rbuf.split(b"\n", 1)
        return json.loads(line)

    def _check_alive(self, when: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            qemu_out = (self.workdir / "qemu.out").read_text(errors="replace").strip()
            extra = f"; QEMU said: {qemu_out[-500:]}" if qemu_out else ""
            raise self._error(f"QEMU exited ({self.proc.returncode}) {when}{extra}")

    # -- console ---------------------------------------------------------------------------------
    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def console_excerpt(self, relevant: int = 25, last: int = 15) -> str:
        """The console's relevant lines (see RELEVANT) and its last lines, without repeats."""
        lines = [ln.rstrip() for ln in self.console().replace("\r", "").splitlines()]
        tail = lines[-last:]
        rel = [ln for ln in lines[:-last] if RELEVANT.search(ln)][-relevant:]
        out = []
        if rel:
            out += ["  relevant console lines:"] + [f"    {ln}" for ln in rel]
        out += [f"  last console lines ({len(lines)} in all, {self.console_log}):"]
        out += [f"    {ln}" for ln in tail] or ["    (none)"]
        return "\n".join(out)

    def _error(self, what: str, stderr: str = "") -> MachineError:
        self.failed = True
        parts = [f"{self.name}: {what}"]
        if stderr:
            tail = stderr.strip().splitlines()[-20:]
            parts += ["  command output (last lines):"] + [f"    {ln}" for ln in tail]
        parts.append(self.console_excerpt())
        return MachineError("\n".join(parts))


def _show(cmd) -> str:
    text = cmd if isinstance(cmd, str) else shlex.join(str(a) for a in cmd)
    return text if len(text) <= 120 else text[:117] + "..."
