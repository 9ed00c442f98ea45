"""The audit log: one JSON object per line, appended, never rewritten.

Every change advise makes is written *before* the next one is tried (the file is opened with
O_APPEND, each line flushed and fsync'd), so a killed advisor leaves a log that says everything
it did. A record (``"v": 1``)::

    {"v": 1, "time": 1733.., "time_iso": "2025-..Z", "action": "set" | "restore" | "rollback" | "gone",
     "knob": "xl-weight" | "xl-cap" | "cgroup-weight", "domid": 3, "domain": "web",
     "identity": "uuid:…" | "dm:<pid>:<start ticks>", "uuid": "…" | null,
     "class": "storming", "settled": "storming", "reason": "…", "signals": {...},
     "old": 256, "new": 128, "original": 256, "target": 64,
     "command": ["xl", "sched-credit2", "-d", "3", "-w", "128"],        # xl
     "cgroup": {"mode": "v1", "dir": …, "file": …, "pid": …, "start_ticks": …,
                "created": true, "moved_from": …, "raw_original": 1024, "raw_new": 512}}

``originals(records)`` is what ``--rollback`` restores: for every (knob, identity) the state
recorded by its first ``set``. Rollback appends its own ``rollback`` records to the same file.
"""
from __future__ import annotations

import json
import os
import time

from iotrace.core.errors import InputError

VERSION = 1
ACTIONS = ("set", "restore", "rollback", "gone")


class AuditLog:
    def __init__(self, path: str):
        self.path = str(path)
        d = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(d, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open the audit log: {exc.strerror}") from None

    def write(self, record: dict, now: float | None = None) -> dict:
        if record.get("action") not in ACTIONS:
            raise ValueError(f"unknown audit action {record.get('action')!r}")
        now = time.time() if now is None else now
        rec = {"v": VERSION, "time": round(now, 3),
               "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        rec.update(record)
        line = (json.dumps(rec, sort_keys=True, default=_plain) + "\n").encode("utf-8")
        try:
            os.write(self._fd, line)
            os.fsync(self._fd)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot write the audit log: {exc.strerror}") from None
        return rec

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain(obj):
    """JSON for the odd NumPy number in a signals dict."""
    try:
        return obj.item()
    except AttributeError:
        return str(obj)


def read_audit(path: str) -> list[dict]:
    """Every record of an audit log; a line that is not one is an InputError naming it."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an audit log") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    out = []
    lines = raw.split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if n == len(lines) and not raw.endswith(b"\n"):
            # a writer killed mid-line leaves a torn last line: every whole line before it stands
            try:
                json.loads(line)
            except ValueError:
                continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{n}: not a JSON object ({exc})") from None
        if not isinstance(rec, dict) or rec.get("v") != VERSION or rec.get("action") not in ACTIONS:
            raise InputError(f"{path}:{n}: not an iotrace advise audit record (v {VERSION})")
        out.append(rec)
    return out


def originals(records: list[dict]) -> list[dict]:
    """The first ``set`` record of every (knob, identity), in the order they were made: what
    ``--rollback`` restores."""
    seen, out = set(), []
    for rec in records:
        if rec.get("action") != "set":
            continue
        key = (rec.get("knob"), rec.get("identity"))
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out
