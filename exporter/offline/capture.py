"""Offline inputs: open a capture file of any supported kind and decode it into one event batch.

Kinds, told apart by their first bytes:
* an iotrace recording (``iotrace record``; see ``iotrace.offline.recording``);
* a xentrace capture (no header: it starts with a TRC_TRACE_CPU_CHANGE record (event 0x0001f003,
  two extra words: header word 0x2001f003), or with a wrap/lost record; see ``iotrace.xentrace.decoder``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from iotrace.core.errors import InputError, open_input


@dataclass
class Capture:
    source: str                     # "xentrace" | "recording"
    path: str
    events: np.ndarray              # EVENT_DTYPE batch, in time order
    records: int = 0                # records decoded (xentrace: every trace record)
    lost_records: int = 0
    decode_errors: int = 0
    warnings: list[str] = field(default_factory=list)
    domain_names: dict[int, str] = field(default_factory=dict)


def load_capture(path: str, *, cpu_hz: float | None = None, xenalyze_compat: bool = False) -> Capture:
    """Decode a recording or a xentrace file; raise InputError (one line) if it is neither."""
    with open_input(path, "a capture file") as fh:
        head = fh.read(64)
    if not head:
        raise InputError(f"{path}: empty file, not a xentrace capture or an iotrace recording")

    from iotrace.offline import recording
    if recording.is_recording(head):
        if xenalyze_compat:
            raise InputError(f"{path}: --xenalyze-compat applies to xentrace captures only")
        rec = recording.read_recording(path)
        return Capture("recording", path, rec.events, records=len(rec.events),
                       lost_records=rec.lost_events, warnings=list(rec.warnings),
                       domain_names=dict(rec.domains))

    from iotrace.xentrace import decoder
    res = decoder.decode_file(path, cpu_hz=cpu_hz, xenalyze_compat=xenalyze_compat)
    return Capture("xentrace", path, res.events, records=res.records,
                   lost_records=res.lost_records, decode_errors=res.decode_errors,
                   warnings=list(res.warnings))
