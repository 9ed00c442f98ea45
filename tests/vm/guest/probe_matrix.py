#!/usr/bin/env python3
"""Load every BPF program of the project in every mode on the running kernel, attach it to a stand-in
device model and report what it counted next to the stand-in's own ground truth (JSON on stdout).

Run as root, inside a guest of the kernel matrix (tests/vm/test_kernels.py) or on the host:

    python3 probe_matrix.py PROJECT [--case NAME ...]

It compares nothing itself: the test on the host does (exact counts, per key), so a failure shows
as a pytest diff. Each program/mode is compiled once (BCC compiles against the running kernel's
headers: ~1 s natively, tens of seconds under TCG). Cases:

* probes/bpf/ioreq.bpf.c through ``QemuProbeSource`` (what serve/top/snoop/record run), on the
  stand-in with QEMU 7.2's layout and its buffered caller known (HAVE_BUF=1): metrics with and
  without the return probe for service times, events with and without;
* the same four modes loaded with ``ProbeSet`` for a binary whose buffered caller is unknown
  (HAVE_BUF=0), on the QEMU 8.1 layout (send_vcpu at 0x48): buffered requests then take the stale
  send_vcpu, so these compare counts per (type, dir, address) only;
* "refused": ioreq.bpf.c built with the test-only -DIOTRACE_TEST_OOB=1 (an access every verifier
  refuses), through QemuProbeSource: the source must be down with this kernel's verdict in one
  line, nothing attached (what tests/probes/test_health.py checks on the host);
* probes/standin/selfcheck.bpf.c (what the stand-in's own uprobe test loads) and
  probes/bpf/empty.bpf.c (the benchmark's baselines): loaded, attached, one record per request
  for the self-check.

Output: {"kernel", "bcc", "python", "seconds", "cases": [{"case", "program", "mode", "timing",
"buffered_caller", "layout", "ok", "error", "load_seconds", "run_seconds", "key", "want": [[...key,
n]], "got": [[...key, n]], "facts": {...}}]}.
"""
import argparse
import ctypes as ct
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotrace_env import make_importable  # noqa: E402

DOMID = {"7.2": 951, "8.1": 952}
WAIT = 120.0       # seconds for a stand-in run to be seen in full (TCG is slow)


@dataclasses.dataclass
class Case:
    name: str
    mode: str = "metrics"
    timing: bool = True
    buffered_caller: bool = True
    layout: str = "7.2"
    program: str = "ioreq.bpf.c"


CASES = [Case("metrics+service"), Case("metrics", timing=False),
         Case("events+service", "events"), Case("events", "events", timing=False),
         Case("metrics+service/no-buffered-caller", buffered_caller=False, layout="8.1"),
         Case("metrics/no-buffered-caller", timing=False, buffered_caller=False, layout="8.1"),
         Case("events+service/no-buffered-caller", "events", buffered_caller=False, layout="8.1"),
         Case("events/no-buffered-caller", "events", timing=False, buffered_caller=False,
              layout="8.1"),
         Case("refused", program="ioreq.bpf.c+IOTRACE_TEST_OOB"),
         Case("selfcheck", "events", timing=False, program="selfcheck.bpf.c"),
         Case("empty", "-", timing=True, program="empty.bpf.c")]


class Run:
    """One case's stand-in: started after the probes are attached, held until stopped."""

    def __init__(self, sr, exe, layout, workdir):
        self.truth = os.path.join(workdir, f"truth-{layout}-{time.monotonic_ns()}.json")
        argv = sr.command(DOMID[layout], sr.BUNDLED_STREAM, exe=exe, name=f"standin-{layout}",
                          speed=0.0, hold=True, truth=self.truth)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    def wait_truth(self):
        end = time.monotonic() + WAIT
        while not os.path.exists(self.truth):
            if self.proc.poll() is not None:
                raise RuntimeError(f"stand-in exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > end:
                raise RuntimeError(f"stand-in wrote no truth within {WAIT:g} s")
            time.sleep(0.05)
        with open(self.truth) as f:
            return json.load(f)["io"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def truth_counter(io, key):
    from iotrace.core.events import TYPE_CODES
    c = Counter()
    for r in io:
        c[key(r["vcpu"], TYPE_CODES[r["type"]], 1 if r["dir"] == "read" else 0, r["addr"])] += \
            r["count"]
    return c


def pairs(counter):
    return sorted([*k, n] for k, n in counter.items())


def run_source_case(case, exe, sr, workdir, out):
    """ioreq.bpf.c through QemuProbeSource, the product's path."""
    from iotrace.probes.live import QemuProbeSource, metrics_bucket
    t0 = time.monotonic()
    src = QemuProbeSource(binaries=[exe], defaults=False, strict=True, mode=case.mode,
                          timing=case.timing, send_vcpu_offset=sr.SEND_VCPU_OFFSET[case.layout],
                          warn=lambda msg: None)
    try:
        src.start()
        out["load_seconds"] = round(time.monotonic() - t0, 2)
        st = src.stats()
        out["facts"].update(up=st.up, attached=st.probes_attached, failed=st.probes_failed)
        run = Run(sr, exe, case.layout, workdir)
        t1 = time.monotonic()
        try:
            io = run.wait_truth()
            domid = DOMID[case.layout]
            if case.mode == "metrics":
                key = lambda v, t, d, a: (v, t, d, metrics_bucket(t, a))  # noqa: E731
                out["key"] = ["vcpu", "type", "dir", "bucket"]
                want = truth_counter(io, key)
                tot = {k: c for k, c in src.totals().items() if k.domid == domid}
                got = Counter()
                for k, c in tot.items():
                    got[(k.vcpu, k.type, k.dir, k.addr)] += c.count
                out["facts"].update(
                    service_n_equals_count=all(c.service_n == c.count for c in tot.values()),
                    hist_sum_equals_count=all(int(c.hist.sum()) == c.count for c in tot.values()),
                    service_n_total=sum(c.service_n for c in tot.values()),
                    service_sum_ns=sum(c.service_sum_ns for c in tot.values()))
            else:
                import numpy as np
                key = lambda v, t, d, a: (v, t, d, a)  # noqa: E731
                out["key"] = ["vcpu", "type", "dir", "addr"]
                want = truth_counter(io, key)
                n_want = sum(want.values())
                batches, n = [], 0
                end = time.monotonic() + WAIT
                while n < n_want and time.monotonic() < end:
                    b = src.poll(100)
                    b = b[b["domid"] == domid]
                    batches.append(b)
                    n += len(b)
                batches.append(src.drain())
                ev = np.concatenate(batches)
                ev = ev[ev["domid"] == domid]
                got = Counter(zip(ev["vcpu"].tolist(), ev["type"].tolist(), ev["dir"].tolist(),
                                  ev["addr"].tolist()))
                svc = ev["service_ns"]
                out["facts"].update(events=len(ev), service_all_positive=bool((svc > 0).all()),
                                    service_all_unknown=bool((svc == -1).all()))
            st = src.stats()
            out["facts"].update(lost=st.lost, decode_errors=st.decode_errors,
                                counters=src.counters())
        finally:
            run.stop()
        out["run_seconds"] = round(time.monotonic() - t1, 2)
        out["want"], out["got"] = pairs(want), pairs(got)
        out["ok"] = True
    finally:
        src.stop()


def run_probeset_case(case, exe, sr, workdir, out):
    """ioreq.bpf.c loaded with ProbeSet for a binary whose buffered caller is unknown."""
    import numpy as np

    from iotrace.probes.bpf import types as T
    from iotrace.probes.bpf.loader import ProbeSet
    from iotrace.probes.hook.resolve import resolve
    res = dataclasses.replace(resolve(exe), buffered=None,
                              send_vcpu_offset=sr.SEND_VCPU_OFFSET[case.layout])
    t0 = time.monotonic()
    ps = ProbeSet(res, case.mode, case.timing)
    try:
        att = ps.attach()
        out["load_seconds"] = round(time.monotonic() - t0, 2)
        out["facts"].update(attached=ps.attached, failed=ps.failed,
                            attach_errors=[a.error for a in att if not a.ok])
        if ps.failed:
            raise RuntimeError("; ".join(a.error or "?" for a in att if not a.ok))
        recs = []
        if case.mode == "events":
            ps.open_ring(lambda _c, data, size: recs.append(ct.string_at(data, size)))
        run = Run(sr, exe, case.layout, workdir)
        t1 = time.monotonic()
        try:
            io = run.wait_truth()
            key = lambda v, t, d, a: (t, d, a)  # noqa: E731   (vcpu of buffered requests: stale)
            if case.mode == "metrics":
                from iotrace.probes.live import metrics_bucket
                want = truth_counter(io, lambda v, t, d, a: (t, d, metrics_bucket(t, a)))
                out["key"] = ["type", "dir", "bucket"]
                got = Counter()
                items = [(k, v) for k, v in ps.stats_items() if k.tgid == run.proc.pid]
                for k, v in items:
                    got[(k.type, k.dir, k.addr)] += v.count
                out["facts"].update(
                    service_n_equals_count=all(v.svc_n == v.count for _, v in items),
                    service_n_total=sum(v.svc_n for _, v in items))
            else:
                want = truth_counter(io, key)
                out["key"] = ["type", "dir", "addr"]
                n_want = sum(want.values())
                end = time.monotonic() + WAIT
                while time.monotonic() < end:
                    ps.poll(100)
                    if len(recs) >= n_want:
                        break
                ps.consume()
                ev = np.frombuffer(b"".join(recs), dtype=T.EVENT_RECORD_DTYPE)
                ev = ev[ev["tgid"] == run.proc.pid]
                got = Counter(zip(ev["type"].tolist(), ev["dir"].tolist(), ev["addr"].tolist()))
                svc = ev["service_ns"]
                out["facts"].update(events=len(ev), service_all_positive=bool((svc > 0).all()),
                                    service_all_unknown=bool((svc == -1).all()))
            out["facts"]["counters"] = ps.counters()
        finally:
            run.stop()
        out["run_seconds"] = round(time.monotonic() - t1, 2)
        out["want"], out["got"] = pairs(want), pairs(got)
        out["ok"] = True
    finally:
        ps.close()


def run_refused_case(case, exe, sr, workdir, out):
    """ioreq.bpf.c with an access every verifier refuses: the source is down, says why."""
    from iotrace.probes.bpf.loader import EXTRA_CFLAGS_ENV
    from iotrace.probes.live import QemuProbeSource
    os.environ[EXTRA_CFLAGS_ENV] = "-DIOTRACE_TEST_OOB=1"
    t0 = time.monotonic()
    try:
        src = QemuProbeSource(binaries=[exe], defaults=False, mode="metrics", timing=True,
                              warn=lambda msg: None)
        src.start()
        out["load_seconds"] = round(time.monotonic() - t0, 2)
        st = src.stats()
        out["facts"].update(up=st.up, attached=src.attached, failed=st.probes_failed,
                            error=st.error, failures=list(src.failures))
        src.stop()
    finally:
        del os.environ[EXTRA_CFLAGS_ENV]
    out["key"], out["want"], out["got"] = ["down"], [[1]], [[0 if st.up else 1]]
    out["ok"] = True


def run_selfcheck_case(case, exe, sr, workdir, out, project):
    """probes/standin/selfcheck.bpf.c: one perf record per request of the stream."""
    from iotrace.probes.bpf.loader import import_bcc
    from iotrace.probes.standin import stream
    bcc = import_bcc()
    t0 = time.monotonic()
    b = bcc.BPF(src_file=os.path.join(project, "probes", "standin", "selfcheck.bpf.c").encode(),
                cflags=[f"-DSEND_VCPU_OFFSET={sr.SEND_VCPU_OFFSET[case.layout]}"])
    try:
        b.attach_uprobe(name=exe.encode(), sym=b"handle_ioreq", fn_name=b"on_handle_ioreq")
        out["load_seconds"] = round(time.monotonic() - t0, 2)
        pids = []
        b["seen"].open_perf_buffer(
            lambda _cpu, data, _size: pids.append(ct.cast(data, ct.POINTER(ct.c_uint32))[9]),
            page_cnt=512)
        n_want = len(stream.read_stream(sr.BUNDLED_STREAM))
        run = Run(sr, exe, case.layout, workdir)
        t1 = time.monotonic()
        try:
            run.wait_truth()
            end = time.monotonic() + WAIT
            while time.monotonic() < end and pids.count(run.proc.pid) < n_want:
                b.perf_buffer_poll(timeout=100)
            out["key"] = ["records"]
            out["want"], out["got"] = [[n_want]], [[pids.count(run.proc.pid)]]
        finally:
            run.stop()
        out["run_seconds"] = round(time.monotonic() - t1, 2)
        out["ok"] = True
    finally:
        b.cleanup()


def run_empty_case(case, exe, sr, workdir, out, project):
    """probes/bpf/empty.bpf.c: each baseline program loads and attaches."""
    from iotrace.probes.bpf.loader import EMPTY_PROGRAM, PROBES_DIR, import_bcc
    from iotrace.probes.hook.resolve import resolve
    bcc = import_bcc()
    res = resolve(exe)
    t0 = time.monotonic()
    b = bcc.BPF(src_file=EMPTY_PROGRAM.encode(), cflags=[f"-I{PROBES_DIR}"])
    try:
        b.attach_uprobe(name=exe.encode(), addr=res.func_vaddr, fn_name=b"empty_entry", pid=-1)
        b.attach_uprobe(name=exe.encode(), addr=res.func_vaddr, fn_name=b"reads_entry", pid=-1)
        b.attach_uretprobe(name=exe.encode(), addr=res.func_vaddr, fn_name=b"empty_return",
                           pid=-1)
        out["load_seconds"] = round(time.monotonic() - t0, 2)
        out["key"], out["want"], out["got"] = ["attached"], [[3]], [[3]]
        out["ok"] = True
    finally:
        b.cleanup()


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("project")
    p.add_argument("--case", action="append", default=[], help="run only these cases")
    args = p.parse_args(argv)
    project = os.path.abspath(args.project)
    make_importable(project)
    import bcc

    from iotrace.probes.standin import runner as sr
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="iotrace-matrix-")
    # Private copies of the stand-in builds (their own inodes: a uprobe on them sees no other
    # stand-in running the project's binaries).
    exes = {}
    for layout, name in sr.LAYOUTS.items():
        exes[layout] = os.path.join(workdir, name)
        shutil.copy2(os.path.join(project, "probes", "standin", name), exes[layout])
    results = []
    for case in CASES:
        if args.case and case.name not in args.case:
            continue
        out = {"case": case.name, "program": case.program, "mode": case.mode,
               "timing": case.timing, "buffered_caller": case.buffered_caller,
               "layout": case.layout, "ok": False, "error": None, "facts": {},
               "load_seconds": None, "run_seconds": None}
        exe = exes[case.layout]
        try:
            if case.name == "refused":
                run_refused_case(case, exe, sr, workdir, out)
            elif case.program == "selfcheck.bpf.c":
                run_selfcheck_case(case, exe, sr, workdir, out, project)
            elif case.program == "empty.bpf.c":
                run_empty_case(case, exe, sr, workdir, out, project)
            elif case.buffered_caller:
                run_source_case(case, exe, sr, workdir, out)
            else:
                run_probeset_case(case, exe, sr, workdir, out)
        except Exception as exc:  # reported per case, the others still run
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc(limit=6)
        print(f"probe_matrix: {case.name}: {'ok' if out['ok'] else out['error']} "
              f"(load {out['load_seconds']} s, run {out['run_seconds']} s)", file=sys.stderr,
              flush=True)
        results.append(out)
    shutil.rmtree(workdir, ignore_errors=True)
    json.dump({"kernel": platform.release(), "bcc": getattr(bcc, "__version__", "?"),
               "python": platform.python_version(), "seconds": round(time.monotonic() - t0, 1),
               "cases": results}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
