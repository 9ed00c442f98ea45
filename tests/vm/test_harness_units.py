"""The VM harness's parts that need no guest (run in ``make test``): the image cache key, the build
lock, QEMU's command line, the console excerpt of a failure."""
from __future__ import annotations

import threading
import time

import pytest

from vm import image
from vm.image import Image, ImageSpec, locked_build
from vm.machine import Machine, MachineError, Share, multiboot_modules


def test_the_key_follows_every_input(tmp_path, monkeypatch):
    a = ImageSpec("x", "bookworm", ("python3-bpfcc", "linux-image-amd64"))
    assert a.key() == ImageSpec("y", "bookworm", ("linux-image-amd64", "python3-bpfcc")).key()
    assert a.key() != ImageSpec("x", "trixie", a.packages).key()
    assert a.key() != ImageSpec("x", "bookworm", a.packages + ("strace",)).key()
    assert a.key() != ImageSpec("x", "bookworm", a.packages, setup="systemctl enable x").key()
    assert a.dirname() == f"x-{a.key()}" and len(a.key()) == 16
    # the build files' text is an input: a changed script makes a new image
    script = tmp_path / "build-image.sh"
    script.write_text("one")
    monkeypatch.setattr(image, "BUILD_INPUTS", (script,))
    k1 = a.key()
    script.write_text("two")
    assert a.key() != k1
    # the real inputs are the builder and the init it installs
    assert {p.name for p in image.BUILD_INPUTS} >= {"build-image.sh"}


def test_the_shipped_specs():
    for name, spec in image.SPECS.items():
        assert spec.name == name
        assert {"linux-image-amd64", "linux-headers-amd64", "python3-bpfcc"} <= set(spec.packages)
    assert image.SPECS["bookworm"].suite == "bookworm" and image.SPECS["trixie"].suite == "trixie"


def test_one_build_for_two_concurrent_asks(tmp_path):
    final = tmp_path / "img-0123"
    calls = []

    def build(tmp):
        calls.append(tmp)
        tmp.mkdir()
        time.sleep(0.3)
        (tmp / "rootfs.img").write_text("x")

    out = []
    threads = [threading.Thread(target=lambda: out.append(locked_build(final, build)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out == [final] * 3
    assert (final / "rootfs.img").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0123", "img-0123.lock"]


def test_a_failed_or_killed_build_leaves_no_image(tmp_path):
    final = tmp_path / "img-0123"
    (tmp_path / "img-0123.tmp-99999").mkdir()          # a build that was killed

    def fails(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise image.ImageError("mirror unreachable")

    with pytest.raises(image.ImageError, match="mirror unreachable"):
        locked_build(final, fails)
    assert not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0123.lock"]
    assert image.cached(ImageSpec("img", "bookworm", ()), tmp_path) is None


def test_prune_removes_only_what_was_not_used(tmp_path):
    import os
    old, new, other = "bookworm-" + "a" * 16, "bookworm-" + "b" * 16, "trixie-" + "c" * 16
    dom0 = "bookworm-dom0-" + "d" * 16                    # another spec: not "bookworm"'s
    for name in (old, new, other, dom0):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rootfs.img").write_text("x")
    (tmp_path / f"{old}.tmp-1").mkdir()                   # not an image: left alone
    month_ago = time.time() - 30 * 86400
    for name in (old, other, dom0, f"{old}.tmp-1"):
        os.utime(tmp_path / name, (month_ago, month_ago))
    assert image.prune(tmp_path, "bookworm") == [tmp_path / old]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == \
        sorted([f"{old}.tmp-1", new, other, dom0])
    assert image.prune(tmp_path) == [tmp_path / dom0, tmp_path / other]


def test_image_paths_and_completeness(tmp_path):
    img = Image(ImageSpec("n", "bookworm", ()), tmp_path)
    assert (img.rootfs.name, img.kernel.name, img.initrd.name) == \
        ("rootfs.img", "vmlinuz", "initrd.img")
    assert not img.complete()
    for p in (img.rootfs, img.kernel, img.initrd):
        p.write_text("x")
    (tmp_path / "kernel-release").write_text("6.1.0-50-amd64\n")
    assert img.complete() and img.kernel_release == "6.1.0-50-amd64"


def test_qemu_command_line(tmp_path):
    img = Image(ImageSpec("bookworm", "bookworm", ()), tmp_path / "img")
    m = Machine.for_image(img, shares=[Share(tmp_path, "project"),
                                       Share(tmp_path / "o", "out", readonly=False)],
                          workdir=tmp_path / "w", memory_mb=2048, smp=2)
    argv = m.command()
    joined = " ".join(argv)
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg"]
    assert "-m 2048" in joined and "-smp 2" in joined and "-no-reboot" in joined
    assert f"file={img.rootfs},format=raw,if=virtio,snapshot=on" in joined  # never written
    assert f"path={tmp_path},security_model=none,readonly=on" in joined
    assert f"path={tmp_path / 'o'},security_model=none -device" in joined   # writable
    assert "mount_tag=harness" in joined and "name=iotrace.agent" in joined
    append = argv[argv.index("-append") + 1]
    assert "init=/usr/local/sbin/iotrace-vm-init" in append and "root=/dev/vda" in append
    assert "iotrace.ro=harness,project " in append + " "


def test_xen_style_boot_parameters(tmp_path):
    """What the Xen harness passes: Xen as the kernel, Dom0's kernel and initrd as multiboot
    modules, an SVM CPU model."""
    mods = multiboot_modules([("/c/vmlinuz", "root=/dev/vda console=hvc0"), ("/c/initrd.img", "")])
    assert mods == "/c/vmlinuz root=/dev/vda console=hvc0,/c/initrd.img"
    with pytest.raises(ValueError, match="comma"):
        multiboot_modules([("/c/vmlinuz", "dom0_mem=1G,max:1G")])
    m = Machine("/c/xen", initrd=mods, append="console=com1 dom0_max_vcpus=1",
                cpu="EPYC,+svm,+npt,-smap,-monitor,-xsave", memory_mb=3072,
                disks=[tmp_path / "dom0.img"], workdir=tmp_path)
    argv = m.command()
    assert argv[argv.index("-kernel") + 1] == "/c/xen"
    assert argv[argv.index("-initrd") + 1] == mods
    assert argv[argv.index("-cpu") + 1] == "EPYC,+svm,+npt,-smap,-monitor,-xsave"


def test_console_excerpt_puts_the_relevant_lines_first(tmp_path):
    m = Machine("/nonexistent", workdir=tmp_path, name="t")
    noise = [f"[ {i}.0] noise line {i}" for i in range(200)]
    noise[50] = "[ 50.0] Kernel panic - not syncing: VFS: Unable to mount root fs"
    m.console_log.write_text("\n".join(noise) + "\n")
    text = m.console_excerpt(last=5)
    assert "Kernel panic - not syncing" in text
    assert "noise line 199" in text and "noise line 150" not in text
    err = m._error("boot failed", stderr="line1\nTraceback\nValueError: x")
    assert isinstance(err, MachineError) and "t: boot failed" in str(err)
    assert "ValueError: x" in str(err) and "Kernel panic" in str(err) and m.failed


def test_start_refuses_what_is_missing(tmp_path):
    with pytest.raises(MachineError, match="does not exist"):
        Machine(tmp_path / "no-kernel", workdir=tmp_path).start()
