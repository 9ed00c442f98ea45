#!/usr/bin/env bash
# Part of `make lint`: the sources name files of this repository or upstream sources, never a path
# of the machine they were written on (/work/..., /tmp/..., a home directory) or the test data's
# folder beside the clone (../shared). Test code may read that folder, through tests/support.
set -euo pipefail
cd "$(dirname "$0")/.."
pattern='(/work/|/root/|/home/[a-z]|\.\./shared)'
hits=$(git ls-files -- '*.py' '*.c' '*.h' '*.sh' '*.yaml' '*.yml' 'Makefile' '*.toml' '*.service' \
        | grep -v '^tests/support/' | grep -v '^scripts/check-no-machine-paths.sh$' \
        | xargs grep -nE "$pattern" 2>/dev/null || true)
if [ -n "$hits" ]; then
    echo "paths of a build machine in the sources (cite repository files or upstream sources):" >&2
    echo "$hits" >&2
    exit 1
fi
