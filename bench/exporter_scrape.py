#!/usr/bin/env python3
"""Scrape cost of `iotrace serve` on a big synthetic host, over real HTTP GETs of /metrics.

The exporter runs in a child process (so its RSS is its own) with the same pieces `iotrace serve`
uses: an EventSource (real Aggregator), IotraceCollector on a private registry, ExporterServer.
The host: DOMAINS domains x VCPUS vCPUs x RANGES named port ranges x 2 directions, every cell
with service times (so every histogram series exists too).

Run twice: with no guest I/O, and with a feeder thread pushing RATE requests/s into the source
(over the same cells). Metrics mode reads totals at scrape time, it does not replay events, so the
scrape time must not grow with the request rate.

    python bench/exporter_scrape.py [--domains 100 --vcpus 4 --ranges 30 --scrapes 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

GOAL_MS, GOAL_MB = 100.0, 150.0


def child(args) -> int:
    import numpy as np
    from prometheus_client import CollectorRegistry

    from iotrace.core.addrmap import AddressMap
    from iotrace.core.aggregate import N_SLOTS, Cell, Key, hist_slots
    from iotrace.core.events import TYPE_PIO, empty
    from iotrace.core.source import DomainInfo, EventSource
    from iotrace.serve.collector import IotraceCollector
    from iotrace.serve.server import ExporterServer

    am = AddressMap.default()
    # one port per named range (the first address of each painted segment), RANGES of them
    ports, names = [], []
    for start in am.segment_starts("pio"):
        name = am.name(TYPE_PIO, start)
        if name not in names:
            ports.append(start)
            names.append(name)
    if len(ports) < args.ranges:
        raise SystemExit(f"the default map has only {len(ports)} port ranges")
    ports, names = ports[:args.ranges], names[:args.ranges]

    class SyntheticHost(EventSource):
        name = "qemu"

        def start(self):
            now = time.time()
            hist = np.zeros(N_SLOTS, dtype=np.int64)
            hist[hist_slots(np.array([1_500, 6_000, 40_000]))] = (50, 30, 20)   # 1.5, 6, 40 us
            for d in range(1, args.domains + 1):
                self._domains[d] = DomainInfo(d, f"guest-{d:03d}", probes_attached=2,
                                              first_seen=now, last_seen=now)
                for v in range(args.vcpus):
                    for rng in names:
                        for dr in (0, 1):
                            self._agg.add_cell(Key(d, v, TYPE_PIO, dr, rng, 0),
                                               Cell(100, 100, 100, 100 * 9000, hist.copy()))
            self._stats.up = True

        def domains(self):
            now = time.time()
            with self._lock:
                for info in self._domains.values():
                    info.last_seen = now
                return dict(self._domains)

    src = SyntheticHost(am)
    src.start()
    stop = threading.Event()

    def feeder():
        rng = np.random.default_rng(1)
        per_tick = max(1, int(args.rate / 20))
        port_arr = np.array(ports, dtype=np.uint64)
        next_t = time.monotonic()
        while not stop.is_set():
            b = empty(per_tick)
            b["domid"] = rng.integers(1, args.domains + 1, per_tick)
            b["vcpu"] = rng.integers(0, args.vcpus, per_tick)
            b["type"] = TYPE_PIO
            b["dir"] = rng.integers(0, 2, per_tick)
            b["addr"] = port_arr[rng.integers(0, len(port_arr), per_tick)]
            b["size"] = 1
            b["service_ns"] = rng.integers(1000, 100000, per_tick)
            src.feed(b)
            next_t += 0.05
            stop.wait(max(0.0, next_t - time.monotonic()))

    if args.rate > 0:
        threading.Thread(target=feeder, daemon=True).start()
    reg = CollectorRegistry()
    col = IotraceCollector([src])
    reg.register(col)
    cpu_ms = []

    def render():
        # what `iotrace serve` hands its HTTP server: the pieces as they are made
        yield from col.iter_chunks()
        # CPU time of the rendering thread itself: what a scrape costs, whatever else runs
        # (the wall time also includes waiting for the GIL and the CPUs).
        cpu_ms.append(col.last_render_cpu * 1e3)

    srv = ExporterServer(reg, f"127.0.0.1:{args.port}", fast_text=render)
    srv.start()
    print("ready", srv.port, flush=True)   # the parent reads our RSS now: before any scrape
    sys.stdin.readline()      # "report": the parent has finished its plain scrapes
    print("cpu", statistics.median(cpu_ms[3:]) if len(cpu_ms) > 3 else float("nan"), flush=True)
    sys.stdin.read()          # until the parent closes our stdin
    stop.set()
    srv.shutdown()
    return 0


def rss_mb(pid: int) -> tuple[float, float]:
    vals = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def scrape(url: str, gzip: bool) -> tuple[float, int, float, float]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        body = r.read()
    dt = time.perf_counter() - t0
    coll, events = float("nan"), float("nan")
    if not gzip:
        tail = body[-4096:].decode()
        for line in tail.splitlines():
            if line.startswith("iotrace_scrape_duration_seconds "):
                coll = float(line.split()[1])
        i = body.find(b'iotrace_source_events_total{source="qemu"} ')
        if i >= 0:
            events = float(body[i:body.index(b"\n", i)].split()[1])
    return dt, len(body), coll, events


def run_one(args, rate: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rate", str(rate),
           "--domains", str(args.domains), "--vcpus", str(args.vcpus), "--ranges",
           str(args.ranges)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        if not line or line[0] != "ready":
            raise SystemExit("exporter child failed to start")
        url = f"http://127.0.0.1:{line[1]}/metrics"
        rss0, _ = rss_mb(p.pid)
        for _ in range(3):
            scrape(url, False)
        times, colls, size, ev = [], [], 0, []
        t_start = time.monotonic()
        for _ in range(args.scrapes):
            dt, size, coll, events = scrape(url, False)
            times.append(dt)
            colls.append(coll)
            ev.append((time.monotonic(), events))
        p.stdin.write("report\n")
        p.stdin.flush()
        cpu = float(p.stdout.readline().split()[1]) / 1e3
        gz = [scrape(url, True)[0] for _ in range(max(3, args.scrapes // 3))]
        gz_size = scrape(url, True)[1]
        rss, hwm = rss_mb(p.pid)
        elapsed = ev[-1][0] - ev[0][0]
        achieved = (ev[-1][1] - ev[0][1]) / elapsed if elapsed > 0 else 0.0
        return dict(rate=rate, achieved=achieved, median=statistics.median(times),
                    p90=sorted(times)[int(0.9 * (len(times) - 1))],
                    coll=statistics.median(colls), cpu=cpu, gz=statistics.median(gz), size=size,
                    gz_size=gz_size, rss0=rss0, rss=rss, hwm=hwm, secs=time.monotonic() - t_start)
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", type=int, default=100)
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--ranges", type=int, default=30)
    ap.add_argument("--scrapes", type=int, default=30)
    ap.add_argument("--rates", default="0,20000",
                    help="guest request rates (requests/s) to run with, comma separated")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    cells = args.domains * args.vcpus * args.ranges * 2
    print("RSS0: exporter before its first scrape; RSS: after the scrapes; peak: VmHWM")
    print(f"synthetic host: {args.domains} domains x {args.vcpus} vCPUs x {args.ranges} ranges "
          f"x 2 directions = {cells} cells; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'guest req/s':>12} {'achieved':>10} {'scrape med':>11} {'p90':>8} "
          f"{'collect':>8} {'CPU':>8} {'gzip med':>9} {'body':>9} {'gzip':>8} {'RSS0':>7} {'RSS':>7} {'peak':>7}")
    results = []
    for rate in [float(x) for x in args.rates.split(",")]:
        r = run_one(args, rate)
        results.append(r)
        print(f"{r['rate']:>12.0f} {r['achieved']:>10.0f} {r['median'] * 1e3:>9.1f}ms "
              f"{r['p90'] * 1e3:>6.1f}ms {r['coll'] * 1e3:>6.1f}ms {r['cpu'] * 1e3:>6.1f}ms "
              f"{r['gz'] * 1e3:>7.1f}ms "
              f"{r['size'] / 1e6:>7.2f}MB {r['gz_size'] / 1e6:>6.2f}MB {r['rss0']:>5.0f}MB "
              f"{r['rss']:>5.0f}MB {r['hwm']:>5.0f}MB")
    worst = max(r["median"] for r in results) * 1e3
    peak = max(r["hwm"] for r in results)
    print(f"goal: scrape < {GOAL_MS:.0f} ms: {'met' if worst < GOAL_MS else 'NOT met'} "
          f"(worst median {worst:.1f} ms); RSS < {GOAL_MB:.0f} MB: "
          f"{'met' if peak < GOAL_MB else 'NOT met'} (peak {peak:.1f} MB)")
    if len(results) > 1 and results[0]["median"] > 0:
        last = results[-1]
        print(f"at {last['achieved']:.0f} req/s vs idle: scrape CPU x{last['cpu'] / results[0]['cpu']:.2f}, "
              f"wall x{last['median'] / results[0]['median']:.2f}, body x"
              f"{last['size'] / results[0]['size']:.3f} (a scrape reads totals, it does not replay "
              f"events; the wall time also waits for the feeder, which shares the process and "
              f"the {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
