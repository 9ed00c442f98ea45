"""Attach and detach BCC uprobes so that neither step depends on tracefs more than the kernel does.

``attach`` does what bcc's ``BPF.attach_uprobe`` / ``attach_uretprobe`` do (python/bcc/__init__.py:
``_check_path_symbol``, ``load_func``, ``lib.bpf_attach_uprobe``, ``_add_uprobe_fd``) with three
differences:

* a short event name. bcc names a uprobe ``p_<path with every non-alphanumeric replaced>_0x<addr>``
  and, when it has to go through tracefs's ``uprobe_events`` (no CAP_SYS_ADMIN: see
  ``iotrace.probes.bpf.tracefs``), appends ``_bcc_<pid>`` (libbpf.c ``create_probe_event``). The
  kernel refuses event names of 64 characters or more (kernel/trace/trace_probe.h
  MAX_EVENT_NAME_LEN), so with CAP_BPF + CAP_PERFMON only, any binary whose path has 48 characters
  or more could not be probed. Ours is ``<p|r>_iotrace_<dev>_<inode>_<addr>`` (hex: at most 48
  characters, 60 with bcc's suffix; about 40 in practice) and names the file the way the kernel's
  uprobe does (by device and inode).
* ``ref_ctr_offset`` 0. The C function has a 7th parameter (``uint32_t ref_ctr_offset``, the USDT
  semaphore: libbpf.h, since bcc commit 50f2009c, 2020) that bcc's Python binding leaves out of
  its argtypes and its call (python/bcc/libbcc.py, up to today's bcc), so the C side reads whatever
  is on the stack (0x6 seen here). The kernel refuses a uprobe on an instruction where another one
  is registered with a different ref_ctr_offset (kernel/events/uprobes.c: "ref_ctr_offset
  mismatch", EINVAL, logged in dmesg): iotrace passes 0, the value for "no semaphore", so all its
  uprobes agree with one another, with tracefs-made ones (bcc's own fallback included) and with
  other libbpf tools. When the kernel refuses it (EINVAL) because a tool on bcc's binding already
  probes the instruction, iotrace tries once more the way that binding calls (the same stack, so
  far the same value), and shares the instruction; a bcc-based tool started after iotrace is
  refused in turn, and says EINVAL (``EINVAL_HINT``).
* what libbcc prints on stderr while attaching (``create_probe_event: open(...)``, ``cannot attach
  uprobe, ...``) becomes the detail of one error line instead of loose lines around it. (Output of
  other threads during those few milliseconds is kept when the attach works, and folded in with
  bcc's when it fails.)

``detach_all`` replaces the uprobe part of bcc's ``BPF.cleanup``: it closes each uprobe's perf event
(``bpf_close_perf_event_fd``: the kernel then unregisters the uprobe and restores the original
instruction in every process) and only when tracefs is there asks libbcc to remove the tracefs event
(``bpf_detach_uprobe``, a no-op for a PMU-made uprobe, which is not listed in ``uprobe_events``).
bcc's own cleanup opens ``uprobe_events`` unconditionally and raises half-way when tracefs is not
mounted, leaving the remaining uprobes set until the process exits.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
import sys
import tempfile
from contextlib import contextmanager

from iotrace.core.errors import ProbeError
from iotrace.probes.bpf import tracefs

BPF_PROBE_ENTRY, BPF_PROBE_RETURN = 0, 1      # enum bpf_probe_attach_type, bcc src/cc/libbpf.h


EINVAL_HINT = ("if another tool has a uprobe on this instruction, the kernel refuses a second one "
               "with a different ref_ctr_offset (dmesg: \"ref_ctr_offset mismatch\"): tools on "
               "bcc's Python binding set an arbitrary one")


class AttachError(Exception):
    """One uprobe could not be attached; str() is the reason (one line)."""


class TracefsMissing(ProbeError):
    """No uprobe can be made on this host as things stand: the operator must mount tracefs."""


def event_name(retprobe: bool, path: str, addr: int) -> bytes:
    st = os.stat(path)
    return b"%s_iotrace_%x_%x_%x" % (b"r" if retprobe else b"p", st.st_dev, st.st_ino, addr)


@contextmanager
def c_stderr():
    """Collect what is written to file descriptor 2 (libbcc's fprintf/perror) inside the block.
    Yields a list that holds the text once the block is over."""
    sys.stderr.flush()
    out: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    s = "; ".join(dict.fromkeys(lines))             # bcc repeats itself (entry, then fallback)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _attach_once(lib, fn_fd, kind, ev, bpath, addr, bcc_ref_ctr: bool):
    """One bpf_attach_uprobe; returns (fd, what libbcc printed, errno). Any tracefs event bcc made
    but could not open is removed again (libbpf.c bpf_attach_probe: its error path only closes the
    perf event, the event stays in uprobe_events)."""
    with c_stderr() as said:
        if bcc_ref_ctr:         # as bcc's binding calls it: the 7th argument left to the stack
            fd = lib.bpf_attach_uprobe(fn_fd, kind, ev, bpath, addr, -1)
        else:
            fd = lib.bpf_attach_uprobe(fn_fd, kind, ev, bpath, addr, -1, ct.c_uint32(0))
        err = ct.get_errno()
    if fd < 0 and tracefs.tracing_dir() is not None:
        with c_stderr():
            lib.bpf_detach_uprobe(ev)
    return fd, said[0], err


def _einval(text: str, err: int) -> bool:
    return "Invalid argument" in text or err == errno.EINVAL


def attach(bpf, path: str, vaddr: int, fn_name: str, retprobe: bool = False) -> None:
    """Attach ``fn_name`` of ``bpf`` at ``vaddr`` of ``path`` for every process (pid -1).

    ref_ctr_offset 0 first; on EINVAL once more the way bcc's binding calls it, which is what a
    bcc-based tool already probing the instruction has (see the module doc), so that iotrace can
    share it. Raises ``TracefsMissing`` when the failure is the host's (no tracefs, no
    CAP_SYS_ADMIN), ``AttachError`` otherwise."""
    import bcc
    from bcc.libbcc import lib

    try:
        bpath, addr = bcc.BPF._check_path_symbol(path.encode(), b"", vaddr, -1)
        bpf._check_probe_quota(1)
    except Exception as exc:            # bcc raises bare Exception
        raise AttachError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    fn = bpf.load_func(fn_name.encode(), bcc.BPF.KPROBE)
    ev = event_name(retprobe, bpath.decode(), addr)
    kind = BPF_PROBE_RETURN if retprobe else BPF_PROBE_ENTRY
    fd, said, err = _attach_once(lib, fn.fd, kind, ev, bpath, addr, bcc_ref_ctr=False)
    if fd < 0 and _einval(said, err):
        fd2, said2, err2 = _attach_once(lib, fn.fd, kind, ev, bpath, addr, bcc_ref_ctr=True)
        if fd2 >= 0:
            fd, said = fd2, said2
    if fd >= 0:
        if said:
            os.write(2, said.encode())
        bpf._add_uprobe_fd(ev, fd)
        return
    if tracefs.tracing_dir() is None and not tracefs.has_cap(tracefs.CAP_SYS_ADMIN):
        raise TracefsMissing(tracefs.MISSING)
    detail = _one_line(said) or (os.strerror(err) if err else "")
    if _einval(said, err):
        detail += f"; {EINVAL_HINT}"
    raise AttachError(f"Failed to attach BPF to {'uretprobe' if retprobe else 'uprobe'}"
                      + (f" ({detail})" if detail else ""))


def detach_all(bpf) -> list[str]:
    """Detach every uprobe of ``bpf``; returns what went wrong (nothing, normally)."""
    from bcc.libbcc import lib

    problems = []
    have_tracefs = tracefs.tracing_dir() is not None
    for ev, fd in list(bpf.uprobe_fds.items()):
        failed = []
        with c_stderr() as said:
            if lib.bpf_close_perf_event_fd(fd) < 0:
                failed.append("closing its perf event failed")
            if have_tracefs and lib.bpf_detach_uprobe(ev) < 0:
                failed.append("removing it from uprobe_events failed")
        if failed:
            detail = _one_line(said[0])
            problems.append(f"{ev.decode()}: {', '.join(failed)}"
                            + (f" ({detail})" if detail else ""))
        bpf._del_uprobe_fd(ev)
    return problems
