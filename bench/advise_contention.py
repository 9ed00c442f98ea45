"""What ``iotrace advise --apply cgroup`` gains a well-behaved guest on a contended Dom0, measured on
Linux's real proportional-share scheduler (CFS/EEVDF through cgroup CPU weights).

Each round runs two arms one after the other, in alternating order, on fresh processes:

  without  ``iotrace advise --knob cgroup`` in a dry run: the same probes and the same analysis,
           nothing changed
  with     ``iotrace advise --apply cgroup``: it moves the device models into groups of their own
           and sets their CPU weights (then ``--rollback`` undoes it)

In each arm, on this machine's cores:

  wb       a stand-in device model replaying a real Linux boot's I/O (a busy stretch of
           the real capture linux-boot-tcg.csv.gz of docs/data.md, as Xen forwards it) at real
           speed, in a loop;
  storm    a stand-in that behaves for ``--warm`` seconds (200 req/s), then floods: rep outsb to
           COM1 as fast as it is served (a guest stuck printing to its console);
  hogs     one CPU-bound process per core (busy loops), so that the device models compete for
           CPU with other Dom0 work, as on a saturated Dom0.

Measured in the same window of each arm (``--skip`` seconds after the storm begins, to its end):

  * the well-behaved domain's guest-visible wait, p50/p95/p99: from the moment a request is due
    (its time in the replayed stream: when the guest would post it) to the end of its service,
    from per-request events (an event-mode probe on wb's binary); a guest's vCPU waits that long;
  * its device-model service time p95 (handle_ioreq entry to return: iotrace's own figure);
  * its throughput (synchronous requests served per second) and the storming domain's (from a
    metrics-mode probe on the stormer's binary), and both device models' CPU (/proc/PID/stat):
    what advise costs the stormer.

wb and the stormer run different stand-in builds (QEMU 7.2's and 8.1's layouts) so that the event
probe sees wb's requests only. ``advise`` probes both binaries only (``--binaries-only``), acts on
these two domains only (``-d``), with a short interval and history (``CONFIG`` below) so that a
round takes minutes. The last line is ``ratio X``: the well-behaved domain's p95 wait without
advise over with it (median over rounds; above 1 = advise helps).

    .venv/bin/python bench/advise_contention.py [--rounds N] [--warm S] [--storm S]   (root)

Streams are built once and kept in /var/cache/iotrace/bench (keyed by their inputs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from iotrace.analysis.host import read_process_cpu  # noqa: E402
from iotrace.core.aggregate import Cell  # noqa: E402
from iotrace.probes.live import QemuProbeSource  # noqa: E402
from iotrace.probes.standin import runner as sr  # noqa: E402
from iotrace.probes.standin import stream as st  # noqa: E402

LINUX_BOOT = REPO.parent / "shared" / "data" / "linux-boot-tcg.csv.gz"
CACHE = Path(os.environ.get("IOTRACE_BENCH_CACHE", "/var/cache/iotrace/bench"))
IOTRACE = REPO / ".venv" / "bin" / "iotrace"
SEGMENT = (4.5, 7.0)          # seconds of the boot capture replayed by wb: bursty, ~14k req/s
WARM_RATE = 200               # the stormer's requests/s before it storms
STORM_COUNT = 256             # rep outsb of 256 bytes per storm request
CONFIG = """\
advise:
  interval: {interval}
  agree_intervals: 3
  min_history_seconds: {history}
  thresholds:
    storm_min_rate: 1000
    storm_dm_cpu: 0.10
"""


def cached(name: str, key: str, build) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.stream"
    if not path.exists():
        build(path)
    return path


def wb_stream() -> Path:
    """The boot capture's SEGMENT as Xen forwards it, starting at t=0."""
    src = st.stream_for(LINUX_BOOT)

    def build(path):
        reqs = st.read_stream(src)
        t = reqs["t_ns"].astype(np.int64)
        keep = (t >= SEGMENT[0] * 1e9) & (t < SEGMENT[1] * 1e9)
        seg = reqs[keep].copy()
        first = int(np.flatnonzero(seg["vcpu"] >= 0)[0])    # start on a synchronous request
        seg = seg[first:]
        seg["t_ns"] -= seg["t_ns"][0]
        st.write_stream(path, seg)
    return cached("wb", f"{src.name} {SEGMENT} v2", build)


def attach(make, what: str, tries: int = 5):
    """A started probe source from ``make()`` with its entry and return probes attached; retried
    with a fresh source (an attach on this shared machine has failed with EINVAL once in a
    while), then given up with one line."""
    for _ in range(tries):
        src = make()
        src.start()
        if src.attached >= 2:
            return src
        err = src.stats().error
        src.stop()
        time.sleep(0.5)
    raise RuntimeError(f"{what}: the uprobes would not attach ({err})")


def storm_stream(warm: float, storm: float) -> Path:
    """WARM_RATE req/s for ``warm`` seconds, then enough flood for ``storm`` seconds."""
    n_storm = int(storm * 60_000)      # more than it can be served at (bounded by its CPU share)

    def build(path):
        n_warm = int(warm * WARM_RATE)
        t = np.concatenate([(np.arange(n_warm) * (1e9 / WARM_RATE)).astype(np.uint64),
                            np.full(n_storm, int(warm * 1e9), dtype=np.uint64)])
        r = np.zeros(len(t), dtype=st.REQ_DTYPE)
        r["t_ns"], r["vcpu"], r["type"], r["dir"], r["size"] = t, 0, 0, 0, 1
        r["count"] = np.where(np.arange(len(t)) < n_warm, 1, STORM_COUNT)
        r["addr"] = 0x3F8
        st.write_stream(path, r)
    return cached("storm", f"{warm} {n_storm} {WARM_RATE} {STORM_COUNT} v1", build)


class Events:
    """Per-request events of wb's binary, pumped on a thread."""

    def __init__(self, exe: str):
        self.exe = exe
        self.src = None
        self.parts: list[np.ndarray] = []
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._pump, daemon=True)

    def _pump(self):
        while not self._stop.is_set():
            b = self.src.poll(100)
            if len(b):
                self.parts.append(b)

    def __enter__(self):
        # 32 MiB of ring buffer (~600 000 events): the consumer may fall behind for many
        # seconds on a saturated machine without losing one (a lost event would misalign the
        # requests with the stream's schedule: such an arm is reported and not counted)
        self.src = attach(lambda: QemuProbeSource(binaries=[self.exe], defaults=False,
                                                  mode="events", keep_addr=True,
                                                  ringbuf_pages=8192),
                          "wb's event probe")
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()
        self.lost = self.src.stats().lost
        self.src.stop()

    def events(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0)


def waits(ev: np.ndarray, domid: int, sched_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(guest-visible wait ns, entry time ns) of wb's synchronous requests, matched in order with
    the stream's synchronous records (the stand-in serves them one after the other; each loop
    pass starts when its first request, at t=0, is issued)."""
    e = ev[(ev["domid"] == domid) & (ev["vcpu"] >= 0)]
    e = e[np.argsort(e["ts_ns"], kind="stable")]
    n = len(sched_ns)
    k = np.arange(len(e))
    idx, passno = k % n, k // n
    starts = e["ts_ns"][passno * n] - sched_ns[0]
    done = e["ts_ns"] + np.maximum(e["service_ns"], 0)
    return done - (starts + sched_ns[idx]), e["ts_ns"]


def per_domain(totals) -> dict:
    out = {}
    for k, c in totals.items():
        out.setdefault(k.domid, Cell()).add(c)
    return out


def run_arm(apply: bool, args, exes, streams, sched_ns, tmp: Path, base: int) -> dict:
    wb_id, storm_id = base + 1, base + 2
    cfg = tmp / "advise.yaml"
    cfg.write_text(CONFIG.format(interval=args.interval, history=args.warm - 5))
    audit = tmp / f"audit-{time.monotonic_ns()}.jsonl"
    hogs, procs = [], []
    metrics = None
    res = {"arm": "with" if apply else "without"}
    try:
        metrics = attach(lambda: QemuProbeSource(binaries=[exes["8.1"]], defaults=False,
                                                 keep_addr=False), "the stormer's metrics probe")
        with Events(exes["7.2"]) as evs:
            cmd = [str(IOTRACE), "advise", str(args.interval), "--config", str(cfg),
                   "--binary", exes["7.2"], "--binary", exes["8.1"], "--binaries-only",
                   "-d", f"{wb_id},{storm_id}", "--format", "json"]
            cmd += ["--apply", "cgroup", "--audit", str(audit)] if apply else ["--knob", "cgroup"]
            log = tmp / f"advise-{res['arm']}.jsonl"
            out = open(log, "w")
            adv = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
            # advise compiles its probes first: the guests start once it reports, so that it
            # watches the stormer's calm start (its own baseline) as a long-running advise would
            deadline = time.monotonic() + 180
            while not log.read_text().strip():
                if adv.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"iotrace advise did not start ({adv.returncode})")
                time.sleep(0.2)
            wb = sr.StandIn(wb_id, streams["wb"], name="wb", speed=1, loop=True, layout="7.2",
                            die_with_parent=True).start()
            storm = sr.StandIn(storm_id, streams["storm"], name="stormer", speed=1, hold=True,
                               layout="8.1", die_with_parent=True).start()
            procs += [wb, storm]
            t_storm = time.monotonic() + args.warm
            hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"])
                    for _ in range(args.hogs)]
            win = (t_storm + args.skip, t_storm + args.storm)
            time.sleep(max(0.0, win[0] - time.monotonic()))
            a = per_domain(metrics.totals())
            cpu0 = {p.domid: read_process_cpu(p.pid)[0] for p in procs}
            t0 = time.monotonic()
            time.sleep(max(0.0, win[1] - time.monotonic()))
            b = per_domain(metrics.totals())
            cpu1 = {p.domid: read_process_cpu(p.pid)[0] for p in procs}
            dt = time.monotonic() - t0
            adv.send_signal(signal.SIGTERM)
            adv.wait(timeout=30)
            out.close()
        ev = evs.events()
        wait_ns, ts = waits(ev, wb_id, sched_ns)
        sel = (ts >= win[0] * 1e9) & (ts < win[1] * 1e9)
        w = wait_ns[sel] / 1e3
        svc = ev[(ev["domid"] == wb_id) & (ev["vcpu"] >= 0)]
        svc = svc[(svc["ts_ns"] >= win[0] * 1e9) & (svc["ts_ns"] < win[1] * 1e9)]["service_ns"]
        sb, sa = b.get(storm_id, Cell()), a.get(storm_id, Cell())
        res.update(
            wait_p50=float(np.percentile(w, 50)), wait_p95=float(np.percentile(w, 95)),
            wait_p99=float(np.percentile(w, 99)), svc_p95=float(np.percentile(svc, 95)) / 1e3,
            wb_rate=float(sel.sum()) / (win[1] - win[0]),
            storm_rate=(sb.count - sa.count) / dt, lost=evs.lost,
            wb_cpu=(cpu1[wb_id] - cpu0[wb_id]) / dt, storm_cpu=(cpu1[storm_id] - cpu0[storm_id]) / dt)
        docs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        t_adv = (t_storm - args.warm) - time.monotonic() + time.time()   # guests' start, wall
        res["changes"] = [(round(d["time"] - t_adv), c["domain"], c["current"], c["new"])
                          for d in docs for c in d["changes"] if apply]
        res["classes"] = {r["domain"]: r["class"] for r in docs[-1]["domains"]} if docs else {}
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        for p in procs:
            p.stop()
        if metrics is not None:
            metrics.stop()
        if apply and audit.exists():
            subprocess.run([str(IOTRACE), "advise", "--rollback", str(audit)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm", type=float, default=30.0, help="seconds before the storm (history)")
    p.add_argument("--storm", type=float, default=75.0, help="seconds of storm per arm")
    p.add_argument("--skip", type=float, default=25.0,
                   help="seconds of storm before the measurement window opens")
    p.add_argument("--interval", type=float, default=2.0, help="advise's interval")
    p.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep advise's JSON output and audit logs of every arm in DIR")
    p.add_argument("--arms", choices=("both", "with", "without"), default="both",
                   help="run only one arm (to look at it)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("advise_contention: needs root (uprobes, cgroups)", file=sys.stderr)
        return 2
    exes = {lay: str(sr.build(lay)) for lay in ("7.2", "8.1")}
    streams = {"wb": wb_stream(), "storm": storm_stream(args.warm, args.storm)}
    reqs = st.read_stream(streams["wb"])
    sched_ns = reqs["t_ns"][reqs["vcpu"] >= 0].astype(np.int64)
    base = 7000 + os.getpid() % 1000
    results = {"without": [], "with": []}
    print(f"advise_contention: wb replays {len(reqs)} requests of a Linux boot ({SEGMENT[0]:g}-"
          f"{SEGMENT[1]:g} s) at real speed in a loop; the stormer floods after {args.warm:g} s; "
          f"{args.hogs} CPU hogs; window {args.skip:g}-{args.storm:g} s of the storm; advise "
          f"every {args.interval:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="advise-bench-") as tmp:
        for rnd in range(args.rounds):
            order = (False, True) if rnd % 2 == 0 else (True, False)
            if args.arms != "both":
                order = (args.arms == "with",)
            for apply in order:
                out = args.keep / f"round{rnd + 1}" if args.keep else Path(tmp) / f"r{rnd}"
                out.mkdir(parents=True, exist_ok=True)
                r = run_arm(apply, args, exes, streams, sched_ns, out, base)
                results[r["arm"]].append(r)
                if r["lost"]:
                    print(f"round {rnd + 1} {r['arm']:>7}: {r['lost']} events lost: the waits "
                          "cannot be matched to the schedule; this round is not counted",
                          flush=True)
                print(f"round {rnd + 1} {r['arm']:>7}: wb wait p50 {r['wait_p50']:8.0f} µs  p95 "
                      f"{r['wait_p95']:8.0f} µs  p99 {r['wait_p99']:8.0f} µs  svc p95 "
                      f"{r['svc_p95']:5.1f} µs  wb {r['wb_rate']:7.0f} req/s  stormer "
                      f"{r['storm_rate']:7.0f} req/s  CPU wb {r['wb_cpu']:.2f} stormer "
                      f"{r['storm_cpu']:.2f}  (lost {r['lost']})"
                      + (f"  changes {r['changes']}" if r["changes"] else "")
                      + f"  classes {r['classes']}", flush=True)

    if args.arms != "both":
        return 0
    pairs = [(a, b) for a, b in zip(results["without"], results["with"])
             if not a["lost"] and not b["lost"]]
    if not pairs:
        print("no round without lost events: nothing to compare")
        return 1

    def summary(key):
        a = [x[key] for x, _ in pairs]
        b = [y[key] for _, y in pairs]
        return statistics.median(a), min(a), max(a), statistics.median(b), min(b), max(b)
    print(f"medians over {len(pairs)} round(s) (min-max):")
    for key, label, unit in (("wait_p50", "wb wait p50", "µs"), ("wait_p95", "wb wait p95", "µs"),
                             ("wait_p99", "wb wait p99", "µs"), ("svc_p95", "wb service p95", "µs"),
                             ("wb_rate", "wb throughput", "req/s"),
                             ("storm_rate", "stormer throughput", "req/s"),
                             ("wb_cpu", "wb device-model CPU", "CPU"),
                             ("storm_cpu", "stormer device-model CPU", "CPU")):
        ma, la, ha, mb, lb, hb = summary(key)
        d = 2 if unit == "CPU" else 1
        print(f"  {label:<24} without {ma:9.{d}f} ({la:.{d}f}-{ha:.{d}f}) {unit:<5}  with "
              f"{mb:9.{d}f} ({lb:.{d}f}-{hb:.{d}f}) {unit:<5}  without/with "
              f"{ma / mb if mb else float('nan'):.2f}")
    ratios = [a["wait_p95"] / b["wait_p95"] for a, b in pairs]
    print(f"per-round ratios of the wb p95 wait: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"ratio {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
