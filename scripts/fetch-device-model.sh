#!/usr/bin/env bash
# Fetch one Debian build of a Xen device model (a binary the tests resolve and attach to, never
# run, never committed) into a cache outside the repository, and print the binary's path.
#
#   scripts/fetch-device-model.sh SUITE PACKAGE VERSION PATH-IN-PACKAGE [BUILD-ID]
#   e.g. scripts/fetch-device-model.sh trixie qemu-system-xen 1:10.0.13+ds-0+deb13u1 \
#            /usr/libexec/xen-qemu-system-i386 2d2e917153c25206ebfdfa8d605a8c62eb719f51
#
# The cache is keyed by the inputs: $IOTRACE_CACHE/device-models/SUITE/PACKAGE_VERSION/ (default
# /var/cache/iotrace, or ~/.cache/iotrace when that is not writable); a second call with the same
# inputs only prints the path. apt runs with a temporary sources list and its own state and cache
# directories, so the host's apt configuration, lists and package database are untouched (the
# archive keys are the host's, from debian-archive-keyring). When VERSION is no longer in the
# suite (Debian keeps only the newest point release), the suite's current version is fetched
# instead and a line on stderr says so. With BUILD-ID, the extracted binary's GNU build-id is
# checked (and reported on stderr when it differs, e.g. after that fallback).
#
# Exit status: 0 and the path on stdout; 1 with one line on stderr when it cannot be fetched.
set -euo pipefail

die() { echo "fetch-device-model: $*" >&2; exit 1; }
[ $# -ge 4 ] || die "usage: $0 SUITE PACKAGE VERSION PATH-IN-PACKAGE [BUILD-ID]"
suite=$1 pkg=$2 version=$3 inner=$4 want_id=${5:-}
mirror=${IOTRACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}

root=${IOTRACE_CACHE:-/var/cache/iotrace}
if ! mkdir -p "$root/device-models" 2>/dev/null || [ ! -w "$root/device-models" ]; then
    root=${XDG_CACHE_HOME:-$HOME/.cache}/iotrace
    mkdir -p "$root/device-models" || die "cannot create a cache directory under $root"
fi
key=$(printf '%s_%s' "$pkg" "$version" | tr -c 'A-Za-z0-9._+-' '_')
dest=$root/device-models/$suite/$key

build_id() { readelf -n "$1" 2>/dev/null | sed -n 's/^ *Build ID: *\([0-9a-f]*\)$/\1/p' | head -n1; }

report() {
    local got
    got=$(build_id "$dest$inner")
    if [ -n "$want_id" ] && [ "$got" != "$want_id" ]; then
        echo "fetch-device-model: $dest$inner has build-id ${got:-none}, not $want_id" \
             "($(cat "$dest/.version" 2>/dev/null || echo '?'))" >&2
    fi
    echo "$dest$inner"
}

if [ -f "$dest/.complete" ] && [ -f "$dest$inner" ]; then
    report
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get is not available (a Debian machine is needed)"
command -v dpkg-deb >/dev/null || die "dpkg-deb is not available"
mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock 9                                  # two test runs fetching at once must not race
if [ -f "$dest/.complete" ] && [ -f "$dest$inner" ]; then
    report
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/iotrace-fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/etc/sources.list.d" "$work/etc/preferences.d" "$work/state/lists/partial" \
         "$work/cache/archives/partial" "$work/dl"
cat >"$work/etc/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
EOF
apt_opts=(-o "Dir::Etc::sourcelist=$work/etc/sources.list"
          -o "Dir::Etc::sourceparts=$work/etc/sources.list.d"
          -o "Dir::Etc::preferencesparts=$work/etc/preferences.d"
          -o "Dir::State=$work/state" -o "Dir::State::status=/dev/null"
          -o "Dir::Cache=$work/cache" -o "APT::Architecture=amd64"
          -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
apt-get "${apt_opts[@]}" -qq update >"$work/update.log" 2>&1 ||
    die "apt-get update for $suite failed: $(grep -m1 -E '^(E|W):' "$work/update.log" || tail -n1 "$work/update.log")"
have=$(apt-cache "${apt_opts[@]}" madison "$pkg" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}')
[ -n "$have" ] || die "$pkg is not in $suite"
got_version=$version
if ! grep -qxF "$version" <<<"$have"; then
    got_version=$(head -n1 <<<"$have")
    echo "fetch-device-model: $pkg $version is no longer in $suite; fetching $got_version" >&2
fi
(cd "$work/dl" && apt-get "${apt_opts[@]}" -qq download "$pkg=$got_version" >"$work/dl.log" 2>&1) ||
    die "apt-get download $pkg=$got_version failed: $(tail -n1 "$work/dl.log")"
deb=$(ls "$work"/dl/*.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || die "apt-get download $pkg=$got_version produced no .deb"
dpkg-deb -x "$deb" "$work/x" || die "dpkg-deb -x $(basename "$deb") failed"
[ -f "$work/x$inner" ] || die "$(basename "$deb") has no $inner"
echo "$pkg $got_version ($suite)" >"$work/x/.version"
touch "$work/x/.complete"
rm -rf "$dest"
mv "$work/x" "$dest"
report
