#!/usr/bin/env python3
"""Cost of resolving a stripped device model automatically (probes/hook/auto.py), per binary.

Each measurement runs in a fresh child process, so its peak RSS is its own. For every binary:

* baseline: read the whole file once (what the resolver before the automatic one did first,
  and the floor of anything that looks at every byte);
* resolve: ``resolve(path, table={})`` -- .eh_frame bounds, the format-string and call scans over
  all executable code, capstone on the few functions involved -- after the imports;
* the imports it needs (capstone's import pulls in setuptools' distutils shim: most of it).

Inputs: Debian 12's and Debian 13's qemu-system-xen (Debian 13's fetched into the cache by
scripts/fetch-device-model.sh), and a stripped stand-in (small). Figures: seconds (median of
--rounds), MB/s of the file, the ratio resolve / read-whole-file, peak RSS.

    python bench/resolver.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
path, what = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if what == "read":
    with open(path, "rb") as f:
        n = len(f.read())
    out = {"seconds": time.perf_counter() - t0}
else:
    from iotrace.probes.hook import resolve as R
    import capstone  # noqa: F401  (imported here so "imports" is measured apart)
    t1 = time.perf_counter()
    res = R.resolve(path, table={})
    out = {"seconds": time.perf_counter() - t1, "imports": t1 - t0, "ok": res.ok,
           "method": res.method, "doubts": res.doubts(), "handle_ioreq": res.func_offset}
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def run_child(path: str, what: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, path, what], capture_output=True,
                       text=True, check=True, cwd=REPO)
    return json.loads(r.stdout)


def inputs(tmp: str) -> list[tuple[str, str]]:
    out = []
    if os.path.exists("/usr/libexec/xen-qemu-system-i386"):
        out.append(("Debian 12 qemu-system-xen (QEMU 7.2)", "/usr/libexec/xen-qemu-system-i386"))
    r = subprocess.run([str(REPO / "scripts" / "fetch-device-model.sh"), "trixie",
                        "qemu-system-xen", "1:10.0.13+ds-0+deb13u1",
                        "/usr/libexec/xen-qemu-system-i386"], capture_output=True, text=True)
    if r.returncode == 0:
        out.append(("Debian 13 qemu-system-xen (QEMU 10.0)", r.stdout.strip().splitlines()[-1]))
    else:
        print(f"(Debian 13 skipped: {r.stderr.strip()})")
    from iotrace.probes.standin import runner as sr
    stripped = os.path.join(tmp, "standin.stripped")
    subprocess.run(["objcopy", "--strip-all", str(sr.build()), stripped], check=True)
    out.append(("stripped stand-in", stripped))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"{'binary':<40} {'MB':>6} {'read s':>8} {'resolve s':>10} {'ratio':>6} "
          f"{'MB/s':>7} {'imports s':>9} {'RSS read':>9} {'RSS res':>8}  result")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in inputs(tmp):
            size = os.path.getsize(path) / 1e6
            reads = [run_child(path, "read") for _ in range(args.rounds)]
            res = [run_child(path, "resolve") for _ in range(args.rounds)]
            rd = statistics.median(r["seconds"] for r in reads)
            rs = statistics.median(r["seconds"] for r in res)
            imp = statistics.median(r["imports"] for r in res)
            last = res[-1]
            result = (f"{last['method']} handle_ioreq {last['handle_ioreq']:#x}"
                      + (" (doubts: " + "; ".join(last["doubts"]) + ")" if last["doubts"] else
                         ", all sure")) if last["ok"] else "FAILED"
            print(f"{name:<40} {size:6.1f} {rd:8.3f} {rs:10.3f} {rs / rd:6.1f} "
                  f"{size / rs:7.0f} {imp:9.3f} {max(r['rss_mb'] for r in reads):8.0f}M "
                  f"{max(r['rss_mb'] for r in res):7.0f}M  {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
