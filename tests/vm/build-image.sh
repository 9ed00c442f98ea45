#!/usr/bin/env bash
# Build a bootable Debian root filesystem image for the VM harness (tests/vm/image.py runs this).
#
#   build-image.sh SUITE MIRROR OUT_DIR PACKAGE...
#
# Writes into OUT_DIR (which must not exist yet):
#   rootfs.img   ext4 image of the root filesystem (label iotrace-vm), made with mkfs.ext4 -d: no
#                loop mount, so it runs where loop devices are not available
#   vmlinuz, initrd.img   the suite's kernel and initramfs, for qemu -kernel/-initrd
#   kernel-release        the kernel's `uname -r`
#   packages.txt          dpkg -l of the image (what was really installed, versions)
#   boot/                 a copy of the image's /boot (e.g. Xen's xen-*.gz, for a multiboot boot)
# SETUP_SCRIPT (environment, optional): a file of shell commands run with bash inside the chroot
# after the packages are installed (enable a service, write a config; ImageSpec.setup).
# Everything that mounts (proc, sys, dev inside the chroot) happens in a private mount namespace
# (unshare --mount --propagation private): nothing is mounted or unmounted in the host's namespace,
# and the mounts go away with the namespace even if this script dies.
#
# The guest side: tests/vm/guest/init.sh becomes /usr/local/sbin/iotrace-vm-init (the kernel's
# init=, or the ExecStart of iotrace-vm-agent.service where the image boots systemd).
set -euo pipefail

if [ "${1:-}" != "--in-namespace" ]; then
    exec unshare --mount --propagation private -- "$0" --in-namespace "$@"
fi
shift
SUITE=$1; MIRROR=$2; OUT=$3; shift 3
PACKAGES=("$@")
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$OUT/rootfs

[ ! -e "$OUT/rootfs.img" ] || { echo "build-image: $OUT already holds an image" >&2; exit 2; }
mkdir -p "$ROOT"

echo "== debootstrap $SUITE ($MIRROR)"
debootstrap --variant=minbase --include=kmod,procps "$SUITE" "$ROOT" "$MIRROR"

# Inside the chroot: no daemon may start, apt must not ask, and the kernel's postinst builds an
# initramfs with the default MODULES=most (virtio_blk and ext4 for the root disk).
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"

echo "== apt-get install ${PACKAGES[*]}"
chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
    apt-get -o Dpkg::Use-Pty=0 install -y -q --no-install-recommends "${PACKAGES[@]}"
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/*

if [ -n "${SETUP_SCRIPT:-}" ]; then
    echo "== setup script"
    install -m 644 "$SETUP_SCRIPT" "$ROOT/tmp/iotrace-image-setup.sh"
    chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
        bash -euo pipefail /tmp/iotrace-image-setup.sh
    rm -f "$ROOT/tmp/iotrace-image-setup.sh"
fi
rm -f "$ROOT/usr/sbin/policy-rc.d"

echo "== guest configuration"
echo iotrace-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 iotrace-vm\n' > "$ROOT/etc/hosts"
echo 'LABEL=iotrace-vm / ext4 rw 0 1' > "$ROOT/etc/fstab"
install -m 755 "$HERE/guest/init.sh" "$ROOT/usr/local/sbin/iotrace-vm-init"
# For images that boot systemd (e.g. a Xen Dom0): the same agent as a service.
mkdir -p "$ROOT/etc/systemd/system"
cat > "$ROOT/etc/systemd/system/iotrace-vm-agent.service" <<'UNIT'
[Unit]
Description=iotrace VM harness agent (tests/vm/guest/agent.py over virtio-serial)
After=local-fs.target
[Service]
ExecStart=/usr/local/sbin/iotrace-vm-init --service
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$ROOT/mnt/harness" "$ROOT/mnt/project" "$ROOT/mnt/out"

umount "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"

kver=$(basename "$(ls -d "$ROOT"/lib/modules/* | sort -V | tail -n1)")
cp "$ROOT/boot/vmlinuz-$kver" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-$kver" "$OUT/initrd.img"
echo "$kver" > "$OUT/kernel-release"
cp -a "$ROOT/boot" "$OUT/boot"
chroot "$ROOT" dpkg-query -W -f='${Package} ${Version}\n' > "$OUT/packages.txt"

echo "== mkfs.ext4 -d"
size_mb=$(( $(du -sm "$ROOT" | cut -f1) * 5 / 4 + 512 ))
mkfs.ext4 -q -F -L iotrace-vm -d "$ROOT" "$OUT/rootfs.img" "${size_mb}M"
rm -rf "$ROOT"
echo "== done: $OUT (kernel $kver, ${size_mb} MiB)"
