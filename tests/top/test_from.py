"""``iotrace top --from URL``: the metrics client, unit-tested on a page and run against a real
``iotrace serve`` (plain http, and https with basic auth through --web.config.file)."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import bcrypt
import numpy as np
import pytest

from iotrace.core import events
from iotrace.core.aggregate import N_SLOTS, SLOT_LOWER_NS, Key, hist_quantile_ns
from iotrace.core.errors import UserError
from iotrace.core.metrics import BUCKET_BOUNDS_NS, BUCKET_BOUNDS_SECONDS
from iotrace.offline.recording import RecordingWriter
from iotrace.sources.remote import (
    DIR_ANY,
    RemoteError,
    RemoteSource,
    buckets_to_hist,
    le_slot,
    parse_metrics,
    redact,
    split_auth,
)
from support import require_tool

PAGE = """\
# HELP iotrace_ioreqs_total I/O requests
# TYPE iotrace_ioreqs_total counter
iotrace_ioreqs_total{dir="write",domain="web",domid="3",range="com1",source="qemu",type="pio",vcpu="0"} 120.0
iotrace_ioreqs_total{dir="read",domain="web",domid="3",range="ide-primary",source="qemu",type="pio",vcpu="1"} 30.0
iotrace_ioreqs_total{dir="write",domain="web",domid="3",range="vga-lowmem",source="qemu",type="mmio",vcpu="-1"} 7.0
iotrace_ioreqs_total{dir="read",domain="web",domid="3",range="com1",source="xentrace",type="pio",vcpu="0"} 999.0
# HELP iotrace_ioreq_bytes_total bytes
# TYPE iotrace_ioreq_bytes_total counter
iotrace_ioreq_bytes_total{dir="write",domain="web",domid="3",range="com1",source="qemu",type="pio",vcpu="0"} 120.0
iotrace_ioreq_bytes_total{dir="read",domain="web",domid="3",range="ide-primary",source="qemu",type="pio",vcpu="1"} 60.0
# HELP iotrace_ioreq_service_seconds service time
# TYPE iotrace_ioreq_service_seconds histogram
iotrace_ioreq_service_seconds_bucket{domain="web",domid="3",le="1.024e-06",range="com1",source="qemu",type="pio"} 0.0
iotrace_ioreq_service_seconds_bucket{domain="web",domid="3",le="4.096e-06",range="com1",source="qemu",type="pio"} 0.0
iotrace_ioreq_service_seconds_bucket{domain="web",domid="3",le="1.6384e-05",range="com1",source="qemu",type="pio"} 100.0
iotrace_ioreq_service_seconds_bucket{domain="web",domid="3",le="6.5536e-05",range="com1",source="qemu",type="pio"} 120.0
iotrace_ioreq_service_seconds_bucket{domain="web",domid="3",le="+Inf",range="com1",source="qemu",type="pio"} 120.0
iotrace_ioreq_service_seconds_count{domain="web",domid="3",range="com1",source="qemu",type="pio"} 120.0
iotrace_ioreq_service_seconds_sum{domain="web",domid="3",range="com1",source="qemu",type="pio"} 0.0012
# HELP iotrace_domain_info domains
# TYPE iotrace_domain_info gauge
iotrace_domain_info{domain="web",domid="3",source="qemu"} 1.0
iotrace_domain_info{domain="idle7",domid="7",source="qemu"} 1.0
# TYPE iotrace_source_up gauge
iotrace_source_up{source="qemu"} 1.0
iotrace_source_up{source="xentrace"} 0.0
# TYPE iotrace_events_lost_total counter
iotrace_events_lost_total{source="qemu"} 5.0
iotrace_events_lost_total{source="xentrace"} 2.0
# TYPE iotrace_probes_attached gauge
iotrace_probes_attached{domain="web",domid="3",source="qemu"} 2.0
"""


def test_parse_page_into_keys_and_cells():
    p = parse_metrics(PAGE)
    assert p.source == "qemu"                                  # qemu preferred over xentrace
    assert p.sources == {"qemu": True, "xentrace": False}
    k1 = Key(3, 0, events.TYPE_PIO, events.DIR_WRITE, "com1", 0)
    k2 = Key(3, 1, events.TYPE_PIO, events.DIR_READ, "ide-primary", 0)
    k3 = Key(3, -1, events.TYPE_MMIO, events.DIR_WRITE, "vga-lowmem", 0)
    ks = Key(3, -1, events.TYPE_PIO, DIR_ANY, "com1", 0)       # service-only cell
    assert set(p.totals) == {k1, k2, k3, ks}
    assert (p.totals[k1].count, p.totals[k1].bytes) == (120, 120)
    assert (p.totals[k2].count, p.totals[k2].bytes) == (30, 60)
    svc = p.totals[ks]
    assert (svc.count, svc.service_n, svc.service_sum_ns) == (0, 120, 1_200_000)
    assert int(svc.hist.sum()) == 120
    # an older exporter's buckets (every second power of two) read as well: 100 in
    # (4.096, 16.384] us, 20 in (16.4, 65.5] us, spread over the slots in between
    lo = SLOT_LOWER_NS
    assert svc.hist[(lo >= 4096) & (lo < 16384)].sum() == 100
    assert svc.hist[(lo >= 16384) & (lo < 65536)].sum() == 20
    p50 = hist_quantile_ns(svc.hist, 0.5)
    assert 4096 <= p50 <= 16384
    assert {d: i.name for d, i in p.domains.items()} == {3: "web", 7: "idle7"}
    assert p.domains[3].probes_attached == 2
    assert p.lost == {"qemu": 5, "xentrace": 2}
    x = parse_metrics(PAGE, source="xentrace")
    assert [c.count for c in x.totals.values()] == [999]


def test_bucket_conversion():
    for le in BUCKET_BOUNDS_SECONDS:                 # every exported bound starts a slot
        assert SLOT_LOWER_NS[le_slot(le)] == round(le * 1e9)
    h = np.array(buckets_to_hist([(1.024e-06, 3), (1.28e-06, 5), (4.096e-06, 9),
                                  (float("inf"), 12)]))
    lo = SLOT_LOWER_NS
    assert h[lo < 1024].sum() == 3 and h[lo >= 4096].sum() == 3 and h.sum() == 12
    assert h[(lo >= 1024) & (lo < 1280)].tolist() == [1, 1]       # two slots of 128 ns
    mid = h[(lo >= 1280) & (lo < 4096)]
    assert mid.sum() == 4 and mid.max() == 1                       # spread, never piled up
    assert h[lo >= 4096][0] == 3                                   # +Inf: the slot above
    assert buckets_to_hist([]) == [0] * N_SLOTS


def test_remote_quantiles_within_half_from_1us_to_1ms():
    """The exporter's buckets read back: p50/p95 within 50% of the exact ones (module doc)."""
    rng = np.random.default_rng(11)
    for median in (1_500, 6_200, 40_000, 300_000):
        ns = rng.lognormal(np.log(median), 0.3, 20_000).astype(np.int64)
        ns = ns[(ns >= 1024) & (ns < 1 << 20)]
        cum = [(b / 1e9, int((ns < b).sum())) for b in BUCKET_BOUNDS_NS] + \
            [(float("inf"), len(ns))]
        hist = np.array(buckets_to_hist(cum))
        for q in (0.5, 0.95):
            exact = np.sort(ns)[int(np.ceil(q * len(ns))) - 1]
            assert abs(hist_quantile_ns(hist, q) - exact) <= 0.5 * exact, (median, q)


@pytest.mark.parametrize("text, message", [
    ("this is { not prometheus", "not a Prometheus text page"),
    ("# TYPE node_load1 gauge\nnode_load1 0.5\n", "not an iotrace exporter"),
])
def test_wrong_pages(text, message):
    with pytest.raises(RemoteError, match=message):
        parse_metrics(text)


def test_unknown_source_names_the_known_ones():
    with pytest.raises(RemoteError, match=r"no source 'replay' \(it has: qemu, xentrace\)"):
        parse_metrics(PAGE, source="replay")


def test_url_credentials(tmp_path):
    url, cred = split_auth("https://ops:s%40cret@dom0:9878/metrics", None)
    assert (url, cred) == ("https://dom0:9878/metrics", "ops:s@cret")
    assert split_auth("http://dom0:9878", "a:b") == ("http://dom0:9878/metrics", "a:b")
    f = tmp_path / "cred"
    f.write_text("prom:pw\n")
    assert split_auth("http://h:1/metrics", f"@{f}")[1] == "prom:pw"
    with pytest.raises(UserError, match="USER:PASSWORD"):
        split_auth("http://h:1/metrics", "nopassword")
    assert redact("https://ops:secret@dom0:9878/metrics") == "https://ops:***@dom0:9878/metrics"


def test_unreachable_endpoint_is_one_line_then_down_later():
    port = free_port()
    src = RemoteSource(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with pytest.raises(RemoteError, match="Connection refused"):
        src.start()
    src.scrape()                                             # later failures: down, no raise
    st = src.stats()
    assert not st.up and "Connection refused" in st.error


# -- against a real `iotrace serve` ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recording(path, n=1000, spacing_ns=0):
    b = events.empty(n)
    b["ts_ns"] = np.arange(n) * spacing_ns
    b["domid"], b["vcpu"], b["type"], b["addr"] = 6, np.arange(n) % 2, events.TYPE_PIO, 0x3f8
    b["dir"], b["size"], b["service_ns"] = events.DIR_WRITE, 1, 8_000
    b["dir"][: n // 4] = events.DIR_READ
    with RecordingWriter(path, {"source": "qemu", "domains": {6: "remote-dom"}}) as w:
        w.write(b)


class Serve:
    def __init__(self, exe, *args, scheme="http", ca=None, auth=None):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}/metrics"
        self.proc = subprocess.Popen([exe, "serve", "--web.listen-address",
                                      f"127.0.0.1:{self.port}", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                    self.stop()
                    pytest.fail(f"iotrace serve did not come up: {err}")
                time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve(iotrace_exe):
    started = []

    def start(*args, **kw):
        s = Serve(iotrace_exe, *args, **kw)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def batch_rows(out: str) -> list[list[list[str]]]:
    tables = []
    for block in out.strip("\n").split("\n\n"):
        lines = block.splitlines()
        tables.append([ln.split() for ln in lines[3:]])
    return tables


@pytest.mark.integration
def test_from_a_real_exporter_matches_the_replay(iotrace_exe, serve, tmp_path):
    rec = tmp_path / "r.iotrec"
    write_recording(rec)
    s = serve("--replay", str(rec), "--speed", "0")
    r = subprocess.run([iotrace_exe, "top", "-b", "--from", s.url, "-e", "vcpu,range", "0.3",
                        "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    local = subprocess.run([iotrace_exe, "top", "-b", "--replay", str(rec), "--speed", "0",
                            "-e", "vcpu,range", "0.3", "1"], capture_output=True, text=True,
                           timeout=60)
    remote_rows = batch_rows(r.stdout)[-1]
    local_rows = batch_rows(local.stdout)[0]
    # ID NAME ... REQS(10) BYTES(11): identical totals per domain, vCPU and range.
    pick = lambda rows: [(x[0], x[1], x[10], x[11]) for x in rows]  # noqa: E731
    assert pick(remote_rows) == pick(local_rows)
    assert pick(remote_rows)[0] == ("6", "remote-dom", "1000", "1000")
    assert f"replay@127.0.0.1:{s.port}=up events=1000 lost=0" in r.stdout


@pytest.mark.integration
def test_from_gives_rates_of_a_replay_in_progress(iotrace_exe, serve, tmp_path):
    rec = tmp_path / "slow.iotrec"
    write_recording(rec, n=400, spacing_ns=5_000_000)        # 2 s of events, 200/s
    s = serve("--replay", str(rec), "--speed", "1")
    r = subprocess.run([iotrace_exe, "top", "-b", "--from", s.url, "0.5", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rates = [float(t[0][2]) for t in batch_rows(r.stdout) if t]
    assert max(rates) >= 80, r.stdout                         # about 200/s while it runs
    p95 = [float(t[0][8]) for t in batch_rows(r.stdout) if t and float(t[0][2]) > 0]
    assert p95 and all(1 <= x <= 100 for x in p95), r.stdout  # ~8 us (P95us), from the remote histogram


@pytest.mark.integration
def test_from_https_with_basic_auth(iotrace_exe, serve, tmp_path):
    openssl = require_tool("openssl")
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(crt), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    pw_hash = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  ops: '{pw_hash}'\n")
    rec = tmp_path / "r.iotrec"
    write_recording(rec, n=50)
    s = serve("--replay", str(rec), "--web.config.file", str(web), scheme="https")
    host = f"127.0.0.1:{s.port}"

    def top(*args):
        return subprocess.run([iotrace_exe, "top", "-b", *args, "0.2", "1"],
                              capture_output=True, text=True, timeout=60)
    good, wrong = tmp_path / "good.auth", tmp_path / "wrong.auth"
    good.write_text("ops:s3cret\n")
    wrong.write_text("ops:badpw\n")
    ok = top("--from", f"https://{host}/metrics", "--from-auth", f"@{good}", "--from-ca", str(crt))
    assert ok.returncode == 0, ok.stderr
    assert batch_rows(ok.stdout)[0][0][10] == "50"
    # from the environment: nothing on the command line
    ok2 = subprocess.run([iotrace_exe, "top", "-b", "--from", f"https://{host}/metrics",
                          "--from-ca", str(crt), "0.2", "1"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "IOTRACE_FROM_AUTH": "ops:s3cret"})
    assert ok2.returncode == 0 and batch_rows(ok2.stdout)[0][0][10] == "50", ok2.stderr
    for args, message in (
            (["--from", f"https://{host}/metrics", "--from-auth", f"@{wrong}", "--from-ca",
              str(crt)], "HTTP 401"),
            (["--from", f"https://{host}/metrics", "--from-auth", f"@{good}"], "--from-ca"),
            (["--from", f"https://{host}/metrics", "--from-ca", str(tmp_path / "no.pem")],
             "no such file"),
            # a password where ps shows it is refused, before anything is sent
            (["--from", f"https://{host}/metrics", "--from-auth", "ops:s3cret"], "shows in ps"),
            (["--from", f"https://ops:s3cret@{host}/metrics", "--from-ca", str(crt)],
             "no password in the URL")):
        bad = top(*args)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], bad.stderr
        assert "s3cret" not in bad.stderr and "badpw" not in bad.stderr


def test_page_without_vcpu_label():
    page = "\n".join(ln.replace(',vcpu="0"', "").replace(',vcpu="1"', "").replace(',vcpu="-1"', "")
                     for ln in PAGE.splitlines()) + "\n"
    p = parse_metrics(page)
    assert not p.vcpu_label
    assert {k.vcpu for k in p.totals} == {-1}
    assert parse_metrics(PAGE).vcpu_label


@pytest.mark.integration
def test_from_an_exporter_without_vcpu_label(iotrace_exe, serve, tmp_path):
    rec = tmp_path / "r.iotrec"
    write_recording(rec, n=100)
    cfg = tmp_path / "iotrace.yaml"
    cfg.write_text("exporter:\n  vcpu_label: false\n")
    s = serve("--replay", str(rec), "--config", str(cfg))
    r = subprocess.run([iotrace_exe, "top", "-b", "--from", s.url, "0.2", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    row = batch_rows(r.stdout)[0][0]
    assert (row[1], row[10], row[13]) == ("remote-dom", "100", "-")   # NAME REQS VCPUS
