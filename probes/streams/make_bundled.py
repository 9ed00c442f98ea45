"""Make the bundled stream ``linux-boot-excerpt.stream`` from the shared Linux-boot capture.

    .venv/bin/python probes/streams/make_bundled.py [PATH/linux-boot-tcg.csv.gz]

The whole capture (see docs/data.md) is converted with Xen's forwarding rules
(``iotrace.probes.standin.stream.forward``: the 0xcf8 latch and the set of registered PCI functions need
the whole boot), then three excerpts of it are kept, each contiguous and unchanged except for
its time origin:

1. SeaBIOS scanning PCI (config cycles, port I/O, vCPU 0);
2. Linux bringing up the VGA console (synchronous MMIO reads, buffered VGA writes, port I/O);
3. Linux probing devices with both vCPUs (port I/O and PCI config from vCPU 0 and vCPU 1).

Each excerpt starts GAP_NS after the previous one's last request, so the stream has idle gaps
(during which the stand-in's buffered-I/O timer drains the buffered page). The result is a few
thousand requests and lasts well under a second at --speed 1. Deterministic: same input, same file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from iotrace.probes.standin import stream

HERE = Path(__file__).resolve().parent
DEFAULT_CSV = HERE.parent.parent.parent / "shared" / "data" / "linux-boot-tcg.csv.gz"
OUT = HERE / "linux-boot-excerpt.stream"
# (start µs, end µs, at most this many requests) in the capture's own time.
WINDOWS = [
    (15_000, 25_000, 700),
    (3_879_857, 3_900_000, 1200),
    (4_757_000, 4_800_000, 1500),
]
GAP_NS = 200_000_000


def excerpt(reqs: np.ndarray) -> np.ndarray:
    parts = []
    t_next = 0
    for lo, hi, cap in WINDOWS:
        sel = reqs[(reqs["t_ns"] >= lo * 1000) & (reqs["t_ns"] < hi * 1000)][:cap].copy()
        sel["t_ns"] = sel["t_ns"] - sel["t_ns"][0] + t_next
        t_next = int(sel["t_ns"][-1]) + GAP_NS
        parts.append(sel)
    return np.concatenate(parts)


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else DEFAULT_CSV
    reqs, stats = stream.forward(stream.read_csv(src))
    out = excerpt(reqs)
    stream.write_stream(OUT, out)
    kinds = {
        "pio": int((out["type"] == 0).sum()),
        "mmio_sync": int(((out["type"] == 1) & (out["buffered"] == 0)).sum()),
        "buffered": int(out["buffered"].sum()),
        "pci_config": int((out["type"] == 2).sum()),
        "vcpu1": int((out["vcpu"] == 1).sum()),
    }
    print(f"{OUT.name}: {len(out)} requests over {out['t_ns'][-1] / 1e9:.3f} s, {kinds} "
          f"(from {stats.forwarded} forwarded of {stats.rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
