"""probes/bpf/uprobes.py on real uprobes (root): names, errors, and what is left behind.

The other tool here is bcc's own ``BPF.attach_uprobe``, whose Python binding hands the kernel an
arbitrary ref_ctr_offset: the kernel refuses a second uprobe on the same instruction with another
one. iotrace must say so in one line and leave nothing behind in tracefs's uprobe_events.
"""
from __future__ import annotations

import os
import shutil
import subprocess

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


def test_event_names_stay_short_for_long_paths(tmp_path, exe):
    long = tmp_path / ("x" * 150) / "qemu-system-i386"
    long.parent.mkdir()
    shutil.copy2(exe, long)
    name = uprobes.event_name(True, str(long), 0x520fe0)
    # bcc appends "_bcc_<pid>" (pid_max 4194304: 7 digits); the kernel wants fewer than 64
    assert name.startswith(b"r_iotrace_") and len(name) + len("_bcc_4194304") < 64
    st = os.stat(long)
    assert name == b"r_iotrace_%x_%x_520fe0" % (st.st_dev, st.st_ino)


def test_a_uprobe_the_kernel_refuses_is_one_line_and_leaves_nothing(exe):
    assert tracefs.tracing_dir() is not None          # make install mounts it
    res = resolve(exe)
    other, ours = _empty(), _empty()
    try:
        other.attach_uprobe(name=exe.encode(), addr=res.func_vaddr, fn_name=b"empty_entry",
                            pid=-1)
        with pytest.raises(uprobes.AttachError) as exc:
            uprobes.attach(ours, exe, res.func_vaddr, "empty_entry")
        msg = str(exc.value)
        assert "\n" not in msg and "Invalid argument" in msg
        assert "ref_ctr_offset mismatch" in msg                 # the hint
        assert uprobe_lines(exe) == []       # bcc's fallback made a tracefs event: removed
        assert ours.uprobe_fds == {}
    finally:
        uprobes.detach_all(ours)
        other.cleanup()
    # once the other tool is gone, the same instruction takes iotrace's uprobe
    again = _empty()
    try:
        uprobes.attach(again, exe, res.func_vaddr, "empty_entry")
        assert len(again.uprobe_fds) == 1
    finally:
        assert uprobes.detach_all(again) == []
        again.cleanup()
    assert uprobe_lines(exe) == []
