"""What the real ``xl`` of this machine says about its own syntax and output, read from the binary.

Xen is not running on the test machines, so ``xl`` cannot run a command; its usage text, its
getopt strings and its printf formats are in the binary itself (Debian's xen-utils-4.17,
/usr/lib/xen-4.17/bin/xl; tools/xl/xl_cmdtable.c, xl_sched.c, xl_info.c upstream). The advise
tests check iotrace's command lines and parsers against them: no stand-in for xl.
"""
from __future__ import annotations

import glob
import re
from functools import lru_cache
from pathlib import Path

import pytest

from support import IN_CI

CANDIDATES = ["/usr/lib/xen-*/bin/xl", "/usr/lib/xen/bin/xl", "/usr/sbin/xl"]


def xl_binary() -> Path:
    for pattern in CANDIDATES:
        for p in sorted(glob.glob(pattern)):
            if Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x7fELF":
                return Path(p)
    if IN_CI:
        pytest.fail("xl is not installed: make install should have installed xen-utils")
    pytest.skip("xl (xen-utils) is not installed")


@lru_cache(maxsize=None)
def strings(path: str) -> tuple[str, ...]:
    """The printable NUL-terminated strings of a binary (like strings(1), 3 characters or more;
    a trailing newline dropped)."""
    blob = Path(path).read_bytes()
    return tuple(s.decode("ascii").rstrip("\n")
                 for s in re.findall(rb"[\t\n\x20-\x7e]{3,}(?=\x00)", blob))


def c_to_python(fmt: str) -> str:
    """A C printf format as Python's % operator reads it (length modifiers dropped)."""
    return re.sub(r"%([-+ #0]*\d*(?:\.\d+)?)(?:hh|h|ll|l|z)?([diuxXsfc])", r"%\1\2", fmt).replace(
        "%u", "%d")
