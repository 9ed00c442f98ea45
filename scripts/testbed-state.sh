#!/usr/bin/env bash
# The machine state iotrace's tests need, beyond installed packages (scripts/bootstrap-debian.sh):
# none of it survives a reboot or is recorded in a stamp, so `make install` runs this every time.
#
#   scripts/testbed-state.sh           make it so (root): idempotent
#   scripts/testbed-state.sh --check   only look; list what is missing, exit 1 if anything is
#
#  1. tracefs on /sys/kernel/tracing, as systemd's sys-kernel-tracing.mount would mount it: the tests
#     run iotrace with CAP_BPF + CAP_PERFMON only (deploy/iotrace.service), which cannot mount it and
#     needs it (see probes/bpf/tracefs.py), and some tests use BCC directly, whose cleanup needs it.
#     debugfs is not needed (BCC uses /sys/kernel/tracing when /sys/kernel/debug/tracing is absent).
#  2. /lib/modules/$(uname -r)/build (and source): BCC compiles against the running kernel's headers.
#     The running kernel may be newer than any Debian header package: the newest -amd64 headers
#     and their -common twin (fine for uprobes, which use no kernel struct layout).
#  3. No Debian prometheus service running: installing the package starts one (:9090, scraping
#     localhost); the tests run their own instances on free ports, and a shared 2-core machine has
#     no CPU to spare for it.
set -euo pipefail

check=0
[ "${1:-}" = "--check" ] && check=1
missing=()

tracefs_ok() { [ -e /sys/kernel/tracing/uprobe_events ]; }
if ! tracefs_ok; then
    if [ $check -eq 0 ] && [ "$(id -u)" -eq 0 ]; then
        mount -t tracefs -o nosuid,nodev,noexec tracefs /sys/kernel/tracing
    fi
    tracefs_ok || missing+=("tracefs on /sys/kernel/tracing (mount -t tracefs -o nosuid,nodev,noexec tracefs /sys/kernel/tracing)")
fi

kver=$(uname -r)
mod=/lib/modules/$kver
if [ ! -e "$mod/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
    if [ $check -eq 0 ] && [ "$(id -u)" -eq 0 ] && [ -n "$hdr" ]; then
        common=${hdr%-amd64}-common
        mkdir -p "$mod"
        ln -sfn "$hdr" "$mod/build"
        [ -d "$common" ] && ln -sfn "$common" "$mod/source"
    fi
    [ -e "$mod/build/include" ] || missing+=("kernel headers at $mod/build (linux-headers-amd64, then make install)")
fi

prometheus_running() {
    if [ -d /run/systemd/system ]; then
        systemctl is-active --quiet prometheus 2>/dev/null
    elif [ -x /etc/init.d/prometheus ]; then
        /etc/init.d/prometheus status >/dev/null 2>&1
    else
        return 1
    fi
}
if prometheus_running; then
    if [ $check -eq 0 ] && [ "$(id -u)" -eq 0 ]; then
        if [ -d /run/systemd/system ]; then
            systemctl stop prometheus
        else
            /etc/init.d/prometheus stop >/dev/null
        fi
    fi
    prometheus_running && missing+=("the Debian prometheus service is running (systemctl stop prometheus)")
fi

if [ ${#missing[@]} -gt 0 ]; then
    printf 'testbed: missing: %s\n' "${missing[@]}" >&2
    [ "$(id -u)" -ne 0 ] && [ $check -eq 0 ] && echo "testbed: run make install as root" >&2
    exit 1
fi
exit 0
