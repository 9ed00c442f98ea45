"""`iotrace report` end to end: the real capture, synth captures with ground truth, recordings,
and every kind of bad input (one line, non-zero exit, never a traceback)."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from iotrace.cli.main import main
from iotrace.core import events
from iotrace.offline.recording import RecordingWriter
from iotrace.xentrace.testing import synth


def run_cli(exe, *args):
    return subprocess.run([exe, "report", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(res, *words, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_real_capture_json_has_all_105_port_records(iotrace_exe, real_xentrace):
    res = run_cli(iotrace_exe, "--format", "json", "--by", "vcpu,addr", real_xentrace)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["source"] == "xentrace" and doc["lost_records"] == 0
    assert doc["records"] > 105
    io = doc["io"]
    assert sum(r["count"] for r in io) == 105
    assert {r["type"] for r in io} == {"pio"}
    per_dir = Counter()
    per_vcpu = Counter()
    for r in io:
        assert r["domid"] == 14
        per_dir[r["dir"]] += r["count"]
        per_vcpu[r["vcpu"]] += r["count"]
        assert set(r) >= {"domid", "vcpu", "type", "dir", "addr", "range", "count",
                          "service_seconds"}
        svc = r["service_seconds"]
        assert svc is None or 0 < svc["p50"] <= svc["p95"] * (1 + 1e-9)
    assert per_dir == {"read": 94, "write": 11}
    assert per_vcpu == {1: 17, 2: 72, 3: 16}
    keys = [(r["domid"], r["vcpu"], r["type"], r["dir"], r["addr"]) for r in io]
    assert len(keys) == len(set(keys)), "one row per (domid, vcpu, type, dir, addr)"


def test_real_capture_table_is_readable(iotrace_exe, real_xentrace):
    res = run_cli(iotrace_exe, real_xentrace)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "105 I/O requests" in out
    lines = out.splitlines()
    dom = lines.index("per domain:")
    assert lines[dom + 1].split()[:4] == ["DOMID", "DOMAIN", "REQS", "REQ/S"]
    assert lines[dom + 2].split()[:3] == ["14", "dom14", "105"]
    assert "ide-primary" in out and "RANGE" in out and "P95" in out


def test_real_capture_xenalyze_compat_counts_fewer(iotrace_exe, real_xentrace):
    res = run_cli(iotrace_exe, "--xenalyze-compat", "--format", "json", real_xentrace)
    assert res.returncode == 0, res.stderr
    assert sum(r["count"] for r in json.loads(res.stdout)["io"]) == 12


def test_synth_capture_counts_equal_ground_truth(tmp_path, capsys):
    trace = synth.generate(7, pcpus=4, steps=1500)
    path = tmp_path / "t.bin"
    trace.write(path)
    assert main(["report", "--format", "json", "--by", "vcpu,addr", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    got = Counter()
    for r in doc["io"]:
        got[(r["domid"], r["vcpu"], events.TYPE_CODES[r["type"]], events.DIR_CODES[r["dir"]],
             r["addr"])] += r["count"]
    assert got == trace.truth
    assert doc["lost_records"] == trace.lost_records


def test_recording_is_reported_with_domain_names(tmp_path, capsys):
    b = events.empty(4)
    b["domid"] = [3, 3, 3, 5]
    b["vcpu"] = [0, 0, 1, -1]
    b["type"] = [0, 0, 2, 1]
    b["dir"] = [1, 1, 0, 0]
    b["addr"] = [0x3f8, 0x3f8, (1 << 35) | 0x10, 0xa0000]
    b["size"] = [1, 1, 4, 2]
    b["service_ns"] = [1500, 2500, -1, 800]
    w = RecordingWriter(tmp_path / "r.iotr", {"source": "qemu", "domains": {3: "web", 5: "db"}})
    w.write(b)
    w.add_lost(7)
    w.close()
    assert main(["report", "--format", "json", "--by", "vcpu,range", str(tmp_path / "r.iotr")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "recording" and doc["lost_records"] == 7
    assert doc["domains"] == {"3": "web", "5": "db"}
    rows = {(r["domid"], r["vcpu"], r["type"], r["range"]): r for r in doc["io"]}
    assert rows[(3, 0, "pio", "com1")]["count"] == 2
    assert rows[(3, 0, "pio", "com1")]["service_seconds"]["avg"] == pytest.approx(2e-6)
    assert rows[(3, 1, "pci_config", "pci-config")]["service_seconds"] is None
    assert rows[(5, -1, "mmio", "vga-lowmem")]["count"] == 1
    assert main(["report", "--by", "vcpu", str(tmp_path / "r.iotr")]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["3", "web", "3"] == table[table.index(["per", "domain:"]) + 2][:3]
    assert ["5", "db", "?", "1"] in [row[:4] for row in table]


def test_config_overrides_range_names(tmp_path, capsys, real_xentrace):
    cfg = tmp_path / "map.yaml"
    cfg.write_text("pio:\n  - {name: virtio-legacy, start: 0xc200, end: 0xc21f}\n")
    assert main(["report", "--format", "json", "--config", str(cfg), str(real_xentrace)]) == 0
    ranges = Counter()
    for r in json.loads(capsys.readouterr().out)["io"]:
        ranges[r["range"]] += r["count"]
    assert ranges["virtio-legacy"] == 72


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (os.urandom(4096), ["not a xentrace capture"]),
    (b"hello, this is text and not a trace\n" * 20, ["not a xentrace capture"]),
])
def test_bad_files_one_line_exit_2(tmp_path, iotrace_exe, content, words):
    p = tmp_path / "bad.bin"
    p.write_bytes(content)
    res = run_cli(iotrace_exe, p)
    assert_one_line_error(res, str(p), *words)


def test_missing_file_and_directory(tmp_path, iotrace_exe):
    assert_one_line_error(run_cli(iotrace_exe, tmp_path / "absent.bin"), "no such file")
    assert_one_line_error(run_cli(iotrace_exe, tmp_path), "directory")


def test_bad_config_one_line_with_file_and_line(tmp_path, iotrace_exe, real_xentrace):
    cfg = tmp_path / "map.yaml"
    cfg.write_text("pio:\n  - {name: x, start: 0x10}\n  - {name: y, start: nope}\n")
    assert_one_line_error(run_cli(iotrace_exe, "--config", cfg, real_xentrace),
                          f"{cfg}:3:", "pio[1].start")


def test_bad_cpu_hz(iotrace_exe, real_xentrace):
    assert_one_line_error(run_cli(iotrace_exe, "--cpu-hz", "fast", real_xentrace), "--cpu-hz")


def test_truncated_capture_reports_complete_records_and_warns(tmp_path, iotrace_exe):
    trace = synth.generate(3, pcpus=2, steps=800, lost=0)
    data = trace.data
    cut = len(data) - 6          # inside the last record
    p = tmp_path / "cut.bin"
    p.write_bytes(data[:cut])
    res = run_cli(iotrace_exe, "--format", "json", p)
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "Traceback" not in res.stderr
    got = sum(r["count"] for r in json.loads(res.stdout)["io"])
    assert trace.io_records - 1 <= got <= trace.io_records


def test_corrupt_recording_is_one_line(tmp_path, iotrace_exe):
    """A recording whose metadata is damaged and that has no chunk to recover from."""
    w = RecordingWriter(tmp_path / "r.iotr", {"source": "qemu"})
    w.flush()
    raw = bytearray((tmp_path / "r.iotr").read_bytes())
    raw[30] ^= 0xFF                                   # inside the metadata block
    (tmp_path / "r.iotr").write_bytes(bytes(raw))
    assert_one_line_error(run_cli(iotrace_exe, tmp_path / "r.iotr"), str(tmp_path / "r.iotr"))


def _damaged_recording(path, flip_at: str):
    """A recording of 3 chunks of 1,000 events (domain 3, "web"), one bit flipped."""
    w = RecordingWriter(path, {"source": "qemu"}, chunk_records=1000)
    w.set_domain(3, "web")
    b = events.empty(3000)
    b["domid"], b["addr"], b["ts_ns"] = 3, 0x3F8, np.arange(3000)
    w.write(b)
    w.close()
    raw = bytearray(path.read_bytes())
    at = {"metadata": 30, "middle": len(raw) // 2}[flip_at]
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("flip_at,kept,skipped", [("middle", 2000, 1), ("metadata", 3000, 0)])
def test_a_damaged_recording_reports_the_rest_and_says_what_was_skipped(
        tmp_path, iotrace_exe, flip_at, kept, skipped):
    path = tmp_path / "d.iotrec"
    _damaged_recording(path, flip_at)
    res = run_cli(iotrace_exe, "--format", "json", path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert sum(r["count"] for r in doc["io"]) == kept
    assert doc["skipped_chunks"] == skipped and doc["decode_errors"] == 3000 - kept
    assert doc["truncated"] is False and doc["domains"] == {"3": "web"}
    warnings = res.stderr.strip().splitlines()
    assert len(warnings) == 1 and "Traceback" not in res.stderr
    # the file is named once per line (not "d.iotrec: d.iotrec: ...")
    assert warnings[0].startswith(f"iotrace report: warning: {path}: offset ")
    assert warnings[0].count(str(path)) == 1
    table = run_cli(iotrace_exe, path)
    assert table.returncode == 0
    first, second = table.stdout.splitlines()[:2]
    assert f"{3000 - kept} decode errors" in first and f"{kept} I/O requests" in second
    assert ("1 damaged chunk(s) skipped" in first) == bool(skipped)


def test_top_must_be_a_positive_count(iotrace_exe, real_xentrace):
    for bad in ("-1", "0", "x"):
        res = run_cli(iotrace_exe, "--top", bad, real_xentrace)
        assert res.returncode == 2 and "--top" in res.stderr and "Traceback" not in res.stderr
        assert "expected a whole number (1 or more)" in res.stderr


def test_no_io_capture_says_so(tmp_path, capsys):
    # A capture with scheduler records only: decodes fine, zero I/O requests.
    assert main(["report", str(_sched_only(tmp_path))]) == 0
    assert "no I/O requests" in capsys.readouterr().out


def _sched_only(tmp_path):
    # One window: TRC_TRACE_CPU_CHANGE(pcpu 0) + one runstate change record with TSC.
    import struct
    rec = struct.pack("<IIII", (1 << 31) | (1 << 28) | (0x21001 | (1 << 8) | (0 << 4)), 100, 0,
                      (1 << 16) | 0)
    head = struct.pack("<IiI", 0x2001F003, 0, len(rec))
    p = tmp_path / "sched.bin"
    p.write_bytes(head + rec)
    return p


# --- schema 2, --by rip, --events, pipes and FIFOs, bounded memory ------------------------------

def _json(exe, *args, **kw):
    res = subprocess.run([exe, "report", "--format", "json", *map(str, args)], capture_output=True,
                         text=True, timeout=120, **kw)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_json_is_schema_3_and_names_its_grouping(iotrace_exe, real_xentrace):
    doc = _json(iotrace_exe, real_xentrace)
    assert doc["schema"] == 3 and doc["by"] == ["range"]
    assert doc["key"] == ["domid", "range", "type"]
    assert all(set(r) >= {"domid", "domain", "range", "type", "count"} for r in doc["io"])
    assert all(not {"rip", "vcpu", "addr", "dir"} & set(r) for r in doc["io"])


def test_by_rip_names_the_instruction_behind_each_request(iotrace_exe, real_xentrace):
    doc = _json(iotrace_exe, "--by", "vcpu,rip,addr", real_xentrace)
    assert doc["by"] == ["vcpu", "addr", "rip"]
    io = doc["io"]
    assert sum(r["count"] for r in io) == 105 and all(r["rip"] for r in io)
    # d14v3's IDE command-block writes (0x1f1-0x1f7) all come from one instruction (the VMEXIT64
    # RIP in the real capture); its data-port write (0x1f0) from another
    writes = [r for r in io
              if r["vcpu"] == 3 and r["dir"] == "write" and r["range"] == "ide-primary"]
    assert {r["rip"] for r in writes if r["addr"] != 0x1F0} == {0xFFFFFFFF8C4E54CD}
    assert {r["rip"] for r in writes if r["addr"] == 0x1F0} == {0xFFFFFFFF8C4E5A7A}
    # summed over RIPs, the rows are the default grouping's
    by_range = {(r["domid"], r["vcpu"], r["type"], r["dir"], r["addr"]): r["count"]
                for r in _json(iotrace_exe, "--by", "vcpu,addr", real_xentrace)["io"]}
    summed = Counter()
    for r in io:
        summed[(r["domid"], r["vcpu"], r["type"], r["dir"], r["addr"])] += r["count"]
    assert summed == by_range
    table = run_cli(iotrace_exe, "--by", "rip", real_xentrace).stdout
    assert "RIP" in table and "0xffffffff8c4e54cd" in table
    # per RIP over every vCPU: the IDE command-block writes of all vCPUs, one row per range
    rows = _json(iotrace_exe, "--by", "rip", real_xentrace)["io"]
    assert sum(r["count"] for r in rows) == 105 and all("vcpu" not in r for r in rows)
    assert len({(r["rip"], r["range"]) for r in rows}) == len(rows)


def test_by_rip_on_a_recording_without_rips(tmp_path, capsys):
    b = events.empty(3)
    b["domid"], b["vcpu"], b["addr"] = 3, 0, 0x3F8
    w = RecordingWriter(tmp_path / "r.iotr", {"source": "qemu"})
    w.write(b)
    w.close()
    assert main(["report", "--by", "rip", "--format", "json", str(tmp_path / "r.iotr")]) == 0
    (row,) = json.loads(capsys.readouterr().out)["io"]
    assert row["rip"] == 0 and row["count"] == 3
    assert main(["report", "--by", "rip", str(tmp_path / "r.iotr")]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["3", "dom3", "?", "com1", "pio", "3"] in [row[:6] for row in table]


def test_events_lists_every_request(iotrace_exe, real_xentrace):
    res = run_cli(iotrace_exe, "--events", real_xentrace)
    assert res.returncode == 0, res.stderr
    head, *lines = res.stdout.splitlines()
    assert head.split() == ["TIME_S", "DOMAIN", "VCPU", "TYPE", "DIR", "ADDRESS", "RANGE", "DATA",
                            "SVC_US", "RIP"]
    assert len(lines) == 105
    times = [float(x.split()[0]) for x in lines]
    assert times == sorted(times) and times[0] == 0.0
    assert all(x.split()[-1].startswith("0xffffffff8c") for x in lines)
    res = run_cli(iotrace_exe, "--events", "--format", "json", real_xentrace)
    objs = [json.loads(x) for x in res.stdout.splitlines()]
    assert Counter(o["vcpu"] for o in objs) == {1: 17, 2: 72, 3: 16}
    w = [o for o in objs if o["addr"] == 0x1F2 and o["dir"] == "write"]
    assert [o["service_ns"] for o in w] == [int(49470 * 1e9 / 2.4e9)]


def test_report_reads_stdin_dev_stdin_a_pipe_and_a_fifo(tmp_path, iotrace_exe, real_xentrace):
    want = _json(iotrace_exe, real_xentrace)
    want.pop("records")
    for arg in ("-", "/dev/stdin"):
        with open(real_xentrace, "rb") as fh:
            got = _json(iotrace_exe, arg, stdin=fh)
        got.pop("records")
        assert got == want, arg
    cat = subprocess.Popen(["cat", str(real_xentrace)], stdout=subprocess.PIPE)
    got = _json(iotrace_exe, "-", stdin=cat.stdout)
    cat.wait()
    assert got["io"] == want["io"]
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat '{real_xentrace}' > '{fifo}'"])
    try:
        got = _json(iotrace_exe, fifo)
    finally:
        writer.wait(timeout=60)
    assert got["io"] == want["io"]


def test_recording_through_a_pipe(tmp_path, iotrace_exe):
    b = events.empty(5)
    b["domid"], b["vcpu"], b["addr"], b["service_ns"] = 3, 1, 0x60, 1000
    w = RecordingWriter(tmp_path / "r.iotr", {"source": "qemu", "domains": {3: "web"}})
    w.write(b)
    w.close()
    with open(tmp_path / "r.iotr", "rb") as fh:
        doc = _json(iotrace_exe, "--by", "addr", "-", stdin=fh)
    assert doc["source"] == "recording" and doc["domains"] == {"3": "web"}
    assert [(r["addr"], r["count"]) for r in doc["io"]] == [(0x60, 5)]
    with open(tmp_path / "r.iotr", "rb") as fh:
        res = subprocess.run([iotrace_exe, "report", "--xenalyze-compat", "-"], stdin=fh,
                             capture_output=True, text=True, timeout=60)
    assert_one_line_error(res, "xentrace captures only")


def test_help_defines_service_time(iotrace_exe):
    out = subprocess.run([iotrace_exe, "report", "--help"], capture_output=True, text=True).stdout
    assert "service time" in out and "runnable" in out and "arc_cycles" in out


@pytest.mark.slow
def test_report_memory_does_not_grow_with_the_capture(tmp_path):
    """A 60x longer capture (the same host, tiled in time) costs no more memory to report."""
    base = synth.generate(8, pcpus=4, steps=30_000).data
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(base)
    with open(big, "wb") as fh:
        for piece in synth.tile(base, 60):
            fh.write(piece)
    code = ("import resource, sys; from iotrace.cli.main import main; "
            "sys.stdout = open('/dev/null', 'w'); rc = main(['report', '--format', 'json', "
            "sys.argv[1]]); sys.stdout = sys.__stdout__; "
            "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    rss = {}
    for p in (small, big):
        out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True,
                             text=True, timeout=300, check=True).stdout.split()
        assert out[0] == "0"
        rss[p] = int(out[1]) / 1024
    assert big.stat().st_size > 60e6
    assert rss[big] - rss[small] < 25, rss          # MB: flat (events would be ~100 MB more)


def test_stdin_on_a_terminal_is_refused(iotrace_exe):
    import pty
    master, slave = pty.openpty()
    try:
        res = subprocess.run([iotrace_exe, "report", "-"], stdin=slave, capture_output=True,
                             text=True, timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert_one_line_error(res, "standard input is a terminal")


def test_keys_beyond_the_bound_are_reported_as_other(tmp_path, capsys):
    n = 65_536 + 100
    body = [synth.record(synth.runstate_event(synth.RUNNABLE, synth.RUNNING), [3 << 16], 1)]
    body += [synth.record(synth.TRC_HVM_IOMEM_WRITE, [0xE000_0000 + 4 * i, i]) for i in range(n)]
    data = b"".join(body)
    path = tmp_path / "many.bin"
    path.write_bytes(synth.cpu_change(0, len(data)) + data)
    assert main(["report", "--by", "vcpu,addr", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "65536 distinct (domain, vCPU, type, dir, address" in err
    other = [line.split() for line in out.splitlines() if "other" in line.split()[3:]]
    assert other == [["3", "dom3", "0", "other", "mmio", "write", "other", "100", "-", "0.2%",
                      "-", "-", "-", "-", "-", "-"]]
    assert main(["report", "--format", "json", "--by", "addr", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out)["io"]
    assert sum(r["count"] for r in rows) == n
    assert [r["count"] for r in rows if r["addr"] == 2**64 - 1] == [100]
