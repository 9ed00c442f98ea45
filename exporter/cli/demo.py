"""``iotrace demo`` (``make demo``): three stand-in guests and the live view on them, no Xen needed.

Builds the stand-in device model (probes/standin), starts three of them as domains with different
names, replay speeds and layouts, each looping over the bundled Linux-boot excerpt (or a stream or
CSV you give), then runs the live view on them: ``iotrace top --source qemu --binary <stand-in>``
when ``iotrace.cli.top`` is installed, else ``iotrace snoop``. The view probes the stand-ins exactly
as it would probe qemu-dm (BCC uprobes on handle_ioreq), so it needs root.

Device models are cleaned up on every exit: normal end, ``--duration`` elapsed, Ctrl-C, SIGTERM,
SIGHUP, and even SIGKILL of the demo (the stand-ins get SIGTERM from PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from iotrace.cli.args import checked, domid, seconds
from iotrace.core.domains import DOMID_FIRST_RESERVED
from iotrace.core.errors import UserError

HELP = "demo: three stand-in guests replaying real I/O, watched by the live view (root)"
EXAMPLES = """\
examples:
  sudo make demo                        # = python -m iotrace demo
  iotrace demo --duration 30            # stop by itself after 30 s
  iotrace demo --no-view                # only the three stand-ins; watch them with iotrace top
  iotrace demo --replay linux-boot-tcg.csv.gz --domid-base 200

The stand-ins are domains DOMID-BASE+1..+3 named web, db and batch (distinct speeds; db uses
QEMU 8.1's XenIOState layout). Quit the view with q or Ctrl-C; the device models go with it."""


@dataclass(frozen=True)
class Guest:
    offset: int          # domid = base + offset
    name: str
    speed: float
    layout: str


STARTUP_GRACE = 60.0     # seconds a batch view may take to compile and attach its probes
GUESTS = (Guest(1, "web", 1.0, "7.2"), Guest(2, "db", 4.0, "8.1"), Guest(3, "batch", 0.25, "7.2"))


def add_arguments(parser) -> None:
    parser.add_argument("--duration", metavar="S",
                        help="stop after S seconds (default: until the view quits or Ctrl-C)")
    parser.add_argument("--domid-base", default="100", metavar="N",
                        help="the stand-ins are domains N+1, N+2, N+3 (default 100)")
    parser.add_argument("--replay", metavar="FILE",
                        help="stream or CSV(.gz) capture to replay (default: the bundled stream)")
    parser.add_argument("--no-view", action="store_true",
                        help="start the stand-ins only and wait (watch them from another shell)")
    parser.add_argument("--view", choices=("auto", "top", "snoop"), default="auto",
                        help="live view to run (default: top if installed, else snoop)")


def _duration(text) -> float | None:
    return None if text is None else checked("--duration", seconds, text)


def _domid_base(text) -> int:
    v = checked("--domid-base", domid, text)
    top = DOMID_FIRST_RESERVED - 1 - len(GUESTS)
    if v > top:
        raise UserError(f"--domid-base: {v} outside 0..{top}")
    return v


def pick_view(choice: str = "auto") -> str | None:
    """'top' or 'snoop', whichever live view is installed (top preferred); None if neither."""
    have = {v: importlib.util.find_spec(m) is not None
            for v, m in (("top", "iotrace.cli.top"), ("snoop", "iotrace.probes.cli.snoop"))}
    if choice != "auto":
        return choice if have[choice] else None
    return "top" if have["top"] else "snoop" if have["snoop"] else None


def view_command(view: str, binaries: list[str], interactive: bool,
                 duration: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "iotrace", view]
    if view == "top":
        cmd += ["--source", "qemu"]
        for b in binaries:
            cmd += ["--binary", b]
        if not interactive:
            cmd += ["-b", "1"]
            if duration:
                cmd.append(str(max(1, int(duration))))
    return cmd


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


def start_guests(base: int, replay: str | None):
    from iotrace.probes.standin import runner as sr
    guests = []
    try:
        for g in GUESTS:
            s = sr.StandIn(base + g.offset, replay, name=g.name, speed=g.speed, loop=True,
                           layout=g.layout, die_with_parent=True)
            guests.append(s.start())
        time.sleep(0.2)
        dead = [s for s in guests if not s.running()]
        if dead:
            raise UserError(f"stand-in {dead[0].argv[-1]!r} exited at once: "
                            f"{dead[0].stderr_text().strip()}")
    except BaseException:
        stop_guests(guests)
        raise
    return guests


def stop_guests(guests) -> None:
    for s in guests:
        if s.running():
            try:
                s.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    for s in guests:
        s.stop(timeout=3)


def run(args) -> int:
    duration = _duration(args.duration)
    base = _domid_base(args.domid_base)
    view = None
    if not args.no_view:
        view = pick_view(args.view)
        if view is None:
            raise UserError("no live view installed (iotrace top or iotrace snoop): "
                            "use --no-view and watch with another tool")
        if os.geteuid() != 0:
            raise UserError("the live view probes device models with BCC uprobes: run as root "
                            "(sudo make demo), or use --no-view")
    if args.replay:
        from iotrace.probes.standin import stream
        stream.read_stream(stream.stream_for(args.replay))      # bad file: one line, before starting

    old = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    guests = []
    viewer = None
    try:
        guests = start_guests(base, args.replay)
        for g, s in zip(GUESTS, guests):
            print(f"iotrace demo: domain {base + g.offset} '{g.name}': pid {s.pid}, speed "
                  f"{g.speed:g}x, QEMU {g.layout} layout ({s.exe.name})", file=sys.stderr)
        deadline = time.monotonic() + duration if duration else None
        if view is None:
            print("iotrace demo: stand-ins running; Ctrl-C to stop", file=sys.stderr)
            while deadline is None or time.monotonic() < deadline:
                if not all(s.running() for s in guests):
                    raise UserError("a stand-in died unexpectedly")
                left = 0.2 if deadline is None else deadline - time.monotonic()
                time.sleep(min(0.2, max(0.0, left)))
            return 0
        interactive = sys.stdout.isatty() and sys.stdin.isatty()
        binaries = sorted({str(s.exe) for s in guests})
        cmd = view_command(view, binaries, interactive, duration)
        viewer = subprocess.Popen(cmd)
        if not interactive and deadline is not None:
            # batch view: it stops by itself after its count; allow for probe compilation
            deadline += STARTUP_GRACE
        while viewer.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                viewer.send_signal(signal.SIGINT if interactive else signal.SIGTERM)
                try:
                    viewer.wait(5)
                except subprocess.TimeoutExpired:
                    viewer.kill()
                return 0
            time.sleep(0.1)
        rc = viewer.returncode
        return 0 if rc in (0, 130, -signal.SIGINT) else rc
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        if viewer is not None and viewer.poll() is None:
            viewer.terminate()
            try:
                viewer.wait(5)
            except subprocess.TimeoutExpired:
                viewer.kill()
                viewer.wait()
        stop_guests(guests)
        for sig, h in old.items():
            signal.signal(sig, h)
