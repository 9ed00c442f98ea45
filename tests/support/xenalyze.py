"""The installed xenalyze in tests: run it on a capture and read its per-vCPU address summaries."""
from __future__ import annotations

import re
import subprocess
from collections import Counter

from iotrace.core.events import DIR_READ, DIR_WRITE, TYPE_MMIO, TYPE_PIO
from support import require_tool


def parse_xenalyze(text: str) -> Counter:
    """(domid, vcpu, type, dir, addr) -> count from xenalyze's per-vCPU "IO address summary" and
    "MMIO address summary" lists (hvm_io_address_summary: ``%8x:[r]`` then PRINT_SUMMARY's count).
    The default domain (records of unknown owner) is only printed on request: not here."""
    out, dom, vcpu, sec = Counter(), None, None, None
    for line in text.splitlines():
        m = re.match(r"\|-- Domain (\d+) --\|$", line)
        if m:
            dom, vcpu, sec = int(m.group(1)), None, None
            continue
        if line.startswith("|-- "):
            dom = sec = None
            continue
        m = re.match(r"-- v(\d+) --$", line)
        if m:
            vcpu, sec = int(m.group(1)), None
            continue
        if line in ("IO address summary:", "MMIO address summary:"):
            sec = TYPE_PIO if line.startswith("IO") else TYPE_MMIO
            continue
        m = re.match(r"\s*([0-9a-f]+)(?:@\s*[0-9a-f]+)?:\[([rw])\]\s+(\d+)\s", line)
        if m and sec is not None and dom is not None and vcpu is not None:
            d = DIR_READ if m.group(2) == "r" else DIR_WRITE
            out[(dom, vcpu, sec, d, int(m.group(1), 16))] += int(m.group(3))
        else:
            sec = None
    return out


def run_xenalyze(path, *extra, timeout: float = 60) -> Counter:
    """xenalyze --summary --with-pio-enumeration --with-mmio-enumeration EXTRA PATH, parsed."""
    exe = require_tool("xenalyze")
    r = subprocess.run([exe, "--summary", "--with-pio-enumeration", "--with-mmio-enumeration",
                        *extra, str(path)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FATAL" not in r.stderr, r.stderr[-2000:]
    return parse_xenalyze(r.stdout)
