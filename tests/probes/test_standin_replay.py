"""The stand-in replays streams: --truth against an independent reading of the rules, timing,
--loop, --hold, the exec'd process a probe sees, and one-line errors."""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from iotrace.probes.standin import runner as sr
from iotrace.probes.standin import stream

# The README's list of what Xen emulates itself or lets through without an exit, written out here
# independently of pc-default.yaml and iotrace.probes.standin.stream.
XEN_PORTS = ({0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71,
              0xE9, 0x80, 0xED} | set(range(0x600, 0x604)) | set(range(0x608, 0x60C))
             | set(range(0xB000, 0xB004)) | set(range(0xB008, 0xB00C)))
XEN_MMIO = [(0xFEC00000, 0xFEC00FFF), (0xFED00000, 0xFED003FF), (0xFEE00000, 0xFEEFFFFF)]


def independent_truth(csv_path: Path, domid: int) -> list[dict]:
    """What Xen would send qemu-dm for this capture, counted per (vcpu, type, dir, addr)."""
    opener = gzip.open if str(csv_path).endswith(".gz") else open
    with opener(csv_path, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # PCI functions that answer their vendor-ID read: the device model registered them.
    present, cf8 = set(), 0
    for r in rows:
        port = int(r["addr"], 16)
        if r["space"] != "pio" or r["vcpu"] == "-1":
            continue
        if port == 0xCF8 and r["dir"] == "W" and r["size"] == "4":
            cf8 = int(r["value"], 16)
        elif 0xCFC <= port <= 0xCFF and cf8 >> 31 and r["dir"] == "R" \
                and (cf8 & 0xFC) == 0 and port in (0xCFC,) and int(r["size"]) >= 2 \
                and int(r["value"], 16) & 0xFFFF != 0xFFFF:
            present.add((cf8 >> 8) & 0xFFFF)             # bus << 8 | devfn
    counts: dict[tuple, int] = {}
    cf8 = 0
    for r in rows:
        vcpu, addr, d = int(r["vcpu"]), int(r["addr"], 16), r["dir"]
        if vcpu < 0:
            continue
        if r["space"] == "pio":
            if addr in XEN_PORTS:
                continue
            typ = "pio"
            if addr == 0xCF8 and d == "W" and r["size"] == "4":
                cf8 = int(r["value"], 16)
            elif 0xCFC <= addr <= 0xCFF and cf8 >> 31:
                bdf = (cf8 >> 8) & 0xFFFF
                if bdf not in present:
                    continue
                typ = "pci_config"
                addr = (bdf << 32) | (cf8 & 0xFC) | (addr & 3)
        else:
            if any(lo <= addr <= hi for lo, hi in XEN_MMIO):
                continue
            typ = "mmio"
            if 0xA0000 <= addr <= 0xBFFFF and d == "W":
                vcpu = -1
        k = (vcpu, typ, "read" if d == "R" else "write", addr)
        counts[k] = counts.get(k, 0) + 1
    return stream.sort_io([{"domid": domid, "vcpu": v, "type": t, "dir": dr, "addr": a,
                            "count": c} for (v, t, dr, a), c in counts.items()])


@pytest.fixture(scope="module")
def exe():
    return sr.build()


def test_bundled_stream_replays_and_truth_matches_the_stream(tmp_path, exe):
    truth = tmp_path / "t.json"
    s = sr.StandIn(4, name="bundled", speed=0, truth=truth).start()
    assert s.wait_exit(30) == 0, s.stderr_text()
    doc = json.loads(truth.read_text())
    assert doc["source"] == "standin"
    reqs = stream.read_stream(sr.BUNDLED_STREAM)
    assert 2000 <= len(reqs) <= 10000
    assert stream.sort_io(doc["io"]) == stream.truth(reqs, 4)["io"]
    kinds = {(r["type"], r["vcpu"] == -1) for r in doc["io"]}
    assert {("pio", False), ("mmio", False), ("mmio", True), ("pci_config", False)} <= kinds
    assert {r["vcpu"] for r in doc["io"]} == {-1, 0, 1}


def test_truth_of_the_whole_linux_boot_matches_an_independent_computation(tmp_path, exe,
                                                                          linux_boot_csv,
                                                                          iotrace_exe):
    truth = tmp_path / "boot.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    res = subprocess.run([iotrace_exe, "standin", "--xen-domid", "12", "--replay",
                          str(linux_boot_csv), "--speed", "0", "--truth", str(truth)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    got = stream.sort_io(json.loads(truth.read_text())["io"])
    want = independent_truth(linux_boot_csv, 12)
    assert got == want
    assert sum(r["count"] for r in got) == 173_850
    # the converted stream was cached by content
    assert len(list((tmp_path / "cache" / "iotrace" / "streams").glob("*.stream"))) == 1


def test_small_csv_via_cli(tmp_path, iotrace_exe):
    p = tmp_path / "small.csv"
    p.write_text("t_us,vcpu,space,dir,addr,size,value,region\n"
                 "0,0,pio,W,0x70,1,0x8f,rtc\n"            # Xen's RTC: not forwarded
                 "5,0,pio,W,0x3f8,1,0x41,serial\n"
                 "6,1,mmio,W,0xb8000,8,0x0741074107410741,vga-lowmem\n"   # two buffered slots
                 "7,1,pio,R,0x3fd,1,0x60,serial\n")
    truth = tmp_path / "t.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    res = subprocess.run([iotrace_exe, "standin", "-xen-domid", "2", "--replay", str(p),
                          "--speed", "0", "--truth", str(truth)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert stream.sort_io(json.loads(truth.read_text())["io"]) == independent_truth(p, 2) == [
        {"domid": 2, "vcpu": -1, "type": "mmio", "dir": "write", "addr": 0xb8000, "count": 1},
        {"domid": 2, "vcpu": 0, "type": "pio", "dir": "write", "addr": 0x3f8, "count": 1},
        {"domid": 2, "vcpu": 1, "type": "pio", "dir": "read", "addr": 0x3fd, "count": 1},
    ]


def test_speed_1_takes_about_the_stream_duration(tmp_path, exe):
    reqs = stream.read_stream(sr.BUNDLED_STREAM)
    duration = int(reqs["t_ns"][-1]) / 1e9
    assert 0.2 < duration < 2.0
    for speed, expect in ((1.0, duration), (2.0, duration / 2)):
        s = sr.StandIn(1, speed=speed)
        t0 = time.monotonic()
        s.start()
        assert s.wait_exit(30) == 0
        took = time.monotonic() - t0
        assert expect * 0.95 <= took <= expect + 0.5, (speed, took, expect)
    t0 = time.monotonic()
    assert sr.StandIn(1, speed=0).start().wait_exit(30) == 0
    assert time.monotonic() - t0 < duration / 2


def test_hold_stays_alive_until_sigterm(tmp_path, exe):
    truth = tmp_path / "t.json"
    s = sr.StandIn(6, speed=0, hold=True, truth=truth).start()
    try:
        assert sr.wait_for(truth.exists, 10), "stream did not end"
        time.sleep(0.5)
        assert s.running()
        with open(f"/proc/{s.pid}/stat") as fh:
            assert fh.read().split(") ")[1][0] == "S"       # idle (sleeping), not spinning
    finally:
        rc = s.stop(5)
    assert rc == 0
    assert stream.sort_io(json.loads(truth.read_text())["io"]) == \
        stream.truth(stream.read_stream(sr.BUNDLED_STREAM), 6)["io"]


def test_loop_repeats_until_sigterm_and_counts_every_pass(tmp_path, exe):
    truth = tmp_path / "t.json"
    one = sum(r["count"] for r in stream.truth(stream.read_stream(sr.BUNDLED_STREAM), 1)["io"])
    with sr.StandIn(8, speed=0, loop=True, truth=truth) as s:
        assert sr.wait_for(truth.exists, 10)
        time.sleep(0.3)
        assert s.running()
    assert s.proc.returncode == 0
    total = sum(r["count"] for r in json.loads(truth.read_text())["io"])
    assert total > 2 * one


def test_the_probed_process_is_the_c_program_with_xen_domid_in_its_argv(tmp_path, iotrace_exe,
                                                                        exe):
    truth = tmp_path / "t.json"
    proc = subprocess.Popen([iotrace_exe, "standin", "--xen-domid", "9", "-name", "guest9",
                             "--speed", "0", "--hold", "--truth", str(truth)],
                            stderr=subprocess.PIPE)
    try:
        assert sr.wait_for(truth.exists, 15), proc.stderr.read() if proc.poll() else "no truth"
        assert os.path.realpath(f"/proc/{proc.pid}/exe") == str(exe.resolve())
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert argv[1:3] == [b"-xen-domid", b"9"] and b"guest9" in argv
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert comm == "iotrace-standin"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0


@pytest.mark.parametrize("args,pattern", [
    ([], "--xen-domid N is required"),
    (["--xen-domid", "abc"], "--xen-domid: expected a domain id"),
    (["--xen-domid", "40000"], "outside 0..32751"),
    (["--xen-domid", "1", "--speed", "fast"], "--speed: expected a number"),
    (["--xen-domid", "1", "--speed", "-2"], "--speed: expected a number"),
    (["--xen-domid", "1", "--replay", "/nonexistent.csv"], "/nonexistent.csv: no such file"),
    (["--xen-domid", "1", "--truth", "/nonexistent/dir/t.json"], "does not exist"),
])
def test_cli_bad_arguments_are_one_line_exit_2(iotrace_exe, args, pattern):
    res = subprocess.run([iotrace_exe, "standin", *args], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], res.stderr


def test_cli_rejects_a_file_that_is_neither_csv_nor_stream(tmp_path, iotrace_exe):
    bad = tmp_path / "bad.stream"
    bad.write_bytes(b"IOTSTRM\0" + b"\x01" * 60)
    res = subprocess.run([iotrace_exe, "standin", "--xen-domid", "1", "--replay", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "bad.stream" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,pattern", [
    (["-xen-domid"], "-xen-domid needs a value"),
    (["-xen-domid", "7"], "-replay FILE is required"),
    (["-replay", "x"], "-xen-domid N is required"),
    (["-xen-domid", "7", "-replay", "x", "-bogus"], "unknown argument '-bogus'"),
    (["-xen-domid", "7", "-replay", "/nonexistent"], "cannot open stream"),
    (["-xen-domid", "7", "-replay", "/etc/hostname"], "not an iotrace stream file"),
    (["-xen-domid", "7", "-replay", "x", "-speed", "-1"], "-speed: expected a number"),
])
def test_binary_bad_arguments_are_one_line_exit_2(exe, args, pattern):
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=10)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], res.stderr


def test_binary_rejects_a_truncated_stream(tmp_path, exe):
    blob = sr.BUNDLED_STREAM.read_bytes()
    p = tmp_path / "cut.stream"
    p.write_bytes(blob[:len(blob) - 10])
    res = subprocess.run([str(exe), "-xen-domid", "1", "-replay", str(p)], capture_output=True,
                         text=True, timeout=10)
    assert res.returncode == 2 and "truncated at offset" in res.stderr
