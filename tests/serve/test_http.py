"""The exporter's HTTP(S) server and the `iotrace serve` command line.

TLS and basic auth are exercised with a real HTTPS client (urllib + ssl) against certificates made
by the openssl CLI; the CLI tests run the installed `iotrace` program.
"""
from __future__ import annotations

import base64
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
from prometheus_client import CollectorRegistry

from iotrace.core.errors import UserError
from iotrace.core.events import TYPE_PIO, empty
from iotrace.serve.collector import IotraceCollector
from iotrace.serve.server import ExporterServer, parse_listen_address
from iotrace.serve.webconfig import load_web_config
from support import require_tool
from support.fakes import FedSource
from support.prometheus import free_port, self_signed_cert, wait_http

PASSWORD = "correct horse"


def make_source(n=3):
    s = FedSource()
    s.start()
    b = empty(n)
    b["domid"], b["vcpu"], b["type"], b["addr"], b["size"] = 2, 0, TYPE_PIO, 0x3f8, 1
    s.feed(b)
    return s


def make_server(web=None, addr="127.0.0.1:0", **kw):
    reg = CollectorRegistry()
    col = IotraceCollector([make_source()])
    reg.register(col)
    srv = ExporterServer(reg, addr, web, fast_text=col.render_text, **kw)
    srv.start()
    return srv


def get(url, auth=None, context=None, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(
            f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca = self_signed_cert(d / "ca", "iotrace-test-ca")
    server = self_signed_cert(d / "srv", "localhost", ca=ca)
    client = self_signed_cert(d / "cli", "scraper", ca=ca)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    return d, ca, server, client, hashed


def test_listen_address_parsing():
    assert parse_listen_address(":9878") == ("", 9878)
    assert parse_listen_address("127.0.0.1:1") == ("127.0.0.1", 1)
    assert parse_listen_address("[::1]:9878") == ("::1", 9878)
    for bad in ("9878", "host:x", "::1:80", "[::1]9878", "h:70000"):
        with pytest.raises(UserError):
            parse_listen_address(bad)


def test_landing_metrics_404_and_openmetrics():
    srv = make_server()
    try:
        code, hdr, body = get(srv.url + "/")
        assert code == 200 and b'href="/metrics"' in body
        code, hdr, body = get(srv.url + "/metrics")
        assert code == 200 and hdr["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b'iotrace_ioreqs_total{source="qemu",domain="dom2",domid="2",vcpu="0",' \
               b'type="pio",dir="write",range="com1"} 3' in body
        # Prometheus' own Accept header: it offers text/plain, and gets the fast text format
        prom_accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                       "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        code, hdr, _ = get(srv.url + "/metrics", headers={"Accept": prom_accept})
        assert hdr["Content-Type"].startswith("text/plain; version=0.0.4")
        code, hdr, body = get(srv.url + "/metrics",
                              headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert code == 200 and hdr["Content-Type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        assert get(srv.url + "/nope")[0] == 404
    finally:
        srv.shutdown()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match="address already in use"):
            make_server(addr=f"127.0.0.1:{port}")


def test_slow_client_does_not_block_scrapes():
    srv = make_server()
    try:
        # five clients connect and send half a request, then stall
        stalled = []
        for _ in range(5):
            c = socket.create_connection(("127.0.0.1", srv.port))
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled.append(c)
        t0 = time.monotonic()
        results = []
        threads = [threading.Thread(target=lambda: results.append(get(srv.url + "/metrics")[0]))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [200] * 8
        assert time.monotonic() - t0 < 5
        for c in stalled:
            c.close()
    finally:
        srv.shutdown()


def test_tls_and_basic_auth_with_real_https_client(tmp_path, tls_files):
    d, ca, (cert, key), _, hashed = tls_files
    cfg = tmp_path / "web.yml"
    cfg.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    srv = make_server(load_web_config(str(cfg)))
    try:
        assert srv.url.startswith("https://")
        url = f"https://localhost:{srv.port}/metrics"
        ctx = ssl.create_default_context(cafile=str(ca[0]))       # verifies the server cert
        code, hdr, body = get(url, ("prometheus", PASSWORD), ctx)
        assert code == 200 and b"iotrace_ioreqs_total" in body
        code, hdr, body = get(url, ("prometheus", "wrong"), ctx)
        assert code == 401 and hdr["WWW-Authenticate"].startswith("Basic")
        assert b"iotrace_" not in body
        assert get(url, None, ctx)[0] == 401
        assert get(url, ("nobody", PASSWORD), ctx)[0] == 401
        assert get(f"https://localhost:{srv.port}/", None, ctx)[0] == 401
        # plain HTTP to the TLS port gets nothing useful
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5).read()
        # still serving after the bad client
        assert get(url, ("prometheus", PASSWORD), ctx)[0] == 200
    finally:
        srv.shutdown()


def test_client_certificate_required(tmp_path, tls_files):
    d, ca, (cert, key), (ccert, ckey), _ = tls_files
    cfg = tmp_path / "web.yml"
    cfg.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"  client_auth_type: RequireAndVerifyClientCert\n"
                   f"  client_ca_file: {ca[0]}\n")
    srv = make_server(load_web_config(str(cfg)))
    try:
        url = f"https://localhost:{srv.port}/metrics"
        ctx = ssl.create_default_context(cafile=str(ca[0]))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(url, None, ctx)
        ctx.load_cert_chain(str(ccert), str(ckey))
        assert get(url, None, ctx)[0] == 200
    finally:
        srv.shutdown()


# -- the command line ----------------------------------------------------------------------------

def run_cli(exe, *args, timeout=60):
    if "--web.listen-address" not in args:
        args = (*args, "--web.listen-address", f"127.0.0.1:{free_port()}")
    return subprocess.run([exe, "serve", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,what", [
    (["--speed", "2"], "--speed only applies with --replay"),
    (["--replay", "/nonexistent.bin"], "no such file"),
    (["--replay", "X", "--source", "qemu"], "--replay excludes --source"),
    (["--web.listen-address", "nonsense"], "HOST:PORT"),
])
def test_cli_bad_arguments_exit_2(iotrace_exe, args, what):
    r = run_cli(iotrace_exe, *args)
    assert r.returncode == 2, r.stderr
    assert what in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_bad_config_and_web_config_exit_2(iotrace_exe, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("exporter:\n  domain_grace_seconds: soon\n")
    r = run_cli(iotrace_exe, "--config", str(cfg), "--replay", "/nonexistent")
    assert r.returncode == 2 and f"{cfg}:2: exporter.domain_grace_seconds:" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n  admin: plaintext\n")
    r = run_cli(iotrace_exe, "--web.config.file", str(web), "--replay", "/nonexistent")
    assert r.returncode == 2 and f"{web}:2: basic_auth_users.admin:" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_port_in_use_exit_2(iotrace_exe, real_xentrace):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli(iotrace_exe, "--replay", str(real_xentrace),
                    "--web.listen-address", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert "address already in use" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_replay_serves_then_stops_cleanly(iotrace_exe, real_xentrace, sig):
    port = free_port()
    p = subprocess.Popen([iotrace_exe, "serve", "--replay", str(real_xentrace),
                          "--web.listen-address", f"127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=30)
        code, _, body = get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        assert b'iotrace_source_up{source="replay"} 1' in body
        # scrapers hanging up mid-response (reset) must not disturb the server
        for _ in range(5):
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200)   # pipelined
            c.recv(1)          # responses are coming: hang up with them unread (reset)
            c.close()
        time.sleep(0.3)
        assert p.poll() is None, p.stderr.read()
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        p.send_signal(sig)
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "stopped" in err


def test_promtool_accepts_the_output(tmp_path):
    promtool = require_tool("promtool")
    srv = make_server()
    try:
        body = get(srv.url + "/metrics")[2]
    finally:
        srv.shutdown()
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _on_xen() -> bool:
    try:
        with open("/sys/hypervisor/type") as fh:
            return fh.read().strip() == "xen"
    except OSError:
        return False


@pytest.mark.integration
def test_cli_failed_source_is_down_but_served_or_fatal_when_strict(iotrace_exe):
    """No Xen hypervisor here: the real xentrace exits at once. Without --strict the exporter
    keeps serving with iotrace_source_up 0 and says why in the log; with --strict it exits."""
    require_tool("xentrace")
    if _on_xen():
        pytest.skip("running on Xen: xentrace would work")
    port = free_port()
    p = subprocess.Popen([iotrace_exe, "serve", "--source", "xentrace",
                          "--web.listen-address", f"127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body = get(f"http://127.0.0.1:{port}/metrics")[2]
            if b'iotrace_source_up{source="xentrace"} 0' in body:
                break
            time.sleep(0.2)
        assert b'iotrace_source_up{source="xentrace"} 0' in body
        assert b"iotrace_build_info" in body
        time.sleep(1.5)                                  # the monitor's first look
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    assert "source xentrace is down: xentrace exited" in err, err
    r = run_cli(iotrace_exe, "--source", "xentrace", "--strict")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("iotrace serve: source xentrace: down: xentrace exited"), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_replay_of_a_damaged_recording_logs_and_counts_it(iotrace_exe, tmp_path):
    """serve --replay of a recording with one flipped bit and no end chunk: the rest is served;
    the log says each problem once (file and offset); the metrics count them (issue #12, 9)."""
    from iotrace.core import events
    from iotrace.offline.recording import RecordingWriter
    path = tmp_path / "d.iotrec"
    w = RecordingWriter(path, {"source": "qemu", "domains": {5: "web"}}, chunk_records=400)
    b = events.empty(1200)
    b["domid"], b["addr"], b["ts_ns"] = 5, 0x3F8, range(1200)
    w.write(b)
    w.flush()                                         # no end chunk: the writer was killed
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    port = free_port()
    p = subprocess.Popen([iotrace_exe, "serve", "--replay", str(path),
                          "--web.listen-address", f"127.0.0.1:{port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=30)
        body = get(f"http://127.0.0.1:{port}/metrics")[2].decode()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert 'iotrace_source_up{source="replay"} 1' in body
    assert 'iotrace_source_events_total{source="replay"} 800' in body
    assert 'iotrace_decode_errors_total{source="replay"} 400' in body
    assert 'iotrace_input_damage_total{source="replay",kind="skipped_chunk"} 1' in body
    assert 'iotrace_input_damage_total{source="replay",kind="truncated"} 1' in body
    logged = [ln for ln in err.splitlines() if f"source replay: {path}: " in ln]
    assert len(logged) == 2, err
    assert "events chunk checksum mismatch" in logged[0] and "no end chunk" in logged[1]
    assert all(" WARNING: " in ln and ln.count(str(path)) == 1 for ln in logged)
