"""The Xen Dom0 image: Debian 12 with Xen 4.17, its device model, BCC and what iotrace imports.

An ``ImageSpec`` of the VM harness (tests/vm/image.py builds and caches it under
/var/cache/iotrace/vm/xen-dom0-<key>/, keyed by its inputs like the kernel-matrix images). The
image boots systemd (Xen's services: xenstored, xenconsoled, xen-init-dom0) and the harness agent
as ``iotrace-vm-agent.service``; the hypervisor comes from the image's /boot.

    python3 tests/xen/dom0_image.py          # build (or find) it; prints its directory
"""
from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vm.image import Image, ImageSpec, ensure  # noqa: E402

XEN_VERSION = "4.17"
DOM0_PACKAGES = (
    "systemd-sysv", "udev", "kmod", "procps", "iproute2",
    "linux-image-amd64", "linux-headers-amd64", "initramfs-tools",
    f"xen-hypervisor-{XEN_VERSION}-amd64", f"xen-utils-{XEN_VERSION}", "xen-utils-common",
    "qemu-system-xen",
    "python3-bpfcc", "python3-numpy", "python3-yaml", "python3-prometheus-client",
    "python3-bcrypt", "python3-capstone", "python3-pyelftools",
)
# Xen's daemons come from Debian's SysV script /etc/init.d/xen (enabled by xen-utils-common;
# systemd runs it as xen.service); xendomains (save/restore guests at shutdown) is masked. The
# agent as a service (its unit is written by build-image.sh after this runs: linked by hand), root
# without password on the consoles, the virtio and 9p modules in the initramfs, no documentation.
DOM0_SETUP = """\
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/iotrace-vm-agent.service \
    /etc/systemd/system/multi-user.target.wants/iotrace-vm-agent.service
systemctl mask xendomains.service 2>/dev/null || true
sed -i 's/^root:[^:]*:/root::/' /etc/shadow
printf 'virtio_pci\\nvirtio_blk\\nvirtio_console\\n9p\\n9pnet_virtio\\n' >> /etc/initramfs-tools/modules
update-initramfs -u -k all
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/*
"""
DOM0_SPEC = ImageSpec("xen-dom0", "bookworm", DOM0_PACKAGES, DOM0_SETUP)


def hypervisor(image: Image) -> Path:
    """The hypervisor as QEMU's multiboot v1 loader wants it: the ELF, gunzipped from the image's
    /boot/xen-4.17-amd64.gz once, beside it in the image directory."""
    elf = image.dir / f"xen-{XEN_VERSION}-amd64"
    if not elf.exists():
        tmp = elf.with_suffix(".tmp")
        with gzip.open(image.boot_file(f"xen-{XEN_VERSION}-amd64.gz")) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(elf)
    return elf


if __name__ == "__main__":
    img = ensure(DOM0_SPEC)
    print(f"{img.dir} (kernel {img.kernel_release}, hypervisor {hypervisor(img)})")
