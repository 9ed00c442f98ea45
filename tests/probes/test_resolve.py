"""Symbol resolution, the per-build table, process discovery and the BPF struct mirrors (no root)."""
from __future__ import annotations

import ctypes as ct
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iotrace.cli.main import main
from iotrace.probes import discovery
from iotrace.probes.bpf import types as T
from iotrace.probes.hook import resolve as symbols
from iotrace.probes.standin import runner as sr

DEBIAN_DM = Path("/usr/libexec/xen-qemu-system-i386")
DEBIAN_BUILD_ID = "c1a56521a4a247be10c1564f57d5f7598eb5500b"
HEADER = Path(T.__file__).with_name("iotrace_bpf.h")


def debian_dm() -> Path:
    if not DEBIAN_DM.exists():
        pytest.skip("qemu-system-xen is not installed")
    return DEBIAN_DM


@pytest.fixture(scope="module")
def standin_layout():
    return sr.layout_info("7.2")


def test_debian_binary_resolves_through_the_table():
    res = symbols.resolve(str(debian_dm()))
    assert res.ok, res.error
    assert res.build_id == DEBIAN_BUILD_ID
    assert res.method == "table"                      # stripped: no .symtab
    assert res.func_offset == 0x520FE0
    # Deltas from handle_ioreq to the return addresses after its two calls (QEMU's cpu_handle_ioreq
    # and handle_buffered_iopage).
    assert res.buffered == (0x521DFB - 0x520FE0, 0x521DFB - 0x520FE0 + 1)
    assert res.sync == (0x523039 - 0x520FE0, 0x523039 - 0x520FE0 + 1)
    assert res.send_vcpu_offset == 0x50
    assert res.usdt == []                             # Debian uses the log trace backend


def test_table_matches_the_code_of_the_build():
    """The table agrees with the code of that build: both return addresses follow a call rel32
    whose target is the table's handle_ioreq, which starts with push %r15; push %r14."""
    data = debian_dm().read_bytes()
    assert data[0x520FE0:0x520FE4] == b"\x41\x57\x41\x56"
    # the byte before each return address ends a 5-byte call rel32 (e8 xx xx xx xx)
    for ret in (0x521DFB, 0x523039):
        assert data[ret - 5] == 0xE8
        target = ret + int.from_bytes(data[ret - 4:ret], "little", signed=True)
        assert target == 0x520FE0


def test_standin_resolves_from_symtab(standin_layout):
    res = symbols.resolve(standin_layout["exe"])
    assert res.ok and res.method == "symtab"
    assert res.func_vaddr == standin_layout["handle_ioreq"]["vaddr"]
    assert res.func_offset == standin_layout["handle_ioreq"]["file_offset"]
    for key, rng in (("ret_buffered", res.buffered), ("ret_sync", res.sync)):
        delta = standin_layout[key]["vaddr"] - res.func_vaddr
        assert rng[0] <= delta < rng[1], key
    # the two caller ranges do not overlap: a return address is one or the other
    assert res.buffered[1] <= res.sync[0] or res.sync[1] <= res.buffered[0]


def test_missing_symbol_is_one_line_with_the_fix(tmp_path):
    res = symbols.resolve("/bin/true")
    assert not res.ok
    assert "cannot find handle_ioreq" in res.error and "offsets.yaml" in res.error
    assert res.build_id and res.build_id in res.error
    assert "\n" not in res.error


def test_not_an_elf_file(tmp_path):
    f = tmp_path / "x"
    f.write_text("hello")
    with pytest.raises(symbols.ElfError, match="not an ELF file"):
        symbols.resolve(str(f))


def test_debug_file_by_build_id_is_used(tmp_path, standin_layout):
    """A stripped binary whose debug file sits under <root>/.build-id/xx/yyyy.debug."""
    exe = tmp_path / "dm"
    subprocess.run(["objcopy", "--only-keep-debug", standin_layout["exe"], str(tmp_path / "d")],
                   check=True)
    subprocess.run(["objcopy", "--strip-all", standin_layout["exe"], str(exe)], check=True)
    bid = symbols.ElfFile(str(exe)).build_id()
    dbg = tmp_path / "root" / ".build-id" / bid[:2] / (bid[2:] + ".debug")
    dbg.parent.mkdir(parents=True)
    (tmp_path / "d").rename(dbg)
    res = symbols.resolve(str(exe), table={}, debug_root=str(tmp_path / "root"))
    assert res.ok and res.method == "debuginfo"
    assert res.func_vaddr == standin_layout["handle_ioreq"]["vaddr"]
    # without the debug file, the automatic resolver finds the same function (stripped builds)
    res2 = symbols.resolve(str(exe), table={}, debug_root=str(tmp_path / "none"))
    assert res2.ok and res2.method == "automatic"
    assert res2.func_vaddr == standin_layout["handle_ioreq"]["vaddr"]


def test_table_entry_for_an_unknown_build(tmp_path, standin_layout):
    exe = tmp_path / "dm"
    subprocess.run(["objcopy", "--strip-all", standin_layout["exe"], str(exe)], check=True)
    bid = symbols.ElfFile(str(exe)).build_id()
    entry = {"handle_ioreq": standin_layout["handle_ioreq"]["file_offset"],
             "buffered_ret": standin_layout["ret_buffered"]["file_offset"],
             "sync_ret": standin_layout["ret_sync"]["file_offset"], "send_vcpu": 0x48}
    res = symbols.resolve(str(exe), table={bid: entry}, debug_root=str(tmp_path))
    assert res.ok and res.method == "table" and res.send_vcpu_offset == 0x48
    d = standin_layout["ret_buffered"]["vaddr"] - standin_layout["handle_ioreq"]["vaddr"]
    assert res.buffered == (d, d + 1)


def test_probe_info_cli_debian(capsys):
    debian_dm()
    assert main(["probe-info", str(DEBIAN_DM)]) == 0
    out = capsys.readouterr().out
    assert DEBIAN_BUILD_ID in out
    assert "file offset 0x520fe0" in out and "resolved from:    the table" in out
    assert "offset 0x50" in out and "[exact]" in out
    assert "the automatic resolver agrees with the table (the table wins)" in out


def test_probe_info_cli_standin_json(capsys, standin_layout):
    assert main(["probe-info", "--json", standin_layout["exe"]]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "symtab"
    assert d["handle_ioreq"]["file_offset"] == standin_layout["handle_ioreq"]["file_offset"]


def test_probe_info_cli_errors(capsys, tmp_path):
    assert main(["probe-info", "/bin/true"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "offsets.yaml" in err
    assert main(["probe-info", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["qemu", "-xen-domid", "3", "-no-shutdown", "-machine", "xenfv"], (3, None)),
    (["qemu", "-xen-domid", "12", "-name", "guest=web,debug-threads=on"], (12, "web")),
    (["qemu", "--xen-domid=4", "-name", "db"], (4, "db")),
    (["qemu", "-xen-domid", "3", "-xen-attach", "-M", "xenpv"], None),     # PV backend
    (["qemu", "-name", "x"], None),
    (["qemu", "-xen-domid", "abc"], None),
    (["qemu", "-xen-domid", "32752"], None),                               # DOMID_FIRST_RESERVED
])
def test_dm_cmdline(argv, expected):
    assert discovery.parse_dm_cmdline(argv) == expected


def test_domain_name_fallbacks():
    # no xenstore daemon here: -name, else domN
    assert discovery.domain_name(5, "web") == (discovery.xenstore_name(5) or "web")
    assert discovery.domain_name(5, None) == (discovery.xenstore_name(5) or "dom5")


def test_ctypes_mirrors_match_the_header():
    """Every size the header documents equals the ctypes mirror (and the C compiler agrees)."""
    text = HEADER.read_text()
    documented = {m.group(1): int(m.group(2)) for m in
                  re.finditer(r"struct (\w+) \{.*?\n\};\s*/\* (\d+) \*/", text, re.S)}
    mirrors = {"xen_ioreq": T.XenIoreq, "ioreq_key": T.IoreqKey, "ioreq_stats": T.IoreqStats,
               "ioreq_event": T.IoreqEvent, "inflight": T.Inflight}
    assert set(documented) == set(mirrors)
    for name, cls in mirrors.items():
        assert ct.sizeof(cls) == documented[name], name
    assert T.EVENT_RECORD_DTYPE.itemsize == ct.sizeof(T.IoreqEvent)


def test_header_sizes_compiled_by_gcc(tmp_path):
    """The header compiles outside BCC too, with the offsets of Xen's ioreq_t."""
    src = tmp_path / "t.c"
    src.write_text(
        "#include <stdint.h>\n#include <stddef.h>\ntypedef uint8_t u8; typedef uint16_t u16;"
        "typedef uint32_t u32; typedef int32_t s32; typedef uint64_t u64; typedef int64_t s64;\n"
        f'#include "{HEADER}"\n'
        "_Static_assert(sizeof(struct xen_ioreq) == 32, \"\");"
        "_Static_assert(offsetof(struct xen_ioreq, flags) == 30, \"\");"
        "_Static_assert(offsetof(struct xen_ioreq, type) == 31, \"\");"
        "_Static_assert(sizeof(struct ioreq_key) == 24, \"\");"
        "_Static_assert(sizeof(struct ioreq_stats) == 2080, \"\");"
        "_Static_assert(sizeof(struct ioreq_event) == 56, \"\");"
        "_Static_assert(sizeof(struct inflight) == 56, \"\");\nint main(void){return 0;}\n")
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "t.o"), str(src)], check=True)


def test_process_map_follows_real_device_models(tmp_path):
    """Real stand-in processes (no root needed): seen with their domid and -name, the PV backend
    (-xen-attach) skipped, and dropped once gone (after the grace period)."""
    exe = sr.build("7.2")
    stream = sr.BUNDLED_STREAM
    dm = subprocess.Popen([str(exe), "-xen-domid", "77", "-name", "guest=alpha,debug-threads=on",
                           "-replay", str(stream), "-hold"], stdout=subprocess.DEVNULL)
    # a process whose argv looks like the per-domain PV backend (handles no ioreqs)
    pv = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-xen-domid", "78",
                           "-xen-attach", "-M", "xenpv"])
    pm = discovery.ProcessMap(grace_s=0.2)
    try:
        assert sr.wait_for(lambda: dm.pid in pm.refresh()[0], 10)
        alive, gone = pm.refresh()
        info = alive[dm.pid]
        assert (info.domid, info.name, info.exe) == (77, "alpha", str(exe))
        assert pv.poll() is None and "-xen-attach" in discovery.read_cmdline(pv.pid)
        assert pv.pid not in alive and pm.lookup(pv.pid) is None
        assert pm.lookup(dm.pid) is info                 # captured once
        dm.terminate()
        dm.wait(10)
        alive, _ = pm.refresh()
        assert dm.pid not in alive                       # dead: no longer listed
        assert sr.wait_for(lambda: dm.pid in pm.refresh()[1], 5)
        assert dm.pid not in pm.known()
    finally:
        for p in (dm, pv):
            p.kill()
            p.wait()


def test_without_root_one_line(iotrace_exe):
    """Not root: one clear line, exit 1, no BCC noise or traceback."""
    import os
    import shutil
    argv = [iotrace_exe, "snoop", "--duration", "1"]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            pytest.skip("setpriv not installed")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == "iotrace snoop: the qemu-dm probes need root (CAP_BPF and " \
                               "CAP_PERFMON, or CAP_SYS_ADMIN: loading BPF programs and uprobes)"


def test_snoop_ebpf_prints_the_program(capsys):
    debian_dm()
    assert main(["snoop", "--ebpf"]) == 0
    out = capsys.readouterr().out
    assert "#define SEND_VCPU_OFF 0x50" in out and "#define EVENT_MODE 1" in out
    assert "#define BUF_LO 3611LL" in out              # 0x521dfb - 0x520fe0
    assert "int on_entry(struct pt_regs *ctx)" in out and "struct xen_ioreq {" in out
    assert main(["snoop", "--ebpf", "--no-service-time"]) == 0
    assert "#define TIMING 0" in capsys.readouterr().out


def test_default_binaries_include_the_debian_device_model():
    from iotrace.probes.live import default_binaries
    debian_dm()
    assert str(DEBIAN_DM) in default_binaries()
