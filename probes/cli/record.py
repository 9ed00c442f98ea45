"""``iotrace record``: the qemu-dm probes in events mode, into a recording file.

Every request handle_ioreq serves is written with its domain, vCPU, type, direction, address, size,
rep count, data and service time (exporter/offline/recording.py's format; ``iotrace report FILE`` reads it).
Ring buffer overruns are counted into the recording's lost total. SIGINT and SIGTERM stop it cleanly:
the ring buffers are drained and everything is flushed before the file is closed.
"""
from __future__ import annotations

import signal
import sys
import time

from iotrace.offline.recording import RecordingWriter
from iotrace.probes.cli.common import add_probe_arguments, events_source, start_attached

HELP = "record every I/O request guests send to their device models into a file (root)"
EXAMPLES = """\
examples:
  iotrace record -o boot.iotrec                    # until Ctrl-C (or SIGTERM)
  iotrace record -o 1min.iotrec --duration 60
  iotrace record -o t.iotrec --binary ./qemu-dm --no-default-binaries
  iotrace report boot.iotrec                       # then read it back

The file holds guest data (the values written and read, e.g. keystrokes through port 0x60):
keep it as private as the guests' own data.
"""


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="recording to write")
    add_probe_arguments(p)


def run(args) -> int:
    src = events_source(args)
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    writer = None
    try:
        start_attached(src)
        meta = {"source": "qemu", "binaries": [ps.res.path for ps in src.sets],
                "build_ids": {ps.res.path: ps.res.build_id for ps in src.sets},
                "service_time": not args.no_service_time,
                "clock": "CLOCK_MONOTONIC ns (bpf_ktime_get_ns)",
                "monotonic_to_unix_s": time.time() - time.monotonic()}
        writer = RecordingWriter(args.output, meta)
        print(f"iotrace record: {src.attached} uprobe(s) on "
              f"{', '.join(ps.res.path for ps in src.sets)}; writing {args.output}",
              file=sys.stderr)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        lost_seen = 0
        names: dict[int, str] = {}

        def take(batch):
            nonlocal lost_seen
            for domid, name in src.domain_names().items():
                if names.get(domid) != name:
                    names[domid] = name
                    writer.set_domain(domid, name)
            if len(batch):
                writer.write(batch)
            lost = src.counters()["lost_events"]
            if lost > lost_seen:
                writer.add_lost(lost - lost_seen)
                lost_seen = lost

        while not stop["flag"] and (deadline is None or time.monotonic() < deadline):
            take(src.poll(100))
        take(src.drain())
        writer.close()
        print(f"iotrace record: {writer.events_written} event(s) from {len(names)} domain(s), "
              f"{lost_seen} lost, in {args.output}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if writer is not None and not writer.closed:
            writer.close()
        src.stop()
    return 0
