"""``iotrace report``: what guests did, from a xentrace capture or an iotrace recording."""
from __future__ import annotations

import sys

from iotrace.cli.config import load_config
from iotrace.core.aggregate import Aggregator
from iotrace.core.errors import UserError
from iotrace.offline.capture import load_capture
from iotrace.offline.report import to_json, to_table

HELP = "summarise a xentrace capture or an iotrace recording per domain, vCPU and device range"
EXAMPLES = """\
examples:
  iotrace report /var/tmp/trace.bin              # table: per domain, vCPU, range, address
  iotrace report --format json trace.bin         # the JSON contract (see iotrace/report.py)
  iotrace report --cpu-hz 2.9e9 trace.bin        # service times with this host's TSC rate
  iotrace report --xenalyze-compat trace.bin     # count the way xenalyze does, for parity checks
  iotrace report --config ranges.yaml rec.iotr   # a recording, with the operator's address names

capture a trace on a Dom0 (HVM + scheduler classes):
  xentrace -D -e hvm -e sched -T 10 /var/tmp/trace.bin
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
    p.add_argument("file", metavar="FILE", help="xentrace capture or iotrace recording")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--config", metavar="F", help="YAML address map overriding the PC default")
    p.add_argument("--cpu-hz", metavar="HZ", help="TSC frequency for xentrace timestamps "
                   "(default: xenalyze's default)")
    p.add_argument("--xenalyze-compat", action="store_true",
                   help="count as xenalyze does: one I/O per exit, its drop rules")
    p.add_argument("--top", type=int, metavar="N", help="table: at most N rows per vCPU")


def run(args) -> int:
    cfg = load_config(args.config)
    cfg.print_warnings("report")
    addrmap = cfg.addrmap
    cpu_hz = _cpu_hz(args.cpu_hz) if args.cpu_hz is not None else None
    capture = load_capture(args.file, cpu_hz=cpu_hz, xenalyze_compat=args.xenalyze_compat)
    agg = Aggregator(addrmap, keep_addr=True)
    agg.add_batch(capture.events)
    for w in capture.warnings:
        print(f"iotrace report: warning: {args.file}: {w}", file=sys.stderr)
    if args.format == "json":
        sys.stdout.write(to_json(capture, agg))
    else:
        sys.stdout.write(to_table(capture, agg, top=args.top))
    return 0
