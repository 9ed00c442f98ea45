"""What the qemu-dm probes cost a device model, per request.

A private build of the stand-in device model replays a stream at full speed (-speed 0) under:

  none             no probe at all
  empty entry      an empty BPF program (probes/bpf/empty.bpf.c) on handle_ioreq's entry
  empty entry+ret  empty programs on the entry and the return (the same two probe points as the
                   default metrics mode)
  reads only       an entry program making only the three user-memory reads of the real one
                   (ioreq_t, return address, send_vcpu): what reading the arguments costs
  metrics          iotrace metrics mode: in-kernel aggregation, entry + return probe (service time)
  metrics no-svc   metrics mode with --no-service-time: entry probe only
  events           event mode (snoop/record): ring buffer, entry + return, a consumer polling

Each run is a new process, so every key (pid, vCPU, type, dir, size, address bucket) starts
afresh. Metrics mode keys MMIO by its 4 KiB page and PCI config by its function
(iotrace.probes.live.metrics_bucket): the Linux boot capture's 173,850 requests make 238 keys
(41,592 with exact addresses, when ~24% of the requests were a key's first: an insert into the
stats map), so nearly every request finds its key, as in a long-running device model. The metrics
configurations drop a finished run's map entries before the next run, as the exporter does for a
device model that went away.

ns added per request = (CPU time of the stand-in - its CPU time without probe) / requests. Configurations are run in
interleaved rounds and the median of each is used (other work on the machine adds noise).
The last line is ``ratio_vs_empty_uprobe X``: metrics mode's added cost over the added cost of empty
programs on the same probe points (entry + return). The cost of the trap itself (the uprobe) is the
price of admission; the ratio shows what iotrace's own work adds on top of it.

    .venv/bin/python bench/probe_overhead.py [--rounds N] [--stream FILE]   (root)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from iotrace.probes.bpf import uprobes  # noqa: E402
from iotrace.probes.bpf.loader import EMPTY_PROGRAM, import_bcc  # noqa: E402
from iotrace.probes.hook.resolve import resolve  # noqa: E402
from iotrace.probes.live import QemuProbeSource  # noqa: E402
from iotrace.probes.standin import runner as sr  # noqa: E402
from iotrace.probes.standin import stream as st  # noqa: E402

LINUX_BOOT = REPO.parent / "shared" / "data" / "linux-boot-tcg.csv.gz"


def run_once(exe: str, stream: str, domid: int, probe=None) -> float:
    """CPU time (user + system, from wait4's rusage) of one stand-in run: the uprobe traps and the
    BPF programs run in the context of the probed process and are charged to it, while other work
    on the machine (and the event consumer) is not, so this is far less noisy than wall time."""
    argv = sr.command(domid, stream, exe=exe, speed=0.0)
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"probe_overhead: stand-in failed: {err.read().decode().strip()}")
    if probe is not None and hasattr(probe, "finished"):
        probe.finished(p.pid)
    return ru.ru_utime + ru.ru_stime


class Empty:
    def __init__(self, exe: str, ret: bool, entry: bytes = b"empty_entry"):
        res = resolve(exe)
        self.bpf = import_bcc().BPF(src_file=EMPTY_PROGRAM.encode(),
                                    cflags=[f"-I{os.path.dirname(EMPTY_PROGRAM)}"])
        # as iotrace attaches (probes/bpf/uprobes.py: same kernel path, ref_ctr_offset 0)
        uprobes.attach(self.bpf, exe, res.func_vaddr, entry.decode())
        if ret:
            uprobes.attach(self.bpf, exe, res.func_vaddr, "empty_return", retprobe=True)

    def close(self):
        uprobes.detach_all(self.bpf)
        self.bpf.cleanup()


class Metrics:
    def __init__(self, exe: str, timing: bool):
        self.src = QemuProbeSource(binaries=[exe], defaults=False, strict=True, timing=timing)
        self.src.start()

    def finished(self, pid: int):
        """Drop the map entries of a finished run, as the exporter does for a device model that
        went away. Without it every run (a new pid, so a new set of keys for the Linux boot) adds to
        the map until it is full, and later runs measure the map-full path (requests not counted,
        stats_full) instead of the probe's work."""
        full = self.src.counters()["stats_full"]
        if full:
            raise SystemExit(f"probe_overhead: stats map full ({full} requests not counted)")
        for ps in self.src.sets:
            ps.forget_tgids({pid})

    def close(self):
        self.src.stop()


class Events:
    def __init__(self, exe: str):
        self.src = QemuProbeSource(binaries=[exe], defaults=False, strict=True, mode="events")
        self.src.start()
        self.n = 0
        self._stop = False
        self._t = threading.Thread(target=self._consume, daemon=True)
        self._t.start()

    def _consume(self):
        while not self._stop:
            self.n += len(self.src.poll(50))

    def close(self):
        self._stop = True
        self._t.join()
        self.n += len(self.src.drain())
        self.lost = self.src.counters()["lost_events"]
        self.src.stop()


CONFIGS = [
    ("none", "no probe", None),
    ("empty1", "empty entry uprobe", lambda exe: Empty(exe, False)),
    ("empty2", "empty entry + return uprobe", lambda exe: Empty(exe, True)),
    ("reads1", "entry doing only the 3 user-memory reads", lambda exe: Empty(exe, False,
                                                                            b"reads_entry")),
    ("metrics1", "metrics mode, entry only (--no-service-time)", lambda exe: Metrics(exe, False)),
    ("metrics2", "metrics mode, entry + return (default)", lambda exe: Metrics(exe, True)),
    ("events", "event mode, entry + return, ring buffer", lambda exe: Events(exe)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2, help="stand-in runs per configuration per round")
    ap.add_argument("--stream", default=None,
                    help="stream or CSV capture (default: the Linux boot capture, else the "
                         "bundled excerpt)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("probe_overhead: needs root (uprobes)", file=sys.stderr)
        return 2
    src = args.stream or (LINUX_BOOT if LINUX_BOOT.exists() else sr.BUNDLED_STREAM)
    stream = str(st.stream_for(src))
    n = len(st.read_stream(stream))
    with tempfile.TemporaryDirectory() as tmp:
        # A private copy: other processes running the shared binary do not hit our probes.
        subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={tmp}"], check=True)
        exe = os.path.join(tmp, "iotrace-standin")
        times = {key: [] for key, _, _ in CONFIGS}
        extra = {}
        for rnd in range(args.rounds):
            for key, _label, make in CONFIGS:
                probe = make(exe) if make else None
                try:
                    run_once(exe, stream, 990, probe)              # warm-up
                    for _ in range(args.runs):
                        times[key].append(run_once(exe, stream, 990, probe))
                finally:
                    if probe is not None:
                        probe.close()
                if key == "events":
                    extra.setdefault("events", []).append((probe.n, probe.lost))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["none"]
    added = {k: (med[k] - base) / n * 1e9 for k in med}
    print(f"probe_overhead: {Path(src).name}, {n} requests per run, {args.rounds} rounds x "
          f"{args.runs} runs, medians of the stand-in CPU time; private stand-in copy, -speed 0")
    print(f"{'no probe':<48} {base / n * 1e9:8.0f} ns/request (baseline, stand-in CPU time)")
    for key, label, _ in CONFIGS[1:]:
        line = f"{label:<48} {added[key]:+8.0f} ns/request added"
        if key == "events":
            got = extra["events"]
            line += (f" (events delivered {sum(g for g, _ in got)}, lost {sum(lo for _, lo in got)}"
                     f" over {len(got) * (args.runs + 1)} runs)")
        print(line)
    svc = added["metrics2"] - added["metrics1"]
    print(f"{'service timing (return probe) costs':<48} {svc:+8.0f} ns/request")
    print(f"ratio_metrics_no_svc_vs_empty_entry_uprobe {added['metrics1'] / added['empty1']:.3f}"
          "   (metrics --no-service-time vs one empty entry uprobe)")
    print(f"ratio_metrics_vs_single_empty_entry_uprobe {added['metrics2'] / added['empty1']:.3f}"
          "   (default metrics, entry+return, vs one empty entry uprobe: shows service timing)")
    print(f"ratio_vs_empty_uprobe {added['metrics2'] / added['empty2']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
