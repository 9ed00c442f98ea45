#!/usr/bin/env bash
# Idempotent bootstrap of the system packages iotrace needs on Debian 12, as root.
# Called by `make install`; safe to run again (does nothing when all is present).
set -euo pipefail

PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 libxen-dev xen-utils-4.17
      prometheus gcc make tmux python3-venv python3-numpy qemu-system-xen libelf-dev
      openssl    # openssl: test certificates for https (iotrace top --from, serve TLS)
      util-linux # unshare, setpriv, mountpoint: tests without tracefs, with the unit's capabilities
      binutils   # objdump/objcopy/readelf: the resolver tests, scripts/fetch-device-model.sh
      # `make deb` (deploy/debian/control's Build-Depends) and `make test-deb` (a debootstrap chroot)
      dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
      python3-prometheus-client python3-yaml python3-bcrypt python3-capstone
      python3-pyelftools  # also: the automatic resolver; its tests' .eh_frame oracle
      lintian debootstrap
      clang-format   # make lint: the C style (.clang-format)
      qemu-system-x86 e2fsprogs)   # the VM harness (tests/vm, make test-kernels)

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

# The machine state the tests need (tracefs, the kernel-headers link, no prometheus service) is
# scripts/testbed-state.sh's job: `make install` runs it every time (it does not survive a reboot).
exit 0
