"""An exact observation window on running guests, made with ``xl pause``.

    with Window(host, ["bs1", "bs2"], workdir) as w:     # guests paused (and again at the end)
        w.spawn("xentrace", "xentrace -D -S 256 ... x.bin", ready="test -s x.bin")  # observers...
        w.spawn("record", "... record -o q.iotrec", ready="grep -q 'uprobe(s) on' record.log")
        w.run(seconds=10)       # unpause all, sleep, pause all; truth = serial bytes per guest
        w.stop_all()            # SIGINT to every observer, bounded wait for each to exit
    w.truth["bs1"]              # loop iterations of bs1 inside the window

A guest prints one byte per loop iteration on COM1: what its serial log grew by between the
unpause and the pause is its iteration count over the window, and the observers were attached for
all of it (they start before the unpause and stop after the pause and a drain).
"""
from __future__ import annotations

import shlex
import time

from vm.machine import MachineError

from xen.conftest import GUEST_DIR
from xen.guests import GUESTS

ATTACH_TIMEOUT = 300.0      # BCC compiles in Dom0 in 65-90 s under TCG
STOP_TIMEOUT = 60.0
DRAIN_SECONDS = 3.0
GONE = 99                   # exit status of a readiness check whose process has exited


def paused(guest: str) -> str:
    """A shell test: is the guest paused (xl list's state column has a p)?"""
    return f"xl list {guest} | awk 'NR == 2 {{print $5}}' | grep -q p"


class Window:
    def __init__(self, host, guests, workdir: str):
        self.host, self.guests, self.dir = host, list(guests), workdir
        self.pids: dict[str, int] = {}
        self.truth: dict[str, int] = {}
        self.seconds: float | None = None

    def __enter__(self) -> "Window":
        self.host.sh(f"rm -rf {self.dir} && mkdir -p {self.dir}")
        self.pause()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all(check=False)
        self.host.run(" ; ".join(f"{{ {paused(g)} || xl pause {g}; }}" for g in self.guests),
                      timeout=60)

    def pause(self) -> None:
        # Xen counts pauses (one unpause per pause): pause only what runs
        self.host.sh(" && ".join(f"{{ {paused(g)} || xl pause {g}; }}" for g in self.guests))

    def spawn(self, name: str, cmd: str, ready: str, timeout: float = ATTACH_TIMEOUT) -> None:
        """``cmd`` in the background in Dom0 (output in WORKDIR/NAME.log); wait until ``ready``
        (a shell test, run in WORKDIR) holds."""
        log = f"{self.dir}/{name}.log"
        pid = self.host.sh(f"cd {self.dir} && nohup setsid {cmd} > {log} 2>&1 < /dev/null & "
                           "echo $!").strip()
        self.pids[name] = int(pid)
        try:
            self.host.wait_until(f"cd {self.dir} && {{ kill -0 {pid} || exit {GONE}; }} && "
                                 f"( {ready} )", timeout, f"{name} ready", give_up=GONE)
        except MachineError:
            alive = self.host.run(f"kill -0 {pid}").ok
            raise self.host.error(f"{name} {'not ready' if alive else 'exited'} after "
                                  f"{timeout:g} s (ready: {ready})",
                                  self.host.run(f"tail -n 20 {log}").stdout) from None

    def run(self, seconds: float, until: str | None = None, most: float = 0.0) -> None:
        """Unpause every guest, sleep, pause them again (one command in Dom0: the window is
        as tight as xl makes it); the truth is each guest's serial growth in between.

        With ``until`` (a shell test run in WORKDIR) the window lasts at least ``seconds`` and
        then until the test holds, checked every second, ``most`` seconds at the longest: for
        observers whose pace under TCG varies from run to run (advise's intervals in Dom0)."""
        logs = {g: GUESTS[g].serial_log(GUEST_DIR) for g in self.guests}
        sizes = " ".join(f"$(stat -c %s {logs[g]})" for g in self.guests)
        wait = f"sleep {seconds}"
        if until is not None:
            extra = max(0, int(most - seconds))
            wait += (f" && for i in $(seq {extra}); do ( cd {self.dir} && {until} ) && break; "
                     "sleep 1; done")
        script = (f"echo {sizes}; " + " && ".join(f"xl unpause {g}" for g in self.guests) +
                  f" && {wait} && " + " && ".join(f"xl pause {g}" for g in self.guests) +
                  f" && echo {sizes}")
        t0 = time.monotonic()
        out = self.host.sh(script, timeout=max(seconds, most) + 120).split("\n")
        self.seconds = time.monotonic() - t0
        before, after = ([int(x) for x in line.split()] for line in out[:2])
        for g, b, a in zip(self.guests, before, after):
            # only loop bytes in the window, else the truth would be wrong
            tr_set = shlex.quote(GUESTS[g].loop_bytes.decode())
            other = self.host.sh(f"tail -c +{b + 1} {logs[g]} | head -c {a - b} | "
                                 f"tr -d {tr_set} | wc -c").strip()
            if other != "0":
                raise self.host.error(f"guest {g} printed {other} byte(s) other than its loop's "
                                      "in the window")
            self.truth[g] = a - b
        time.sleep(DRAIN_SECONDS)

    def stop_all(self, check: bool = True) -> None:
        for name, pid in list(self.pids.items()):
            r = self.host.run(f"kill -INT {pid}; for i in $(seq {int(STOP_TIMEOUT * 5)}); do "
                              f"kill -0 {pid} 2>/dev/null || exit 0; sleep 0.2; done; "
                              f"kill -KILL {pid}; exit 1", timeout=STOP_TIMEOUT + 30)
            del self.pids[name]
            if check and not r.ok:
                raise self.host.error(f"{name} did not stop within {STOP_TIMEOUT:g} s of SIGINT",
                                      self.host.run(f"tail -5 {self.dir}/{name}.log").stdout)


def near(got: int, n: int, per: int = 1) -> bool:
    """A window's edge can fall inside a loop iteration (xl pause stops a vCPU wherever it is,
    also while it waits for qemu's answer to a read: qemu counts that read in this window, Xen
    traces its completion in the next). The serial byte is the iteration's last request, so of
    a request made ``per`` times an iteration, the window holds those of n - 1 whole iterations
    and from none to all of the two partial ones at its edges, give or take the one read."""
    return per * (n - 1) - 1 <= got <= per * (n + 1) + 1
