"""The audit log (iotrace.advise.audit): appended, never rewritten, readable after a kill."""
from __future__ import annotations

import json

import pytest

from iotrace.advise.audit import AuditLog, originals, read_audit
from iotrace.core.errors import InputError


def rec(identity, old, new, knob="xl-weight", action="set"):
    return {"action": action, "knob": knob, "identity": identity, "domid": 3, "domain": "web",
            "old": old, "new": new, "original": old}


def test_records_are_appended_with_time_and_read_back(tmp_path):
    p = tmp_path / "a" / "audit.jsonl"          # the directory is created
    with AuditLog(str(p)) as log:
        log.write(rec("uuid:1", 256, 128), now=1000.0)
    with AuditLog(str(p)) as log:               # a second run appends
        log.write(rec("uuid:1", 128, 64), now=1060.0)
    got = read_audit(str(p))
    assert [(r["old"], r["new"]) for r in got] == [(256, 128), (128, 64)]
    assert got[0]["time"] == 1000.0 and got[0]["time_iso"] == "1970-01-01T00:16:40Z"
    assert all(r["v"] == 1 for r in got)
    assert p.read_text().count("\n") == 2


def test_originals_are_the_first_set_of_each_knob_and_identity():
    records = [rec("uuid:1", 256, 128), rec("uuid:2", 100, 200, "cgroup-weight"),
               rec("uuid:1", 128, 64), {"action": "gone", "identity": "uuid:2"},
               rec("uuid:1", 0, 50, "xl-cap"), rec("uuid:1", 256, 128, action="rollback")]
    got = originals(records)
    assert [(r["knob"], r["identity"], r["old"]) for r in got] == [
        ("xl-weight", "uuid:1", 256), ("cgroup-weight", "uuid:2", 100), ("xl-cap", "uuid:1", 0)]


def test_a_torn_last_line_is_dropped_and_a_bad_line_is_named(tmp_path):
    p = tmp_path / "audit.jsonl"
    with AuditLog(str(p)) as log:
        log.write(rec("uuid:1", 256, 128))
    with open(p, "a") as fh:
        fh.write('{"v": 1, "action": "se')           # killed mid-write
    assert len(read_audit(str(p))) == 1
    with open(p, "a") as fh:
        fh.write('\n{"not": "ours"}\n')
    with pytest.raises(InputError, match=rf"{p}:2: not a JSON object|{p}:3: not an iotrace"):
        read_audit(str(p))
    with pytest.raises(InputError, match="no such file"):
        read_audit(str(tmp_path / "none.jsonl"))
    with pytest.raises(InputError, match="is a directory"):
        read_audit(str(tmp_path))


def test_unknown_action_and_plain_json(tmp_path):
    import numpy as np
    with AuditLog(str(tmp_path / "x.jsonl")) as log:
        with pytest.raises(ValueError):
            log.write({"action": "guess"})
        out = log.write({**rec("uuid:1", 1, 2), "signals": {"rate": np.float64(2.5)}})
    assert json.loads((tmp_path / "x.jsonl").read_text())["signals"]["rate"] == 2.5
    assert out["new"] == 2


def test_a_full_disk_is_one_line():
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    log = AuditLog("/dev/full")
    with pytest.raises(InputError, match="cannot write the audit log: No space left"):
        log.write(rec("uuid:1", 256, 128))
    log.close()


def test_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="cannot open the audit log"):
        AuditLog(str(tmp_path / "f" / "audit.jsonl"))
