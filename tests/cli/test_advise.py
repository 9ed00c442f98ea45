"""``iotrace advise`` as an operator runs it: one-line errors, the labelled scenarios replayed on
their own clock, --rollback, and (root) --apply cgroup live on real device-model processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from iotrace.analysis import scenarios as SC
from iotrace.cli.main import main
from support.scenarios import first_changes, scenario_file, settings_file


def advise(*args, capsys):
    rc = main(["advise", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args,words", [
    (["--apply", "cgroup", "--replay", "x.iotrec"], "needs a live source"),
    (["--apply", "xl", "--from", "http://h:9878"], "needs a live source"),
    (["--speed", "2"], "--speed only applies with --replay"),
    (["--dry-run"], "--dry-run goes with --rollback"),
    (["--binaries-only"], "needs --binary"),
    (["--audit", "a.jsonl"], "--audit goes with --apply"),
    (["--replay", "x", "--source", "qemu"], "exclusive"),
    (["--knob", "xl", "--apply", "cgroup"], "disagree"),
    (["--allow-caps", "--knob", "cgroup"], "xl knob only"),
    (["10", "--interval", "20"], "disagree"),
    (["--rollback", "a.jsonl", "--apply", "xl"], "does not go with it"),
    (["--apply", "xl"], "not a Xen Dom0"),
])
def test_mistakes_are_one_line(args, words, capsys):
    if "not a Xen Dom0" in words and os.path.exists("/proc/xen"):
        pytest.skip("a real Dom0")
    rc, out, err = advise(*args, capsys=capsys)
    assert rc == 2 and words in err and err.count("\n") == 1, err
    assert err.startswith("iotrace advise: ")


def test_bad_config_is_file_line_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("advise:\n  thresholds:\n    io_wait: 7\n")
    rc, _, err = advise("--replay", scenario_file("idle"), "--config", cfg, capsys=capsys)
    assert rc == 2 and f"{cfg}:3: advise.thresholds.io_wait: expected 0..1" in err


def test_replay_of_a_missing_or_bad_file(tmp_path, capsys):
    rc, _, err = advise("--replay", tmp_path / "none.iotrec", capsys=capsys)
    assert rc == 2 and "no such file" in err
    bad = tmp_path / "bad.iotrec"
    bad.write_bytes(b"\x89IOTREC\n" + b"\0" * 40)
    rc, _, err = advise("--replay", bad, capsys=capsys)
    assert rc == 2 and str(bad) in err and err.count("\n") == 1


@pytest.mark.parametrize("knob", ["xl", "cgroup"])
@pytest.mark.parametrize("name", list(SC.SCENARIOS))
def test_scenarios_replayed_offline(name, knob, capsys):
    rc, out, _ = advise("--replay", scenario_file(name), "--config", settings_file(),
                        "--knob", knob, "--format", "json", capsys=capsys)
    assert rc == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == SC.SCENARIOS[name].intervals
    first = first_changes(docs)
    want = SC.SCENARIOS[name].expected[knob]
    assert {d: ("up" if c["new"] > c["current"] else "down") for d, (_, c) in first.items()} == want
    assert not any(d["applied"] for d in docs)


def test_text_output_explains_the_plan(capsys):
    rc, out, _ = advise("--replay", scenario_file("storming"), "--config", settings_file(),
                        "--knob", "cgroup", "-d", "noisy", "5", "16", capsys=capsys)
    assert rc == 0
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 16
    assert all("web" not in b for b in blocks)                   # -d: only noisy (and Dom0)
    last = blocks[-1]
    assert "noisy" in last and "storming" in last
    assert "plan (dry run, nothing changed" in last and "--apply cgroup to act" in last
    assert "cgroup cpu.weight 100 -> 50 (target 25, original 100)" in last
    assert "held: noisy" in blocks[-4] and "for 1 of 3 intervals" in blocks[-4]


def test_rollback_of_nothing_and_dry_run(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, out, _ = advise("--rollback", empty, capsys=capsys)
    assert rc == 0 and "nothing to restore" in out
    audit = tmp_path / "a.jsonl"
    audit.write_text(json.dumps({"v": 1, "action": "set", "knob": "cgroup-weight", "domid": 7,
                                 "domain": "web", "identity": "dm:1:2", "old": 100, "new": 50,
                                 "original": 100, "cgroup": {"pid": 1, "start_ticks": 2}}) + "\n")
    rc, out, _ = advise("--rollback", audit, "--dry-run", capsys=capsys)
    assert rc == 0 and "would restore web (domid 7, dm:1:2) cgroup-weight -> 100" in out
    assert audit.read_text().count("\n") == 1                   # a dry run writes nothing
    rc, _, err = advise("--rollback", tmp_path / "missing.jsonl", capsys=capsys)
    assert rc == 2 and "no such file" in err


def test_rollback_of_xl_changes_off_a_dom0_fails_clearly(tmp_path, capsys):
    if os.path.exists("/proc/xen"):
        pytest.skip("a real Dom0")
    audit = tmp_path / "xl.jsonl"
    audit.write_text(json.dumps({"v": 1, "action": "set", "knob": "xl-weight", "domid": 3,
                                 "domain": "web", "identity": "uuid:u", "uuid": "u", "old": 256,
                                 "new": 128, "original": 256}) + "\n")
    rc, out, _ = advise("--rollback", audit, capsys=capsys)
    assert rc == 1 and "NOT restored web (domid 3, uuid:u) xl-weight -> 256" in out
    assert "not a Xen Dom0" in out


# -- live, as root: stand-in device models, the real probes, the real cgroups ------------------

CPU_V1 = "/sys/fs/cgroup/cpu"


def _stream(path, warm_s=12.0, warm_rate=200, storm=400_000):
    """A guest that behaves for ``warm_s`` seconds, then storms (as fast as it can be served)."""
    from iotrace.probes.standin import stream as st
    n = int(warm_s * warm_rate)
    t = (np.arange(n) * (1e9 / warm_rate)).astype(np.uint64)
    t = np.concatenate([t, np.full(storm, t[-1] + 1, dtype=np.uint64)])
    r = np.zeros(len(t), dtype=st.REQ_DTYPE)
    r["t_ns"], r["vcpu"], r["type"], r["dir"], r["size"], r["count"] = t, 0, 0, 0, 1, 1
    r["addr"] = 0x3F8
    st.write_stream(path, r)
    return path


def cpu_path(pid):
    for line in open(f"/proc/{pid}/cgroup"):
        _, ctrls, path = line.rstrip("\n").split(":", 2)
        if "cpu" in ctrls.split(","):
            return path


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.slow
def test_apply_cgroup_live_then_rollback(tmp_path, iotrace_exe):
    if not os.path.isfile(os.path.join(CPU_V1, "cpu.shares")):
        pytest.skip("no cgroup v1 cpu hierarchy on this host")
    from iotrace.probes.standin import runner as sr
    base = 6000 + os.getpid() % 1000
    cfg = tmp_path / "advise.yaml"
    cfg.write_text("advise:\n  interval: 1\n  agree_intervals: 2\n  min_history_seconds: 6\n"
                   "  thresholds:\n    storm_min_rate: 1000\n    storm_dm_cpu: 0.05\n")
    audit = tmp_path / "audit.jsonl"
    stormer = sr.StandIn(base + 1, _stream(tmp_path / "storm.stream"), name="stormer", speed=1,
                         hold=True, die_with_parent=True)
    calm = sr.StandIn(base + 2, name="calm", speed=1, loop=True, die_with_parent=True)
    with stormer, calm:
        home = cpu_path(stormer.pid)
        proc = subprocess.run(
            [iotrace_exe, "advise", "1", "22", "--apply", "cgroup", "--audit", str(audit),
             "--config", str(cfg), "--binary", str(stormer.exe), "--binaries-only",
             "-d", f"{base + 1},{base + 2}",
             "--format", "json"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        docs = [json.loads(line) for line in proc.stdout.splitlines()]
        sets = [r for d in docs for r in d["audit"] if r["action"] == "set"]
        storm = [r for r in sets if r["domain"] == "stormer"]
        # down in two x1/2 steps while it storms; once its stream is served (it then idles),
        # back up towards its original, never past it
        steps = [(r["old"], r["new"]) for r in storm]
        assert steps[:2] == [(100, 50), (50, 25)], sets
        assert all(old < new <= 100 for old, new in steps[2:]), steps
        assert storm[0]["settled"] == "storming" and storm[0]["cgroup"]["created"]
        group = storm[0]["cgroup"]["dir"]
        assert open(os.path.join(group, "cpu.shares")).read().strip() == \
            str(storm[-1]["cgroup"]["raw_new"])
        assert cpu_path(stormer.pid).endswith(os.path.basename(group))
        assert "--rollback" in proc.stderr and "stay in place" in proc.stderr
        # the audit log holds what the output said, and rollback undoes it
        assert [r["new"] for r in json.loads("[" + ",".join(audit.read_text().split("\n")[:-1])
                                             + "]") if r["action"] == "set"] == \
            [r["new"] for r in sets]
        back = subprocess.run([iotrace_exe, "advise", "--rollback", str(audit)],
                              capture_output=True, text=True, timeout=60)
        assert back.returncode == 0, back.stderr
        assert "restored stormer" in back.stdout
        assert cpu_path(stormer.pid) == home and not os.path.exists(group)
        assert '"action": "rollback"' in audit.read_text()


@pytest.mark.root
def test_apply_cgroup_needs_root_to_say_so():
    """Without root, --apply cgroup stops before starting anything (as root it would run)."""
    code = ("import os, sys; os.setuid(65534); from iotrace.cli.main import main; "
            "sys.exit(main(['advise', '--apply', 'cgroup', '1', '1']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--apply cgroup needs root" in res.stderr
    assert time.monotonic() > 0


def _recording(path, seconds=20, rate=400):
    """Two domains' synchronous port I/O over ``seconds``, 50 us each."""
    from iotrace.core import events as ev
    from iotrace.offline.recording import RecordingWriter
    n = seconds * rate
    b = ev.empty(n)
    b["ts_ns"] = np.linspace(0, seconds * 1e9, n, endpoint=False).astype(np.int64)
    b["domid"] = np.where(np.arange(n) % 4 == 0, 4, 3)
    b["vcpu"], b["type"], b["addr"], b["size"], b["service_ns"] = 0, ev.TYPE_PIO, 0x3F8, 1, 50_000
    with RecordingWriter(str(path), {"source": "qemu", "domains": {3: "web", 4: "db"}}) as w:
        w.write(b)
    return path


@pytest.mark.integration
def test_replay_through_the_live_pipeline_with_speed(tmp_path, iotrace_exe):
    rec = _recording(tmp_path / "two.iotrec")
    res = subprocess.run([iotrace_exe, "advise", "1", "3", "--replay", str(rec), "--speed", "1",
                          "--knob", "xl", "--format", "json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(docs) == 3
    web = next(r for r in docs[-1]["domains"] if r["domain"] == "web")
    # 300 req/s of 50 us on one vCPU: waits 1.5% of its time
    assert web["signals"]["rate"] == pytest.approx(300, rel=0.25)
    assert web["signals"]["io_wait_ratio"] == pytest.approx(0.015, rel=0.3)
    assert all(not d["changes"] for d in docs)


@pytest.mark.integration
def test_from_a_remote_exporter(tmp_path, iotrace_exe):
    from support.prometheus import free_port
    rec = _recording(tmp_path / "two.iotrec", seconds=60)
    port = free_port()
    serve = subprocess.Popen([iotrace_exe, "serve", "--replay", str(rec), "--speed", "1",
                              "--web.listen-address", f"127.0.0.1:{port}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "iotrace serve did not come up"
                time.sleep(0.2)
        res = subprocess.run([iotrace_exe, "advise", "2", "2", "--from",
                              f"http://127.0.0.1:{port}/metrics", "--knob", "cgroup",
                              "--format", "json"], capture_output=True, text=True, timeout=60)
    finally:
        serve.terminate()
        serve.wait(timeout=10)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    names = {r["domain"] for r in docs[-1]["domains"]}
    assert names == {"web", "db"}
    web = next(r for r in docs[-1]["domains"] if r["domain"] == "web")
    assert web["signals"]["rate"] == pytest.approx(300, rel=0.3)
    # the remote page's histograms have no vCPU: every request's service time counts
    assert web["signals"]["io_wait_ratio"] == pytest.approx(0.015, rel=0.5)


@pytest.mark.integration
@pytest.mark.parametrize("verb", ["advise", "top"])
def test_sigint_stops_it_even_when_started_with_sigint_ignored(tmp_path, iotrace_exe, verb):
    """``iotrace advise ... &`` from a script (or nohup) starts with SIGINT ignored; ``kill -INT``
    must stop it all the same (found in Dom0: advise ran on for a minute after SIGINT)."""
    import signal
    rec = _recording(tmp_path / "two.iotrec")
    extra = ["--knob", "xl", "--format", "json"] if verb == "advise" else ["-b"]
    proc = subprocess.Popen([iotrace_exe, verb, "1", "--replay", str(rec), "--speed", "0.01",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        first = proc.stdout.readline()              # it runs: one interval printed
        assert first.strip(), proc.stderr.read() if proc.poll() is not None else "no output"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc in (0, 130), proc.stderr.read()
