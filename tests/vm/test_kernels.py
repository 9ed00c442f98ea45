"""The kernel matrix (issue #16): every BPF program of the project, in every mode, loaded on the
kernels Dom0s run and on the host's, attached to a stand-in device model, counting exactly what the
stand-in says it served.

Kernels: Debian 12's 6.1 (bookworm's linux-image-amd64: the Dom0 kernel of Xen 4.17 hosts) and
Debian 13's 6.12 (trixie's), each booted under QEMU TCG from an image of its suite with its own
headers and BCC (vm.image.SPECS); and the host's kernel, where the same script runs directly.
guest/probe_matrix.py runs every case once per kernel (BCC compiles each program once: tens of
seconds each under TCG) and reports what each counted; the tests below compare, case by case.

    make test-kernels        # IOTRACE_VM=1 pytest tests/vm (see tests/vm/README.md for timings)
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from support import REPO
from vm.guest.probe_matrix import CASES
from vm.report import COSTS

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.timeout(3600)]

KERNELS = ["bookworm", "trixie", "host"]
MATRIX_TIMEOUT = 2400      # seconds for all cases in one guest (TCG; ~10 compiles)


@pytest.fixture(scope="module", params=KERNELS)
def matrix(request, guests):
    """The probe matrix's report on one kernel (run once per kernel)."""
    kernel = request.param
    t0 = time.monotonic()
    if kernel == "host":
        r = subprocess.run([sys.executable, str(REPO / "tests/vm/guest/probe_matrix.py"),
                            str(REPO)], capture_output=True, text=True, timeout=MATRIX_TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        out, boot = r.stdout, 0.0
    else:
        m = guests.get(kernel)
        boot = m.boot_seconds
        r = m.check(["python3", "/mnt/harness/probe_matrix.py", "/mnt/project"],
                    timeout=MATRIX_TIMEOUT)
        out = r.stdout
        m.shutdown()
    report = json.loads(out)
    report["boot_seconds"] = boot
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    COSTS.append(f"{kernel}: kernel {report['kernel']}, bcc {report['bcc']}: matrix "
                 f"{report['seconds']} s (all: {report['wall_seconds']} s); load+verify per "
                 "case: " + ", ".join(f"{c['case']} {c['load_seconds']}"
                                      for c in report["cases"]))
    return report


def case_of(report, name):
    found = [c for c in report["cases"] if c["case"] == name]
    assert found, f"case {name} missing from the report"
    return found[0]


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_case_loads_attaches_and_counts_exactly(matrix, name):
    c = case_of(matrix, name)
    assert c["ok"], f"{matrix['kernel']}: {name}: {c['error']}\n{c.get('traceback', '')}"
    want = Counter({tuple(k[:-1]): k[-1] for k in c["want"]})
    got = Counter({tuple(k[:-1]): k[-1] for k in c["got"]})
    assert sum(want.values()) > 0
    assert got == want, f"{matrix['kernel']}: {name}: counts per {c['key']} differ"
    f = c["facts"]
    if name == "refused":
        # one line with this kernel's verdict; nothing left attached
        assert f["up"] is False and f["attached"] == 0 and f["failed"] == 1, f
        assert len(f["failures"]) == 1 and "\n" not in f["error"]
        assert "the kernel refused on_return" in f["error"] and "verifier: " in f["error"], f
        return
    if c["program"] != "ioreq.bpf.c":
        return
    assert f["counters"] == {"lost_events": 0, "stats_full": 0, "read_errors": 0, "no_entry": 0}
    assert f["attached"] == (2 if c["timing"] else 1) and f["failed"] == 0
    if c["buffered_caller"]:
        assert f["up"] is True and f["lost"] == 0 and f["decode_errors"] == 0
        # buffered requests (vcpu -1) are told apart by their caller on this kernel too
        assert any(k[0] == -1 for k in want)
    if c["mode"] == "metrics":
        if c["timing"]:
            assert f["service_n_equals_count"] and f["service_n_total"] == sum(want.values())
            if "hist_sum_equals_count" in f:
                assert f["hist_sum_equals_count"] and f["service_sum_ns"] > 0
        else:
            assert f["service_n_total"] == 0
    else:
        assert f["events"] == sum(want.values())
        assert f["service_all_positive"] if c["timing"] else f["service_all_unknown"]
