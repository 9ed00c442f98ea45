"""Load probes/bpf/ioreq.bpf.c for one device model binary and attach it (per binary, pid -1).

One BPF module per binary: the hook parameters (send_vcpu offset, the buffered caller's return
address range) differ between builds and are compiled in as constants, so the hot path has no
per-request configuration lookup. A uprobe on the binary's path with pid -1 covers every process
running it, including those started later, from their first request.

A set is whole or nothing: its programs are loaded (verified by the kernel) before any uprobe is
attached, and when one program cannot be loaded or one point cannot be attached, nothing stays
attached (an entry probe whose return probe is missing traps on every request and counts nothing:
in metrics mode with service times the return probe does the counting). The kernel verifier's
answer is kept to its first error, one line (BCC prints the whole log on stderr; ``load_program``
takes it from there).

``IOTRACE_BPF_EXTRA_CFLAGS`` (environment): extra compiler flags for ioreq.bpf.c, for tests and
debugging only, e.g. ``-DIOTRACE_TEST_OOB=1`` compiles in an access every verifier rejects
(tests/probes/test_health.py proves with it that a program the kernel refuses makes the source
down).
"""
from __future__ import annotations

import atexit
import ctypes as ct
import errno
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

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


# Entries per BPF_MAP_LOOKUP_BATCH call. BCC's own items_lookup_batch() allocates and zeroes
# buffers for the map's max_entries on every call: 65,536 x (24 + 2,080) bytes = 138 MB per read
# of the stats map, whatever it holds - seconds of CPU per scrape in a Dom0 under QEMU TCG (the
# real-Xen harness: serve's /metrics never answered), and most of the scrape bench's RSS.
LOOKUP_BATCH = 1024


def lookup_batches(table, size: int = LOOKUP_BATCH) -> list[tuple]:
    """Every (key, value) of a BPF hash ``table`` (a bcc table), copied out, read with
    BPF_MAP_LOOKUP_BATCH through buffers of ``size`` entries (grown when one bucket holds more:
    ENOSPC). OSError when the kernel refuses batch lookups (then iterate key by key)."""
    from bcc.libbcc import lib
    out: list[tuple] = []
    token = ct.c_uint32(0)
    started = False
    size = max(1, min(size, table.max_entries))
    keys, vals = (table.Key * size)(), (table.Leaf * size)()
    while True:
        cnt = ct.c_uint32(size)
        res = lib.bpf_lookup_batch(table.map_fd, ct.byref(token) if started else None,
                                   ct.byref(token), keys, vals, ct.byref(cnt))
        err = ct.get_errno() if res != 0 else 0
        ks, vs = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
        for i in range(cnt.value):
            out.append((table.Key.from_buffer_copy(keys, i * ks),
                        table.Leaf.from_buffer_copy(vals, i * vs)))
        if res == 0:
            started = True
            continue
        if err == errno.ENOENT:
            return out                  # the whole map read
        if err == errno.ENOSPC and cnt.value == 0 and size < table.max_entries:
            size = min(size * 4, table.max_entries)     # one bucket holds more than size
            keys, vals = (table.Key * size)(), (table.Leaf * size)()
            continue
        raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")


EXTRA_CFLAGS_ENV = "IOTRACE_BPF_EXTRA_CFLAGS"


def extra_cflags() -> list[str]:
    """Test/debug flags from ``IOTRACE_BPF_EXTRA_CFLAGS`` (empty in normal use)."""
    return shlex.split(os.environ.get(EXTRA_CFLAGS_ENV, ""))


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
    return flags + extra_cflags()


# The verifier's log ends with its verdict, then a statistics line ("processed N insns ..."); the
# instructions before it look like "123: (0f) r8 += r2" or "; source line @ main.c:256".
_INSN = re.compile(r"^\s*(\d+: |; |\d+: R\d|R\d+=|from \d+ to \d+|mark_precise|last_idx|"
                   r"frame\d|func#|propagating|regs=|parent |Validating|;$)")
_STATS = re.compile(r"^processed \d+ insns")


def verifier_error(log: str) -> str | None:
    """The verifier's verdict in a kernel verifier log as BCC prints it: the message lines between
    the last instruction and the statistics line (the verifier stops at its first error), joined
    with "; ", e.g. "R8 unbounded memory access, make sure to bounds check any such access", with
    the instruction it refused ("at insn 129: (db) lock *(u64 *)(r8 +32) += r1") when shown."""
    lines = [ln.strip() for ln in log.splitlines()]
    end = next((i for i in range(len(lines) - 1, -1, -1) if _STATS.match(lines[i])), None)
    if end is None:
        return None
    block: list[str] = []
    i = end - 1
    while i >= 0 and len(block) < 4:
        ln = lines[i]
        if _INSN.match(ln):
            break
        if ln and not ln.startswith(("bpf: ", "HINT:", "verification time")):
            block.insert(0, ln)
        i -= 1
    if not block:
        return None
    insn = lines[i] if i >= 0 and re.match(r"^\d+: \(", lines[i]) else None
    where = f" (at insn {insn.split(';')[0].strip()})" if insn else ""
    return "; ".join(block) + where


def load_program(bpf, fn_name: str, what: str) -> None:
    """Have the kernel load (verify) ``fn_name`` of ``bpf`` as a uprobe program; ProbeError with
    the verifier's first error, one line, when it refuses. BCC writes the verifier log to file
    descriptor 2 itself: it is caught in a temporary file, and written through unless the load
    failed (then the one line says it all)."""
    bcc = import_bcc()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:                     # no stderr at all (a daemon): nothing to catch
        try:
            bpf.load_func(fn_name.encode(), bcc.BPF.KPROBE)
        except Exception as exc:
            raise ProbeError(f"the kernel refused {fn_name} ({what}): {exc}") from None
        return
    with tempfile.TemporaryFile() as cap:
        os.dup2(cap.fileno(), 2)
        try:
            bpf.load_func(fn_name.encode(), bcc.BPF.KPROBE)
            error = None
        except Exception as exc:  # bcc raises bare Exception("Failed to load BPF program ...")
            error = str(exc).splitlines()[0] if str(exc) else repr(exc)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        log = cap.read().decode("utf-8", "replace")
    if error is None:
        if log:
            sys.stderr.write(log)
        return
    why = verifier_error(log)
    raise ProbeError(f"the kernel refused {fn_name} ({what}): "
                     f"{'verifier: ' + why if why else error}")


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


def describe(mode: str, timing: bool) -> str:
    """"ioreq.bpf.c, metrics mode with service times" and the like, for messages."""
    return (f"{os.path.basename(PROGRAM)}, {mode} mode "
            f"{'with' if timing else 'without'} service times")


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
        """Entry uprobe (and return probe) on the binary for every process (pid -1): all of
        them or none. Every program is loaded first; when one is refused or one point does not
        attach, the points already attached are detached again: the returned list says which
        failed and why (``ok`` is then False for the failed points and for those undone), and
        ``complete`` is False.

        Raises ``uprobes.TracefsMissing`` (a ProbeError) when no uprobe can be made on this host
        until tracefs is mounted."""
        path, addr = self.res.path, self.res.func_vaddr
        points = [("entry", False, "on_entry")]
        if self.timing:
            points.append(("return", True, "on_return"))
        self.attachments = []
        what = describe(self.mode, self.timing)
        for point, _retprobe, prog in points:
            try:
                load_program(self.bpf, prog, what)
            except ProbeError as exc:
                self.attachments = [Attachment(p, False, str(exc) if p == point else
                                               f"not attached: {point} program refused")
                                    for p, _, _ in points]
                return self.attachments
        done = []
        for point, retprobe, prog in points:
            try:
                uprobes.attach(self.bpf, path, addr, prog, retprobe=retprobe)
                done.append(point)
                self.attachments.append(Attachment(point, True))
            except uprobes.TracefsMissing:
                uprobes.detach_all(self.bpf)        # none left behind, then the host's problem
                raise
            except Exception as exc:
                self.attachments.append(Attachment(point, False, str(exc).splitlines()[0]))
        if len(done) != len(points):
            uprobes.detach_all(self.bpf)            # all or none: undo the points attached
            failed = next(a for a in self.attachments if not a.ok)
            self.attachments = [a if not a.ok else
                                Attachment(a.point, False, f"detached: {failed.point} failed")
                                for a in self.attachments]
        return self.attachments

    @property
    def complete(self) -> bool:
        """Every program loaded and every point attached: this set counts."""
        return bool(self.attachments) and all(a.ok for a in self.attachments)

    def first_error(self) -> str | None:
        """The error of the point that failed first (not those undone because of it)."""
        errs = [a.error for a in self.attachments if not a.ok and a.error
                and not a.error.startswith(("not attached:", "detached:"))]
        return errs[0] if errs else None

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
                v.count = v.svc_n = int(np.frombuffer(v.hist, dtype=np.uint64).sum())
        return out

    def _items(self, name: str):
        table = self.bpf[name.encode()]
        try:
            return lookup_batches(table)
        except OSError:
            return [(type(k).from_buffer_copy(k), type(v).from_buffer_copy(v))
                    for k, v in table.items()]

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
