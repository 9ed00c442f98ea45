#!/usr/bin/env python3
"""Cost of device-model discovery per scrape/refresh (probes/discovery.py), with many processes.

Starts N extra idle processes (``sleep``), then measures, in the same run:

* baseline: ``discovery.scan()``, a full pass that reads every process's /proc/PID/cmdline (what
  each refresh did before discovery became incremental);
* ``ProcessMap.refresh()`` in steady state: one scandir of /proc, /proc/PID files read only for
  processes not seen before (and young ones that may still exec);
* the first ``refresh()`` (everything is new).

Figures: milliseconds per call (median of --rounds), /proc/PID files read per steady refresh, and
the ratio steady / baseline, for each N.

    python bench/discovery.py [--counts 0 500 2000] [--rounds 20]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spawn(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


def kill(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def timed(fn, rounds: int) -> float:
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> int:
    from iotrace.probes import discovery
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 500, 2000])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    print(f"{'extra procs':>11} {'in /proc':>8} {'scan ms':>8} {'first ms':>9} "
          f"{'steady ms':>10} {'reads/refresh':>13} {'ratio':>6}")
    procs: list = []
    try:
        for n in sorted(args.counts):
            procs += spawn(n - len(procs))
            time.sleep(1.0)
            # young_s=0: the spawned processes are seconds old; what is measured is the steady
            # state of a host whose processes are older than discovery.YOUNG_S
            total = sum(1 for e in os.listdir("/proc") if e.isdigit())
            base = timed(discovery.scan, args.rounds)
            t = time.perf_counter()
            pm = discovery.ProcessMap(young_s=0.0)
            pm.refresh()
            first = (time.perf_counter() - t) * 1e3
            r0 = pm.reads
            steady = timed(pm.refresh, args.rounds)
            reads = (pm.reads - r0) / args.rounds
            print(f"{n:>11} {total:>8} {base:8.2f} {first:9.2f} {steady:10.2f} {reads:13.1f} "
                  f"{steady / base:6.3f}")
    finally:
        kill(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
