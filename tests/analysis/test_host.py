"""What the host says (iotrace.analysis.host): /proc for real, xl list -v in xl's own format."""
from __future__ import annotations

import os
import time

import pytest

from iotrace.analysis import host as H
from support import xl as X


def _xl_list_text(rows) -> str:
    """`xl list -v` as Xen 4.17's xl prints it, with the formats read from the xl binary."""
    s = X.strings(str(X.xl_binary()))
    row_fmt = next(f for f in s if f.startswith("%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f"))
    uuid_fmt = next(f for f in s if f.startswith(" %02hhx%02hhx%02hhx%02hhx-"))
    head = next(f for f in s if f.startswith("Name") and "VCPUs" in f)
    verbose = next(f for f in s if f.startswith("   UUID") and "Reason-Code" in f)
    out = [head + verbose]
    for name, domid, mem, vcpus, state, secs, uuid in rows:
        line = X.c_to_python(row_fmt) % ((name, domid, mem, vcpus) + tuple(state) + (secs,))
        b = bytes.fromhex(uuid.replace("-", ""))
        line += X.c_to_python(uuid_fmt) % tuple(b)
        line += " %8s" % "-" + " %16s" % "-"
        out.append(line)
    return "\n".join(out) + "\n"


def test_parse_xl_list_in_xl_s_own_format():
    rows = [("Domain-0", 0, 2048, 2, "r-----", 1234.5, "00000000-0000-0000-0000-000000000000"),
            ("web server", 3, 1024, 4, "-b----", 88.1, "7d7c4d64-1c41-4f5b-9a64-2a6bd0c7f3e1"),
            ("db", 17, 4096, 1, "--p---", 0.0, "0f0e0d0c-0b0a-0908-0706-050403020100")]
    doms = H.parse_xl_list(_xl_list_text(rows))
    assert set(doms) == {0, 3, 17}
    assert doms[3] == H.XenDomain(3, "web server", 4, 88.1, "7d7c4d64-1c41-4f5b-9a64-2a6bd0c7f3e1")
    assert doms[0].name == "Domain-0" and doms[0].vcpus == 2 and doms[0].cpu_seconds == 1234.5
    assert doms[17].uuid == "0f0e0d0c-0b0a-0908-0706-050403020100"


def test_parse_xl_list_without_verbose_and_garbage():
    text = "Name ID Mem VCPUs\tState\tTime(s)\n" + \
        "%-40s %5d %5d %5d     %s  %8.1f\n" % ("vm1", 5, 512, 2, "-b----", 3.5) + \
        "libxl: warning: something\n\n"
    doms = H.parse_xl_list(text)
    assert doms == {5: H.XenDomain(5, "vm1", 2, 3.5, None)}


def test_cpu_times_and_pressure_of_this_host():
    got = H.read_cpu_times()
    assert got is not None
    cpu, ncpu = got
    assert ncpu == os.cpu_count()
    assert 0 < cpu.busy <= cpu.total and 0 <= cpu.steal <= cpu.total
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:
        pass
    later, _ = H.read_cpu_times()
    assert later.total > cpu.total and later.busy >= cpu.busy
    if os.path.exists("/proc/pressure/cpu"):
        assert isinstance(H.read_pressure(), int)
    assert H.read_pressure("/nonexistent") is None
    assert H.read_cpu_times("/nonexistent") is None


def test_run_delay_of_this_process():
    d = H.read_run_delay(os.getpid())
    if d is None:
        pytest.skip("this kernel keeps no schedstat run delays (CONFIG_SCHED_INFO)")
    assert d >= 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.1:
        pass
    assert H.read_run_delay(os.getpid()) >= d              # cumulative
    assert H.read_run_delay(2 ** 22 + 12345) is None


def test_process_cpu_counts_this_process():
    before = H.read_process_cpu(os.getpid())
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    after = H.read_process_cpu(os.getpid())
    assert after[1] == before[1]                        # same process, same start time
    assert after[0] - before[0] >= 0.2
    assert H.read_process_cpu(2 ** 22 + 12345) is None  # above pid_max: never a process


def test_dom0_detection(tmp_path):
    if os.path.exists("/proc/xen"):
        pytest.skip("this host runs on Xen")
    assert H.is_dom0() is False                 # no /proc/xen: not a Dom0, xl is never run
    assert H.LocalHost().use_xen is False
    (tmp_path / "xen").mkdir()
    (tmp_path / "xen" / "capabilities").write_text("control_d\n")   # what a Dom0 kernel says
    assert H.is_dom0(str(tmp_path)) is True
    (tmp_path / "xen" / "capabilities").write_text("")                 # a domU's
    assert H.is_dom0(str(tmp_path)) is False


def test_host_sample_json_round_trip_and_bad_input():
    s = H.HostSample(12.5, H.CpuTimes(10.0, 20.0, 0.5), 2, 123456, {3: 1.5}, {3: "dm:42:99"},
                     {0: H.XenDomain(0, "Domain-0", 2, 5.0, None),
                      3: H.XenDomain(3, "web", 1, 2.0, "aa")}, {3: 0.25})
    assert H.HostSample.from_json(s.to_json()) == s
    assert H.HostSample.from_json({"t": 1}) == H.HostSample(1.0)
    for bad in ([1], {"t": "x"}, {"t": 1, "cpu": {"busy": 1}}, {"t": 1, "xen": {"3": {}}}):
        with pytest.raises(ValueError):
            H.HostSample.from_json(bad)


@pytest.mark.root
def test_local_host_samples_a_real_device_model():
    """A stand-in device model (-xen-domid N in its argv) is found in /proc like qemu-dm."""
    from iotrace.probes.standin import runner as sr
    with sr.StandIn(4731, name="hostprobe", speed=0, loop=True, die_with_parent=True) as s:
        lh = H.LocalHost(use_xen=False)
        a = lh.sample(1.0)
        time.sleep(0.5)
        b = lh.sample(1.5, {4731: s.pid})
    assert a.dm_ident[4731] == b.dm_ident[4731]          # one process, one identity
    assert a.dm_ident[4731].startswith(f"dm:{s.pid}:")
    assert b.dm_cpu[4731] > a.dm_cpu[4731]              # it replays flat out: it burns CPU
    assert b.dm_wait.get(4731, 0.0) >= a.dm_wait.get(4731, 0.0)
    assert a.xen is None and b.cpu is not None and b.ncpu == os.cpu_count()


def test_a_failed_xl_listing_keeps_the_uuid_while_the_device_model_is_the_same(tmp_path):
    """xl answers once, then fails (a starved Dom0: timeouts): the domain keeps its UUID
    identity as long as its device model is the same process, and loses it with a new one."""
    from iotrace.analysis.signals import identity_of
    uuid = "8300c3de-fb3b-4bd0-b988-e2e53aa4db58"
    listing = tmp_path / "listing"
    listing.write_text(_xl_list_text([("Domain-0", 0, 1024, 1, "r-----", 5.0,
                                       "00000000-0000-0000-0000-000000000000"),
                                      ("bs1", 7, 32, 1, "-b----", 1.5, uuid)]))
    calls = tmp_path / "calls"
    xl = tmp_path / "xl"                # answers the first call only (xl cannot run here)
    xl.write_text(f"#!/bin/sh\necho x >> {calls}\n[ $(wc -l < {calls}) -eq 1 ] || exit 1\n"
                  f"cat {listing}\n")
    xl.chmod(0o755)
    lh = H.LocalHost(use_xen=True, xl=str(xl))
    me = {7: os.getpid()}               # this process stands for bs1's device model
    a = lh.sample(1.0, me)
    assert a.xen[7].uuid == uuid and a.uuids == {}
    assert identity_of(7, a) == (f"uuid:{uuid}", uuid)
    b = lh.sample(2.0, me)              # xl failed
    assert b.xen is None and b.uuids == {7: uuid}
    assert identity_of(7, b) == (f"uuid:{uuid}", uuid)
    assert H.HostSample.from_json(b.to_json()) == b
    c = lh.sample(3.0, {7: os.getppid()})   # another device model: not the same domain
    assert c.uuids == {} and identity_of(7, c)[0].startswith(f"dm:{os.getppid()}:")
    d = lh.sample(4.0, me)              # the first process again (pid + start time): bs1
    assert d.uuids == {7: uuid}
