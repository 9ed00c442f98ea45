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

``xl pause`` stops a vCPU wherever it is: inside an iteration, or waiting for qemu's answer to a
read (qemu counts it in this window, Xen traces its completion in the next). ``Window(...,
exact=True)`` ends windows between iterations instead: the guests are told to stop on COM1
(guests/hold.inc) and hold, without any I/O, before the observers start; ``run`` tells them to
go, and after the seconds to stop again, and waits for each one's '!'. Every request of the
window then belongs to a whole iteration or to that go and stop (``STOP_AND_GO``): counts are
exact, reads included.
"""
from __future__ import annotations

import shlex
import time

from vm.machine import MachineError

from iotrace.core import events as E
from xen.conftest import GUEST_DIR
from xen.guests import GUESTS

ATTACH_TIMEOUT = 300.0      # BCC compiles in Dom0 in 65-90 s under TCG
STOP_TIMEOUT = 60.0
DRAIN_SECONDS = 3.0
GONE = 99                   # exit status of a readiness check whose process has exited
HOLD_TIMEOUT = 120          # a guest's '!' after its 'S' (seconds)
HELD = "!"                  # what a guest prints when it holds (guests/hold.inc)
# (vcpu, type, dir, addr) -> requests of one go and one stop (guests/hold.inc): the command reads,
# the interrupt handler's line status read, the interrupt enable writes, the '!'; the EOI goes
# to Xen's PIC (xentrace only)
STOP_AND_GO = {(0, E.TYPE_PIO, E.DIR_READ, 0x3F8): 2, (0, E.TYPE_PIO, E.DIR_READ, 0x3FD): 1,
               (0, E.TYPE_PIO, E.DIR_WRITE, 0x3F9): 2, (0, E.TYPE_PIO, E.DIR_WRITE, 0x3F8): 1}
STOP_AND_GO_XEN = {(0, E.TYPE_PIO, E.DIR_WRITE, 0x20): 1}


def paused(guest: str) -> str:
    """A shell test: is the guest paused (xl list's state column has a p)?"""
    return f"xl list {guest} | awk 'NR == 2 {{print $5}}' | grep -q p"


class Window:
    def __init__(self, host, guests, workdir: str, exact: bool = False):
        self.host, self.guests, self.dir, self.exact = host, list(guests), workdir, exact
        self.pids: dict[str, int] = {}
        self.truth: dict[str, int] = {}
        self.seconds: float | None = None

    def __enter__(self) -> "Window":
        self.host.sh(f"rm -rf {self.dir} && mkdir -p {self.dir}")
        self.pause()
        if self.exact:
            self.hold()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all(check=False)
        self.host.run(self._pause_all(), timeout=60)
        if self.exact:      # they go on at their next unpause (the 'G' waits in the UART)
            self.host.run(" ; ".join(self._tell(g, "G") for g in self.guests), timeout=60)

    def _pause_all(self) -> str:
        """Shell: pause every guest not paused (Xen counts pauses: one unpause per pause)."""
        return " ; ".join(f"{{ {paused(g)} || xl pause {g}; }}" for g in self.guests)

    def _tell(self, guest: str, command: str) -> str:
        return f"printf {command} > {GUESTS[guest].com1_in(GUEST_DIR)}"

    def _held(self, guest: str, holds: int) -> str:
        """A shell test: the guest's serial log holds ``holds`` '!' and ends with one."""
        log = GUESTS[guest].serial_log(GUEST_DIR)
        return (f"[ \"$(tail -c 1 {log})\" = '{HELD}' ] && "
                f"[ $(tr -cd '{HELD}' < {log} | wc -c) -eq {holds} ]")

    def _holds(self) -> dict[str, int]:
        return {g: int(self.host.sh(f"tr -cd '{HELD}' < {GUESTS[g].serial_log(GUEST_DIR)} | "
                                    "wc -c").strip()) for g in self.guests}

    def _wait_held(self, want: dict[str, int]) -> str:
        """Shell: wait (bounded) until every guest printed its next '!'; exit 1 if one did not."""
        every = " && ".join(self._held(g, n) for g, n in want.items())
        return (f"for i in $(seq {HOLD_TIMEOUT * 5}); do {{ {every}; }} && break; sleep 0.2; "
                f"done; {every}")

    def hold(self) -> None:
        """Tell every guest to go and then stop ("GS": whether it runs, holds, or holds with a
        'G' waiting, it ends up holding after one more '!'), wait until each holds, pause."""
        want = {g: n + 1 for g, n in self._holds().items()}
        r = self.host.run(" && ".join(self._tell(g, "GS") for g in self.guests) + " && " +
                          " && ".join(f"xl unpause {g}" for g in self.guests) +
                          " && { " + self._wait_held(want) + " ; } ; rc=$? ; " +
                          self._pause_all() + " ; exit $rc",
                          timeout=HOLD_TIMEOUT + 60)
        if not r.ok:
            raise self.host.error(f"guests {self.guests} did not all hold within "
                                  f"{HOLD_TIMEOUT} s of 'S'", r.stdout + r.stderr)

    def pause(self) -> None:
        self.host.sh(self._pause_all())

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
            wait += (f" && end=$(( $(date +%s) + {extra} )) && while [ $(date +%s) -lt $end ]; "
                     f"do ( cd {self.dir} && {until} ) && break; sleep 1; done")
        go = stop = ""
        if self.exact:
            holds = self._holds()
            go = " && " + " && ".join(self._tell(g, "G") for g in self.guests)
            stop = (" && " + " && ".join(self._tell(g, "S") for g in self.guests) + " && { " +
                    self._wait_held({g: n + 1 for g, n in holds.items()}) + " ; }")
        script = (f"echo {sizes}; " + " && ".join(f"xl unpause {g}" for g in self.guests) +
                  f"{go} && {wait}{stop} ; rc=$? ; " +
                  self._pause_all() + f" ; echo {sizes} ; exit $rc")
        t0 = time.monotonic()
        r = self.host.run(script, timeout=max(seconds, most) + HOLD_TIMEOUT + 120)
        self.seconds = time.monotonic() - t0
        out = r.stdout.split("\n")
        if not r.ok:
            raise self.host.error(f"window on {self.guests} failed (rc {r.rc}"
                                  + (f": a guest did not hold within {HOLD_TIMEOUT} s of 'S'"
                                     if self.exact else "") + ")",
                                  r.stdout + r.stderr + self.host.run(
                                      " ; ".join(f"tail -c 200 {logs[g]}; echo"
                                                 for g in self.guests)).stdout)
        before, after = ([int(x) for x in line.split()] for line in out[:2])
        for g, b, a in zip(self.guests, before, after):
            # only loop bytes in the window (and, exact, the '!' it ends with), else the truth
            # would be wrong
            tail = int(self.exact)
            tr_set = shlex.quote(GUESTS[g].loop_bytes.decode())
            other = self.host.sh(f"tail -c +{b + 1} {logs[g]} | head -c {a - b - tail} | "
                                 f"tr -d {tr_set} | wc -c").strip()
            if other != "0":
                raise self.host.error(f"guest {g} printed {other} byte(s) other than its loop's "
                                      "in the window")
            self.truth[g] = a - b - tail
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
