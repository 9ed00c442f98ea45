"""deploy/debian and the files it installs, checked against the project they package.

One version everywhere; every Python dependency of pyproject.toml is a Debian 12 package in
Depends, and Debian 12's version satisfies its lower bound (the .deb runs on those, not on PyPI's);
the default configuration files load as iotrace reads them.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import pytest

from iotrace import __version__
from iotrace.cli.main import build_parser
from iotrace.core.addrmap import AddressMap
from iotrace.serve.settings import ExporterSettings, load_settings
from support import REPO, require_tool

DEBIAN = REPO / "deploy" / "debian"

# pyproject's name -> Debian 12's package
DEBIAN_NAMES = {"prometheus-client": "python3-prometheus-client", "PyYAML": "python3-yaml",
                "numpy": "python3-numpy", "bcrypt": "python3-bcrypt",
                "capstone": "python3-capstone"}


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _control_field(package_stanza: str, field: str) -> list[str]:
    m = re.search(rf"^{field}:(.*?)(?=^\S|\Z)", package_stanza, re.M | re.S)
    assert m, field
    items = [ln.split("#")[0] for ln in m.group(1).splitlines()]
    return [x.strip() for x in ",".join(items).split(",") if x.strip()]


def _binary_stanza() -> str:
    text = (DEBIAN / "control").read_text()
    return text[text.index("\nPackage: iotrace"):]


def _requirements():
    for req in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([\w.]+))?", req)
        assert m, req
        yield m.group(1), m.group(2)


def test_one_version():
    cl = subprocess.run(["dpkg-parsechangelog", "-l", str(DEBIAN / "changelog"), "-S", "Version"],
                        capture_output=True, text=True, check=True).stdout.strip()
    assert cl == _pyproject()["project"]["version"] == __version__


def test_depends_are_debian_packages_for_every_python_dependency():
    depends = {d.split()[0] for d in _control_field(_binary_stanza(), "Depends")}
    for name, _ in _requirements():
        assert DEBIAN_NAMES[name] in depends, name
    assert {"python3-bpfcc", "python3-capstone", "python3-pyelftools"} <= depends
    recommends = _control_field(_binary_stanza(), "Recommends")
    assert "linux-headers-amd64" in recommends
    assert any(r.startswith("xen-utils") for r in recommends)


def test_debian_12_satisfies_every_lower_bound():
    """What the .deb runs on: Debian 12's python3-* must meet pyproject's >= (bcrypt>=4.0 did not:
    Debian 12 has 3.2.2), so that make install's venv (--system-site-packages) uses them too."""
    require_tool("dpkg-query")
    for name, low in _requirements():
        if low is None:
            continue
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEBIAN_NAMES[name]],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"{DEBIAN_NAMES[name]} is not installed: make install installs it")
        version = re.sub(r"^\d+:", "", r.stdout.strip())             # drop the epoch
        ok = subprocess.run(["dpkg", "--compare-versions", version, "ge", low])
        assert ok.returncode == 0, f"{name}>={low} but Debian 12 has {version}"


def test_default_config_loads_as_iotrace_reads_it():
    path = str(REPO / "deploy" / "iotrace.yaml")
    assert AddressMap.load(path).names == AddressMap.default().names   # adds nothing by default
    assert load_settings(path) == ExporterSettings()                   # spells out the defaults


def test_default_options_are_valid_serve_options():
    text = (REPO / "deploy" / "iotrace.default").read_text()
    (args,) = re.findall(r'^IOTRACE_ARGS="(.*)"$', text, re.M)
    unit = (REPO / "deploy" / "iotrace.service").read_text()
    (execstart,) = re.findall(r"^ExecStart=/usr/bin/iotrace (.*)$", unit, re.M)
    argv = shlex.split(execstart.replace("$IOTRACE_ARGS", args))
    ns = build_parser().parse_args(argv)
    assert ns.verb == "serve" and ns.config == "/etc/iotrace/iotrace.yaml"


def test_unit_waits_for_tracefs():
    """Its capabilities (no CAP_SYS_ADMIN) cannot mount tracefs, and need it
    (probes/bpf/tracefs.py)."""
    unit = (REPO / "deploy" / "iotrace.service").read_text()
    wants = re.search(r"^Wants=(.*)$", unit, re.M).group(1).split()
    after = re.search(r"^After=(.*)$", unit, re.M).group(1).split()
    assert "sys-kernel-tracing.mount" in wants and "sys-kernel-tracing.mount" in after
    assert re.search(r"^CapabilityBoundingSet=CAP_BPF CAP_PERFMON$", unit, re.M)


def test_rules_build_the_makefiles_native_target():
    rules = (DEBIAN / "rules").read_text()
    assert "$(MAKE) native" in rules
    assert re.search(r"^native:", (REPO / "Makefile").read_text(), re.M)
