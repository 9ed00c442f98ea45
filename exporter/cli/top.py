"""``iotrace top``: the live per-domain view of guest I/O requests (full screen, or -b batch text).

Conventions from bcc tools and xentop/kvm_stat: positional ``[interval [count]]``, ``-b`` prints
plain-text tables (one per interval, each with a timestamp line) for logs and pipes. Sources: the
live qemu-dm probes (default), ``--source xentrace``, ``--replay FILE`` or ``--from URL`` (a remote
``iotrace serve``; no root needed here).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time

from iotrace.core.errors import UserError
from iotrace.core.source import LIVE_SOURCES, live_source_class
from iotrace.top.model import SORT_ORDER, FilterError, Model, Sampler, make_filter

HELP = "live per-domain view of guest I/O requests (like top/xentop; -b for text)"
EXAMPLES = """\
examples:
  iotrace top                           # live qemu-dm probes, refresh every second (root)
  iotrace top 2                         # refresh every 2 s
  iotrace top -b 5 12                   # batch: a text table every 5 s, 12 times (for logs)
  iotrace top -d web1 -e vcpu,range     # one domain, with its vCPUs and ranges expanded
  iotrace top --type pio --range 'com*' --sort bytes
  iotrace top --source xentrace         # Xen trace points (sees what Xen itself emulates too)
  iotrace top --replay capture.bin --speed 10
  iotrace top --from https://dom0-a:9878/metrics --from-auth ops:secret --from-ca ca.pem
  iotrace top --source qemu --binary probes/standin/iotrace-standin   # the stand-in device model

keys: q quit, h help, s sort, f filter, enter expand, p pause (see h in the view)."""


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return v


def _speed(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError("0 (all at once) or a positive factor")
    return v


def _expand(text: str) -> list[str]:
    out = []
    for w in text.split(","):
        w = w.strip().lower()
        w = {"vcpus": "vcpu", "ranges": "range", "addrs": "addr", "address": "addr",
             "addresses": "addr"}.get(w, w)
        if w not in ("vcpu", "range", "addr"):
            raise argparse.ArgumentTypeError(f"expected vcpu, range or addr, got {w!r}")
        out.append(w)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("interval", nargs="?", type=_pos_float, default=1.0,
                   help="seconds between refreshes (default 1)")
    p.add_argument("count", nargs="?", type=_count, default=None,
                   help="number of refreshes, then exit (default: until q / Ctrl-C)")
    p.add_argument("-b", "--batch", action="store_true",
                   help="print plain-text tables (one per interval) instead of the full-screen view")
    g = p.add_argument_group("filters (repeatable or comma-separated)")
    g.add_argument("-d", "--domain", action="append", default=[], metavar="NAME|ID",
                   help="only these domains (id, or name with shell wildcards)")
    g.add_argument("--vcpu", action="append", default=[], metavar="N",
                   help="only requests from these vCPUs (-1: unknown, e.g. buffered ioreqs)")
    g.add_argument("--range", action="append", default=[], metavar="GLOB",
                   help="only these named ranges (e.g. com1, 'ide-*', vga-lowmem, other)")
    g.add_argument("--type", action="append", default=[], metavar="TYPE",
                   help="only these request types: pio, mmio, pci_config, ...")
    p.add_argument("--sort", default="reqs", choices=SORT_ORDER,
                   help="sort domains by (default reqs = requests/s)")
    p.add_argument("--reverse", action="store_true", help="invert the sort order")
    p.add_argument("-e", "--expand", type=_expand, action="append", default=[],
                   metavar="vcpu,range,addr",
                   help="expand every domain into vCPUs, ranges, and/or addresses in ranges")
    p.add_argument("--slow", type=_pos_float, default=1.0, metavar="MS",
                   help="flag rows whose service-time p95 is at least MS milliseconds (default 1)")
    p.add_argument("--no-color", action="store_true", help="no colours (markers only)")
    s = p.add_argument_group("sources (default: live qemu-dm probes)")
    s.add_argument("--source", choices=("qemu", "xentrace"), default=None,
                   help="live source: qemu-dm uprobes (default) or Xen trace points")
    s.add_argument("--binary", action="append", default=[], metavar="PATH",
                   help="with --source qemu: device-model binary to probe (repeatable; "
                        "default: the known install paths and the ones running domains use)")
    s.add_argument("--replay", metavar="FILE", help="a recording or xentrace capture, replayed")
    s.add_argument("--speed", type=_speed, default=None, metavar="X",
                   help="with --replay: X times real time (default 1); 0 = all at once")
    s.add_argument("--from", dest="from_url", metavar="URL",
                   help="read a remote 'iotrace serve' /metrics page (http[s]://[user:pass@]host:port)")
    s.add_argument("--from-auth", metavar="USER:PASS",
                   help="basic auth for --from (or @FILE holding USER:PASS)")
    s.add_argument("--from-ca", metavar="FILE", help="CA certificate(s) to verify an https --from")
    s.add_argument("--from-source", metavar="NAME",
                   help="which of the remote exporter's sources to show (default qemu, else first)")
    s.add_argument("--from-timeout", type=_pos_float, default=5.0, metavar="S",
                   help="timeout of one --from scrape in seconds (default 5)")
    p.add_argument("--config", metavar="FILE", help="YAML address map (names for port/MMIO ranges)")


SETTLE_SECONDS = 1.0     # without root: how long a live source may take to report its failure


def build_source(args):
    picked = [n for n, v in (("--replay", args.replay), ("--from", args.from_url),
                             ("--source", args.source)) if v]
    if len(picked) > 1:
        raise UserError(f"{' and '.join(picked)} are exclusive: pick one source")
    if args.speed is not None and not args.replay:
        raise UserError("--speed only applies with --replay")
    if args.binary and (args.replay or args.from_url or args.source == "xentrace"):
        raise UserError("--binary only applies to the qemu source")
    if (args.from_auth or args.from_ca or args.from_source) and not args.from_url:
        raise UserError("--from-auth, --from-ca and --from-source need --from URL")
    if args.from_url:
        if args.config:
            raise UserError("--config does not apply to --from (the remote exporter names ranges)")
        from iotrace.sources.remote import RemoteSource
        return RemoteSource(args.from_url, auth=args.from_auth, cafile=args.from_ca,
                            source=args.from_source, timeout=args.from_timeout)
    from iotrace.core.addrmap import AddressMap
    addrmap = AddressMap.load(args.config) if args.config else None
    if args.replay:
        from iotrace.sources.replay import ReplaySource
        # top expands domains down to addresses: every source keeps per-address cells for it.
        return ReplaySource(args.replay, speed=1.0 if args.speed is None else args.speed,
                            addrmap=addrmap, keep_addr=True)
    cls = live_source_class(args.source or "qemu")
    kwargs = {"addrmap": addrmap, "keep_addr": True}
    if args.binary:
        kwargs["binaries"] = list(args.binary)
    return cls(**kwargs)


def _start(src) -> None:
    try:
        src.start()
    except UserError:
        raise
    except PermissionError as exc:
        raise UserError(f"source {src.name}: permission denied ({exc}); run as root, or watch "
                        "a host's exporter with --from URL") from None
    except Exception as exc:
        raise UserError(f"source {getattr(src, 'name', '?')} failed to start: "
                        f"{type(exc).__name__}: {exc}") from None


def run(args) -> int:
    try:
        filt = make_filter(args.domain, args.vcpu, args.range, args.type)
    except FilterError as exc:
        raise UserError(str(exc)) from None
    _check_terminal(args)
    return run_source(args, build_source(args), filt)


def _check_terminal(args) -> None:
    if not args.batch and not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise UserError("not a terminal: use -b for plain-text output (e.g. iotrace top -b 1 10)")


def run_source(args, src, filt=None) -> int:
    """Start ``src`` (any object following iotrace.core.source.Source), show it, stop it."""
    if filt is None:
        try:
            filt = make_filter(args.domain, args.vcpu, args.range, args.type)
        except FilterError as exc:
            raise UserError(str(exc)) from None
    _check_terminal(args)
    model = Model(slow_p95=args.slow / 1000.0, sort=args.sort, reverse=args.reverse, filt=filt)
    for group in args.expand:
        for what in group:
            if what not in model.expand_all:
                model.toggle_all(what)
    _interrupt_on_term()
    try:
        if not args.batch:     # compiling probes takes a moment; the view replaces this line
            print(f"iotrace top: starting the {getattr(src, 'name', '')} source...",
                  file=sys.stderr, flush=True)
        _start(src)
        _check_privileges(src)
        t0 = time.monotonic()  # after start(): probe compilation is not part of any interval
        take = Sampler([src])
        # The first refresh counts everything since the source started (a replay at --speed 0
        # already has all its totals now): the baseline is empty totals at t0. A remote
        # exporter's totals predate us, so there the first scrape is the baseline.
        first = take()
        if not getattr(src, "totals_predate_start", False):
            first.t, first.totals = t0, {}
        model.update(first)
        if args.batch:
            return _run_batch(model, take, args)
        from iotrace.top.screen import run_screen
        try:
            run_screen(model, take, args.interval, args.count, colour=not args.no_color)
        except Exception as exc:
            import curses
            if isinstance(exc, curses.error):
                raise UserError(f"cannot drive this terminal ({exc}); check TERM, "
                                "or use -b for plain-text output") from None
            raise
        return 0
    finally:
        try:
            src.stop()
        except Exception as exc:  # never leave uprobes behind because of a later error
            print(f"iotrace top: stopping {src.name}: {exc}", file=sys.stderr)


def _check_privileges(src) -> None:
    """A live source that could not attach anything without root: say so, instead of an empty
    view (a source that fails *with* root stays visible as DOWN, with its error)."""
    if getattr(src, "name", "") not in LIVE_SOURCES or os.geteuid() == 0:
        return
    # A source may fail asynchronously (xentrace exits at once without privileges): give it a
    # moment to settle before deciding.
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        st = src.stats()
        failed = not st.up or (st.probes_failed and not st.probes_attached)
        if failed or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not failed:
        return
    why = f" ({st.error})" if st.error else ""
    raise UserError(f"the {src.name} source could not start without root{why}: run as root, "
                    "or watch the host's 'iotrace serve' with --from URL")


def _on_term(signum, frame):
    raise KeyboardInterrupt


def _interrupt_on_term() -> None:
    """SIGTERM/SIGHUP (a supervisor, ``iotrace demo``, a closed ssh session) end top like Ctrl-C:
    through the ``finally`` that stops the source (detaching its uprobes) and restores the
    terminal."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_term)


def _run_batch(model: Model, take, args) -> int:
    from iotrace.top.batch import format_table
    n = 0
    next_t = model.cur.t + args.interval       # from the baseline, not after the first read
    while args.count is None or n < args.count:
        time.sleep(max(0.0, next_t - time.monotonic()))
        next_t += args.interval
        model.update(take())
        lines = format_table(model.view(), model.sort + (",reversed" if model.reverse else ""),
                             model.filter.describe())
        sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()
        n += 1
    return 0
