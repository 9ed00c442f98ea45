#!/usr/bin/env python3
"""In Dom0: the I/O requests of a xentrace capture and of an iotrace recording, counted per
(domain, vCPU, type, dir, address), as JSON on stdout (tests/xen/test_window.py compares them).

    python3 window_counts.py PROJECT --xentrace FILE --recording FILE

{"xentrace": {"DOMID VCPU TYPE DIR ADDR": n, ...}, "qemu": {...}, "names": {domid: name},
 "lost": {"xentrace": n, "qemu": n}, "decode_errors": n}
Addresses are hexadecimal; PCI config addresses as the source reports them.
"""
import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, "/mnt/harness")
from iotrace_env import make_importable  # noqa: E402


def key_counts(ev) -> Counter:
    c = Counter()
    for d, v, t, r, a in zip(ev["domid"].tolist(), ev["vcpu"].tolist(), ev["type"].tolist(),
                             ev["dir"].tolist(), ev["addr"].tolist()):
        c[f"{d} {v} {t} {r} {a:#x}"] += 1
    return c


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("project")
    p.add_argument("--xentrace")
    p.add_argument("--recording")
    a = p.parse_args()
    make_importable(a.project)
    out = {"lost": {}, "names": {}}
    if a.xentrace:
        from iotrace.xentrace.decoder import decode_file
        res = decode_file(a.xentrace)
        out["xentrace"] = key_counts(res.events)
        out["lost"]["xentrace"] = res.lost_records
        out["decode_errors"] = res.decode_errors
        out["xentrace_bytes"] = os.path.getsize(a.xentrace)
    if a.recording:
        from iotrace.offline.recording import read_recording
        rec = read_recording(a.recording)
        out["qemu"] = key_counts(rec.events)
        out["lost"]["qemu"] = rec.lost_events
        out["names"] = {str(k): v for k, v in rec.domains.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
