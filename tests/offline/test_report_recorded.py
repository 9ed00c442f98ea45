"""`iotrace report` on a real recording (root): two stand-in device models replaying the bundled
boot excerpt, recorded by `iotrace record` through real uprobes, then reported. The truth is
what the stand-ins say they issued (-truth) and the recording's own events (read with the
recording reader, not the report)."""
from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from iotrace.core.addrmap import AddressMap
from iotrace.core.events import TYPE_CODES
from iotrace.offline.recording import read_recording
from iotrace.probes.standin import runner as sr
from iotrace.probes.standin import stream as st
from support.procs import wait_line as _wait_line

pytestmark = [pytest.mark.root, pytest.mark.integration]
DOMS = {961: "web", 962: "db"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from support import REPO
    iotrace_exe = str(REPO / ".venv" / "bin" / "iotrace")
    tmp = tmp_path_factory.mktemp("recorded")
    subprocess.run(["make", "-s", "-C", str(sr.SRC_DIR), f"OUT={tmp}"], check=True)
    exe = str(tmp / "iotrace-standin")          # a private copy: no other test's uprobes
    out = tmp / "boot.iotrec"
    rec = subprocess.Popen([iotrace_exe, "record", "-o", str(out), "--binary", exe,
                            "--no-default-binaries"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_line(rec, "writing")
        stream = st.stream_for(sr.BUNDLED_STREAM)
        procs = [subprocess.Popen(sr.command(d, stream, exe=exe, name=n, speed=2.0,
                                             truth=tmp / f"{d}.json"),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for d, n in DOMS.items()]
        for p in procs:
            assert p.wait(60) == 0, p.stderr.read()
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=30)
        assert rec.returncode == 0, err
    finally:
        if rec.poll() is None:
            rec.kill()
    truth = Counter()
    amap = AddressMap.default()
    for d in DOMS:
        for r in json.loads((tmp / f"{d}.json").read_text())["io"]:
            truth[(r["domid"], amap.name(TYPE_CODES[r["type"]], r["addr"]))] += r["count"]
    ev = read_recording(out).events
    span = (int(ev["ts_ns"].max()) - int(ev["ts_ns"].min())) / 1e9
    return Path(out), truth, span


def _csv(exe, *args):
    res = subprocess.run([exe, "report", *map(str, args)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return list(csv.DictReader(io.StringIO(res.stdout)))


@pytest.mark.parametrize("flags, doms", [([], set(DOMS)), (["-D", "web"], {961}),
                                         (["-D", "962"], {962})])
def test_busiest_five_ranges_of_a_recording(recorded, iotrace_exe, flags, doms):
    path, truth, span = recorded
    want = sorted(((k, n) for k, n in truth.items() if k[0] in doms), key=lambda kv: -kv[1])
    total = sum(n for _, n in want)
    rows = _csv(iotrace_exe, "--by", "range", "--top", "5", "--format", "csv", *flags, path)
    assert len(rows) == 5
    assert [int(r["count"]) for r in rows] == [n for _, n in want[:5]]
    for r in rows:
        key = (int(r["domid"]), r["range"])
        assert r["domain"] == DOMS[key[0]] and truth[key] == int(r["count"])
        assert float(r["rate_per_second"]) == pytest.approx(truth[key] / span, rel=1e-9)
        assert float(r["share"]) == pytest.approx(truth[key] / total, rel=1e-12)
        assert int(r["bytes"]) >= int(r["count"])             # sizes known: size x count
        assert 0 < int(r["service_count"]) <= int(r["count"])


def test_hist_of_a_recording(recorded, iotrace_exe):
    path, _, _ = recorded
    res = subprocess.run([iotrace_exe, "report", "--hist", "--top", "3", "-D", "web", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    blocks = res.stdout.split("powers of two of ns):\n")[1].strip().split("\n\n")
    assert len(blocks) == 3
    for b in blocks:
        head, label, *bars = b.strip().splitlines()
        timed = int(head.split(" timed:")[0].rsplit(", ", 1)[1])
        assert head.startswith("web ") and " min " in head and " max " in head
        assert label.split() == ["service", "time", ":", "count", "distribution"]
        assert sum(int(x.split(" : ")[1].split()[0]) for x in bars) == timed
        assert any("*" * 40 in x for x in bars)
