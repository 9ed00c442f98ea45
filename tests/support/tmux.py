"""A private tmux server driving a full-screen program, for the tests of ``iotrace top``.

``Tmux(cmd)`` starts ``cmd`` in a detached session of fixed size on its own socket; ``keys()``
sends keys, ``screen()`` reads the pane, ``wait_for()`` polls it with a deadline.
"""
from __future__ import annotations

import os
import subprocess
import time

from support import require_tool


class Tmux:
    """A private tmux server (own socket) with one detached session running a command."""

    def __init__(self, cmd: str, width: int = 80, height: int = 24):
        self.exe = require_tool("tmux")
        self.sock = f"iotrace-top-test-{os.getpid()}-{id(self)}"
        # The shell keeps the pane open after the program exits, so its exit status can be read.
        wrapped = f"{cmd}; echo EXIT=$?; sleep 60"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(width),
                  "-y", str(height), "sh", "-c", wrapped)

    def tmux(self, *args: str) -> str:
        r = subprocess.run([self.exe, "-L", self.sock, *args], capture_output=True, text=True,
                           timeout=10)
        if r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "t")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, pred, timeout: float = 10.0, what: str = "") -> str:
        """The screen once ``pred`` holds for it, and it is a whole frame: the same in two
        captures 50 ms apart (a capture can fall inside curses' redraw: seen in CI, a new
        header above the previous frame's rows)."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if pred(text):
                time.sleep(0.05)
                if self.screen() == text:
                    return text
                continue
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or pred}; screen:\n{text}")

    def kill(self) -> None:
        subprocess.run([self.exe, "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


def table_rows(screen: str) -> list[str]:
    """The table lines (below the column header, above the key-hint line)."""
    lines = screen.splitlines()
    head = next(i for i, ln in enumerate(lines) if "REQ/s" in ln and "NAME" in ln)
    out = []
    for ln in lines[head + 1:]:
        if ln.startswith("q quit") or ln.startswith("sort:") or ln.startswith("filter"):
            break
        if ln.strip():
            out.append(ln)
    return out
