"""Benchmark: iotrace's xentrace decoder (+ aggregation) against xenalyze on the same capture.

    .venv/bin/python bench/xentrace_decode.py [--mb 60] [--repeat 3] [--file CAPTURE]

Generates (once, cached in /tmp/iotrace-bench-xentrace-<MB>mb.bin) a synthetic xentrace capture of at
least ``--mb`` MB with ``iotrace.xentrace.testing.synth`` (several pCPUs, HVM domains, port I/O and MMIO,
rep, lost records, wrap records), or uses ``--file``. Then, in the same run, best of ``--repeat``:

* iotrace: ``decode_file`` + ``Aggregator.add_batch`` on the events (in this process);
* xenalyze: ``xenalyze --summary --with-pio-enumeration --with-mmio-enumeration FILE`` (output to
  /dev/null), Xen's own analyser.

Prints MB/s for both, the peak RSS of a decode (measured in a fresh child process, so it is the
decode's own peak), and as the last line ``ratio_vs_xenalyze X`` = iotrace time / xenalyze time.
The goal is X <= 2.0.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time


def make_capture(mb: int) -> str:
    path = f"/tmp/iotrace-bench-xentrace-{mb}mb.bin"
    if os.path.exists(path) and os.path.getsize(path) >= mb * 1_000_000:
        return path
    from iotrace.xentrace.testing import synth
    t0 = time.time()
    # about 47 bytes of trace per scheduling step with this host shape (measured)
    steps = int(mb * 1_000_000 / 45)
    tr = synth.generate(0, pcpus=8, steps=steps, domains=((1, 4), (2, 4), (3, 2)))
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(tr.data)
    os.replace(tmp, path)
    print(f"generated {path}: {len(tr.data) / 1e6:.1f} MB, {tr.io_records} I/O records, "
          f"in {time.time() - t0:.1f} s", flush=True)
    return path


def time_iotrace(path: str) -> tuple[float, int, int]:
    from iotrace.core.aggregate import Aggregator
    from iotrace.xentrace.decoder import decode_file
    t0 = time.perf_counter()
    res = decode_file(path)
    agg = Aggregator()
    agg.add_batch(res.events)
    return time.perf_counter() - t0, len(res.events), res.records


def time_xenalyze(path: str) -> float:
    exe = shutil.which("xenalyze")
    if not exe:
        raise SystemExit("xenalyze not installed (apt-get install xen-utils-4.17)")
    t0 = time.perf_counter()
    subprocess.run([exe, "--summary", "--with-pio-enumeration", "--with-mmio-enumeration", path],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def peak_rss_mb(path: str) -> float:
    code = ("import resource,sys; from iotrace.xentrace.decoder import decode_file; "
            "decode_file(sys.argv[1]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip()) / 1024.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=60, help="capture size to generate (MB, default 60)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, best kept (default 3)")
    ap.add_argument("--file", help="use this capture instead of a generated one")
    args = ap.parse_args(argv)
    path = args.file or make_capture(args.mb)
    mb = os.path.getsize(path) / 1e6
    from iotrace.xentrace import decoder as D
    it, xt = [], []
    for _ in range(args.repeat):
        t, n_events, n_records = time_iotrace(path)
        it.append(t)
        xt.append(time_xenalyze(path))
    best_i, best_x = min(it), min(xt)
    print(f"capture {path}: {mb:.1f} MB, {n_records} records, {n_events} I/O events")
    print(f"iotrace decode+aggregate ({D.walker_name()} walk): best {best_i:.3f} s  "
          f"{mb / best_i:.1f} MB/s")
    print(f"xenalyze --summary --with-pio-enumeration --with-mmio-enumeration: best {best_x:.3f} s"
          f"  {mb / best_x:.1f} MB/s")
    print(f"iotrace decode peak RSS: {peak_rss_mb(path):.0f} MB")
    print(f"ratio_vs_xenalyze {best_i / best_x:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
