"""Reading an exporter's /metrics in tests: fetch it, pick samples by name and labels."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

from support.procs import terminate
from support.prometheus import free_port, wait_http


def scrape(port: int) -> str:
    """The text of http://127.0.0.1:PORT/metrics (10 s timeout)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str, name: str, **labels) -> list[float]:
    """Values of the ``name{...}`` samples whose labels include every ``labels`` pair."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        lab, _, val = line.rpartition(" ")
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            out.append(float(val))
    return out


def start_serve(tmp_path, *args):
    """``iotrace serve --source qemu ARGS`` on a free loopback port, its stderr in
    tmp_path/serve.log: (process, port, log file), once /metrics answers (120 s at most: a BCC
    compile on a loaded machine)."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    p = subprocess.Popen([sys.executable, "-m", "iotrace", "serve", "--web.listen-address",
                          f"127.0.0.1:{port}", "--source", "qemu", *args],
                         stdout=subprocess.DEVNULL, stderr=log)
    wait_http(f"http://127.0.0.1:{port}/metrics", timeout=120)
    return p, port, log


def stop_serve(p, log) -> str:
    """SIGTERM (SIGKILL after 30 s) and the log's text."""
    terminate(p, 30)
    log.seek(0)
    return log.read()
