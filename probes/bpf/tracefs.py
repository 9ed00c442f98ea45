"""The kernel's tracing filesystem (tracefs): is it there for BCC, and mounting it when we may.

Why it matters (bcc src/cc/libbpf.c, v0.26 as in Debian 12, unchanged since):

* ``bpf_attach_probe`` first makes a uprobe with ``perf_event_open`` on the ``uprobe`` PMU
  (``bpf_try_perf_event_open_with_probe``: /sys/bus/event_source/devices/uprobe, no tracefs), and
  only when that fails writes ``p:uprobes/<name>_bcc_<pid> <path>:<offset>`` to tracefs's
  ``uprobe_events`` (``create_probe_event``) and opens the event by its id.
* ``bpf_detach_probe`` (what bcc's Python ``BPF.cleanup`` calls for every uprobe) opens
  ``uprobe_events`` in every case, and fails when tracefs is not mounted: bcc then raises
  "Failed to detach BPF from uprobe" half-way through its cleanup, leaving the remaining probes
  attached. ``iotrace.probes.bpf.uprobes`` detaches without it.
* The perf ``uprobe`` PMU needs CAP_SYS_ADMIN again since Linux 6.16 (commit ba677dbe77af, "perf:
  Revert to requiring CAP_SYS_ADMIN for uprobes", CVE-2025-38466; in the stable kernels since July
  2025). With only CAP_BPF + CAP_PERFMON (deploy/iotrace.service) a uprobe can only be made through
  ``uprobe_events``: there tracefs is required.

bcc looks for tracefs where ``get_tracefs_path`` says: /sys/kernel/debug/tracing when that exists
(debugfs mounted; the kernel automounts tracefs there), else /sys/kernel/tracing. systemd mounts the
latter at boot (units/sys-kernel-tracing.mount: What=tracefs, Options=nosuid,nodev,noexec); a
fresh machine without it, or a minimal Dom0 without systemd, has an empty directory there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

TRACEFS = "/sys/kernel/tracing"
DEBUGFS_TRACING = "/sys/kernel/debug/tracing"

CAP_SYS_ADMIN = 21

# <sys/mount.h>
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8

MOUNT_HINT = (f"mount -t tracefs -o nosuid,nodev,noexec tracefs {TRACEFS} "
              "(systemd: systemctl start sys-kernel-tracing.mount)")

MISSING = (f"tracefs is not mounted on {TRACEFS}, and without CAP_SYS_ADMIN BCC can only make "
           "uprobes through its uprobe_events (Linux >= 6.16 and current stable kernels keep the "
           f"perf uprobe PMU for CAP_SYS_ADMIN): mount it first: {MOUNT_HINT}")


def tracing_dir() -> str | None:
    """The tracefs directory bcc's libbpf uses, if it has ``uprobe_events``; else None."""
    d = DEBUGFS_TRACING if os.access(DEBUGFS_TRACING, os.F_OK) else TRACEFS
    return d if os.path.exists(os.path.join(d, "uprobe_events")) else None


def effective_caps() -> int:
    """This process's effective capability set (``CapEff`` in /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return ~0 if os.geteuid() == 0 else 0


def has_cap(cap: int) -> bool:
    return bool(effective_caps() >> cap & 1)


def mount() -> None:
    """mount(2) tracefs on /sys/kernel/tracing the way systemd's sys-kernel-tracing.mount does.
    Raises OSError (EPERM without CAP_SYS_ADMIN, ENOENT without the mount point, ...)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), TRACEFS)


def ensure() -> str | None:
    """Make tracefs available to BCC when it is not, if this process may mount (CAP_SYS_ADMIN).

    Returns a line for the operator when something was done, else None. Without CAP_SYS_ADMIN
    nothing is tried: the attach then says what to mount (``MISSING``) if it needs tracefs. A
    failed mount with CAP_SYS_ADMIN is not an error: the perf uprobe PMU works without tracefs for
    a process that has CAP_SYS_ADMIN, and the detach does not need it.
    """
    if tracing_dir() is not None or not has_cap(CAP_SYS_ADMIN):
        return None
    try:
        mount()
    except OSError as exc:
        return (f"tracefs is not mounted on {TRACEFS} and mounting it failed "
                f"({exc.strerror}); attaching through the perf uprobe PMU")
    if tracing_dir() is None:
        return None
    return (f"mounted tracefs on {TRACEFS} (as systemd's sys-kernel-tracing.mount does at boot; "
            "BCC's uprobe_events fallback needs it)")
