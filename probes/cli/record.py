"""``iotrace record``: the qemu-dm probes in events mode, into a recording file.

Every request handle_ioreq serves is written with its domain, vCPU, type, direction, address, size,
rep count, data and service time (exporter/offline/recording.py's format; ``iotrace report FILE`` reads it).
Ring buffer overruns are counted into the recording's lost total. SIGINT and SIGTERM stop it cleanly:
the ring buffers are drained and everything is flushed before the file is closed. Events reach the
file at most half a second after they are taken from the ring buffers, traffic or not, so even
SIGKILL loses at most that much. The output is opened (0600, never through a symbolic link, an
existing file only with --force) before the probes are compiled; a failed write (disk full) is one
line and exit status 1, with the file readable up to the failure.
"""
from __future__ import annotations

import signal
import sys
import time

from iotrace.core.errors import OutputError
from iotrace.offline.recording import PrivateFile, RecordingWriter
from iotrace.probes.cli.common import add_probe_arguments, events_source, start_attached

HELP = "record every I/O request guests send to their device models into a file (root)"
EXAMPLES = """\
examples:
  iotrace record -o boot.iotrec                    # until Ctrl-C (or SIGTERM)
  iotrace record -o 1min.iotrec --duration 60
  iotrace record -o t.iotrec --binary ./qemu-dm --no-default-binaries
  iotrace record -o boot.iotrec --force            # overwrite an earlier recording
  iotrace report boot.iotrec                       # then read it back

The file holds guest data (the values written and read, e.g. keystrokes through port 0x60):
keep it as private as the guests' own data. It is created 0600 (owner only), whatever the umask.
"""


def add_arguments(p) -> None:
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="recording to write (created 0600; an existing FILE is refused unless "
                        "--force; a symbolic link always is)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing FILE (made 0600)")
    add_probe_arguments(p)


def run(args) -> int:
    src = events_source(args)                       # options and config: no BPF compiled yet
    out = PrivateFile(args.output, force=args.force)   # the output, before compiling anything
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    writer = None
    try:
        try:
            start_attached(src)
        except BaseException:
            out.discard()                           # never started: no file left behind
            raise
        meta = {"source": "qemu", "binaries": [ps.res.path for ps in src.sets],
                "build_ids": {ps.res.path: ps.res.build_id for ps in src.sets},
                "service_time": not args.no_service_time,
                "clock": "CLOCK_MONOTONIC ns (bpf_ktime_get_ns)",
                "monotonic_to_unix_s": time.time() - time.monotonic()}
        writer = RecordingWriter(out, meta)
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
            writer.tick()           # what waited FLUSH_INTERVAL goes out, even in silence

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
            try:
                writer.close()
            except OutputError:
                pass                # the error on its way out says it already
        else:
            out.close()
        src.stop()
    return 0
