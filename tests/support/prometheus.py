"""A real Prometheus for tests: start /usr/bin/prometheus on a free loopback port, query it.

    from support.prometheus import Prometheus, free_port

    with Prometheus(tmp_path, targets=["127.0.0.1:9878"], scrape_interval="1s") as prom:
        prom.wait_for_scrapes(job="iotrace", count=2)          # waits until the target is up
        value = prom.query_value('sum(iotrace_ioreqs_total)')  # float or None
        rows = prom.query('sum by (range) (iotrace_ioreqs_total)')  # [(labels dict, float)]
        prom.wait_for('sum(iotrace_ioreqs_total)', lambda v: v == 105, timeout=20)

Arguments of ``Prometheus(workdir, ...)``:

* ``targets``: host:port list for one job (``job``, default "iotrace"), scraped every
  ``scrape_interval``; or ``scrape_configs``: a list of scrape_config dicts, used as they are
  (TLS, basic auth, several jobs);
* ``rule_files``: paths of rule files (alerting / recording), evaluated every
  ``evaluation_interval``; ``alerts()`` and ``rules()`` return the API's view of them;
* ``extra_args``: more prometheus command-line flags.

The instance stores its TSDB in ``workdir`` and is killed on ``stop()`` / leaving the ``with``.
``require_tool("prometheus")`` (support) should be called first to skip/fail properly.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, workdir, targets=None, *, job: str = "iotrace",
                 scrape_interval: str = "1s", scrape_configs=None, rule_files=None,
                 evaluation_interval: str = "1s", extra_args=(), binary: str = PROMETHEUS):
        self.workdir = Path(workdir)
        self.job = job
        self.port = None
        self.proc: subprocess.Popen | None = None
        self.binary = binary
        self.extra_args = list(extra_args)
        if scrape_configs is None:
            scrape_configs = [{"job_name": job, "scrape_interval": scrape_interval,
                               "scrape_timeout": scrape_interval,
                               "static_configs": [{"targets": list(targets or [])}]}]
        self.config = {
            "global": {"scrape_interval": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "scrape_configs": scrape_configs,
        }
        if rule_files:
            self.config["rule_files"] = [str(Path(r).resolve()) for r in rule_files]

    # -- life cycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Prometheus":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.port = free_port()
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}",
             f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--web.enable-lifecycle", *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self.proc.returncode}): "
                                      f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- HTTP API --------------------------------------------------------------------------------
    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as exc:
            raise PrometheusError(f"{path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"{path}: {doc}")
        return doc["data"]

    def query(self, promql: str) -> list[tuple[dict, float]]:
        """Instant query: [(labels, value)] for a vector, [({}, value)] for a scalar."""
        data = self.api("query", query=promql)
        if data["resultType"] == "vector":
            return [(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        raise PrometheusError(f"unexpected result type {data['resultType']}")

    def query_value(self, promql: str) -> float | None:
        """The single value of a query (None if empty; error if several series)."""
        rows = self.query(promql)
        if not rows:
            return None
        if len(rows) > 1:
            raise PrometheusError(f"{promql}: {len(rows)} series, expected one")
        return rows[0][1]

    def wait_for(self, promql: str, predicate=lambda v: v is not None, timeout: float = 30.0):
        """Poll ``query_value`` until ``predicate(value)``; return the value (or raise)."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.query_value(promql)
            if predicate(value):
                return value
            time.sleep(0.3)
        raise PrometheusError(f"{promql}: still {value!r} after {timeout}s; targets: "
                              f"{self.targets()}")

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for_scrapes(self, job: str | None = None, count: int = 1,
                         timeout: float = 30.0) -> None:
        """Wait until every target of ``job`` is up and has been scraped ``count`` times."""
        job = job or self.job
        q = f'count_over_time(up{{job="{job}"}}[1h])'
        self.wait_for(f"min({q})", lambda v: v is not None and v >= count, timeout)
        self.wait_for(f'min(up{{job="{job}"}})', lambda v: v == 1, timeout)

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]


def scrape_config(job: str, targets, interval: str = "1s", **extra) -> dict:
    """A scrape_config dict; ``extra`` adds keys such as scheme, tls_config, basic_auth."""
    cfg = {"job_name": job, "scrape_interval": interval, "scrape_timeout": interval,
           "static_configs": [{"targets": list(targets)}]}
    cfg.update(extra)
    return cfg


def wait_http(url: str, timeout: float = 20.0, context=None) -> None:
    """Wait until ``url`` answers (any HTTP status)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1, context=context).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not answering after {timeout}s: {last}")


__all__ = ["Prometheus", "PrometheusError", "free_port", "scrape_config", "self_signed_cert",
           "wait_http"]


def self_signed_cert(directory, name: str = "localhost", ca: tuple | None = None) -> tuple:
    """Write a key and certificate for ``name`` (SAN: DNS name, 127.0.0.1) with the openssl CLI.

    Self-signed, or signed by ``ca`` = (ca_cert, ca_key) when given. Returns (cert, key) paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    san = f"subjectAltName=DNS:{name},IP:127.0.0.1"
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN={name}", "-addext", san, "-addext",
                        "basicConstraints=critical,CA:TRUE",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    else:
        csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
        ext.write_text(san + "\n")
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                        "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey",
                        str(ca[1]), "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                        "-out", str(cert)], check=True, capture_output=True)
    return cert, key
