"""Benchmark: iotrace's xentrace decoder against xenalyze, on every kind of capture, side by side.

    .venv/bin/python bench/xentrace_decode.py [--repeat 5] [--mix NAME ...] [--no-gb]

Captures, generated once with ``iotrace.xentrace.testing.synth`` (``MIXES``, ``stream``)
into /var/tmp/iotrace-bench/ (named by mix, size, seed and a hash of synth.py) and reused:

  io-dense      135 MB  ~25% of records I/O, nearly every record inside an exit, 2 pCPUs,
                        2 domains x 2 vCPUs, half the MMIO above 4 GiB
  sched-heavy   100 MB  8 pCPUs, 10 guest vCPUs, 30% of I/O exits wait for qemu (the old mix)
  mmio64-amd    100 MB  an AMD host (xenalyze needs --svm-mode), 90% MMIO, 60% of it 64-bit
  many-domains   60 MB  60 domains x 2 vCPUs on 8 pCPUs, migrating all the time
  lost-heavy    100 MB  a lost-records burst every ~40 scheduling steps
  real                  the real capture (xentrace-hvm-real.bin beside the clone, docs/data.md), 3.9 MB
  1 GB          1050 MB  io-dense again, generated at that length: time and memory at scale

Each capture is measured in rounds, xenalyze and iotrace back to back in every round (the
machine is shared: a ratio is only meaningful within a round):

  xenalyze     xenalyze --summary --with-pio-enumeration --with-mmio-enumeration [--svm-mode] FILE
               > /dev/null (a process; C, starts in ~1 ms)
  iotrace      what ``iotrace report --format json FILE`` does after the interpreter has
               started, in this process: summarize_capture (read, decode, aggregate in the
               compiled core), group, render the JSON
  cli          ``iotrace report --format json FILE`` as a process: the same plus Python's start-up
               and imports (a fixed ~0.1-0.2 s, printed on its own as "start-up")
  compat       iotrace with --xenalyze-compat (in this process)

Printed per capture: medians (and min-max) of the wall times, MB/s, and the ratios iotrace /
xenalyze (median of the per-round ratios, with their min-max); the peak RSS of
``iotrace report --format json`` and of xenalyze (each in a fresh process). Last line:
``worst_ratio_vs_xenalyze X`` - the worst capture's iotrace/xenalyze ratio (goal <= 1.0).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/var/tmp/iotrace-bench")
REAL = (REPO.parent / "shared" / "data" / "xentrace-hvm-real.bin").resolve()
SIZES_MB = {"io-dense": 135, "sched-heavy": 100, "mmio64-amd": 100, "many-domains": 60,
            "lost-heavy": 100}
GB_MB = 1050
SEED = 1


def _synth_key() -> str:
    """A hash of the generator's code (docstrings and comments aside): a changed generator
    makes new captures, an edited comment does not."""
    from iotrace.xentrace.testing import synth
    tree = ast.parse(Path(synth.__file__).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:10]


def capture(mix: str, mb: int | None = None) -> Path:
    """The mix's capture of mb MB (default SIZES_MB), generated once; beside it a .json of the
    generator's counters."""
    from iotrace.xentrace.testing import synth
    mb = mb or SIZES_MB[mix]
    path = CACHE / f"{mix}-{mb}mb-s{SEED}-{_synth_key()}.bin"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = path.with_suffix(".tmp")
    tr = synth.write_capture(tmp, SEED, target_bytes=mb * 1_000_000, **synth.MIXES[mix])
    path.with_suffix(".json").write_text(json.dumps(
        {"records": tr.records, "io_records": tr.io_records, "lost_records": tr.lost_records,
         "windows": tr.windows, "migrations": tr.migrations}))
    os.replace(tmp, path)
    print(f"generated {path.name}: {path.stat().st_size / 1e6:.1f} MB, {tr.records} records, "
          f"{tr.io_records} I/O, in {time.time() - t0:.0f} s", flush=True)
    return path


def generator_counts(path: Path) -> dict | None:
    side = path.with_suffix(".json")
    return json.loads(side.read_text()) if side.exists() else None


def parse_xenalyze(text: str) -> int:
    """Requests xenalyze's summary lists per domain/vCPU ("IO"/"MMIO address summary" rows of
    hvm_io_address_summary), the default domain aside - what --xenalyze-compat counts."""
    total, listing, dom = 0, False, None
    for line in text.splitlines():
        if line.startswith("|-- "):
            dom = line.startswith("|-- Domain ")
            listing = False
        elif line in ("IO address summary:", "MMIO address summary:"):
            listing = True
        elif listing:
            m = re.match(r"\s*[0-9a-f]+(?:@\s*[0-9a-f]+)?:\[[rw]\]\s+(\d+)\s", line)
            if m and dom:
                total += int(m.group(1))
            else:
                listing = False
    return total


def xenalyze_cmd(path: Path, mix: str) -> list[str]:
    exe = shutil.which("xenalyze")
    if not exe:
        raise SystemExit("xenalyze not installed (apt-get install xen-utils-4.17)")
    amd = mix in SIZES_MB and __import__("iotrace.xentrace.testing.synth",
                                         fromlist=["MIXES"]).MIXES[mix].get("amd")
    return [exe, "--summary", "--with-pio-enumeration", "--with-mmio-enumeration",
            *(["--svm-mode"] if amd else []), str(path)]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    t = time.perf_counter() - t0
    if r.returncode != 0 or b"FATAL" in r.stderr:
        # a run that stopped early would make a ratio meaningless
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise SystemExit(f"{cmd[0]} failed on {cmd[-1]} (status {r.returncode}): {last[0]}")
    return t


LAST = {}


def report_json(path: Path, compat: bool = False) -> float:
    from iotrace.core.addrmap import AddressMap
    from iotrace.offline.capture import summarize_capture
    from iotrace.offline.report import to_json
    from iotrace.offline.rollup import build
    t0 = time.perf_counter()
    addrmap = AddressMap.load(None)
    s = summarize_capture(str(path), xenalyze_compat=compat)
    io.StringIO().write(to_json(build(s, addrmap)))
    t = time.perf_counter() - t0
    LAST[compat] = s
    return t


def cli_cmd(path: Path) -> list[str]:
    return [str(REPO / ".venv" / "bin" / "iotrace"), "report", "--format", "json", str(path)]


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of cmd, alone in a fresh wrapper process (RUSAGE_CHILDREN is its max)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip()) / 1024.0


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def measure(name: str, path: Path, mix: str, repeat: int, startup: float) -> float:
    mb = path.stat().st_size / 1e6
    xa, it, cli, co = [], [], [], []
    for _ in range(repeat):
        xa.append(wall(xenalyze_cmd(path, mix)))
        it.append(report_json(path))
        cli.append(wall(cli_cmd(path)))
        co.append(report_json(path, compat=True))
    r = [i / x for i, x in zip(it, xa)]
    xa_listed = parse_xenalyze(subprocess.run(xenalyze_cmd(path, mix), capture_output=True,
                                              text=True).stdout)
    gen = generator_counts(path)
    default, compat = LAST[False], LAST[True]
    rc = [c / x for c, x in zip(cli, xa)]
    rp = [c / x for c, x in zip(co, xa)]
    xm, im = statistics.median(xa), statistics.median(it)
    print(f"{name}: {mb:.1f} MB, {repeat} rounds (median, min-max)")
    print(f"  xenalyze  {spread(xa)} s  {mb / xm:6.0f} MB/s  peak RSS "
          f"{peak_rss_mb(xenalyze_cmd(path, mix)):.0f} MB")
    print(f"  iotrace   {spread(it)} s  {mb / im:6.0f} MB/s  ratio {statistics.median(r):.2f} "
          f"({min(r):.2f}-{max(r):.2f})")
    print(f"  cli       {spread(cli)} s  (start-up {startup:.2f} s)  ratio "
          f"{statistics.median(rc):.2f} ({min(rc):.2f}-{max(rc):.2f})  peak RSS "
          f"{peak_rss_mb(cli_cmd(path)):.0f} MB")
    print(f"  compat    {spread(co)} s  ratio {statistics.median(rp):.2f} "
          f"({min(rp):.2f}-{max(rp):.2f})")
    print(f"  counts    default {default.requests} I/O of {default.records} records"
          + (f" (generator: {gen['io_records']} of {gen['records']})" if gen else "")
          + f"; compat {compat.requests}, xenalyze lists {xa_listed}"
          + (" (equal)" if compat.requests == xa_listed else " (DIFFERENT)"), flush=True)
    return statistics.median(r)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="rounds per capture (default 5)")
    ap.add_argument("--mix", action="append", choices=sorted(SIZES_MB) + ["real"],
                    help="only these captures (repeatable; default: all)")
    ap.add_argument("--no-gb", action="store_true", help="skip the 1 GB capture")
    args = ap.parse_args(argv)
    names = args.mix or list(SIZES_MB) + ["real"]
    paths = {}
    for name in names:
        if name == "real":
            if REAL.exists():
                paths[name] = REAL
            else:
                print(f"real capture {REAL} missing: skipped")
        else:
            paths[name] = capture(name)
    # start-up: the CLI on a capture with one empty window (decoding costs nothing)
    tiny = CACHE / "empty-window.bin"
    if not tiny.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tiny.write_bytes(bytes.fromhex("03f00120" "00000000" "00000000"))
    startup = statistics.median(wall(cli_cmd(tiny)) for _ in range(5))
    print(f"iotrace start-up (report of an empty capture, as a process): {startup:.3f} s")
    worst = {}
    for name, path in paths.items():
        worst[name] = measure(name, path, name, args.repeat, startup)
    if not args.no_gb:
        gb = capture("io-dense", GB_MB)
        worst["1 GB"] = measure(f"1 GB (io-dense, {GB_MB} MB)", gb, "io-dense",
                                max(1, args.repeat // 3), startup)
    name = max(worst, key=worst.get)
    print(f"worst: {name}")
    print(f"worst_ratio_vs_xenalyze {worst[name]:.2f}")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
