"""The built .deb (make deb), installed in a fresh Debian 12 chroot: `make test-deb`.

No project venv and no test tools there: a debootstrap minbase with Debian 12's device model
(support.debchroot; cached, a copy per run). ``apt-get install`` of the .deb resolves its Depends
from Debian's archive; then what an operator does first: --version, a report of the real capture,
probe-info on Debian 12's qemu-dm, the exporter with the default config. Marked ``deb``: the
default test run leaves these out (pyproject addopts); ``make test-deb`` builds the package and
runs them. IOTRACE_DEB names the .deb to test (default: out/iotrace_<version>_<arch>.deb).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from iotrace import __version__
from support import REAL_XENTRACE, REPO, debchroot, require_shared, require_tool
from support.prometheus import free_port

pytestmark = [pytest.mark.deb, pytest.mark.root, pytest.mark.integration, pytest.mark.slow]

DM = "/usr/libexec/xen-qemu-system-i386"
DEBIAN12_DM_BUILD_ID = "c1a56521a4a247be10c1564f57d5f7598eb5500b"
PACKAGED_VERBS = ["report", "serve", "top", "advise", "snoop", "record", "probe-info"]
LEFT_OUT_VERBS = ["standin", "demo"]


@pytest.fixture(scope="module")
def deb() -> Path:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip()
    path = Path(os.environ.get("IOTRACE_DEB") or REPO / "out" / f"iotrace_{__version__}_{arch}.deb")
    if not path.exists():
        pytest.fail(f"{path} missing: make test-deb builds it (make deb)")
    return path.resolve()


@pytest.fixture(scope="module")
def extracted(deb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def chroot(deb):
    """A fresh Debian 12 with the .deb installed by apt; yields (session, timings, logs)."""
    data = require_shared(REAL_XENTRACE).parent
    t0 = time.monotonic()
    base = debchroot.base()
    timings = {"base": time.monotonic() - t0}
    s = debchroot.Session(base, binds={"/mnt/deb": deb.parent, "/mnt/data": data})
    logs = {}
    try:
        t = time.monotonic()
        r = s.run("apt-get", "update")
        assert r.returncode == 0, r.stdout + r.stderr
        # what a plain `apt-get install` would pull in too (Recommends), without doing it
        logs["simulate"] = s.run("apt-get", "install", "--simulate", f"/mnt/deb/{deb.name}")
        logs["install"] = s.run("apt-get", "install", "-y", "--no-install-recommends",
                                f"/mnt/deb/{deb.name}")
        timings["install"] = time.monotonic() - t
        yield s, timings, logs
    finally:
        s.close()
        print("\ntest-deb timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


# -- the .deb itself -----------------------------------------------------------------------------

def test_contents(extracted):
    files = {str(p.relative_to(extracted)) for p in extracted.rglob("*") if not p.is_dir()}
    site = "usr/lib/python3/dist-packages/iotrace"
    want = {"usr/bin/iotrace", "lib/systemd/system/iotrace.service",
            "etc/iotrace/iotrace.yaml", "etc/default/iotrace",
            "usr/share/bash-completion/completions/iotrace",
            "usr/share/doc/iotrace/deployment.md",          # the unit's Documentation=, unzipped
            "usr/share/doc/iotrace/copyright",
            f"{site}/xentrace/_xtcore.so", f"{site}/core/data/pc-default.yaml",
            f"{site}/probes/bpf/ioreq.bpf.c", f"{site}/probes/hook/offsets.yaml",
            "usr/share/man/man1/iotrace.1.gz"}
    want |= {f"usr/share/man/man1/iotrace-{v}.1.gz" for v in PACKAGED_VERBS}
    assert want <= files, sorted(want - files)
    # the test-only parts stay in the source tree
    assert not [f for f in files if "/standin" in f or "/streams/" in f or "/testing/" in f
                or f.endswith("cli/demo.py") or f.endswith(".c") and "bpf" not in f]
    assert not {f"usr/share/man/man1/iotrace-{v}.1.gz" for v in LEFT_OUT_VERBS} & files


def test_no_build_paths_in_the_package(extracted):
    """Nothing refers to the machine it was built on (the repository, the build tree)."""
    bad = [re.escape(str(REPO)).encode(), rb"/build/deb/iotrace-"]
    hits = [str(p.relative_to(extracted)) for p in extracted.rglob("*")
            if p.is_file() and any(re.search(b, p.read_bytes()) for b in bad)]
    assert hits == []


def test_man_pages_render_without_warnings(extracted):
    groff = require_tool("groff")
    for page in sorted((extracted / "usr/share/man/man1").glob("*.1.gz")):
        text = gzip.decompress(page.read_bytes())
        r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z"], input=text,
                           capture_output=True)
        assert r.returncode == 0 and r.stderr == b"", (page.name, r.stderr)


def test_systemd_unit_verifies(extracted, tmp_path):
    """systemd-analyze verify on the unit as packaged (ExecStart pointed at the extracted
    /usr/bin/iotrace, since the host does not have the package): no complaint at all."""
    tool = require_tool("systemd-analyze")
    unit = (extracted / "lib/systemd/system/iotrace.service").read_text()
    assert "ExecStart=/usr/bin/iotrace serve" in unit
    assert "Documentation=man:iotrace-serve(1) file:///usr/share/doc/iotrace/deployment.md" in unit
    copy = tmp_path / "iotrace.service"
    copy.write_text(unit.replace("ExecStart=/usr/bin/iotrace",
                                 f"ExecStart={extracted}/usr/bin/iotrace"))
    r = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# -- installed in a fresh Debian 12 --------------------------------------------------------------

def test_apt_resolves_depends_and_recommends_from_debian(chroot):
    s, _, logs = chroot
    assert logs["install"].returncode == 0, logs["install"].stdout + logs["install"].stderr
    sim = logs["simulate"]
    assert sim.returncode == 0, sim.stdout + sim.stderr
    planned = set(re.findall(r"^Inst (\S+)", sim.stdout, re.M))
    assert {"iotrace", "python3-bpfcc", "python3-prometheus-client", "python3-yaml",
            "python3-numpy", "python3-bcrypt", "python3-capstone", "python3-pyelftools",
            "linux-headers-amd64", "xen-utils-4.17"} <= planned
    r = s.run("dpkg-query", "-W", "-f=${Status} ${Version}", "iotrace")
    assert r.stdout == f"install ok installed {__version__}"
    # Debian's Python, Debian's modules: nothing from PyPI, no venv
    r = s.run("python3", "-c", "import iotrace, prometheus_client, yaml, numpy, bcrypt, bcc; "
                               "print(iotrace.__file__)")
    assert r.stdout.strip() == "/usr/lib/python3/dist-packages/iotrace/__init__.py", r.stderr


def test_version(chroot):
    s, _, _ = chroot
    r = s.run("iotrace", "--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"iotrace {__version__}"), r.stderr


def test_report_on_the_real_capture(chroot):
    s, _, _ = chroot
    capture = f"/mnt/data/{REAL_XENTRACE.name}"
    r = s.run("iotrace", "report", "--format", "json", "--by", "vcpu", capture)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    per_vcpu = Counter()
    for row in doc["io"]:
        assert row["domid"] == 14
        per_vcpu[row["vcpu"]] += row["count"]
    assert dict(per_vcpu) == {1: 17, 2: 72, 3: 16}
    r = s.run("iotrace", "report", capture)
    assert r.returncode == 0 and "105 I/O requests" in r.stdout, r.stderr
    # the package's own compiled core is the one loaded (there is no fallback without it)
    r = s.run("python3", "-c", "from iotrace.xentrace import native; native.constants(); "
              "print(native.LIBRARY)")
    assert r.stdout.strip() == "/usr/lib/python3/dist-packages/iotrace/xentrace/_xtcore.so", \
        r.stderr


def test_probe_info_on_debian_12_device_model(chroot):
    s, _, _ = chroot
    r = s.run("iotrace", "probe-info", DM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"build-id:         {DEBIAN12_DM_BUILD_ID}" in r.stdout
    assert "handle_ioreq:     file offset 0x520fe0" in r.stdout
    assert re.search(r"send_vcpu:\s+offset 0x50 ", r.stdout)


def test_serve_with_the_default_config(chroot):
    """The exporter as the unit runs it (/etc/default/iotrace's IOTRACE_ARGS: the packaged
    /etc/iotrace/iotrace.yaml), on a replay of the real capture, scraped from inside."""
    s, _, _ = chroot
    port = free_port()
    script = f"""
. /etc/default/iotrace
iotrace serve --web.listen-address 127.0.0.1:{port} --replay /mnt/data/{REAL_XENTRACE.name} \
    $IOTRACE_ARGS 2>/tmp/serve.err &
pid=$!
python3 - <<'EOF'
import time, urllib.request
for _ in range(300):
    try:
        print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=2).read().decode())
        break
    except OSError:
        time.sleep(0.1)
EOF
kill -TERM $pid; wait $pid; echo "serve-exit: $?"; cat /tmp/serve.err >&2
"""
    r = s.sh(script, timeout=120)
    assert "serve-exit: 0" in r.stdout, r.stdout[-2000:] + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    total = sum(float(m.group(1)) for m in
                re.finditer(r'^iotrace_ioreqs_total\{[^}]*source="replay"[^}]*\} (\S+)$',
                            r.stdout, re.M))
    assert total == 105
    assert f'iotrace_build_info{{version="{__version__}"}} 1' in r.stdout


def test_left_out_verbs_say_so_in_one_line(chroot):
    s, _, _ = chroot
    r = s.run("iotrace", "--help")
    listed = re.findall(r"^    ([a-z-]+)\s", r.stdout, re.M)          # the verbs under VERB
    assert listed == PACKAGED_VERBS
    for verb in LEFT_OUT_VERBS:
        r = s.run("iotrace", verb)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "not part of this installation" in r.stderr


def test_conffiles_and_bash_completion(chroot):
    s, _, _ = chroot
    r = s.run("dpkg-query", "-W", "-f=${Conffiles}", "iotrace")
    assert {ln.split()[0] for ln in r.stdout.strip().splitlines()} == \
        {"/etc/iotrace/iotrace.yaml", "/etc/default/iotrace"}
    r = s.run("bash", "-c", ". /usr/share/bash-completion/completions/iotrace; "
                            "COMP_WORDS=(iotrace se); COMP_CWORD=1; _iotrace; "
                            'echo "${COMPREPLY[*]}"')
    assert r.stdout.strip() == "serve", r.stderr


def test_purge_leaves_nothing(chroot):
    """Last (the module's tests run in order): removing and purging the package."""
    s, timings, _ = chroot
    r = s.run("apt-get", "purge", "-y", "iotrace")
    assert r.returncode == 0, r.stdout + r.stderr
    r = s.sh("ls -d /etc/iotrace /etc/default/iotrace /usr/bin/iotrace "
             "/usr/lib/python3/dist-packages/iotrace 2>&1 | grep -v 'No such' || true")
    assert r.stdout.strip() == ""
