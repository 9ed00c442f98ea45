"""``iotrace standin``: run a stand-in device model that replays guest I/O requests.

Builds the stand-in (probes/standin, gcc against <xen/hvm/ioreq.h>) if needed, converts a CSV
capture to a stream file (cached) when given one, then *execs* the C program so that the process a
uprobe sees is the stand-in itself with ``-xen-domid N`` in its argv. See
``iotrace.probes.standin.runner`` for the stand-in's own command line and a Python API.
"""
from __future__ import annotations

import os
import sys

from iotrace.cli.args import checked, domid
from iotrace.cli.args import speed as speed_arg
from iotrace.core.errors import UserError

HELP = "run a stand-in device model (looks like qemu-dm to a probe) replaying a request stream"
EXAMPLES = """\
examples:
  iotrace standin --xen-domid 7 --replay linux-boot-tcg.csv.gz --speed 1
  iotrace standin --xen-domid 7 -name web --loop                  # bundled stream, real time
  iotrace standin --xen-domid 3 --replay x.stream --speed 0 --hold --truth truth.json
  iotrace standin --print-layout                                   # offsets for probe tests

FILE is a CSV(.gz) in the columns t_us,vcpu,space,dir,addr,size,value,region (Xen's forwarding
rules are applied: iotrace.probes.standin.stream) or a stream file; default: the bundled excerpt of a
Linux boot. --speed 1 replays in real time, 0 as fast as possible. --truth writes the requests
issued, in the `io` JSON schema of `iotrace report`, when the stream ends and on SIGTERM."""


def add_arguments(parser) -> None:
    parser.add_argument("--xen-domid", "-xen-domid", dest="domid", metavar="N",
                        help="domain id the stand-in serves (as libxl passes to qemu-dm)")
    parser.add_argument("--replay", "-replay", metavar="FILE",
                        help="CSV(.gz) capture or stream file (default: the bundled stream)")
    parser.add_argument("--speed", "-speed", default="1", metavar="X",
                        help="replay speed: 1 real time (default), 2 twice as fast, 0 flat out")
    parser.add_argument("--loop", "-loop", action="store_true", help="replay again and again")
    parser.add_argument("--hold", "-hold", action="store_true",
                        help="stay alive, idle, after the stream ends, until SIGTERM")
    parser.add_argument("--truth", "-truth", metavar="OUT.json",
                        help="write the requests issued (io JSON) when the stream ends")
    parser.add_argument("--name", "-name", dest="name", metavar="NAME", help="domain name")
    parser.add_argument("--layout", choices=("7.2", "8.1"), default="7.2",
                        help="XenIOState layout: QEMU 7.2 (send_vcpu 0x50, default) or 8.1 (0x48)")
    parser.add_argument("--print-layout", action="store_true",
                        help="print the binary's probe-relevant offsets as JSON and exit")


def _domid(text) -> int:
    if text is None:
        raise UserError("--xen-domid N is required")
    return checked("--xen-domid", domid, text)


def run(args) -> int:
    from iotrace.probes.standin import runner as sr
    from iotrace.probes.standin import stream

    if args.print_layout:
        exe = sr.build(args.layout)
        sys.stdout.flush()
        os.execv(str(exe), [str(exe), "-print-layout"])
    domid = _domid(args.domid)
    speed = checked("--speed", speed_arg, args.speed)
    if args.name is not None and not args.name.strip():
        raise UserError("-name: empty name")
    if args.truth:
        d = os.path.dirname(os.path.abspath(args.truth))
        if not os.path.isdir(d):
            raise UserError(f"--truth: directory {d} does not exist")
    src = args.replay if args.replay else sr.BUNDLED_STREAM
    stream_file = stream.stream_for(src)
    # Validate the stream here too, so a bad file is one line from iotrace, not from the C side.
    stream.read_stream(stream_file)
    exe = sr.build(args.layout)
    argv = sr.command(domid, os.path.abspath(stream_file), exe=exe, name=args.name, speed=speed,
                      loop=args.loop, hold=args.hold,
                      truth=os.path.abspath(args.truth) if args.truth else None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(exe), argv)
    return 0  # not reached
