"""A plain-Python model of the compiled xentrace core (xt*.c), record by record - for tests only.

The same rules, written the obvious way: the walk (window framing, overruns, resync), the rows,
the watermark and the merge in TSC order (xtorder.c), the default machine (xtdecode.c) and the
xenalyze-compatible one (xtcompat.c). The tests feed it and the core the same chunks and compare
every event and counter, on synthetic, real and damaged captures: two implementations of one
specification, so a slip in either shows. It is about 100 times slower than the core and keeps
everything in memory; the core's bound on waiting rows (forced merging) is not modelled.

    res = reference.decode_bytes(buf, cpu_hz=None, xenalyze_compat=False, chunk_bytes=...)
    res.events (EVENT_DTYPE, ts order), res.records, res.windows, res.decode_errors,
    res.lost_records, res.io_records, res.late_rows, res.notes [(kind, offset, a, b)], res.status
"""
from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field

import numpy as np

from iotrace.core import events as E
from iotrace.xentrace import catalogue as C

R_RUNSTATE, R_CONTINUE, R_LOST, R_LOST_END, R_EXIT, R_ENTRY, R_IO, R_CLAIM = range(1, 9)
IO_MMIO, IO_READ, IO_REP, IO_64 = 1, 2, 4, 8
N_OVERRUN, N_RESYNC, N_NO_RESYNC, N_NOT_CAPTURE = 1, 2, 3, 4
MAX_PCPU_ID = 65535
KNOWN_CLASSES = {0x001, 0x002, 0x004, 0x008, 0x010, 0x020, 0x040, 0x080, 0x800}
INT64_MAX = (1 << 63) - 1


@dataclass
class Row:
    tsc: int
    seq: int
    kind: int
    cpu: int
    a: int = 0
    b: int = 0
    w: int = 0
    f: int = 0


@dataclass
class PCpu:
    id: int
    pseudo: "VCpu"
    last_tsc: int = 0
    lb: int = 0
    gap_lb: int = 0
    queue: list = field(default_factory=list)
    qpos: int = 0
    owner: "VCpu | None" = None
    xa_cur: "VCpu | None" = None


@dataclass
class VCpu:
    key: int
    domid: int
    vcpu: int
    exit_open: bool = False
    end_known: bool = False
    exit_tsc: int = 0
    end_tsc: int = 0
    rip: int = 0
    pending: list = field(default_factory=list)
    xa_valid: bool = False
    xa_seen_rs: bool = False
    xa_claim: str | None = None        # None | "other" | "io"
    xa_post: str | None = None         # None | "pio" | "mmio"
    xa_pio_dir: int = 0
    xa_mmio_dir: int = 0
    xa_data_valid: bool = False
    xa_rstate: int = -2
    xa_exit_tsc: int = 0
    xa_gpa: int = 0
    xa_port: int = 0
    xa_io: dict | None = None


@dataclass
class Result:
    events: np.ndarray
    records: int
    windows: int
    decode_errors: int
    lost_records: int
    io_records: int
    late_rows: int
    consumed: int
    remain_words: int
    status: int
    notes: list


class Reference:
    def __init__(self, cpu_hz: float | None = None, compat: bool = False):
        self.hz = float(cpu_hz) if cpu_hz else float(C.XENALYZE_DEFAULT_CPU_HZ)
        self.compat = compat
        self.records = self.windows = self.decode_errors = self.lost_records = 0
        self.io_records = self.late_rows = self.consumed = self.remain = 0
        self.skipping = self.resyncing = self.started = False
        self.status = 0
        self.notes: list[tuple[int, int, int, int]] = []
        self.pcpus: dict[int, PCpu] = {}
        self.cur: PCpu | None = None
        self.prev: PCpu | None = None
        self.vcpus: dict[int, VCpu] = {}
        self.wm = 0
        self.last_merged = 0
        self.events: list[dict] = []

    # ---- helpers
    def ns(self, cycles: int) -> int:
        v = cycles * 1e9 / self.hz
        return INT64_MAX if v >= 9.2e18 else int(v)

    def vcpu(self, key: int, domid: int, vcpu: int) -> VCpu:
        v = self.vcpus.get(key)
        if v is None:
            v = self.vcpus[key] = VCpu(key, domid, vcpu)
        return v

    def named(self, word: int) -> VCpu:
        return self.vcpu(word, word >> 16, word & 0xFFFF)

    def pcpu(self, cid: int) -> PCpu:
        p = self.pcpus.get(cid)
        if p is None:
            ids = sorted(self.pcpus)
            pseudo = self.vcpu(-2 - cid, -1, -1)
            p = PCpu(cid, pseudo)
            if ids:
                below = [i for i in ids if i < cid]
                pred = self.pcpus[below[-1] if below else ids[-1]]
                p.lb = p.gap_lb = pred.gap_lb
            self.pcpus[cid] = p
        return p

    # ---- walk (xtwalk.c)
    def feed(self, buf: bytes) -> int:
        if self.status:
            return 0
        nw = len(buf) // 4
        w = struct.unpack_from(f"<{nw}I", buf) if nw else ()
        pos, base = 0, self.consumed
        while pos < nw and not self.status:
            if self.skipping:
                take = min(self.remain, nw - pos)
                pos += take
                self.remain -= take
                if self.remain == 0:
                    self.skipping = False
                continue
            if self.remain == 0:
                if pos + 3 > nw:
                    break
                if self.plausible(w, pos):
                    p = self.pcpu(w[pos + 1])
                    self.remain = w[pos + 2] >> 2
                    pos += 3
                    self.windows += 1
                    self.started = True
                    self.resyncing = False
                    self.cur = p
                    self.window_start(p)
                    continue
                if not self.started:
                    self.notes.append((N_NOT_CAPTURE, base + pos * 4, w[pos], 0))
                    self.status = 1
                    break
                nxt = next((q for q in range(pos + 1, nw - 2) if self.plausible(w, q)), -1)
                if not self.resyncing:
                    self.decode_errors += 1
                    self.notes.append((N_NO_RESYNC if nxt < 0 else N_RESYNC, base + pos * 4,
                                       0 if nxt < 0 else (nxt - pos) * 4, 0))
                if nxt < 0:
                    self.resyncing = True
                    pos = max(pos + 1, nw - 2)
                    break
                pos = nxt
                continue
            h = w[pos]
            n = 1 + ((h >> 28) & 7) + 2 * (h >> 31)
            if n > self.remain:
                self.decode_errors += 1
                self.notes.append((N_OVERRUN, base + pos * 4, self.remain * 4, 0))
                self.skipping = True
                continue
            if pos + n > nw:
                break
            self.record(self.cur, w[pos:pos + n])
            pos += n
            self.remain -= n
        self.consumed += pos * 4
        if not self.status:
            self.drain(False)
        return pos * 4

    @staticmethod
    def plausible(w, p) -> bool:
        cpu = w[p + 1] - (1 << 32) if w[p + 1] >= 1 << 31 else w[p + 1]
        return w[p] == C.CPU_CHANGE_HEADER and w[p + 2] & 3 == 0 and 0 <= cpu <= MAX_PCPU_ID

    def record(self, p: PCpu, r) -> None:
        h = r[0]
        ev, n, tscf = h & C.EVENT_MASK, (h >> 28) & 7, h >> 31
        d = r[1 + 2 * tscf:]
        if tscf:
            p.last_tsc = r[1] | r[2] << 32
        self.records += 1
        row = Row(p.last_tsc, self.records, 0, p.id)
        cls = ev >> 16
        if cls == 0x008:
            sub = ev & 0xF000
            if sub == 0x2000:
                if ev & C.IO_ID_MASK in (C.TRC_HVM_IOPORT_READ, C.TRC_HVM_IOMEM_READ):
                    is64 = bool(ev & C.TRC_64_FLAG)
                    aw = 2 if is64 else 1
                    if n not in (aw, 2 * aw):
                        self.decode_errors += 1
                        return
                    row.kind = R_IO
                    row.f = ((IO_MMIO if ev & 1 else 0) | (0 if ev & C.IO_WRITE_BIT else IO_READ)
                             | (IO_REP if n == aw else 0) | (IO_64 if is64 else 0))
                    row.a = d[0] | (d[1] << 32 if is64 else 0)
                    if n == 2 * aw:
                        row.b = d[aw] | (d[aw + 1] << 32 if is64 else 0)
                    self.io_records += 1
                    self.push(p, row)
                elif self.compat and ev in C.XENALYZE_CLAIMING_IDS:
                    row.kind = R_CLAIM
                    self.push(p, row)
                return
            if sub == 0x1000:
                if ev == C.TRC_HVM_VMENTRY:
                    if not tscf:
                        self.decode_errors += 1
                        return
                    row.kind = R_ENTRY
                    self.push(p, row)
                elif ev & C.EXIT_ID_MASK in (C.TRC_HVM_VMX_EXIT, C.TRC_HVM_SVM_EXIT):
                    is64 = bool(ev & C.TRC_64_FLAG)
                    if not tscf or n != (3 if is64 else 2):
                        self.decode_errors += 1
                        return
                    row.kind = R_EXIT
                    row.a = d[1] | (d[2] << 32 if is64 else 0)
                    self.push(p, row)
            return
        if cls == 0x002:
            change = ev & C.RUNSTATE_MASK == C.TRC_SCHED_RUNSTATE_CHANGE
            if not change and ev != C.TRC_SCHED_CONTINUE_RUNNING:
                return
            if n < 1:
                self.decode_errors += 1
                return
            row.kind = R_RUNSTATE if change else R_CONTINUE
            row.w = d[0]
            row.f = ((ev >> 8) & 0xF) << 4 | ((ev >> 4) & 0xF)
            self.push(p, row)
            return
        if cls == 0x001:
            if ev != C.TRC_LOST_RECORDS:
                return
            if n != 4:
                self.decode_errors += 1
                return
            self.lost_records += d[0]
            row.kind, row.w = R_LOST, d[1]
            if self.compat:
                first = Row(d[2] | d[3] << 32, row.seq, R_LOST, p.id, w=d[1])
                self.push(p, first)
                row.kind = R_LOST_END
            self.push(p, row)
            return
        if cls not in KNOWN_CLASSES:
            self.decode_errors += 1

    # ---- order (xtorder.c)
    def push(self, p: PCpu, row: Row) -> None:
        p.queue.append(row)

    def window_start(self, p: PCpu) -> None:
        prev, self.prev = self.prev, p
        if prev is None:
            return
        a, b, lp = prev.id, p.id, prev.last_tsc
        prev.gap_lb = max(prev.gap_lb, lp)
        for j in self.pcpus.values():
            between = (a < j.id < b) if b > a else (j.id > a or j.id < b)
            if between:
                j.lb = max(j.lb, lp)
                j.gap_lb = max(j.gap_lb, lp)

    def watermark(self) -> int:
        if not self.pcpus:
            return self.wm
        ids = sorted(self.pcpus)
        wm = None
        for k, cid in enumerate(ids):
            p = self.pcpus[cid]
            p.lb = max(p.lb, p.last_tsc)
            wm = p.lb if wm is None else min(wm, p.lb)
            gap_open = (ids[k + 1] - cid > 1) if k + 1 < len(ids) else (
                cid < MAX_PCPU_ID or ids[0] > 0)
            if gap_open:
                wm = min(wm, p.gap_lb)
        return max(wm, self.wm)

    def drain(self, everything: bool) -> None:
        wm = (1 << 64) - 1 if everything else self.watermark()
        self.wm = wm
        heap = [(p.queue[p.qpos].tsc, p.queue[p.qpos].seq, cid)
                for cid, p in self.pcpus.items() if p.qpos < len(p.queue)]
        heapq.heapify(heap)
        while heap:
            tsc, _, cid = heap[0]
            if not everything and tsc >= wm:
                break
            p = self.pcpus[cid]
            row = p.queue[p.qpos]
            p.qpos += 1
            if row.tsc < self.last_merged:
                self.late_rows += 1
            else:
                self.last_merged = row.tsc
            (self.compat_row if self.compat else self.decode_row)(row)
            if p.qpos < len(p.queue):
                nxt = p.queue[p.qpos]
                heapq.heapreplace(heap, (nxt.tsc, nxt.seq, cid))
            else:
                heapq.heappop(heap)
                p.queue, p.qpos = [], 0

    def finish(self) -> None:
        if self.status == 1:
            return
        self.drain(True)
        if not self.compat:
            for v in list(self.vcpus.values()):
                self.abandon(v)

    # ---- default machine (xtdecode.c)
    def owner(self, p: PCpu) -> VCpu:
        return p.owner if p.owner is not None else p.pseudo

    def span(self, a: int, b: int) -> int:
        return self.ns(b - a) if b >= a else -1

    def settle(self, v: VCpu, ns: int) -> None:
        for ev in v.pending:
            ev["service_ns"] = ns
            self.events.append(ev)
        v.pending = []

    def abandon(self, v: VCpu) -> None:
        if v.exit_open and not v.end_known:
            self.settle(v, -1)
        v.exit_open = False

    def decode_row(self, r: Row) -> None:
        p = self.pcpus[r.cpu]
        if r.kind == R_IO:
            v = self.owner(p)
            ev = dict(ts_ns=self.ns(r.tsc), domid=v.domid, vcpu=v.vcpu, type=r.f & IO_MMIO,
                      dir=1 if r.f & IO_READ else 0, data_is_ptr=1 if r.f & IO_REP else 0,
                      addr=r.a, data=r.b, rip=v.rip if v.exit_open else 0, service_ns=-1)
            if v.exit_open and not v.end_known:
                v.pending.append(ev)
                return
            if v.exit_open:
                ev["service_ns"] = self.span(v.exit_tsc, v.end_tsc)
            self.events.append(ev)
        elif r.kind == R_EXIT:
            v = self.owner(p)
            self.abandon(v)
            v.exit_open, v.end_known, v.exit_tsc, v.rip = True, False, r.tsc, r.a
        elif r.kind == R_ENTRY:
            v = self.owner(p)
            if v.exit_open and not v.end_known:
                v.end_known, v.end_tsc = True, r.tsc
                self.settle(v, self.span(v.exit_tsc, r.tsc))
            v.exit_open = False
        elif r.kind == R_RUNSTATE:
            v = self.named(r.w)
            if r.f & 0xF == C.RUNSTATE_RUNNABLE and v.exit_open and not v.end_known:
                v.end_known, v.end_tsc = True, r.tsc
                self.settle(v, self.span(v.exit_tsc, r.tsc))
            if r.f & 0xF == C.RUNSTATE_RUNNING:
                p.owner = v
        elif r.kind == R_CONTINUE:
            p.owner = self.named(r.w)
        elif r.kind == R_LOST:
            self.abandon(self.owner(p))
            v = self.named((r.w & 0xFFFF) << 16 | r.w >> 16)
            self.abandon(v)
            p.owner = v

    # ---- xenalyze-compatible machine (xtcompat.c)
    def close_exit(self, v: VCpu, tsc: int) -> None:
        if v.xa_claim == "io":
            e = dict(v.xa_io)
            arc = tsc - v.xa_exit_tsc if v.xa_exit_tsc <= tsc else 0
            keep = True
            if v.xa_post == "pio":
                e.update(type=0, dir=v.xa_pio_dir, addr=v.xa_port)
            elif v.xa_data_valid and not (C.XENALYZE_VGA_START <= v.xa_gpa < C.XENALYZE_VGA_END):
                e.update(type=1, dir=v.xa_mmio_dir, addr=v.xa_gpa & 0xFFFFFFFF)
            else:
                keep = False
            if keep:
                e.update(service_ns=self.ns(arc), data_is_ptr=0)
                self.events.append(e)
        v.xa_valid = False
        v.xa_claim = None

    def compat_row(self, r: Row) -> None:
        p = self.pcpus[r.cpu]
        if r.kind in (R_RUNSTATE, R_CONTINUE):
            v = self.named(r.w)
            change = r.kind == R_RUNSTATE
            old, new = r.f >> 4, (r.f & 0xF) if change else C.RUNSTATE_RUNNING
            if change and new == C.RUNSTATE_RUNNABLE and v.xa_seen_rs and v.xa_valid:
                self.close_exit(v, r.tsc)
            v.xa_seen_rs = True
            if v.xa_rstate != -1 or new == C.RUNSTATE_RUNNING:
                v.xa_rstate = new
            if new == C.RUNSTATE_RUNNING:
                p.xa_cur = v
            elif change and old == C.RUNSTATE_RUNNING and p.xa_cur is v:
                p.xa_cur = None
            return
        if r.kind == R_LOST:
            if p.xa_cur is not None:
                p.xa_cur.xa_valid, p.xa_cur.xa_claim = False, None
            for v in self.vcpus.values():
                if v.xa_rstate != -2 and v.xa_rstate != C.RUNSTATE_RUNNING:
                    v.xa_valid, v.xa_claim, v.xa_rstate = False, None, -1
            p.xa_cur = None
            return
        if r.kind == R_LOST_END:
            p.xa_cur = self.named((r.w & 0xFFFF) << 16 | r.w >> 16)
            return
        v = p.xa_cur
        if v is None:
            return
        if r.kind == R_EXIT:
            v.xa_valid, v.xa_claim, v.xa_exit_tsc, v.rip = True, None, r.tsc, r.a
            return
        if r.kind == R_ENTRY:
            if v.xa_valid:
                self.close_exit(v, r.tsc)
            return
        if not v.xa_valid:
            return
        if r.kind == R_CLAIM:
            if v.xa_claim is None:
                v.xa_claim = "other"
            return
        mmio, d = bool(r.f & IO_MMIO), 1 if r.f & IO_READ else 0
        if not mmio and r.f & IO_64:
            return
        if v.xa_claim is None:
            v.xa_claim, v.xa_post, v.xa_data_valid = "io", None, False
            v.xa_io = dict(ts_ns=self.ns(r.tsc), domid=v.key >> 16, vcpu=v.key & 0xFFFF,
                           type=int(mmio), dir=d, data_is_ptr=1 if r.f & IO_REP else 0,
                           addr=r.a, data=r.b, rip=v.rip, service_ns=-1)
        if v.xa_claim == "other":
            return
        if not mmio:
            v.xa_port = r.a & 0xFFFFFFFF
            if v.xa_post is None:
                v.xa_post, v.xa_pio_dir = "pio", d
        else:
            v.xa_gpa, v.xa_mmio_dir = r.a, d
            if not r.f & IO_REP:
                v.xa_data_valid = True
            if v.xa_post is None:
                v.xa_post = "mmio"

    # ---- result
    def result(self) -> Result:
        ev = E.empty(len(self.events))
        for name in ("ts_ns", "domid", "vcpu", "type", "dir", "data_is_ptr", "addr", "data",
                     "rip", "service_ns"):
            ev[name] = [e[name] for e in self.events]
        ev = ev[np.argsort(ev["ts_ns"], kind="stable")]
        return Result(ev, self.records, self.windows, self.decode_errors, self.lost_records,
                      self.io_records, self.late_rows, self.consumed, self.remain, self.status,
                      list(self.notes))


def decode_bytes(buf: bytes, *, cpu_hz: float | None = None, xenalyze_compat: bool = False,
                 chunk_bytes: int = 4 << 20) -> Result:
    """Decode ``buf`` fed in ``chunk_bytes`` pieces (the core's feeds, for a like comparison)."""
    ref = Reference(cpu_hz, compat=xenalyze_compat)
    tail = b""
    for i in range(0, len(buf), chunk_bytes):
        data = tail + bytes(buf[i:i + chunk_bytes])
        used = ref.feed(data)
        tail = data[used:]
        if ref.status:
            break
    ref.finish()
    return ref.result()
