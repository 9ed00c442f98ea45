"""Commands run in a private mount namespace where tracefs and debugfs are not mounted.

That is a fresh machine's state (Debian 12 before anything mounts /sys/kernel/tracing, a Dom0
without systemd), made without touching the host's mounts: other tests and other users on the
machine need them. ``unshare`` (util-linux) makes the namespace; the unmounts run inside it only,
and vanish with it. Needs root.
"""
from __future__ import annotations

# The tracefs automount inside debugfs first, then debugfs, then tracefs itself; each as often as
# it is mounted (mounts can be stacked).
POINTS = ("/sys/kernel/debug/tracing", "/sys/kernel/debug", "/sys/kernel/tracing")

_UNMOUNT = "".join(f'while mountpoint -q {p}; do umount -l {p} || exit 97; done; '
                   for p in POINTS)

# After the command: how many tracefs mounts the namespace has ("tracefs-mounts: N" on stderr),
# so a test can tell whether the command mounted one.
_REPORT = ('rc=$?; echo "tracefs-mounts: $(grep -c " tracefs " /proc/self/mounts)" >&2; '
           'exit $rc')


def without_tracefs(argv: list[str], report: bool = False) -> list[str]:
    """``argv`` wrapped to run where tracefs and debugfs are unmounted (see module doc).

    Without ``report`` the command replaces the shell (the process is the command itself, so
    signals reach it). report: print "tracefs-mounts: N" on stderr once the command has exited;
    the command is then a child of the shell: use it for commands that end by themselves."""
    body = _UNMOUNT + ('"$@"; ' + _REPORT if report else 'exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", body, "sh", *argv]


def tracefs_mounts_after(stderr: str) -> int:
    """The count ``without_tracefs(..., report=True)`` printed."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("tracefs-mounts: "):
            return int(line.split()[1])
    raise AssertionError(f"no tracefs-mounts line in {stderr!r}")
