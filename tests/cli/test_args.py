"""The argument types the verbs share (iotrace.cli.args): what each accepts and its one-line error."""
from __future__ import annotations

import argparse

import pytest

from iotrace.cli import args as A
from iotrace.core.errors import UserError


@pytest.mark.parametrize("parse,good,bad", [
    (A.seconds, {"1": 1.0, "0.25": 0.25, "1e3": 1000.0}, ["0", "-1", "x", "nan", "inf", ""]),
    (A.positive, {"2": 2.0, "0.5": 0.5}, ["0", "-3", "x", "nan", "-inf"]),
    (A.count, {"1": 1, "12": 12}, ["0", "-1", "1.5", "x", ""]),
    (A.speed, {"0": 0.0, "1": 1.0, "2.5": 2.5, "1e6": 1e6}, ["-1", "1e7", "nan", "inf", "fast"]),
    (A.domid, {"0": 0, "7": 7, "0x10": 16, "32751": 32751}, ["-1", "32752", "32767", "x"]),
    (A.byte_offset, {"0x48": 0x48, "80": 80, "0": 0}, ["-5", "0x10000", "x"]),
    (A.duration, {"250us": 250e-6, "1ms": 1e-3, "1.5 ms": 1.5e-3, "2s": 2.0, "100ns": 1e-7,
                  "3µs": 3e-6}, ["1", "0ms", "-1ms", "fastms", "ms", "5m", "nan s"]),
])
def test_parsers(parse, good, bad):
    for text, want in good.items():
        assert parse(text) == pytest.approx(want, rel=1e-12)
    for text in bad:
        with pytest.raises(ValueError) as exc:
            parse(text)
        assert repr(text) in str(exc.value) or "outside" in str(exc.value) \
            or "duration" in str(exc.value)


def test_argtype_is_argparse_error_and_checked_is_one_line():
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    p.add_argument("--speed", type=A.argtype(A.speed))
    assert p.parse_args(["--speed", "3"]).speed == 3.0
    with pytest.raises(argparse.ArgumentError, match="expected a number in 0..1000000"):
        p.parse_args(["--speed", "-1"])
    with pytest.raises(UserError) as exc:
        A.checked("--duration", A.seconds, "soon")
    assert str(exc.value) == "--duration: expected seconds, got 'soon'"
