"""``iotrace report``: what guests did, from a xentrace capture or an iotrace recording."""
from __future__ import annotations

import sys

from iotrace.cli.args import argtype, count
from iotrace.cli.config import load_config
from iotrace.core.errors import UserError
from iotrace.offline.capture import summarize_capture
from iotrace.offline.report import GROUPINGS, NEEDS_RIP, EventLister, grouped, to_table, write_json

HELP = "summarise a xentrace capture or an iotrace recording per domain, vCPU and device range"
EXAMPLES = """\
examples:
  iotrace report /var/tmp/trace.bin              # table: per domain, vCPU, range, address
  iotrace report --format json trace.bin         # the JSON contract (iotrace/offline/report.py)
  iotrace report --by rip trace.bin              # which guest instruction (RIP) made which requests
  iotrace report --events trace.bin | less       # every request, one line each (like snoop)
  iotrace report --cpu-hz 2.9e9 trace.bin        # service times with this host's TSC rate
  iotrace report --xenalyze-compat trace.bin     # count the way xenalyze does, for parity checks
  iotrace report --config ranges.yaml rec.iotr   # a recording, with the operator's address names
  xentrace -D -e hvm -e sched -T 10 /dev/stdout | iotrace report -     # straight from a pipe

capture a trace on a Dom0 (HVM + scheduler classes):
  xentrace -D -e hvm -e sched -T 10 /var/tmp/trace.bin

FILE may be "-" (standard input), /dev/stdin, a pipe or a named FIFO: the input is read once,
in chunks, in bounded memory whatever its length.

service time (AVG/P50/P95, SVC_US): from the VM exit that issued the request until the request
was answered - the vCPU's next VMENTRY, or, if the vCPU was descheduled while waiting (for
qemu), the moment Xen made it runnable again. The time it then waits for a pCPU is CPU
contention, not service, and is not included. xenalyze measures the same interval
(arc_cycles), so --xenalyze-compat changes which requests are counted, not their times.
Recordings of the qemu source: handle_ioreq's entry to its return in the device model.
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
                   help='xentrace capture or iotrace recording ("-": standard input)')
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (the contract; with --events: one object a line)")
    p.add_argument("--by", choices=tuple(GROUPINGS), default="range",
                   help="rows per range and address (default), or per guest RIP of the VM exit "
                        "that caused them (xentrace captures)")
    p.add_argument("--events", action="store_true",
                   help="list every request (time, domain, vCPU, address, data, service time, "
                        "RIP) instead of the summary")
    p.add_argument("--config", metavar="F", help="YAML address map overriding the PC default")
    p.add_argument("--cpu-hz", metavar="HZ", help="TSC frequency for xentrace timestamps "
                   "(default: xenalyze's default)")
    p.add_argument("--xenalyze-compat", action="store_true",
                   help="count as xenalyze does: one I/O per exit, its drop rules")
    p.add_argument("--top", type=argtype(count), metavar="N",
                   help="table: at most N rows per vCPU (N >= 1)")


def run(args) -> int:
    cfg = load_config(args.config)
    cfg.print_warnings("report")
    addrmap = cfg.addrmap
    cpu_hz = _cpu_hz(args.cpu_hz) if args.cpu_hz is not None else None
    if args.events:
        return _list_events(args, addrmap, cpu_hz)
    summary = summarize_capture(args.file, cpu_hz=cpu_hz, xenalyze_compat=args.xenalyze_compat,
                                rip=args.by in NEEDS_RIP)
    for w in summary.warnings:
        print(f"iotrace report: warning: {summary.path}: {w}", file=sys.stderr)
    table = grouped(summary, args.by, addrmap)
    if args.format == "json":
        write_json(sys.stdout, summary, table, args.by)
    else:
        sys.stdout.write(to_table(summary, table, args.by, top=args.top))
    return 0


def _list_events(args, addrmap, cpu_hz) -> int:
    lister = EventLister(addrmap, fmt=args.format)
    out = sys.stdout
    head = lister.header()
    if head:
        out.write(head + "\n")

    def show(batch):
        out.write("".join(line + "\n" for line in lister.lines(batch)))

    summary = summarize_capture(args.file, cpu_hz=cpu_hz, xenalyze_compat=args.xenalyze_compat,
                                on_events=show)
    for w in summary.warnings:
        print(f"iotrace report: warning: {summary.path}: {w}", file=sys.stderr)
    return 0
