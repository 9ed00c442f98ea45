"""``iotrace top -b``: batch tables checked line by line on replays whose truth is known.

Truth comes from recordings written here with ``iotrace.offline.recording.RecordingWriter`` (every event
chosen by the test) and from the real xentrace capture (94 port reads + 11 writes of domain 14,
see docs/data.md).
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from iotrace.core import events
from iotrace.offline.recording import RecordingWriter
from support.fakes import batch

HEADER = ["ID", "NAME", "REQ/s", "BYTES/s", "RD/s", "WR/s", "BUSIEST", "P50us", "P95us", "LOST",
          "REQS", "BYTES", "AVGus", "VCPUS", "PROBES", "FLAGS"]


@pytest.fixture
def known_recording(tmp_path):
    """alpha (1): 1000 com1 writes x1 B on vcpu 0 (5 us), 250 ide-primary reads x2 B on vcpu 1
    (40 us); beta (2): 400 vga-lowmem writes x4 B, buffered (vcpu -1), no timing. 3 lost."""
    path = tmp_path / "known.iotrec"
    with RecordingWriter(path, {"source": "qemu", "domains": {1: "alpha", 2: "beta"}}) as w:
        w.write(batch(1000, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, 5_000, 0, 1000))
        w.write(batch(250, 1, 1, events.TYPE_PIO, 0x1f0, events.DIR_READ, 2, 40_000, 10, 4000))
        w.write(batch(400, 2, -1, events.TYPE_MMIO, 0xa0000, events.DIR_WRITE, 4, -1, 20, 2500))
        w.add_lost(3)
    return path


def run_top(exe, *args, timeout=60):
    r = subprocess.run([exe, "top", "-b", *args], capture_output=True, text=True, timeout=timeout)
    return r


def tables(out: str) -> list[list[str]]:
    blocks = [b.splitlines() for b in out.strip("\n").split("\n\n")]
    for b in blocks:
        assert re.match(r"iotrace top \d{4}-\d\d-\d\d \d\d:\d\d:\d\d host=\S+ interval=", b[0]), b[0]
        assert b[1].startswith("sources: ")
        assert b[2].split() == HEADER
    return blocks


def rows(table: list[str]) -> list[dict]:
    out = []
    for line in table[3:]:
        f = line.split()
        assert len(f) == len(HEADER), line
        out.append(dict(zip(HEADER, f)))
    return out


def interval_of(table) -> float:
    return float(re.search(r"interval=([0-9.]+)s", table[0]).group(1))


def test_replay_totals_line_by_line(iotrace_exe, known_recording):
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "0.25", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    t1, t2 = tables(r.stdout)
    assert "sources: replay=up events=1650 lost=3" == t1[1]
    assert "domains=2" in t1[0] and "reqs=1650" in t1[0] and "sort=reqs" in t1[0]
    a, b = rows(t1)
    # raw numbers: 1000 x 1 B + 250 x 2 B; 400 x 4 B
    assert (a["ID"], a["NAME"], a["REQS"], a["BYTES"], a["VCPUS"]) == ("1", "alpha", "1250",
                                                                         "1500", "2")
    assert (b["ID"], b["NAME"], b["REQS"], b["BYTES"], b["VCPUS"]) == ("2", "beta", "400",
                                                                        "1600", "0")
    assert a["BUSIEST"] == "com1:80.0%" and b["BUSIEST"] == "vga-lowmem:100.0%"
    assert float(a["BYTES/s"]) * interval_of(t1) == pytest.approx(1500, rel=0.03)
    # Everything arrived in the first interval: rate x interval = the totals (3 significant digits).
    dt = interval_of(t1)
    assert float(a["REQ/s"]) * dt == pytest.approx(1250, rel=0.03)
    assert float(a["RD/s"]) * dt == pytest.approx(250, rel=0.03)
    assert float(a["WR/s"]) * dt == pytest.approx(1000, rel=0.03)
    assert 4.0 <= float(a["P50us"]) <= 8.2                      # 5 us, log2 slot
    assert 32.0 <= float(a["P95us"]) <= 65.6                    # 40 us
    assert a["AVGus"] == "12.0"                                 # (1000x5 + 250x40) / 1250
    assert b["P50us"] == b["P95us"] == b["AVGus"] == "-"         # no timing for buffered writes
    assert a["FLAGS"] == b["FLAGS"] == "-"
    assert a["PROBES"] == b["PROBES"] == "-"                    # a replay attaches no probes
    # Second interval: nothing new, totals unchanged.
    a2, b2 = rows(t2)
    assert (a2["REQ/s"], a2["REQS"], b2["REQ/s"], b2["REQS"]) == ("0", "1250", "0", "400")
    assert a2["P95us"] == "-"
    assert a2["BUSIEST"] == b2["BUSIEST"] == "-"                # no requests: no stale busiest


def test_expansion_filter_and_sort_in_batch(iotrace_exe, known_recording):
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "-e", "vcpu,addr",
                "--sort", "bytes", "0.2", "1")
    assert r.returncode == 0, r.stderr
    (t,) = tables(r.stdout)
    got = [(x["ID"], x["NAME"], x["REQS"]) for x in rows(t)]
    assert got == [("2", "beta", "400"), ("2", "..vcpu?", "400"),
                   ("2", "..vga-lowmem", "400"), ("2", "....0xa0000", "400"),
                   ("1", "alpha", "1250"), ("1", "..vcpu0", "1000"), ("1", "..vcpu1", "250"),
                   ("1", "..com1", "1000"), ("1", "....0x3f8", "1000"),
                   ("1", "..ide-primary", "250"), ("1", "....0x1f0", "250")]
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "--type", "pio",
                "--vcpu", "1", "0.2", "1")
    (t,) = tables(r.stdout)
    assert "filter=vcpu=1;type=pio" in t[0]
    assert [(x["NAME"], x["REQS"], x["BUSIEST"]) for x in rows(t)] == \
        [("alpha", "250", "ide-primary:100.0%")]
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "-D", "beta",
                "--range", "vga*", "0.2", "1")
    (t,) = tables(r.stdout)
    assert [x["NAME"] for x in rows(t)] == ["beta"]


def test_slow_flag(iotrace_exe, known_recording):
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "--slow", "20us",
                "0.2", "1")
    (t,) = tables(r.stdout)
    assert rows(t)[0]["FLAGS"] == "!slow"                    # alpha p95 ~40 us >= 20 us


def test_replay_at_speed_spreads_over_intervals(iotrace_exe, tmp_path):
    """1.2 s of events (one every 2 ms) at speed 1: the first 0.4 s interval sees part of them,
    the last table all 600."""
    path = tmp_path / "timed.iotrec"
    with RecordingWriter(path, {"source": "qemu", "domains": {4: "timed"}}) as w:
        w.write(batch(600, 4, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, 1000, 0, 2_000_000))
    r = run_top(iotrace_exe, "--replay", str(path), "--speed", "1", "0.4", "5")
    assert r.returncode == 0, r.stderr
    ts = tables(r.stdout)
    totals = [int(rows(t)[0]["REQS"]) for t in ts]
    assert totals == sorted(totals)                          # cumulative never goes down
    assert 0 < totals[0] < 600 and totals[-1] == 600
    first_rate = float(rows(ts[0])[0]["REQ/s"])
    assert 150 <= first_rate <= 700                          # ~500/s of replayed time


def test_real_xentrace_capture(iotrace_exe, real_xentrace):
    r = run_top(iotrace_exe, "--replay", str(real_xentrace), "--speed", "0", "-e", "range",
                "0.3", "1")
    assert r.returncode == 0, r.stderr
    (t,) = tables(r.stdout)
    assert "events=105" in t[1]
    rs = rows(t)
    dom = rs[0]
    assert (dom["ID"], dom["REQS"], dom["BYTES"]) == ("14", "105", "0")   # xentrace: no sizes
    dt = interval_of(t)
    assert float(dom["RD/s"]) * dt == pytest.approx(94, rel=0.03)
    assert float(dom["WR/s"]) * dt == pytest.approx(11, rel=0.1)
    assert sum(int(x["REQS"]) for x in rs[1:]) == 105          # the ranges add up


@pytest.mark.parametrize("args, message", [
    (["--speed", "2"], "--speed only applies with --replay"),
    (["--replay", "x", "--from", "http://h:1/metrics"], "are exclusive"),
    (["--vcpu", "zero"], "vcpu: expected a vCPU number"),
    (["--type", "disk"], "type: expected one of"),
    (["--from-auth", "a:b"], "need --from URL"),
    (["--from", "ftp://h/metrics"], "expected an http:// or https:// URL"),
    (["--binary", "/bin/true", "--source", "xentrace"], "--binary only applies"),
])
def test_bad_arguments_are_one_line(iotrace_exe, args, message):
    r = run_top(iotrace_exe, *args, "0.1", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("iotrace top: ")


def test_bad_replay_files_are_one_line(iotrace_exe, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a capture at all\n" * 10)
    for path in (junk, tmp_path / "missing.bin"):
        r = run_top(iotrace_exe, "--replay", str(path), "0.1", "1")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], r.stderr
        assert r.stdout == ""


def test_positional_arguments_are_checked(iotrace_exe):
    for args in (["0"], ["-1"], ["1", "0"], ["abc"]):
        r = run_top(iotrace_exe, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr


def test_sigterm_ends_batch_cleanly(iotrace_exe, real_xentrace):
    import signal
    p = subprocess.Popen([iotrace_exe, "top", "-b", "--replay", str(real_xentrace), "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        assert first.startswith("iotrace top ")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and err == ""


def test_xentop_flags_delay_and_iterations(iotrace_exe, known_recording):
    """-d SECONDS and -i N as xentop has them: two tables about one second apart."""
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "-d", "1", "-i", "2")
    assert r.returncode == 0, r.stderr
    t1, t2 = tables(r.stdout)
    assert 0.8 <= interval_of(t2) <= 1.6
    stamps = [re.match(r"iotrace top (\S+ \S+)", t[0]).group(1) for t in (t1, t2)]
    assert stamps[0] != stamps[1]
    r = run_top(iotrace_exe, "--replay", str(known_recording), "-d", "1", "2", "1")
    assert r.returncode == 2 and "give the interval once" in r.stderr


def test_a_filter_that_matches_nothing_says_so(iotrace_exe, known_recording):
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "-D", "nosuchdom",
                "0.2", "2")
    assert r.returncode == 0
    t1, t2 = tables(r.stdout)
    assert "filter=domain=nosuchdom (matches-nothing)" in t1[0] and rows(t1) == []
    assert r.stderr.strip().splitlines() == [
        "iotrace top: the filter domain=nosuchdom matches nothing (yet)"]


def test_csv_and_json(iotrace_exe, known_recording):
    import csv
    import io
    import json
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "--format", "csv",
                "0.25", "2")
    assert r.returncode == 0, r.stderr
    recs = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.stdout.count("time,host,") == 1                    # one header row
    first = [x for x in recs if x["reqs_total"] and x["kind"] == "domain"][:2]
    alpha = next(x for x in first if x["name"] == "alpha")
    assert (alpha["domid"], alpha["reqs_total"], alpha["bytes_total"]) == ("1", "1250", "1500")
    assert float(alpha["avg_seconds"]) == pytest.approx(12e-6)
    assert float(alpha["req_per_second"]) * float(alpha["interval_seconds"]) == \
        pytest.approx(1250, rel=0.03)
    assert len(recs) == 4                                      # 2 domains x 2 tables
    r = run_top(iotrace_exe, "--replay", str(known_recording), "--speed", "0", "--format", "json",
                "-e", "range", "0.25", "1")
    (line,) = r.stdout.splitlines()
    doc = json.loads(line)
    assert doc["sources"][0] == {"name": "replay", "up": True, "events": 1650, "lost": 3,
                                 "probes_attached": 0, "probes_failed": 0, "decode_errors": 0,
                                 "damage": {"skipped_chunk": 0, "truncated": 0}, "error": None}
    by = {(x["kind"], x["name"]): x for x in doc["rows"]}
    assert by[("range", "com1")]["reqs_total"] == 1000 and by[("range", "com1")]["level"] == 1
    assert by[("domain", "beta")]["p95_seconds"] is None and doc["filter_matches"]


@pytest.mark.integration
@pytest.mark.root
def test_batch_exits_1_when_a_source_is_down(iotrace_exe):
    """No Xen here: the live xentrace source is down; batch mode says so and exits 1."""
    r = run_top(iotrace_exe, "--source", "xentrace", "0.3", "1")
    assert r.returncode == 1, (r.returncode, r.stderr)
    (t,) = tables(r.stdout)
    assert "xentrace=DOWN" in t[1]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("iotrace top: source xentrace is down")]


def _damaged(path, flip: bool, close: bool):
    """alpha (1): 3 chunks of 500 com1 writes; one payload bit flipped in the middle chunk, or
    the writer "killed" (no end chunk)."""
    w = RecordingWriter(path, {"source": "qemu", "domains": {1: "alpha"}}, chunk_records=500)
    w.write(batch(1500, 1, 0, events.TYPE_PIO, 0x3f8, events.DIR_WRITE, 1, 5_000, 0, 1000))
    w.close() if close else w.flush()
    if flip:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x80
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("flip,close,events_,line,warning", [
    (True, True, 1000, "decode_errors=500 skipped_chunks=1", "events chunk checksum mismatch"),
    (False, False, 1500, "truncated", "no end chunk: the writer did not close the file"),
])
def test_a_damaged_replay_says_so(iotrace_exe, tmp_path, flip, close, events_, line, warning):
    """top --replay of a damaged or writer-killed recording: the source line carries the damage,
    stderr the warning naming the file once; the JSON has the counts (issue #12, item 9)."""
    path = _damaged(tmp_path / "d.iotrec", flip, close)
    r = run_top(iotrace_exe, "--replay", str(path), "--speed", "0", "0.2", "2")
    assert r.returncode == 0, r.stderr
    for t in tables(r.stdout):
        assert t[1] == f"sources: replay=up events={events_} lost=0 {line}"
    said = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(said) == 1 and said[0].startswith(f"iotrace top: source replay: warning: {path}: ")
    assert warning in said[0] and said[0].count(str(path)) == 1
    r = run_top(iotrace_exe, "--replay", str(path), "--speed", "0", "--format", "json", "0.2", "1")
    src = json.loads(r.stdout.splitlines()[0])["sources"][0]
    assert src["decode_errors"] == 1500 - events_
    assert src["damage"] == {"skipped_chunk": int(flip), "truncated": int(not close)}
