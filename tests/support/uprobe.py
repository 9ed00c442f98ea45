"""What a uprobe leaves in the system: the int3 byte in a running process, tracefs's event list."""
from __future__ import annotations

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


def uprobe_lines(exe: str) -> list[str]:
    """Lines of tracefs's uprobe_events (where mounted here) that name ``exe``."""
    out = []
    for p in UPROBE_EVENTS:
        if p.exists():
            out += [ln for ln in p.read_text().splitlines() if exe in ln]
    return out
