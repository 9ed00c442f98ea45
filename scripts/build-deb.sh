#!/usr/bin/env bash
# `make deb`: the Debian package iotrace_<version>_<arch>.deb, into out/.
#
# Builds in a clean copy of the tree (the files git knows or would add: no .venv, no build
# products) under build/deb/, with deploy/debian as its debian/ directory, by dpkg-buildpackage
# (dh + dh-python's pybuild, see deploy/debian/rules), then runs lintian on the result: any error
# or warning fails the build (an override, if one is ever needed, goes in
# deploy/debian/iotrace.lintian-overrides with the reason beside it).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
changelog=$(dpkg-parsechangelog -l deploy/debian/changelog -S Version)
if [ "$version" != "$changelog" ]; then
    echo "build-deb: pyproject.toml says $version, deploy/debian/changelog $changelog" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)
deb=iotrace_${version}_${arch}.deb

work=build/deb
src=$work/iotrace-$version
rm -rf "$work"
mkdir -p "$src" out
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"           # a file deleted but not yet committed: skip
done | tar --null -T - -cf - | tar -xf - -C "$src"
rm -rf "$src/debian"
cp -r deploy/debian "$src/debian"

# Debian's own tools only: a python3 earlier on PATH (pyenv, a venv) is not the one packaged for.
(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc)

cp "$work/$deb" out/
echo "build-deb: lintian out/$deb" >&2
env PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error,warning --info "out/$deb"
echo "out/$deb"
