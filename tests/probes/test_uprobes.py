"""probes/bpf/uprobes.py on real uprobes (root): names, errors, and what is left behind.

The other tool here is bcc's own ``BPF.attach_uprobe``, whose Python binding hands the kernel an
arbitrary ref_ctr_offset: the kernel refuses a second uprobe on the same instruction with another
one. iotrace must say so in one line and leave nothing behind in tracefs's uprobe_events.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from iotrace.probes.bpf import tracefs, uprobes
from iotrace.probes.bpf.loader import EMPTY_PROGRAM, import_bcc
from iotrace.probes.hook.resolve import resolve
from iotrace.probes.standin import runner as sr
from support.uprobe import uprobe_lines

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={out}"], check=True)
    return str(out / "iotrace-standin")


def _empty():
    return import_bcc().BPF(src_file=EMPTY_PROGRAM.encode(),
                            cflags=[f"-I{os.path.dirname(EMPTY_PROGRAM)}"])


def _write_events(path: str, line: str) -> None:
    """One command to uprobe_events (O_APPEND, without the seek to the end of Python's "a")."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def test_event_names_stay_short_for_long_paths(tmp_path, exe):
    long = tmp_path / ("x" * 150) / "qemu-system-i386"
    long.parent.mkdir()
    shutil.copy2(exe, long)
    name = uprobes.event_name(True, str(long), 0x520fe0)
    # bcc appends "_bcc_<pid>" (pid_max 4194304: 7 digits); the kernel wants fewer than 64
    assert name.startswith(b"r_iotrace_") and len(name) + len("_bcc_4194304") < 64
    st = os.stat(long)
    assert name == b"r_iotrace_%x_%x_520fe0" % (st.st_dev, st.st_ino)


def test_sharing_an_instruction_with_a_bcc_tool(exe):
    """A tool on bcc's Python binding probes handle_ioreq already (arbitrary ref_ctr_offset):
    iotrace's 0 is refused, the retry the binding's way shares the instruction; both detach."""
    res = resolve(exe)
    other, ours = _empty(), _empty()
    try:
        other.attach_uprobe(name=exe.encode(), addr=res.func_vaddr, fn_name=b"empty_entry",
                            pid=-1)
        uprobes.attach(ours, exe, res.func_vaddr, "empty_entry")
        uprobes.attach(ours, exe, res.func_vaddr, "empty_return", retprobe=True)
        assert len(ours.uprobe_fds) == 2
    finally:
        assert uprobes.detach_all(ours) == []
        other.cleanup()
    assert uprobe_lines(exe, os.getpid()) == []


def test_a_uprobe_the_kernel_refuses_is_one_line_and_leaves_nothing(exe):
    """A third tool holds handle_ioreq with yet another ref_ctr_offset (an ftrace uprobe event
    with a semaphore, enabled): both of iotrace's tries are refused (EINVAL): one line with the
    hint, no tracefs event of iotrace's left, nothing attached; once it is gone, iotrace
    attaches."""
    tdir = tracefs.tracing_dir()
    assert tdir is not None                           # make install mounts it
    res = resolve(exe)
    name = f"iotrace_test_refctr_{os.getpid()}"
    events = os.path.join(tdir, "uprobe_events")
    enable = os.path.join(tdir, "events", "uprobes", name, "enable")
    _write_events(events, f"p:uprobes/{name} {exe}:{res.func_offset:#x}(0x10)")
    ours = _empty()
    try:
        with open(enable, "w") as f:
            f.write("1")
        with pytest.raises(uprobes.AttachError) as exc:
            uprobes.attach(ours, exe, res.func_vaddr, "empty_entry")
        msg = str(exc.value)
        assert "\n" not in msg and "Invalid argument" in msg, msg
        assert "ref_ctr_offset mismatch" in msg                 # the hint
        assert ours.uprobe_fds == {}
        assert uprobe_lines(exe, os.getpid()) == []
    finally:
        with open(enable, "w") as f:
            f.write("0")
        _write_events(events, f"-:uprobes/{name}")
    try:
        uprobes.attach(ours, exe, res.func_vaddr, "empty_entry")
        assert len(ours.uprobe_fds) == 1
    finally:
        assert uprobes.detach_all(ours) == []
        ours.cleanup()
    assert uprobe_lines(exe, os.getpid()) == []


CAPPED_ATTACH = """
import sys
from iotrace.probes.bpf import uprobes
from iotrace.probes.bpf.loader import EMPTY_PROGRAM, import_bcc
import os
bpf = import_bcc().BPF(src_file=EMPTY_PROGRAM.encode(),
                       cflags=["-I" + os.path.dirname(EMPTY_PROGRAM)])
try:
    uprobes.attach(bpf, sys.argv[1], int(sys.argv[2]), "empty_entry")
    print("attached")
except uprobes.AttachError as exc:
    print("refused:", exc)
"""


def test_refused_with_the_units_capabilities_leaves_no_tracefs_event(exe):
    """CAP_BPF + CAP_PERFMON go through tracefs: bcc makes the event, then the kernel refuses to
    register it (a root bcc tool holds the instruction with another ref_ctr_offset). bcc leaves
    such events behind; iotrace removes them, on each of its two tries."""
    res = resolve(exe)
    other = _empty()
    try:
        other.attach_uprobe(name=exe.encode(), addr=res.func_vaddr, fn_name=b"empty_entry",
                            pid=-1)
        r = subprocess.run([shutil.which("setpriv"), "--inh-caps=-all",
                            "--bounding-set=-all,+bpf,+perfmon", sys.executable, "-c",
                            CAPPED_ATTACH, exe, str(res.func_vaddr)],
                           capture_output=True, text=True, timeout=120)
        assert r.stdout.startswith("refused: ") and "Invalid argument" in r.stdout, r
        assert r.stderr == ""
        assert uprobe_lines(exe) == []
    finally:
        other.cleanup()


def test_a_bad_address_is_an_attach_error(exe):
    with pytest.raises(uprobes.AttachError):
        uprobes.attach(_empty(), exe, os.path.getsize(exe) + 0x10000, "empty_entry")
