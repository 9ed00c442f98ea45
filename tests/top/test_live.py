"""``iotrace top --source qemu --binary STANDIN``: the live probes on a running stand-in device
model (what ``make demo`` shows). Needs root for the uprobes; CI runs it as root."""
from __future__ import annotations

import subprocess

import pytest

pytestmark = [pytest.mark.root, pytest.mark.integration]

DOMID = 41


def test_live_probes_on_a_standin(iotrace_exe):
    from iotrace.probes.standin import runner as sr
    exe = sr.build()
    with sr.StandIn(domid=DOMID, name="top-live", speed=1, loop=True) as s:
        assert s.running()
        r = subprocess.run([iotrace_exe, "top", "-b", "--source", "qemu", "--binary", str(exe),
                            "-D", str(DOMID), "-e", "vcpu", "0.7", "4"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    blocks = [b.splitlines() for b in r.stdout.strip("\n").split("\n\n")]
    assert len(blocks) == 4
    assert all(b[1].startswith("sources: qemu=up") and "probes=" in b[1] for b in blocks), \
        r.stdout
    doms = [[ln.split() for ln in b[3:] if ln.split()[1] == "top-live"] for b in blocks]
    assert all(len(d) == 1 for d in doms), r.stdout
    totals = [int(float(d[0][10].rstrip("k")) * (1000 if d[0][10].endswith("k") else 1))
              for d in doms]
    assert totals == sorted(totals) and totals[-1] > totals[0] > 0, r.stdout
    assert any(float(d[0][2].rstrip("k")) > 0 for d in doms[1:]), r.stdout
    # the stand-in serves synchronous requests with a vCPU: at least one vcpuN child row
    assert any(ln.split()[1].startswith("..vcpu") for b in blocks for ln in b[3:]), r.stdout


def test_live_view_in_tmux_as_demo_runs_it(iotrace_exe):
    """`make demo`'s command line, full screen in tmux: the stand-in's domain appears with
    rates, q quits with status 0 (and the probes are detached by stop())."""
    import shlex

    from iotrace.probes.standin import runner as sr
    from support.tmux import Tmux, table_rows
    exe = sr.build()
    with sr.StandIn(domid=DOMID + 1, name="top-tmux", speed=1, loop=True):
        t = Tmux(f"{shlex.quote(iotrace_exe)} top --source qemu --binary {shlex.quote(str(exe))}"
                 f" -D {DOMID + 1} 0.5")
        try:
            s = t.wait_for(lambda x: "top-tmux" in x and "REQ/s" in x and
                           table_rows(x) and table_rows(x)[0].split()[3][0].isdigit()
                           and float(table_rows(x)[0].split()[3].rstrip("k")) > 0,
                           timeout=60, what="live rates")
            assert "sources: qemu up" in s
            t.keys("q")
            t.wait_for(lambda x: "EXIT=0" in x, timeout=20, what="exit 0")
        finally:
            t.kill()


def test_without_root_a_live_source_is_one_clear_error(iotrace_exe):
    import shutil
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("runuser not installed")
    r = subprocess.run([runuser, "-u", "nobody", "--", iotrace_exe, "top", "-b", "--source",
                        "xentrace", "0.2", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("iotrace top: the xentrace source could not start without root")
    assert lines[0].endswith("or watch the host's 'iotrace serve' with --from URL")
