"""The stand-in binary: it builds with gcc -O2 against <xen/hvm/ioreq.h>, and a uprobe sees what it
would see in qemu-dm: a local function symbol handle_ioreq, two real call sites, send_vcpu at 0x50
(QEMU 7.2 layout) or 0x48 (8.1)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from iotrace.probes.standin import runner as sr
from support import REPO, require_tool

SRC = REPO / "probes" / "standin"


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """Both binaries built from scratch into a private folder, exactly as `make install` does."""
    require_tool("gcc")
    out = tmp_path_factory.mktemp("standin-build")
    res = subprocess.run(["make", "-s", "-C", str(SRC), f"OUT={out}"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    return out


def test_make_builds_both_layouts_without_warnings(fresh_build):
    for name in ("iotrace-standin", "iotrace-standin-81"):
        assert (fresh_build / name).is_file()
    # -Wall -Wextra clean: a rebuild prints nothing on stderr
    res = subprocess.run(["make", "-B", "-s", "-C", str(SRC), f"OUT={fresh_build}"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_makefile_uses_gcc_O2_and_the_xen_header():
    text = (SRC / "Makefile").read_text()
    assert re.search(r"^STANDIN_CFLAGS\s*:?=\s*-O2", text, re.M)
    c = (SRC / "standin.c").read_text()
    assert "#include <xen/hvm/ioreq.h>" in c
    assert "offsetof(XenIOState, send_vcpu) == 0x50" in c


def _symbols(exe):
    require_tool("readelf")
    out = subprocess.run(["readelf", "-sW", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[3] in ("FUNC", "OBJECT"):
            syms.setdefault(parts[7], []).append((int(parts[1], 16), parts[3], parts[4]))
    return syms


@pytest.mark.parametrize("name", ["iotrace-standin", "iotrace-standin-81"])
def test_handle_ioreq_is_a_local_function_symbol(fresh_build, name):
    exe = fresh_build / name
    syms = _symbols(exe)
    assert [s[1:] for s in syms["handle_ioreq"]] == [("FUNC", "LOCAL")]
    for fn in ("cpu_handle_ioreq", "handle_buffered_iopage", "cpu_get_ioreq"):
        assert syms[fn][0][1:] == ("FUNC", "LOCAL"), fn
    # no clone (handle_ioreq.isra.0 / .constprop.0) that a probe on handle_ioreq would miss
    assert not [s for s in syms if s.startswith("handle_ioreq.")]
    nm = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^[0-9a-f]+ t handle_ioreq$", nm, re.M)


@pytest.mark.parametrize("name,layout,offset", [("iotrace-standin", "7.2", 0x50),
                                                ("iotrace-standin-81", "8.1", 0x48)])
def test_print_layout_matches_the_disassembly(fresh_build, name, layout, offset):
    require_tool("objdump")
    exe = fresh_build / name
    info = json.loads(subprocess.run([str(exe), "-print-layout"], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["layout"] == layout and info["send_vcpu_offset"] == offset
    sym_addr = _symbols(exe)["handle_ioreq"][0][0]
    assert info["handle_ioreq"]["vaddr"] == sym_addr
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(exe)], capture_output=True,
                         text=True, check=True).stdout
    lines = dis.splitlines()
    # Every call of handle_ioreq, with the function it sits in and the next instruction's address.
    calls = []
    func = None
    for i, line in enumerate(lines):
        m = re.match(r"^[0-9a-f]+ <([^>]+)>:", line)
        if m:
            func = m.group(1)
        if re.search(r"\bcall\s+[0-9a-f]+ <handle_ioreq>", line):
            nxt = next(ln for ln in lines[i + 1:] if re.match(r"^\s+[0-9a-f]+:", ln))
            calls.append((func, int(nxt.split(":")[0], 16)))
    # also no tail call (jmp) into it: return addresses must identify the caller
    assert not re.search(r"\bjmp\s+[0-9a-f]+ <handle_ioreq>", dis)
    assert sorted(calls) == sorted([("handle_buffered_iopage", info["ret_buffered"]["vaddr"]),
                                    ("cpu_handle_ioreq", info["ret_sync"]["vaddr"])])
    for k in ("handle_ioreq", "ret_buffered", "ret_sync"):
        assert info[k]["file_offset"] >= 0


def test_runner_build_and_layout_info():
    exe = sr.build()
    assert exe.name == "iotrace-standin" and exe.is_file()
    info = sr.layout_info("8.1")
    assert info["send_vcpu_offset"] == sr.SEND_VCPU_OFFSET["8.1"] == 0x48
    assert info["exe"].endswith("iotrace-standin-81")


def test_top_level_make_standin_target_builds_it():
    require_tool("make")
    # `make install` runs `$(MAKE) -s -C probes/standin`: that exact command must succeed.
    res = subprocess.run(["make", "-s", "-C", str(SRC)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (SRC / "iotrace-standin").is_file() and shutil.which("gcc")


@pytest.mark.parametrize("args,offset", [([], 0x50), (["--layout", "8.1"], 0x48)])
def test_cli_print_layout(iotrace_exe, args, offset):
    res = subprocess.run([iotrace_exe, "standin", "--print-layout", *args], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["send_vcpu_offset"] == offset
    assert info["ret_buffered"]["vaddr"] != info["ret_sync"]["vaddr"]


@pytest.mark.parametrize("name,offset", [("iotrace-standin", 0x50), ("iotrace-standin-81", 0x48)])
def test_send_vcpu_offset_is_readable_from_the_file(fresh_build, name, offset):
    """The stand-in has no QEMU banner: it exports its layout as iotrace_send_vcpu_offset (u32)."""
    exe = fresh_build / name
    vaddr, kind, _bind = _symbols(exe)["iotrace_send_vcpu_offset"][0]
    assert kind == "OBJECT"
    phdrs = subprocess.run(["readelf", "-lW", str(exe)], capture_output=True, text=True,
                           check=True).stdout
    for line in phdrs.splitlines():
        parts = line.split()
        if parts[:1] == ["LOAD"]:
            off, va, filesz = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            if va <= vaddr < va + filesz:
                data = exe.read_bytes()[vaddr - va + off:vaddr - va + off + 4]
                assert int.from_bytes(data, "little") == offset
                return
    raise AssertionError("iotrace_send_vcpu_offset is not in a loaded segment")


def test_stream_format_header_matches_the_python_mirror(tmp_path):
    """stream_format.h is the one declaration of the stream file: standin.c includes it, stream.py
    reads its constants; its structs (compiled here) have the sizes and offsets of the dtypes."""
    from iotrace.probes.standin import stream
    gcc = require_tool("gcc")
    fields = {"stream_key": stream.KEY_DTYPE, "stream_rec": stream.REC_DTYPE}
    lines = ['#include <stddef.h>', '#include <stdio.h>', f'#include "{SRC / "stream_format.h"}"',
             "int main(void) {", '  printf("stream_header %zu\\n", sizeof(struct stream_header));']
    for struct_name, dt in fields.items():
        lines.append(f'  printf("{struct_name} %zu\\n", sizeof(struct {struct_name}));')
        for f in dt.names:
            lines.append(f'  printf("{struct_name}.{f} %zu\\n", offsetof(struct {struct_name}, {f}));')
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
    got = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                        check=True).stdout.splitlines())
    assert int(got["stream_header"]) == stream.HEADER.size
    for struct_name, dt in fields.items():
        assert int(got[struct_name]) == dt.itemsize
        for f in dt.names:
            assert int(got[f"{struct_name}.{f}"]) == dt.fields[f][1], (struct_name, f)
    assert "#include \"stream_format.h\"" in (SRC / "standin.c").read_text()
    assert stream.MAGIC == b"IOTSTRM\0" and stream.VERSION == 1 and stream.FLAG_BUFFERED == 1
