"""What `iotrace report` accepts (issue #13): xentrace captures and recordings, plain or
gzip-compressed (read as decompressed, from files and pipes), and one clear line naming the
accepted formats for anything else - the shared boot CSV among them."""
from __future__ import annotations

import gzip
import json
import subprocess

import pytest

from iotrace.core.errors import InputError
from iotrace.offline import inputs
from iotrace.offline.capture import summarize_capture

ACCEPTS = "iotrace report reads xentrace captures"


def run(exe, *args, stdin=None):
    return subprocess.run([exe, "report", *map(str, args)], capture_output=True, text=True,
                          timeout=120, stdin=stdin)


def one_line_error(res, *words):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def real_gz(tmp_path_factory):
    from support import REAL_XENTRACE, require_shared
    real = require_shared(REAL_XENTRACE)
    gz = tmp_path_factory.mktemp("gz") / "real.bin.gz"
    gz.write_bytes(gzip.compress(real.read_bytes(), compresslevel=6))
    return real, gz


def _doc(exe, *args, stdin=None):
    res = run(exe, "--format", "json", "--by", "vcpu,addr", *args, stdin=stdin)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def test_gzip_capture_reads_as_the_plain_one_from_a_file_and_a_pipe(iotrace_exe, real_gz):
    real, gz = real_gz
    plain, _ = _doc(iotrace_exe, real)
    packed, err = _doc(iotrace_exe, gz)
    assert err == "" and packed.pop("compressed") is True and plain.pop("compressed") is False
    assert packed == plain and sum(r["count"] for r in packed["io"]) == 105
    with open(gz, "rb") as fh:
        piped, _ = _doc(iotrace_exe, "-", stdin=fh)
    piped.pop("compressed")
    assert piped == plain


def test_gzip_members_one_after_the_other_and_zero_padding(iotrace_exe, real_gz, tmp_path):
    """gzip(1) reads concatenated members as one stream; zeros after the last are padding."""
    real, gz = real_gz
    two = tmp_path / "two.gz"
    two.write_bytes(gz.read_bytes() + gzip.compress(real.read_bytes()) + b"\0" * 512)
    doc, err = _doc(iotrace_exe, two)
    assert err == "" and sum(r["count"] for r in doc["io"]) == 210


def test_gzip_cut_short_keeps_what_came_before_with_warnings(iotrace_exe, real_gz, tmp_path):
    _, gz = real_gz
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gz.read_bytes()[:len(gz.read_bytes()) // 2])
    doc, err = _doc(iotrace_exe, cut)
    got = sum(r["count"] for r in doc["io"])
    assert 0 < got < 105
    warns = err.strip().splitlines()
    assert "gzip stream cut short after" in warns[0] and "were read" in warns[0]
    assert all(w.startswith(f"iotrace report: warning: {cut}: ") for w in warns)


def test_gzip_with_junk_after_it_warns_and_reads_the_stream(iotrace_exe, real_gz, tmp_path):
    _, gz = real_gz
    junk = tmp_path / "junk.gz"
    junk.write_bytes(gz.read_bytes() + b"not gzip\n")
    doc, err = _doc(iotrace_exe, junk)
    assert sum(r["count"] for r in doc["io"]) == 105
    assert f"data after the end of the gzip stream (from compressed byte offset " \
           f"{gz.stat().st_size}) ignored" in err


def test_corrupt_gzip_is_one_line(iotrace_exe, real_gz, tmp_path):
    _, gz = real_gz
    raw = bytearray(gz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.gz"
    bad.write_bytes(bytes(raw))
    one_line_error(run(iotrace_exe, bad), str(bad), "corrupt gzip data after")


def test_the_shared_boot_csv_says_what_it_is_and_what_is_read(iotrace_exe, linux_boot_csv):
    line = one_line_error(run(iotrace_exe, linux_boot_csv), str(linux_boot_csv),
                          "gzip-compressed CSV device-access log", "iotrace standin --replay",
                          ACCEPTS, "either of them gzip-compressed")
    assert "0x08088b1f" not in line


@pytest.mark.parametrize("content, words", [
    (b"t_us,vcpu,space,dir,addr,size,value,region\n0,0,pio,W,0x70,1,0x8f,rtc\n",
     ["not a xentrace capture nor an iotrace recording: a CSV device-access log"]),
    (b"hello, this is text\n" * 20, ["not a xentrace capture", ": text."]),
    (gzip.compress(b"hello\n"), ["gzip-compressed text"]),
    (gzip.compress(gzip.compress(b"x" * 100)), ["gzip-compressed twice"]),
    (gzip.compress(b""), ["gzip-compressed empty"]),
    (b"\x01\x02\x03\x04\x05\x06\x07\x08" * 10, ["data starting with 0x04030201",
                                                "TRC_TRACE_CPU_CHANGE, 0x2001f003"]),
])
def test_anything_else_is_one_line_naming_the_accepted_formats(tmp_path, iotrace_exe, content,
                                                                words):
    p = tmp_path / "input"
    p.write_bytes(content)
    one_line_error(run(iotrace_exe, p), str(p), ACCEPTS, *words)


def test_input_stream_api(tmp_path):
    p = tmp_path / "x.gz"
    payload = bytes(range(256)) * 5000
    p.write_bytes(gzip.compress(payload))
    with inputs.open_input_stream(str(p)) as src:
        assert src.gzip and src.head == payload[:inputs.SNIFF]
        rest = bytearray(len(payload))
        n = src.fh.readinto(rest)
        assert src.head + bytes(rest[:n]) == payload[:inputs.SNIFF + n]
        tail = src.fh.read()
        assert src.head + bytes(rest[:n]) + tail == payload and src.fh.read(10) == b""
    with pytest.raises(InputError, match="no such file"):
        inputs.open_input_stream(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="not a xentrace capture nor an iotrace recording"):
        summarize_capture(str(p))
