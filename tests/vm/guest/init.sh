#!/bin/sh
# The guest's init (kernel command line init=/usr/local/sbin/iotrace-vm-init), installed into the
# image by tests/vm/build-image.sh. It mounts what a Dom0-like host has (proc, sys, tracefs,
# debugfs, bpffs), the 9p shares QEMU offers (each under /mnt/<mount_tag>; read-only for the tags
# listed in the kernel parameter iotrace.ro=TAG,TAG), then runs the harness agent from the share
# tagged "harness" (tests/vm/guest/agent.py) until it exits, and powers off.
#
# With --service (systemd images, iotrace-vm-agent.service) the system is already up: only the
# shares are mounted and the agent is run.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "iotrace-vm-init: $*" > /dev/console 2>/dev/null || echo "iotrace-vm-init: $*"; }

if [ "${1:-}" != "--service" ]; then
    mount -t proc proc /proc 2>/dev/null
    mount -t sysfs sysfs /sys 2>/dev/null
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
    mount -o remount,rw / || say "cannot remount / read-write"
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /dev/shm
    mount -t tmpfs tmpfs /run
    mount -t tmpfs tmpfs /tmp
    # A Dom0 with systemd has these (sys-kernel-tracing.mount, sys-kernel-debug.mount): BCC's uprobe
    # cleanup writes to tracefs' uprobe_events.
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "no tracefs"
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || say "no debugfs"
    mount -t bpf bpf /sys/fs/bpf 2>/dev/null
    hostname "$(cat /etc/hostname)"
fi

modprobe -q virtio_console 2>/dev/null
modprobe -q 9pnet_virtio 2>/dev/null
modprobe -q 9p 2>/dev/null
ro_tags=$(sed -n 's/.*iotrace\.ro=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
for tagfile in /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; do
    [ -e "$tagfile" ] || continue
    tag=$(tr -d '\0' < "$tagfile")
    mkdir -p "/mnt/$tag"
    mountpoint -q "/mnt/$tag" && continue
    mode=rw
    for t in $ro_tags; do [ "$t" = "$tag" ] && mode=ro; done
    mount -t 9p -o $mode,trans=virtio,version=9p2000.L,msize=524288,cache=none "$tag" "/mnt/$tag" \
        || say "cannot mount 9p share $tag"
done

if [ -f /mnt/harness/agent.py ]; then
    say "starting agent"
    python3 /mnt/harness/agent.py
    say "agent exited ($?)"
else
    say "no /mnt/harness/agent.py (no share tagged harness): nothing to run"
fi
[ "${1:-}" = "--service" ] && exit 0
sync
echo o > /proc/sysrq-trigger
sleep 10
