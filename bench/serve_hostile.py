#!/usr/bin/env python3
"""Benchmark: a scrape of ``iotrace serve`` while hostile clients are connected (issue #12, 7-8).

    .venv/bin/python bench/serve_hostile.py [--slow 200] [--guessers 20] [--seconds 20]

Starts ``iotrace serve --replay`` of a small generated recording on a loopback port, with basic
auth (bcrypt cost 10, the exporter-toolkit's usual) and then, each alone and side by side with a
quiet baseline measured in the same run:

* ``quiet``: a legitimate scraper (right password) alone: its scrape latency;
* ``slowloris``: ``--slow`` clients each sending one byte of a request head per second;
* ``guessers``: ``--guessers`` clients sending requests with distinct wrong passwords as fast
  as they get answers.

Prints, per situation, the legitimate scraper's median and worst latency over ``--seconds``, how
many of its scrapes failed, and the server's thread count (from /proc), then the ratios against
the quiet baseline; the last line is ``worst_ratio_vs_quiet X``.
"""
from __future__ import annotations

import argparse
import base64
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bcrypt  # noqa: E402

from iotrace.core import events  # noqa: E402
from iotrace.offline.recording import RecordingWriter  # noqa: E402

USER, PASSWORD = "prom", "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Threads:"))


def scrape(url: str, password: str, timeout: float = 30.0) -> float:
    cred = base64.b64encode(f"{USER}:{password}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {cred}"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
    return time.monotonic() - t0


def slow_client(host: str, port: int, stop: threading.Event) -> None:
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n" + b"X-a: b\r\n" * 100
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                for byte in head:
                    if stop.wait(1.0):
                        return
                    s.sendall(bytes([byte]))
        except OSError:
            if stop.wait(0.2):
                return


def guesser(url: str, i: int, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        try:
            scrape(url, f"wrong-{i}-{n}", timeout=10)
        except (urllib.error.URLError, OSError, TimeoutError):
            pass


def measure(url: str, pid: int, seconds: float) -> dict:
    lat, failed, peak_threads = [], 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lat.append(scrape(url, PASSWORD))
        except (urllib.error.URLError, OSError, TimeoutError):
            failed += 1
            lat.append(30.0)
        peak_threads = max(peak_threads, threads_of(pid))
        time.sleep(0.5)
    return {"median": statistics.median(lat), "worst": max(lat), "failed": failed,
            "scrapes": len(lat), "threads": peak_threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow", type=int, default=200, help="slow clients (default 200)")
    ap.add_argument("--guessers", type=int, default=20, help="password guessers (default 20)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per situation (default 20)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "r.iotrec"
        with RecordingWriter(rec, {"source": "qemu", "domains": {1: "web"}}) as w:
            b = events.empty(5000)
            b["domid"], b["vcpu"], b["type"], b["addr"], b["size"] = 1, 0, events.TYPE_PIO, 0x3f8, 1
            w.write(b)
        web = Path(tmp) / "web.yml"
        pw_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
        web.write_text(f"basic_auth_users:\n  {USER}: '{pw_hash}'\n")
        port = free_port()
        exe = REPO / ".venv" / "bin" / "iotrace"
        proc = subprocess.Popen([str(exe), "serve", "--replay", str(rec), "--web.config.file",
                                 str(web), "--web.listen-address", f"127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            for _ in range(100):
                try:
                    scrape(url, PASSWORD, timeout=2)
                    break
                except (urllib.error.URLError, OSError):
                    time.sleep(0.1)
            results = {"quiet": measure(url, proc.pid, args.seconds)}
            for name, target, n, arg in (("slowloris", slow_client, args.slow, None),
                                         ("guessers", guesser, args.guessers, None)):
                stop = threading.Event()
                workers = [threading.Thread(
                    target=target, daemon=True,
                    args=(("127.0.0.1", port, stop) if target is slow_client else (url, i, stop)))
                    for i in range(n)]
                for t in workers:
                    t.start()
                time.sleep(3.0)                  # let them take hold
                results[name] = measure(url, proc.pid, args.seconds)
                stop.set()
                for t in workers:
                    t.join(12)
                time.sleep(2.0)
        finally:
            proc.terminate()
            proc.wait(10)
    base = results["quiet"]["median"]
    worst = 0.0
    for name, r in results.items():
        ratio = r["median"] / base
        worst = max(worst, ratio)
        print(f"{name:<10} scrape median {r['median'] * 1000:8.1f} ms  worst {r['worst'] * 1000:8.1f} ms"
              f"  failed {r['failed']}/{r['scrapes']}  server threads {r['threads']}"
              f"  median_ratio_vs_quiet {ratio:.2f}")
    print(f"worst_ratio_vs_quiet {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
