"""/proc/PID/stat, read the one careful way (what process discovery and the analysis share).

The second field (comm) may hold spaces and parentheses, so the fields are taken after the last
``)``. ``stat_fields(pid)[i]`` is field ``i + 3`` of proc(5): 0 is the state, 11 utime, 12 stime,
19 starttime (clock ticks since boot).
"""
from __future__ import annotations

PROC = "/proc"
UTIME, STIME, STARTTIME = 11, 12, 19


def stat_fields(pid: int, proc: str = PROC) -> list[bytes] | None:
    """The fields of /proc/PID/stat after comm, or None when the process is gone."""
    try:
        with open(f"{proc}/{int(pid)}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()
