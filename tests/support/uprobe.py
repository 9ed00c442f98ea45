"""What a uprobe leaves in the system: the int3 byte in a running process, tracefs's event list."""
from __future__ import annotations

import os
import re
from pathlib import Path

UPROBE_EVENTS = [Path("/sys/kernel/tracing/uprobe_events"),
                 Path("/sys/kernel/debug/tracing/uprobe_events")]

INT3 = 0xCC


def runtime_byte(pid: int, exe: str, vaddr: int) -> int:
    """The byte at ``vaddr`` of ``exe`` in process ``pid``'s memory (0xcc while a uprobe is set)."""
    base = None
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == exe and int(parts[2], 16) == 0:
                base = int(parts[0].split("-")[0], 16)
                break
    assert base is not None, f"{exe} is not mapped in process {pid}"
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(base + vaddr)
        return f.read(1)[0]


def uprobe_lines(exe: str, pid: int | None = None) -> list[str]:
    """The tracefs uprobe events iotrace left behind on ``exe``: lines of uprobe_events (where
    mounted here) naming ``exe``, with iotrace's event names (probes/bpf/uprobes.py:
    ``[pr]_iotrace_..._bcc_<pid>``) and a creating process that is gone (or, given ``pid``,
    made by that process). Events of live processes and of other tools (other users of this
    machine probe the same binaries) are not leftovers."""
    out = []
    for p in UPROBE_EVENTS:
        if not p.exists():
            continue
        for ln in p.read_text().splitlines():
            m = re.match(r"[pr]:\S+/[pr]_iotrace_\S*_bcc_(\d+) (\S+):", ln)
            if not m or m.group(2) != exe:
                continue
            if (int(m.group(1)) == pid) if pid is not None else \
                    not os.path.exists(f"/proc/{m.group(1)}"):
                out.append(ln)
    return out
