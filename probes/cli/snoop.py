"""``iotrace snoop``: one line per guest I/O request, live (the paper's figure 9, with names).

Events mode of the qemu-dm probes: every request handle_ioreq serves goes through a ring buffer.
Records the ring buffer could not take are counted and reported (on stderr), never silently lost.
"""
from __future__ import annotations

import signal
import sys
import time

import numpy as np

from iotrace.core.domains import display_name
from iotrace.core.errors import UserError
from iotrace.core.events import dir_name, type_name
from iotrace.probes.bpf.loader import program_text
from iotrace.probes.cli.common import add_probe_arguments, events_source, start_attached
from iotrace.probes.hook.resolve import resolve

HELP = "print every I/O request guests send to their device models, as it happens (root)"
EXAMPLES = """\
examples:
  iotrace snoop                          # every domain, every request
  iotrace snoop -d web --range com1      # domain "web" (or a domid), serial port only
  iotrace snoop --vcpu 0 --duration 10   # vCPU 0 for ten seconds
  iotrace snoop --binary ./qemu-dm       # also probe another device model binary
  iotrace snoop --ebpf                   # print the BPF program and exit

columns: TIME (wall clock), DOMAIN, VCPU (-1: buffered request, no vCPU), TYPE (pio, mmio,
pci_config, ...), DIR, ADDRESS, RANGE (named by the address map), SIZE (bytes), COUNT (rep),
DATA (the value written, or the device model's answer to a read; "*" marks a guest buffer
address; with --no-service-time there is no return probe and reads show 0), SVC_US (time from
handle_ioreq's entry to its return, including the return probe's own trap: a floor of a few us).
DATA is guest data (keystrokes pass through port 0x60): treat the output accordingly.
"""

HEADER = (f"{'TIME':<15} {'DOMAIN':<12} {'VCPU':>4} {'TYPE':<10} {'DIR':<5} {'ADDRESS':>18} "
          f"{'RANGE':<16} {'SIZE':>4} {'COUNT':>5} {'DATA':>18} {'SVC_US':>8}")


def add_arguments(p) -> None:
    p.add_argument("-D", "-d", "--domain", action="append", default=[], metavar="DOM",
                   help="only this domain (domid or name; repeatable)")
    p.add_argument("--vcpu", type=int, action="append", default=None, metavar="N",
                   help="only this vCPU (-1: buffered requests; repeatable)")
    p.add_argument("--range", action="append", default=[], metavar="NAME",
                   help="only this named address range, e.g. com1, vga-lowmem (repeatable)")
    p.add_argument("--ebpf", action="store_true", help="print the BPF program and exit")
    add_probe_arguments(p)


class Filter:
    def __init__(self, args, addrmap):
        self.vcpus = set(args.vcpu) if args.vcpu else None
        self.ranges = set(args.range) or None
        if self.ranges:
            unknown = self.ranges - set(addrmap.names)
            if unknown:
                raise UserError(f"--range {sorted(unknown)[0]}: not a range of the address map "
                                f"(known: {', '.join(sorted(set(addrmap.names)))})")
        self.domains = args.domain or None
        self.addrmap = addrmap

    def domids(self, names: dict[int, str]) -> set[int] | None:
        if self.domains is None:
            return None
        out = set()
        for d in self.domains:
            if d.isdigit():
                out.add(int(d))
            out.update(i for i, n in names.items() if n == d)
        return out

    def apply(self, batch: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        rng = self.addrmap.lookup(batch["type"], batch["addr"])
        keep = np.ones(len(batch), dtype=bool)
        doms = self.domids(names)
        if doms is not None:
            keep &= np.isin(batch["domid"], list(doms))
        if self.vcpus is not None:
            keep &= np.isin(batch["vcpu"], list(self.vcpus))
        if self.ranges is not None:
            idx = [i for i, n in enumerate(self.addrmap.names) if n in self.ranges]
            keep &= np.isin(rng, idx)
        return batch[keep], rng[keep]


class DomainFilterCheck:
    """Says on stderr, once, when -D names no domain a device model serves: after WAIT seconds,
    and at the end (a typo must not look like a quiet guest)."""

    WAIT = 5.0

    def __init__(self, flt: Filter, t0: float):
        self.flt, self.t0 = flt, t0
        self.matched = flt.domains is None
        self.said = False

    def check(self, names: dict[int, str], now: float | None) -> None:
        if self.matched or self.said:
            return
        if self.flt.domids(names) & set(names):
            self.matched = True
            return
        if now is None or now - self.t0 >= self.WAIT:
            self.said = True
            running = ", ".join(sorted(set(names.values()))) or "none so far"
            print(f"iotrace snoop: -D {','.join(self.flt.domains)} matches no domain "
                  f"{'yet ' if now is not None else ''}(device models seen: {running})",
                  file=sys.stderr)


def format_line(ev, rng_name: str, dom_name: str, wall_offset: float) -> str:
    t = ev["ts_ns"] / 1e9 + wall_offset
    lt = time.localtime(t)
    ts = time.strftime("%H:%M:%S", lt) + f".{int((t % 1) * 1e6):06d}"
    data = f"*{int(ev['data']):#x}" if ev["data_is_ptr"] else f"{int(ev['data']):#x}"
    svc = "-" if ev["service_ns"] < 0 else f"{ev['service_ns'] / 1000:.1f}"
    return (f"{ts:<15} {dom_name[:12]:<12} {int(ev['vcpu']):>4} {type_name(ev['type']):<10} "
            f"{dir_name(ev['dir']):<5} {int(ev['addr']):>#18x} {rng_name[:16]:<16} "
            f"{int(ev['size']):>4} {int(ev['count']):>5} {data:>18} {svc:>8}")


def run(args) -> int:
    if args.ebpf:
        res = None
        paths = args.binary or ["/usr/libexec/xen-qemu-system-i386"]
        try:
            r = resolve(paths[0])
            res = r if r.ok else None
        except Exception:
            res = None
        print(program_text(res, "events", not args.no_service_time))
        return 0
    src = events_source(args)
    flt = Filter(args, src.addrmap)
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    old = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    try:
        start_attached(src)
        wall_offset = time.time() - time.monotonic()
        print(f"iotrace snoop: {src.attached} uprobe(s) on "
              f"{', '.join(ps.res.path for ps in src.sets)}; Ctrl-C to stop", file=sys.stderr)
        print(HEADER, flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        lost_reported = 0
        names: dict[int, str] = {}
        unmatched = DomainFilterCheck(flt, time.monotonic())
        while not stop["flag"] and (deadline is None or time.monotonic() < deadline):
            batch = src.poll(100)
            names.update(src.domain_names())
            unmatched.check(names, time.monotonic())
            if len(batch):
                batch, rng = flt.apply(batch, names)
                out = [format_line(ev, src.addrmap.names[int(r)],
                                   display_name(int(ev["domid"]), names),
                                   wall_offset) for ev, r in zip(batch, rng)]
                if out:
                    sys.stdout.write("\n".join(out) + "\n")
                    sys.stdout.flush()
            lost = src.counters()["lost_events"]
            if lost > lost_reported:
                print(f"iotrace snoop: {lost - lost_reported} event(s) lost (ring buffer full; "
                      f"{lost} in all)", file=sys.stderr)
                lost_reported = lost
        st = src.stats()
        print(f"iotrace snoop: {st.events} event(s), {st.extra.get('lost_events', 0)} lost",
              file=sys.stderr)
        unmatched.check(names, None)
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
        src.stop()
    return 0
