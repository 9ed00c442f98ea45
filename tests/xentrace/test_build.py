"""The compiled core builds warning-free from its sources alone (what `make xtcore` and a
package build do), and the library the package loads is the one its sources make."""
from __future__ import annotations

import ctypes
import subprocess

import pytest

from iotrace.xentrace import native
from support import REPO, require_tool


@pytest.mark.integration
def test_core_builds_with_every_warning_as_an_error(tmp_path):
    cc = require_tool("cc")
    src = sorted((REPO / "xen-tracepoints").glob("xt*.c"))
    assert {p.name for p in src} == {"xtcore.c", "xtwalk.c", "xtorder.c", "xtdecode.c",
                                     "xtcompat.c", "xtout.c"}
    out = tmp_path / "_xtcore.so"
    r = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wconversion",
                        "-Wno-sign-conversion", "-ffp-contract=off", "-fvisibility=hidden",
                        "-shared", "-fPIC",
                        "-o", str(out), *map(str, src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(out))
    lib.xt_sizeof.restype = ctypes.c_int64
    assert [lib.xt_sizeof(i) for i in range(6)] == [lib.xt_sizeof(i) for i in range(6)]
    installed = ctypes.CDLL(str(native.LIBRARY))
    installed.xt_sizeof.restype = ctypes.c_int64
    assert [lib.xt_sizeof(i) for i in range(6)] == [installed.xt_sizeof(i) for i in range(6)]


def test_a_missing_core_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "_xtcore.so")
    monkeypatch.setattr(native, "_lib", None)
    from iotrace.core.errors import UserError
    with pytest.raises(UserError, match=r"missing or cannot be loaded: run `make install`") as e:
        native.Core(2.4e9)
    assert "\n" not in str(e.value)
