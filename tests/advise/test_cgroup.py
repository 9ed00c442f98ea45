"""The cgroup backend (iotrace.advise.cgroup) on this machine's real kernel (cgroup v1 hybrid: the
cpu controller at /sys/fs/cgroup/cpu, a cgroup2 without it at /sys/fs/cgroup/unified), with
real device-model processes (the stand-in); the weight mapping as the kernel converts."""
from __future__ import annotations

import os
import uuid

import pytest

from iotrace.advise import cgroup as CG
from iotrace.analysis.settings import CGROUP_RANGE

CPU_V1 = "/sys/fs/cgroup/cpu"


def test_weight_maps_to_shares_as_the_kernel_converts():
    # kernel/sched/core.c cpu_weight_write_u64: DIV_ROUND_CLOSEST(weight * 1024, 100), and the
    # read-back DIV_ROUND_CLOSEST(shares * 100, 1024): round trips over the whole range.
    assert CG.weight_to_shares(100) == 1024
    assert CG.weight_to_shares(1) == 10 and CG.weight_to_shares(10000) == 102400
    assert CG.weight_to_shares(25) == 256 and CG.weight_to_shares(33) == 338
    for w in range(CGROUP_RANGE[0], CGROUP_RANGE[1] + 1):
        assert CG.shares_to_weight(CG.weight_to_shares(w)) == w
    assert CG.shares_to_weight(2) == 1 and CG.shares_to_weight(262144) == 10000


def test_mountinfo_and_proc_cgroup_parsing(tmp_path):
    """The formats of proc(5): mountinfo (with an escaped space) and /proc/PID/cgroup."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
        "41 31 0:38 /machine /mnt/my\\040cg rw,relatime - cgroup2 cgroup2 rw\n")
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "cgroup").write_text("2:cpuacct:/\n1:cpu:/system.slice/xen.service\n"
                                            "0::/machine/vm7\n")
    mounts = CG.read_mounts(str(tmp_path))
    assert [m.fstype for m in mounts] == ["cgroup", "cgroup", "cgroup2"]
    assert mounts[2].point == "/mnt/my cg" and mounts[2].root == "/machine"
    assert CG.read_proc_cgroup(77, str(tmp_path)) == [
        ("2", ("cpuacct",), "/"), ("1", ("cpu",), "/system.slice/xen.service"),
        ("0", (), "/machine/vm7")]
    w = CG.locate(77, str(tmp_path), mounts)      # v1 holds the cpu controller: it wins
    assert (w.mode, w.dir) == ("v1", "/sys/fs/cgroup/cpu/system.slice/xen.service")
    assert w.knob_file.endswith("/cpu.shares") and not w.is_root
    assert CG.read_proc_cgroup(78, str(tmp_path)) is None
    with pytest.raises(CG.CgroupError, match="gone"):
        CG.locate(78, str(tmp_path), mounts)


def test_this_host_s_cgroup2_has_no_cpu_controller(tmp_path):
    """The real /sys/fs/cgroup/unified: a process only in cgroup2 gets a clear line."""
    unified = "/sys/fs/cgroup/unified"
    if not os.path.isfile(os.path.join(unified, "cgroup.controllers")):
        pytest.skip("no cgroup2 mounted at /sys/fs/cgroup/unified")
    if "cpu" in open(os.path.join(unified, "cgroup.controllers")).read().split():
        pytest.skip("this host's cgroup2 has the cpu controller")
    mounts = [m for m in CG.read_mounts() if m.fstype == "cgroup2" and m.point == unified]
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "cgroup").write_text("0::/\n")
    with pytest.raises(CG.CgroupError, match="has no cpu controller"):
        CG.locate(9, str(tmp_path), mounts)


def test_v1_without_its_mount_is_one_line(tmp_path):
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "cgroup").write_text("1:cpu:/\n")
    with pytest.raises(CG.CgroupError, match="not\\s+mounted"):
        CG.locate(5, str(tmp_path), [])


def test_this_process_is_found_in_the_real_hierarchy():
    w = CG.locate(os.getpid())
    assert w.mode in ("v1", "v2") and os.path.isdir(w.dir)
    weight, raw = CG.read_weight(w)
    assert CGROUP_RANGE[0] <= weight <= CGROUP_RANGE[1]


def cpu_path(pid):
    for line in open(f"/proc/{pid}/cgroup"):
        _, ctrls, path = line.rstrip("\n").split(":", 2)
        if "cpu" in ctrls.split(","):
            return path


@pytest.fixture
def v1():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.isfile(os.path.join(CPU_V1, "cpu.shares")):
        pytest.skip("no cgroup v1 cpu hierarchy here")


@pytest.fixture
def standin():
    from iotrace.probes.standin import runner as sr
    domid = 5100 + os.getpid() % 1000
    with sr.StandIn(domid, name="cg", speed=0, hold=True, die_with_parent=True) as s:
        yield s, domid


@pytest.mark.root
def test_a_shared_cgroup_gets_the_device_model_a_group_of_its_own(v1, standin):
    s, domid = standin
    home = cpu_path(s.pid)
    be = CG.CgroupBackend()
    before = be.read(s.pid)
    g = be.prepare(s.pid, domid)
    try:
        assert g.created and g.mode == "v1" and g.moved_from == CPU_V1 + home.rstrip("/")
        assert os.path.basename(g.dir) == f"iotrace-dom{domid}-{s.pid}"
        assert cpu_path(s.pid) == (home.rstrip("/") + "/" + os.path.basename(g.dir))
        assert be.read(s.pid) == 100 == before                  # a new group weighs the default
        assert be.set_weight(g, 25) == (1024, 256)
        assert open(g.file).read().strip() == "256" and be.read(s.pid) == 25
        assert be.prepare(s.pid, domid) is g                    # once
        with pytest.raises(ValueError):
            be.set_weight(g, 0)
        rec = {"cgroup": {**g.as_dict(), "raw_original": 1024}}
        assert "moved" in be.restore(rec)
        assert cpu_path(s.pid) == home and not os.path.exists(g.dir)
    finally:
        if os.path.isdir(g.dir):
            open(os.path.join(g.moved_from, "cgroup.procs"), "w").write(str(s.pid))
            os.rmdir(g.dir)


@pytest.mark.root
def test_a_device_model_alone_in_its_cgroup_keeps_it(v1, standin):
    s, domid = standin
    home = cpu_path(s.pid)
    own = os.path.join(CPU_V1, f"iotrace-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(own)
    try:
        open(os.path.join(own, "cpu.shares"), "w").write("2048")
        open(os.path.join(own, "cgroup.procs"), "w").write(str(s.pid))
        be = CG.CgroupBackend()
        assert be.read(s.pid) == 200
        g = be.prepare(s.pid, domid)
        assert (g.dir, g.created, g.moved_from) == (own, False, None)
        be.set_weight(g, 50)
        assert open(os.path.join(own, "cpu.shares")).read().strip() == "512"
        assert be.restore({"cgroup": {**g.as_dict(), "raw_original": 2048}}).endswith("2048")
        assert open(os.path.join(own, "cpu.shares")).read().strip() == "2048"
        assert cpu_path(s.pid) == "/" + os.path.basename(own)
    finally:
        open(os.path.join(CPU_V1 + home.rstrip("/"), "cgroup.procs"), "w").write(str(s.pid))
        os.rmdir(own)


@pytest.mark.root
def test_a_device_model_that_went_away(v1, standin):
    s, domid = standin
    be = CG.CgroupBackend()
    g = be.prepare(s.pid, domid)
    s.stop()
    assert "is gone" in be.restore({"cgroup": {**g.as_dict()}})
    assert not os.path.exists(g.dir)                           # its empty group removed
    with pytest.raises(CG.CgroupError, match="gone"):
        be.prepare(s.pid, domid)


def test_v2_cpu_controller_enabled_from_the_root_down(tmp_path, monkeypatch):
    """cgroup v2 offers a child only the controllers its parent enabled: +cpu goes into the
    root's subtree_control first, then each level down to the parent of the new group (Debian
    12's Dom0: a device model in system.slice/x.service, cpu enabled nowhere; seen on real Xen:
    'cannot enable the cpu controller below /sys/fs/cgroup/system.slice')."""
    root = tmp_path / "cg"
    parent = root / "system.slice"
    parent.mkdir(parents=True)
    for d in (root, parent):
        (d / "cgroup.subtree_control").write_text("memory pids\n" if d == root else "")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cgroup.subtree_control").write_text("")
    order = []

    def write(path, text):
        order.append((os.path.relpath(path, tmp_path), text))
        with open(path, "a") as f:          # a real subtree_control adds to what it lists
            f.write(" cpu")
    monkeypatch.setattr(CG, "_write", write)
    where = CG.Where("v2", str(root), "/system.slice/x.service", str(parent / "x.service"))
    CG.CgroupBackend()._enable_cpu(str(parent), where)
    assert order == [("cg/cgroup.subtree_control", "+cpu"),
                     ("cg/system.slice/cgroup.subtree_control", "+cpu")]
    order.clear()
    CG.CgroupBackend()._enable_cpu(str(parent), where)        # already enabled: nothing written
    assert order == []
    assert (tmp_path / "elsewhere" / "cgroup.subtree_control").read_text() == ""
