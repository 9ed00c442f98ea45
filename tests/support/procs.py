"""Waiting on a running command's stderr in tests, bounded; ending it."""
from __future__ import annotations

import signal
import subprocess
import time


def wait_line(proc, needle: str, timeout: float = 30) -> list[str]:
    """Read ``proc.stderr`` (text) line by line until one contains ``needle``: the lines read.
    An AssertionError with what was read if it ends or ``timeout`` seconds pass first (checked
    between lines)."""
    end = time.monotonic() + timeout
    lines = []
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} in {lines}")


def wait_until(pred, timeout: float = 30.0, interval: float = 0.05):
    """Call ``pred`` until it returns something true (returned), at most ``timeout`` seconds;
    then its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


def terminate(proc, timeout: float) -> None:
    """SIGTERM a still running ``proc``; SIGKILL if it has not exited after ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
