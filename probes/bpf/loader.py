"""Load probes/bpf/ioreq.bpf.c for one device model binary and attach it (per binary, pid -1).

One BPF module per binary: the hook parameters (send_vcpu offset, the buffered caller's return
address range) differ between builds and are compiled in as constants, so the hot path has no
per-request configuration lookup. A uprobe on the binary's path with pid -1 covers every process
running it, including those started later, from their first request.
"""
from __future__ import annotations

import atexit
import ctypes as ct
import os
from dataclasses import dataclass

from iotrace.core.errors import ProbeError
from iotrace.probes.bpf import types as T
from iotrace.probes.bpf import uprobes
from iotrace.probes.hook.resolve import Resolution

PROBES_DIR = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(PROBES_DIR, "ioreq.bpf.c")
EMPTY_PROGRAM = os.path.join(PROBES_DIR, "empty.bpf.c")

STATS_ENTRIES = 65536
RINGBUF_PAGES = 256          # 1 MiB: ~18,700 events of 56 bytes


def import_bcc():
    try:
        import bcc  # Debian's python3-bpfcc (never PyPI's "bcc")
    except ImportError:
        raise ProbeError("BCC is not available: apt-get install python3-bpfcc bpfcc-tools "
                         "(and use a venv made with --system-site-packages)") from None
    return bcc


def cflags_for(res: Resolution, mode: str, timing: bool,
               stats_entries: int = STATS_ENTRIES, ringbuf_pages: int = RINGBUF_PAGES) -> list[str]:
    flags = [f"-I{PROBES_DIR}",
             f"-DSEND_VCPU_OFF={res.send_vcpu_offset:#x}",
             f"-DEVENT_MODE={1 if mode == 'events' else 0}",
             f"-DTIMING={1 if timing else 0}",
             f"-DSTATS_ENTRIES={stats_entries}",
             f"-DRINGBUF_PAGES={ringbuf_pages}"]
    if res.buffered is not None:
        flags += ["-DHAVE_BUF=1", f"-DBUF_LO={res.buffered[0]}LL", f"-DBUF_HI={res.buffered[1]}LL"]
    else:
        flags += ["-DHAVE_BUF=0"]
    return flags


def program_text(res: Resolution | None, mode: str = "metrics", timing: bool = True) -> str:
    """The BPF program as loaded for ``res`` (bcc style ``--ebpf``): the parameters, then the C."""
    with open(os.path.join(PROBES_DIR, "iotrace_bpf.h")) as f:
        header = f.read()
    with open(PROGRAM) as f:
        body = f.read()
    lines = []
    if res is not None:
        lines.append(f"/* for {res.path} (build-id {res.build_id}, {res.method}); "
                     f"uprobe at file offset {res.func_offset:#x} */")
        for flag in cflags_for(res, mode, timing):
            if flag.startswith("-D"):
                name, _, value = flag[2:].partition("=")
                lines.append(f"#define {name} {value}")
    body = body.replace('#include "iotrace_bpf.h"', header)
    return "\n".join(lines + [body])


@dataclass
class Attachment:
    point: str          # "entry" | "return"
    ok: bool
    error: str | None = None


class ProbeSet:
    """ioreq.bpf.c loaded for one binary, in metrics mode (in-kernel maps) or events mode (ring
    buffer); with or without the return probe for the service time."""

    def __init__(self, res: Resolution, mode: str = "metrics", timing: bool = True,
                 stats_entries: int = STATS_ENTRIES, ringbuf_pages: int = RINGBUF_PAGES):
        if not res.ok:
            raise ProbeError(res.error or f"{res.path}: nothing to attach to")
        if mode not in ("metrics", "events"):
            raise ValueError(mode)
        self.res, self.mode, self.timing = res, mode, timing
        self.attachments: list[Attachment] = []
        bcc = import_bcc()
        try:
            self.bpf = bcc.BPF(src_file=PROGRAM.encode(),
                               cflags=cflags_for(res, mode, timing, stats_entries,
                                                 ringbuf_pages=ringbuf_pages))
        except Exception as exc:  # bcc raises bare Exception for compile/load failures
            raise ProbeError(f"cannot load {os.path.basename(PROGRAM)} for {res.path}: "
                             f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        # bcc registers BPF.cleanup to run at exit; it needs tracefs to detach (see
        # probes/bpf/uprobes.py): whatever the way out, this set's own close() runs instead.
        self._closed = False
        atexit.unregister(self.bpf.cleanup)
        atexit.register(self.close)
        self._check_layouts()

    def _check_layouts(self) -> None:
        """The maps' key/value sizes as BCC compiled them equal the ctypes mirrors."""
        pairs = []
        if self.mode == "metrics":
            pairs.append(("stats", T.IoreqKey, T.IoreqStats))
        for name, key, leaf in pairs:
            table = self.bpf[name.encode()]
            if key is not None and ct.sizeof(table.Key) != ct.sizeof(key):
                raise ProbeError(f"map {name}: key is {ct.sizeof(table.Key)} bytes in BPF, "
                                 f"{ct.sizeof(key)} in bpf_types.py")
            if ct.sizeof(table.Leaf) != ct.sizeof(leaf):
                raise ProbeError(f"map {name}: value is {ct.sizeof(table.Leaf)} bytes in BPF, "
                                 f"{ct.sizeof(leaf)} in bpf_types.py")

    def attach(self) -> list[Attachment]:
        """Entry uprobe (and return probe) on the binary for every process (pid -1).

        Raises ``uprobes.TracefsMissing`` (a ProbeError) when no uprobe can be made on this host
        until tracefs is mounted; other failures are recorded in the returned attachments."""
        path, addr = self.res.path, self.res.func_vaddr
        points = [("entry", False, "on_entry")]
        if self.timing:
            points.append(("return", True, "on_return"))
        for point, retprobe, prog in points:
            try:
                uprobes.attach(self.bpf, path, addr, prog, retprobe=retprobe)
                self.attachments.append(Attachment(point, True))
            except uprobes.TracefsMissing:
                raise
            except Exception as exc:
                self.attachments.append(Attachment(point, False, str(exc).splitlines()[0]))
        return self.attachments

    @property
    def attached(self) -> int:
        return sum(a.ok for a in self.attachments)

    @property
    def failed(self) -> int:
        return sum(not a.ok for a in self.attachments)

    # -- reading ---------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        table = self.bpf[b"counters"]
        out = {}
        for i, name in enumerate(T.COUNTER_NAMES):
            out[name] = int(sum(table[ct.c_int(i)]))
        return out

    def stats_items(self) -> list[tuple]:
        """[(IoreqKey, IoreqStats)] of the stats map, copied out. With timing the kernel bins
        every request it counts and leaves count and svc_n 0 (two atomic adds fewer per
        request): both are the histogram's sum, filled in here."""
        out = [(self._copy(k, T.IoreqKey), self._copy(v, T.IoreqStats))
               for k, v in self._items("stats")]
        if self.timing:
            for _, v in out:
                v.count = v.svc_n = sum(v.hist)
        return out

    def _items(self, name: str):
        table = self.bpf[name.encode()]
        try:
            return list(table.items_lookup_batch())
        except Exception:
            return list(table.items())

    @staticmethod
    def _copy(obj, cls):
        return cls.from_buffer_copy(bytes(obj))

    def forget_tgids(self, tgids: set[int]) -> int:
        """Delete the map entries of processes that went away (so a reused pid starts afresh)."""
        if self.mode != "metrics" or not tgids:
            return 0
        n = 0
        table = self.bpf[b"stats"]
        for k in list(table.keys()):
            if k.tgid in tgids:
                try:
                    del table[k]
                    n += 1
                except KeyError:
                    pass
        return n

    def open_ring(self, callback) -> None:
        """callback(cpu, data, size) per record; call ``poll`` to deliver."""
        self.bpf[b"events"].open_ring_buffer(callback)

    def poll(self, timeout_ms: int = 100) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

    def close(self) -> list[str]:
        """Detach every uprobe (with or without tracefs) and free the BPF module; idempotent.
        Returns the problems met while detaching (none, normally)."""
        if self._closed:
            return []
        self._closed = True
        atexit.unregister(self.close)
        problems = uprobes.detach_all(self.bpf)
        try:
            self.bpf.cleanup()          # no uprobe left: closes programs, maps, ring buffers
        except Exception as exc:        # bcc raises bare Exception
            problems.append(str(exc).splitlines()[0] if str(exc) else repr(exc))
        return problems
