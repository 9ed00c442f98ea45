"""Argument types shared by the verbs: one definition of a duration, a count, a speed, a domain id.

Each parser takes the text the operator typed and returns the value or raises ``ValueError`` with
what was expected (no flag name: the caller knows it). Two adapters put them to use:

* ``argtype(parse)``: an argparse ``type=`` (argparse names the flag and exits 2);
* ``checked(flag, parse, text)``: for verbs that validate after parsing (QEMU-style single-dash
  flags of ``iotrace standin``): a ``UserError`` "FLAG: what was expected".
"""
from __future__ import annotations

import argparse
import math

from iotrace.core.domains import DOMID_FIRST_RESERVED
from iotrace.core.errors import UserError

MAX_SPEED = 1e6


def _number(text, expected: str, lo: float, hi: float, lo_open: bool) -> float:
    """A finite number in [lo, hi] (lo excluded when ``lo_open``); ValueError saying
    ``expected`` otherwise."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise ValueError(f"expected {expected}, got {text!r}")
    return v


def seconds(text) -> float:
    """A positive, finite number of seconds."""
    try:
        float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected seconds, got {text!r}") from None
    return _number(text, "a positive number of seconds", 0.0, math.inf, True)


def positive(text) -> float:
    """A positive, finite number (a unit the flag's help names)."""
    return _number(text, "a positive number", 0.0, math.inf, True)


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def duration(text) -> float:
    """A positive duration with its unit, in seconds: 250us, 1.5ms, 2s (ns, us/µs, ms, s).
    The unit is required: a bare number is ambiguous between the flag's and the view's units."""
    t = str(text).strip()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            num = t[:-len(unit)].strip()
            v = _number(num, "a positive duration such as 250us, 1ms, 2s", 0.0, math.inf, True)
            return v * _UNITS[unit]
    raise ValueError(f"expected a duration with its unit (ns, us, ms, s), e.g. 250us or 1ms, "
                     f"got {text!r}")


def count(text) -> int:
    """A whole number, 1 or more."""
    try:
        v = int(str(text), 10)
    except ValueError:
        v = 0
    if v < 1:
        raise ValueError(f"expected a whole number (1 or more), got {text!r}")
    return v


def speed(text) -> float:
    """A replay speed: 0 (as fast as possible / all at once) or a factor of real time."""
    return _number(text, f"a number in 0..{int(MAX_SPEED)} (0: as fast as possible)", 0.0, MAX_SPEED,
                   False)


def domid(text) -> int:
    """A guest domain id (0 .. DOMID_FIRST_RESERVED - 1), decimal or 0x hex."""
    try:
        v = int(str(text), 0)
    except ValueError:
        raise ValueError(f"expected a domain id, got {text!r}") from None
    if not 0 <= v < DOMID_FIRST_RESERVED:
        raise ValueError(f"{v} outside 0..{DOMID_FIRST_RESERVED - 1}")
    return v


def byte_offset(text) -> int:
    """A byte offset inside a structure (decimal or 0x hex), 0 or more."""
    try:
        v = int(str(text), 0)
    except ValueError:
        raise ValueError(f"expected a byte offset such as 0x48, got {text!r}") from None
    if not 0 <= v < 1 << 16:
        raise ValueError(f"expected a byte offset 0..0xffff, got {text!r}")
    return v


def argtype(parse):
    """``parse`` as an argparse ``type=``: its ValueError becomes argparse's own error."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__      # argparse names the type in some messages
    return convert


def checked(flag: str, parse, text):
    """``parse(text)``, its ValueError as ``UserError("FLAG: ...")``."""
    try:
        return parse(text)
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None


def add_filter_arguments(p, title: str) -> None:
    """The request filters of ``top`` and ``report`` (iotrace.core.filters), one definition:
    -D/--domain, --vcpu, --range, --type, --dir, each repeatable or comma-separated."""
    g = p.add_argument_group(title)
    g.add_argument("-D", "--domain", action="append", default=[], metavar="NAME|ID",
                   help="only these domains (id, or name with shell wildcards)")
    g.add_argument("--vcpu", action="append", default=[], metavar="N",
                   help="only requests from these vCPUs (-1: unknown, e.g. buffered ioreqs)")
    g.add_argument("--range", action="append", default=[], metavar="GLOB",
                   help="only these named ranges (e.g. com1, 'ide-*', vga-lowmem, other)")
    g.add_argument("--type", action="append", default=[], metavar="TYPE",
                   help="only these request types: pio, mmio, pci_config, ...")
    g.add_argument("--dir", action="append", default=[], metavar="DIR",
                   help="only reads or only writes: read, write")
