"""``iotrace top``: the live per-domain view of guest I/O requests (full screen, or -b batch text).

Conventions from bcc tools and xentop/kvm_stat: positional ``[interval [count]]``, ``-b`` prints
plain-text tables (one per interval, each with a timestamp line) for logs and pipes. Sources: the
live qemu-dm probes (default), ``--source xentrace``, ``--replay FILE`` or ``--from URL`` (a remote
``iotrace serve``; no root needed here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from iotrace.cli.args import add_filter_arguments, argtype, count, duration, seconds
from iotrace.cli.source_args import (
    add_source_arguments,
    build_remote,
    check_source_arguments,
)
from iotrace.cli.stopsignals import interrupt_on_stop_signals
from iotrace.core.errors import UserError
from iotrace.core.filters import FilterError, make_filter
from iotrace.sources import registry
from iotrace.top.batch import FORMATS
from iotrace.top.columns import SORT_ORDER
from iotrace.top.model import Model
from iotrace.top.snapshot import Sampler

HELP = "live per-domain view of guest I/O requests (like top/xentop; -b for text)"
EXAMPLES = """\
examples:
  iotrace top                           # live qemu-dm probes, refresh every second (root)
  iotrace top 2                         # refresh every 2 s (or -d 2, as xentop)
  iotrace top -b 5 12                   # batch: a text table every 5 s, 12 times (for logs)
  iotrace top -b -d 1 -i 2              # the same with xentop's flags: delay 1 s, 2 iterations
  iotrace top -b --format csv 10 > io.csv   # CSV (or --format json: one JSON object per line)
  iotrace top -D web1 -e vcpu,range     # one domain, with its vCPUs and ranges expanded
  iotrace top --type pio --range 'com*' --sort bytes --slow 250us
  iotrace top --source xentrace         # Xen trace points (sees what Xen itself emulates too)
  iotrace top --replay capture.bin --speed 10
  iotrace top --from https://dom0-a:9878/metrics --from-auth @/etc/iotrace/from.auth --from-ca ca.pem
  iotrace top --source qemu --binary probes/standin/iotrace-standin   # the stand-in device model

Batch mode exits 1 when a source was down (each one said on stderr), 0 otherwise. REQS and BYTES
count since the source started; every other column covers the last interval.

keys: q quit, h help, s sort, f filter, enter expand, p pause (see h in the view)."""


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
    p.add_argument("interval", nargs="?", type=argtype(seconds), default=None,
                   help="seconds between refreshes (default 1)")
    p.add_argument("count", nargs="?", type=argtype(count), default=None,
                   help="number of refreshes, then exit (default: until q / Ctrl-C)")
    p.add_argument("-d", "--delay", type=argtype(seconds), default=None, metavar="SECONDS",
                   help="seconds between refreshes, as xentop's -d (same as INTERVAL)")
    p.add_argument("-i", "--iterations", type=argtype(count), default=None, metavar="N",
                   help="number of refreshes, as xentop's -i (same as COUNT)")
    p.add_argument("-b", "--batch", action="store_true",
                   help="print plain-text tables (one per interval) instead of the full-screen view")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="batch output: table (default), csv or json (one object per line); "
                        "implies -b")
    add_filter_arguments(p, "filters (repeatable or comma-separated)")
    p.add_argument("--sort", default="reqs", choices=SORT_ORDER,
                   help="sort domains by (default reqs = requests/s)")
    p.add_argument("--reverse", action="store_true", help="invert the sort order")
    p.add_argument("-e", "--expand", type=_expand, action="append", default=[],
                   metavar="vcpu,range,addr",
                   help="expand every domain into vCPUs, ranges, and/or addresses in ranges")
    p.add_argument("--slow", type=argtype(duration), default=1e-3, metavar="DURATION",
                   help="flag rows whose service-time p95 is at least DURATION, with its unit "
                        "as the view shows it: 250us, 1ms (default 1ms)")
    p.add_argument("--no-color", action="store_true", help="no colours (markers only)")
    add_source_arguments(
        p, replay_help="a recording or xentrace capture, replayed",
        speed_help="with --replay: X times real time (default 1); 0 = all at once",
        from_help="read a remote 'iotrace serve' /metrics page (http[s]://host:port)",
        binary_help="with --source qemu: device-model binary to probe (repeatable; default: the "
                    "known install paths and the ones running domains use)")
    p.add_argument("--config", metavar="FILE", help="YAML address map (names for port/MMIO ranges)")


SETTLE_SECONDS = 1.0     # without root: how long a live source may take to report its failure


def _timing(args) -> tuple[float, int | None]:
    """The refresh interval and count, from INTERVAL COUNT or xentop's -d/-i (one of each)."""
    if args.interval is not None and args.delay is not None and args.interval != args.delay:
        raise UserError("give the interval once: INTERVAL or -d/--delay")
    if args.count is not None and args.iterations is not None and args.count != args.iterations:
        raise UserError("give the count once: COUNT or -i/--iterations")
    interval = args.interval if args.interval is not None else args.delay
    return (1.0 if interval is None else interval), \
        (args.count if args.count is not None else args.iterations)


def build_source(args):
    check_source_arguments(args)
    if args.from_url:
        if args.config:
            raise UserError("--config does not apply to --from (the remote exporter names ranges)")
        return build_remote(args)
    from iotrace.cli.config import load_config
    cfg = load_config(args.config)
    cfg.print_warnings("top")
    addrmap = cfg.addrmap
    # top expands domains down to addresses: every source keeps per-address cells for it.
    if args.replay:
        return registry.build("replay", args.replay,
                              speed=1.0 if args.speed is None else args.speed,
                              addrmap=addrmap, keep_addr=True)
    kwargs = {"addrmap": addrmap, "keep_addr": True}
    if args.binary:
        kwargs["binaries"] = list(args.binary)
    return registry.build(args.source or "qemu", **kwargs)


def _normalise(args) -> None:
    """One interval and count (INTERVAL COUNT or -d/-i); --format implies batch mode."""
    args.interval, args.count = _timing(args)
    if args.format is not None:
        args.batch = True


def run(args) -> int:
    _normalise(args)
    try:
        filt = make_filter(args.domain, args.vcpu, args.range, args.type, args.dir)
    except FilterError as exc:
        raise UserError(str(exc)) from None
    _check_terminal(args)
    return run_source(args, build_source(args), filt)


def _check_terminal(args) -> None:
    if not args.batch and not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise UserError("not a terminal: use -b for plain-text output (e.g. iotrace top -b 1 10)")


def run_source(args, src, filt=None) -> int:
    """Start ``src`` (any object following iotrace.core.source.Source), show it, stop it."""
    _normalise(args)                   # idempotent: run() did it, a test's args may not have
    if filt is None:
        try:
            filt = make_filter(args.domain, args.vcpu, args.range, args.type, args.dir)
        except FilterError as exc:
            raise UserError(str(exc)) from None
    _check_terminal(args)
    model = Model(slow_p95=args.slow, sort=args.sort, reverse=args.reverse, filt=filt)
    for group in args.expand:
        for what in group:
            if what not in model.expand_all:
                model.toggle_all(what)
    interrupt_on_stop_signals()
    try:
        if not args.batch:     # compiling probes takes a moment; the view replaces this line
            print(f"iotrace top: starting the {getattr(src, 'name', '')} source...",
                  file=sys.stderr, flush=True)
        registry.start(src)
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
        finally:
            # the screen showed that the input is damaged; what exactly, once it is gone
            _say_warnings([_stats_or_none(src)], set())
        return 0
    finally:
        try:
            src.stop()
        except Exception as exc:  # never leave uprobes behind because of a later error
            print(f"iotrace top: stopping {src.name}: {exc}", file=sys.stderr)


def _stats_or_none(src):
    try:
        return src.stats()
    except Exception:          # a broken source is shown as down elsewhere
        return None


def _say_warnings(stats, said: set) -> None:
    """Each warning a source has about its input (a replayed file's damage), once, on stderr."""
    for st in stats:
        for line in getattr(st, "warnings", None) or ():
            if (st.name, line) not in said:
                said.add((st.name, line))
                print(f"iotrace top: source {st.name}: warning: {line}", file=sys.stderr)


def _check_privileges(src) -> None:
    """A live source that could not attach anything without root: say so, instead of an empty
    view (a source that fails *with* root stays visible as DOWN, with its error)."""
    if getattr(src, "name", "") not in registry.LIVE or os.geteuid() == 0:
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





def _run_batch(model: Model, take, args) -> int:
    """Print a table every interval; exit 1 if a source was down (said on stderr, once per
    source and reason), 0 otherwise. A filter that matches nothing is said on stderr too."""
    from iotrace.top import batch
    fmt = args.format or "table"
    n = 0
    said: set = set()
    down = False
    next_t = model.cur.t + args.interval       # from the baseline, not after the first read
    while args.count is None or n < args.count:
        time.sleep(max(0.0, next_t - time.monotonic()))
        next_t += args.interval
        model.update(take())
        view = model.view()
        sort = model.sort + (",reversed" if model.reverse else "")
        desc = model.filter.describe()
        if fmt == "csv":
            lines = batch.format_csv(view, header=n == 0)
            out = "\n".join(lines) + "\n" if lines else ""
        elif fmt == "json":
            out = batch.format_json(view, sort, desc) + "\n"
        else:
            out = "\n".join(batch.format_table(view, sort, desc)) + "\n\n"
        sys.stdout.write(out)
        sys.stdout.flush()
        _say_warnings(view.snapshot.stats, said)
        for st in view.snapshot.stats:
            if not st.up:
                down = True
                if (st.name, st.error) not in said:
                    said.add((st.name, st.error))
                    print(f"iotrace top: source {st.name} is down"
                          f"{': ' + st.error if st.error else ''}", file=sys.stderr)
        if desc and not view.rows and "filter" not in said:
            said.add("filter")
            print(f"iotrace top: the filter {desc} matches nothing (yet)", file=sys.stderr)
        n += 1
    return 1 if down else 0
