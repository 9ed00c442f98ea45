"""``iotrace report``: what guests did, from a xentrace capture or an iotrace recording."""
from __future__ import annotations

import sys

from iotrace.cli.args import add_filter_arguments, argtype, count
from iotrace.cli.config import load_config
from iotrace.core.errors import UserError
from iotrace.core.filters import FilterError, make_filter
from iotrace.offline.capture import summarize_capture
from iotrace.offline.inputs import ACCEPTED
from iotrace.offline.report import EventLister, to_table, write_csv, write_json
from iotrace.offline.rollup import DEFAULT_BY, LEVELS, SORTS, build, needs_rip, parse_by

HELP = "summarise a xentrace capture or an iotrace recording per domain, vCPU and device range"
EXAMPLES = f"""\
examples:
  iotrace report /var/tmp/trace.bin              # per domain, then per domain and range
  iotrace report --by range --top 5 --format csv trace.bin   # the 5 busiest ranges, raw numbers
  iotrace report --by vcpu,addr trace.bin        # every address of every vCPU
  iotrace report -D web --range 'ide*' --hist trace.bin      # one domain's IDE latency histograms
  iotrace report --sort p95 --top 10 trace.bin   # the 10 slowest ranges (95th percentile)
  iotrace report --by rip trace.bin              # which guest instruction (RIP) made which requests
  iotrace report --format json trace.bin         # the JSON contract (iotrace/offline/report.py)
  iotrace report --events trace.bin | less       # every request, one line each (like snoop)
  iotrace report --cpu-hz 2.9e9 trace.bin        # service times with this host's TSC rate
  iotrace report --xenalyze-compat trace.bin     # count the way xenalyze does, for parity checks
  iotrace report --config ranges.yaml rec.iotr   # a recording, with the operator's address names
  iotrace report trace.bin.gz                    # gzip-compressed: read as it is decompressed
  xentrace -D -e hvm -e sched -T 10 /dev/stdout | iotrace report -     # straight from a pipe

capture a trace on a Dom0 (HVM + scheduler classes):
  xentrace -D -e hvm -e sched -T 10 /var/tmp/trace.bin

FILE: {ACCEPTED}. It may be "-" (standard input), /dev/stdin, a pipe or a named FIFO: the
input is read once, in chunks, in bounded memory whatever its length.

--by: rows per domain, vcpu, range (default), addr or rip, or a comma-separated mix
(vcpu,addr: every address of every vCPU); every row carries its domain. --top N keeps the
first N rows in --sort order (default count: the N busiest). The filters (-D, --vcpu, --range,
--type, --dir; as in iotrace top) apply before everything: totals, shares and rates cover the
requests that pass. REQ/S: requests per second of the capture's span (first to last record).
BYTES: size x count (xentrace records no sizes: -). AVG P50 P95 MIN MAX: service time.

service time: from the VM exit that issued the request until the request was answered - the
vCPU's next VMENTRY, or, if the vCPU was descheduled while waiting (for qemu), the moment Xen
made it runnable again. The time it then waits for a pCPU is CPU contention, not service, and
is not included. xenalyze measures the same interval (arc_cycles), so --xenalyze-compat
changes which requests are counted, not their times. Recordings of the qemu source:
handle_ioreq's entry to its return in the device model.
"""


def _cpu_hz(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--cpu-hz: not a number: {text!r}") from None
    if not value > 0:
        raise UserError("--cpu-hz must be positive")
    return value


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE",
                   help='xentrace capture or iotrace recording, gzip-compressed or not '
                        '("-": standard input)')
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table (default), json (the contract; with --events: one object a "
                        "line) or csv (one header row, raw numbers)")
    p.add_argument("--by", type=argtype(parse_by), default=None, metavar="LEVELS",
                   help=f"rows per {', '.join(LEVELS)} or a comma-separated mix "
                        "(default range; rip: xentrace captures)")
    p.add_argument("--top", type=argtype(count), metavar="N",
                   help="only the first N rows (in --sort order: by default the N busiest)")
    p.add_argument("--sort", choices=SORTS, default=None,
                   help="order of the rows, largest first (default count; share orders as "
                        "count; avg/p95: service time)")
    p.add_argument("--hist", action="store_true",
                   help="service-time histogram of every row shown (text bars, as bcc's "
                        "biolatency), with min/max; json: the slots of each row")
    p.add_argument("--events", action="store_true",
                   help="list every request (time, domain, vCPU, address, data, service time, "
                        "RIP) instead of the summary; the filters apply")
    add_filter_arguments(p, "filters (repeatable or comma-separated; as in iotrace top)")
    p.add_argument("--config", metavar="F", help="YAML address map overriding the PC default")
    p.add_argument("--cpu-hz", metavar="HZ", help="TSC frequency for xentrace timestamps "
                   "(default: xenalyze's default)")
    p.add_argument("--xenalyze-compat", action="store_true",
                   help="count as xenalyze does: one I/O per exit, its drop rules")


def _filter(args):
    try:
        return make_filter(args.domain, args.vcpu, args.range, args.type, args.dir)
    except FilterError as exc:
        raise UserError(f"filter: {exc}") from None


def run(args) -> int:
    filt = _filter(args)
    if args.events:
        summary_only = [flag for flag, on in (("--by", args.by is not None),
                                              ("--top", args.top is not None),
                                              ("--sort", args.sort is not None),
                                              ("--hist", args.hist)) if on]
        if summary_only:
            raise UserError(f"{summary_only[0]} applies to the summary, not to --events "
                            "(which lists every request; the filters do apply)")
        if args.format == "csv":
            raise UserError("--events: --format table or json (csv is for the summary)")
    if args.hist and args.format == "csv":
        raise UserError("--hist: --format table or json (csv has one row per row shown)")
    cfg = load_config(args.config)
    cfg.print_warnings("report")
    addrmap = cfg.addrmap
    cpu_hz = _cpu_hz(args.cpu_hz) if args.cpu_hz is not None else None
    if args.events:
        return _list_events(args, addrmap, cpu_hz, filt)
    by = args.by or DEFAULT_BY
    summary = summarize_capture(args.file, cpu_hz=cpu_hz, xenalyze_compat=args.xenalyze_compat,
                                rip=needs_rip(by))
    for w in summary.warnings:
        print(f"iotrace report: warning: {summary.path}: {w}", file=sys.stderr)
    r = build(summary, addrmap, by, filt, args.sort or "count", args.top)
    if filt.active() and not r.requests and r.requests_seen:
        print(f"iotrace report: the filter {filt.describe()} matches none of the "
              f"{r.requests_seen} requests of {summary.path}", file=sys.stderr)
    if args.format == "json":
        write_json(sys.stdout, r, hist=args.hist)
    elif args.format == "csv":
        write_csv(sys.stdout, r)
    else:
        sys.stdout.write(to_table(r, hist=args.hist))
    return 0


def _list_events(args, addrmap, cpu_hz, filt) -> int:
    lister = EventLister(addrmap, fmt=args.format, filt=filt)
    out = sys.stdout
    head = lister.header()
    if head:
        out.write(head + "\n")

    def show(batch):
        out.write("".join(line + "\n" for line in lister.lines(batch)))

    def names(known):
        lister.names = dict(known)

    summary = summarize_capture(args.file, cpu_hz=cpu_hz, xenalyze_compat=args.xenalyze_compat,
                                on_events=show, on_names=names)
    for w in summary.warnings:
        print(f"iotrace report: warning: {summary.path}: {w}", file=sys.stderr)
    return 0
