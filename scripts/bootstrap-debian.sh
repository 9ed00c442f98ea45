#!/usr/bin/env bash
# Idempotent bootstrap of the system packages iotrace needs on Debian 12, as root.
# Called by `make install`; safe to run again (does nothing when all is present).
set -euo pipefail

PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 libxen-dev xen-utils-4.17
      prometheus gcc make tmux python3-venv python3-numpy qemu-system-xen libelf-dev
      openssl    # openssl: test certificates for https (iotrace top --from, serve TLS)
      qemu-system-x86 debootstrap e2fsprogs)   # the VM harness (tests/vm, make test-kernels)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: need root to install: ${missing[*]}" >&2; exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: xen-utils would otherwise pull in the hypervisor and grub.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's prometheus package starts a service; iotrace's tests run their own instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi

# BCC compiles against kernel headers of the running kernel. The running kernel may be newer than
# any Debian header package: point /lib/modules/$(uname -r)/{build,source} at the newest -amd64
# headers and their -common twin (fine for uprobes, which use no kernel struct layout).
kver=$(uname -r)
mod=/lib/modules/$kver
if [ ! -e "$mod/build/include" ] && [ "$(id -u)" -eq 0 ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
    if [ -n "$hdr" ]; then
        common=${hdr%-amd64}-common
        mkdir -p "$mod"
        ln -sfn "$hdr" "$mod/build"
        [ -d "$common" ] && ln -sfn "$common" "$mod/source"
    fi
fi
exit 0
