"""Real uprobes on Debian's real device models, at the offsets the automatic resolver found (root).

The device models cannot run without Xen, so attaching is the test: BCC attaches the entry and
return probes at the resolved offset, the attachment is seen live (the kernel has put its int3 at
that offset in an executable mapping of the binary), and detaching restores the original byte.
The live check runs on a private copy of each binary (same bytes, its own inode), so probes other
test runs attach to the shared file cannot disturb it.
"""
from __future__ import annotations

import mmap
import os
import shutil
import subprocess

import pytest

from iotrace.probes.bpf.loader import ProbeSet
from iotrace.probes.hook.resolve import resolve
from support.device_models import DEBIAN12, DEBIAN13, path_of

pytestmark = [pytest.mark.root, pytest.mark.integration]

INT3 = 0xCC


def _exec_mapping(path):
    """The binary mapped private and executable, as a process running it would have it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    finally:
        os.close(fd)


@pytest.mark.parametrize("build", [DEBIAN12, DEBIAN13], ids=lambda b: b.name)
def test_uprobe_attaches_at_the_resolved_offset(build, tmp_path):
    src = path_of(build)
    exe = tmp_path / "xen-qemu-system-i386"
    shutil.copy2(src, exe)
    res = resolve(str(exe), table={})            # no table: the automatic resolver's numbers
    assert res.ok and res.method == "automatic" and res.doubts() == []
    off = res.func_offset
    m = _exec_mapping(exe)
    try:
        original = m[off]
        assert original != INT3
        ps = ProbeSet(res, "metrics", timing=True)
        try:
            atts = ps.attach()
            assert [(a.point, a.ok) for a in atts] == [("entry", True), ("return", True)], \
                [a.error for a in atts]
            assert m[off] == INT3, "no breakpoint at the resolved offset: the uprobe is not live"
        finally:
            ps.close()
        assert m[off] == original, "detaching left the breakpoint in place"
    finally:
        m.close()


def test_probe_info_attaches_to_debian13(iotrace_exe):
    path = path_of(DEBIAN13)
    r = subprocess.run([iotrace_exe, "probe-info", "--attach", "--strict", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resolved from:    the automatic resolver" in r.stdout
    assert "attach:           entry ok, return ok" in r.stdout
