"""Where to hook a device model binary: handle_ioreq, its two callers, send_vcpu's offset.

QEMU's ``handle_ioreq`` is ``static`` (hw/i386/xen/xen-hvm.c up to QEMU 8.0, hw/xen/xen-hvm-common.c
from 8.1), so it is not in ``.dynsym``. It is resolved, in this order, from:

1. the binary's own ``.symtab`` (unstripped builds, the stand-in device model);
2. detached debug info found by build-id (``/usr/lib/debug/.build-id/xx/yyyy.debug``, e.g. Debian's
   ``-dbgsym`` packages), whose ``.symtab`` uses the same virtual addresses;
3. the per-build table ``offsets.yaml`` beside this module, keyed by build-id: an override and a
   cache. When it has the build, it wins over the automatic resolver (which still runs, and a
   disagreement is reported);
4. the automatic resolver (``auto.py``) for stripped builds: function bounds from ``.eh_frame``,
   handle_ioreq as the function that loads the handle_ioreq trace event's format string (log
   trace backend) or holds its USDT probe (dtrace backend), the two call sites told apart by what
   QEMU's source makes them do, send_vcpu from the store ``state->send_vcpu = i``.

Each number carries how it was found and how sure that is (``Resolution.findings``, one of
``auto.CONFIDENCE``); ``Resolution.doubts()`` lists what is less than "sure" (``--strict`` refuses
those). send_vcpu comes, in order, from the stand-in's ``iotrace_send_vcpu_offset`` symbol, the
table, the code, and only as a last resort (reported as a guess) from the QEMU banner's version.

The two callers matter as much as the function: ``handle_buffered_iopage`` passes a zeroed local
ioreq_t with no vCPU, ``cpu_handle_ioreq`` a copy of the vCPU's slot (the vCPU index is then in
``state->send_vcpu``, set by ``cpu_get_ioreq``). The BPF side tells them apart by the return
address at function entry, as a *delta* from handle_ioreq's own address (so the load base of a PIE
binary cancels out): with a symbol table the whole caller body is one delta range, otherwise the
exact return address after the call is.

USDT (RHEL/Fedora-style builds with QEMU's ``dtrace`` trace backend): the ``qemu:handle_ioreq``
probe in ``.note.stapsdt`` is used to *find* handle_ioreq (the function whose ``.eh_frame`` range
holds the probe point), but the uprobe still goes on the function's entry, not on the probe: the
probe's arguments are those of the trace event in hw/xen/trace-events, ``(void *req, uint32_t
type, uint32_t dir, uint32_t df, uint32_t data_is_ptr, uint64_t addr, uint64_t data, uint32_t
count, uint32_t size)`` -- neither ``state`` (for send_vcpu, so no vCPU) nor the caller (so no way
to tell buffered requests apart), and ``req`` points at the caller's stack copy. At the entry both
are at hand (``%rdi`` and the return address at ``%rsp``), and the same BPF program serves every
build. Debian builds use the ``log`` backend (no USDT); the USDT path is tested on a stand-in
built with a probe note.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from iotrace.probes.hook import auto
from iotrace.probes.hook.auto import Finding
from iotrace.probes.hook.elf import (  # noqa: F401
    NT_GNU_BUILD_ID,
    NT_STAPSDT,
    PT_LOAD,
    SHT_DYNSYM,
    SHT_NOTE,
    SHT_SYMTAB,
    STT_FUNC,
    ElfError,
    ElfFile,
    Section,
    Symbol,
    UsdtProbe,
)

DEBUG_ROOT = "/usr/lib/debug"
TABLE_FILE = "offsets.yaml"
FUNC = "handle_ioreq"
BUFFERED_CALLER = "handle_buffered_iopage"
SYNC_CALLER = "cpu_handle_ioreq"
STANDIN_SEND_VCPU_SYMBOL = "iotrace_send_vcpu_offset"

# state->send_vcpu in XenIOState (QEMU's hw/i386/xen/xen-hvm.c, include/hw/xen/xen-hvm-common.h):
# 0x50 in QEMU <= 8.0 (the struct still has shared_vmport_page), 0x48 from 8.1 (unchanged in 10.0,
# whose new has_bufioreq field comes after it).
SEND_VCPU_OFFSET_OLD = auto.SEND_VCPU_OFFSET_OLD
SEND_VCPU_OFFSET_81 = auto.SEND_VCPU_OFFSET_81

FIELDS = ("handle_ioreq", "buffered", "sync", "send_vcpu")


@dataclass
class Resolution:
    """How to probe one binary. Addresses are virtual addresses of the binary (bcc translates them
    to file offsets for the uprobe); caller ranges are deltas from handle_ioreq, [lo, hi)."""
    path: str
    build_id: str | None
    method: str | None = None             # symtab | debuginfo | table | automatic
    func_vaddr: int | None = None
    func_offset: int | None = None        # file offset (what a uprobe attaches to)
    buffered: tuple[int, int] | None = None
    sync: tuple[int, int] | None = None
    send_vcpu_offset: int | None = None
    send_vcpu_from: str = ""
    usdt: list[UsdtProbe] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    findings: dict[str, Finding] = field(default_factory=dict)   # FIELDS -> how, how sure
    file_offsets: dict[str, int] = field(default_factory=dict)   # buffered/sync return addresses
    qemu_version: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.func_vaddr is not None

    def doubts(self) -> list[str]:
        """What is less than sure, one phrase each ("send_vcpu: guess (QEMU 8.2 banner)")."""
        if not self.ok:
            return [self.error or "not resolved"]
        out = []
        for name in FIELDS:
            f = self.findings.get(name)
            if f is None:
                out.append(f"{name}: not found")
            elif not f.at_least("sure"):
                out.append(f"{name}: {f.confidence} ({f.how})")
        return out


def load_table() -> dict:
    """The per-build table: {build_id: {handle_ioreq, buffered_ret, sync_ret, send_vcpu, ...}}."""
    text = resources.files("iotrace.probes.hook").joinpath(TABLE_FILE).read_text("utf-8")
    doc = yaml.safe_load(text) or {}
    builds = doc.get("builds") or {}
    return {str(k).lower(): v for k, v in builds.items()}


def _caller_range(syms: dict[str, Symbol], name: str, func: int) -> tuple[int, int] | None:
    s = syms.get(name)
    if s is None or not s.size:
        return None
    return (s.value - func, s.value + s.size - func)


def _from_symbols(res: Resolution, elf: ElfFile, symelf: ElfFile, method: str) -> bool:
    all_syms = symelf.symbols(SHT_SYMTAB)
    syms = {s.name: s for s in all_syms if s.type == STT_FUNC}
    func = syms.get(FUNC)
    if func is None:
        res.notes.append(f"{method}: {len(syms)} function symbols, no {FUNC}")
        return False
    off = elf.vaddr_to_offset(func.value)
    if off is None:
        res.notes.append(f"{method}: {FUNC} at {func.value:#x} is outside every PT_LOAD segment")
        return False
    res.method, res.func_vaddr, res.func_offset = method, func.value, off
    res.findings["handle_ioreq"] = Finding(func.value, f"{method} symbol {FUNC}", "exact")
    res.buffered = _caller_range(syms, BUFFERED_CALLER, func.value)
    res.sync = _caller_range(syms, SYNC_CALLER, func.value)
    for key, name, rng in (("buffered", BUFFERED_CALLER, res.buffered),
                           ("sync", SYNC_CALLER, res.sync)):
        if rng is not None:
            res.findings[key] = Finding(func.value + rng[0], f"{method} symbol {name} (its whole "
                                        f"body)", "exact")
    if res.buffered is None:
        res.notes.append(f"{method}: no {BUFFERED_CALLER}: buffered requests cannot be told apart")
    # A build can say where send_vcpu lives (the stand-in exports it as a symbol of its own).
    sv = next((s for s in all_syms if s.name == STANDIN_SEND_VCPU_SYMBOL), None)
    if sv is not None:
        voff = elf.vaddr_to_offset(sv.value)
        raw = elf.read(voff, sv.size) if voff is not None and sv.size in (4, 8) else b""
        if len(raw) == sv.size:
            res.send_vcpu_offset = int.from_bytes(raw, "little")
            res.send_vcpu_from = f"symbol {STANDIN_SEND_VCPU_SYMBOL}"
            res.findings["send_vcpu"] = Finding(res.send_vcpu_offset, res.send_vcpu_from, "exact")
    return True


def debug_file_for(build_id: str | None, root: str = DEBUG_ROOT) -> str | None:
    if not build_id or len(build_id) < 3:
        return None
    path = os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
    return path if os.path.exists(path) else None


def _from_table(res: Resolution, elf: ElfFile, entry: dict) -> bool:
    name = entry.get("name", res.build_id)
    how = f"table probes/hook/{TABLE_FILE} ({name})"
    try:
        off = int(entry["handle_ioreq"])
        vaddr = elf.offset_to_vaddr(off)
        if vaddr is None:
            res.notes.append(f"table: handle_ioreq {off:#x} is outside every PT_LOAD segment")
            return False
        res.method, res.func_offset, res.func_vaddr = "table", off, vaddr
        res.findings["handle_ioreq"] = Finding(vaddr, how, "exact")
        for key, tkey in (("buffered", "buffered_ret"), ("sync", "sync_ret")):
            if tkey in entry:
                ret = elf.offset_to_vaddr(int(entry[tkey]))
                if ret is None:
                    res.notes.append(f"table: {tkey} is outside every PT_LOAD segment")
                    continue
                d = ret - vaddr
                setattr(res, key, (d, d + 1))
                res.findings[key] = Finding(ret, how, "exact")
    except (KeyError, TypeError, ValueError) as exc:
        res.notes.append(f"table entry for {res.build_id} is malformed ({exc})")
        return False
    return True


def _cross_check(res: Resolution, got: auto.AutoResult) -> None:
    """The table won; say whether the automatic resolver agrees with it."""
    if got.error:
        res.notes.append(f"automatic resolver (not used, the table wins): {got.error}")
        return
    diffs = []
    for key, mine in (("handle_ioreq", got.func), ("buffered", got.buffered),
                      ("sync", got.sync), ("send_vcpu", got.send_vcpu)):
        theirs = res.findings.get(key)
        if mine is None or theirs is None:
            continue
        if mine.value != theirs.value:
            diffs.append(f"{key} {mine.value:#x} vs {theirs.value:#x}")
    if diffs:
        res.notes.append("the automatic resolver disagrees with the table (the table wins): "
                         + ", ".join(diffs))
    else:
        res.notes.append("the automatic resolver agrees with the table (the table wins)")


def _apply_auto(res: Resolution, elf: ElfFile, got: auto.AutoResult) -> None:
    f = got.func
    off = elf.vaddr_to_offset(f.value)
    if off is None:
        res.notes.append(f"automatic: {FUNC} at {f.value:#x} is outside every PT_LOAD segment")
        return
    res.method, res.func_vaddr, res.func_offset = "automatic", f.value, off
    res.findings["handle_ioreq"] = f
    res.buffered = got.buffered_range()
    if got.buffered is not None and res.buffered is not None:
        res.findings["buffered"] = got.buffered
    if got.sync is not None:
        d = got.sync.value - f.value
        res.sync = (d, d + 1)
        res.findings["sync"] = got.sync
    if res.buffered is None:
        res.notes.append("automatic: the buffered caller is unknown: buffered requests count as "
                         "synchronous, with a stale vCPU")


def resolve(path: str, table: dict | None = None, debug_root: str = DEBUG_ROOT) -> Resolution:
    """Find handle_ioreq, its callers and send_vcpu's offset in one binary. Raises ElfError only
    for a file that is not a readable ELF binary; any other failure is ``Resolution.error`` (one
    line, with the fix)."""
    real = os.path.realpath(path)
    with ElfFile(real) as elf:
        return _resolve(elf, real, table, debug_root)


def _resolve(elf: ElfFile, real: str, table: dict | None, debug_root: str) -> Resolution:
    res = Resolution(path=real, build_id=elf.build_id())
    res.qemu_version = elf.qemu_version()
    probes = elf.usdt_probes()
    res.usdt = [p for p in probes if p.name == FUNC]
    if res.usdt:
        res.notes.append(f"USDT {res.usdt[0].provider}:{FUNC} present (dtrace trace backend): "
                         f"used to find {FUNC}; the uprobe goes on its entry, not on the probe, "
                         f"whose arguments carry neither XenIOState (the vCPU) nor the caller "
                         f"(buffered or not)")
    found = False
    if elf.has_symtab():
        found = _from_symbols(res, elf, elf, "symtab")
    else:
        res.notes.append("no .symtab (stripped)")
    if not found:
        dbg = debug_file_for(res.build_id, debug_root)
        if dbg:
            try:
                with ElfFile(dbg) as d:
                    found = _from_symbols(res, elf, d, "debuginfo")
            except ElfError as exc:
                res.notes.append(f"debuginfo {dbg}: {exc}")
        elif not elf.has_symtab():
            res.notes.append(f"no debug file under {debug_root}/.build-id")
    table = load_table() if table is None else table
    entry = table.get((res.build_id or "").lower())
    from_table = False
    if entry is not None and not found:
        found = from_table = _from_table(res, elf, entry)
    if entry is not None and "send_vcpu" in entry and "send_vcpu" not in res.findings:
        try:
            res.send_vcpu_offset = int(entry["send_vcpu"])
            res.send_vcpu_from = f"table ({entry.get('name', res.build_id)})"
            res.findings["send_vcpu"] = Finding(res.send_vcpu_offset,
                                                f"table probes/hook/{TABLE_FILE}", "exact")
        except (TypeError, ValueError):
            res.notes.append(f"table entry for {res.build_id}: send_vcpu is not a number")
    got = None
    if not found or from_table:
        got = auto.resolve_stripped(elf, res.usdt, res.qemu_version)
        if from_table:
            _cross_check(res, got)
        elif got.error is None:
            _apply_auto(res, elf, got)
            found = res.func_vaddr is not None
        res.notes += [f"automatic: {n}" for n in got.notes]
    if not found:
        why = f": {got.error}" if got is not None and got.error else ""
        res.error = (f"{real}: cannot find {FUNC} (build-id {res.build_id or 'none'}){why}; "
                     f"install its debug symbols (/usr/lib/debug/.build-id/...), or add an entry "
                     f"for this build-id to probes/hook/{TABLE_FILE} (see `iotrace probe-info "
                     f"--help`)")
        return res
    if "send_vcpu" not in res.findings:
        _send_vcpu(res, elf, got)
    for key in ("buffered", "sync"):
        f = res.findings.get(key)
        off = elf.vaddr_to_offset(f.value) if f is not None and f.value is not None else None
        if off is not None:
            res.file_offsets[key] = off
    return res


def _send_vcpu(res: Resolution, elf: ElfFile, got: auto.AutoResult | None) -> None:
    """send_vcpu from the code, else (a guess) from the QEMU banner, else the old default."""
    f = got.send_vcpu if got is not None and got.error is None else None
    if f is None:
        f = auto.send_vcpu_for(elf, res.func_vaddr, res.qemu_version)
    if f is None:
        ver = res.qemu_version
        if ver is not None:
            f = Finding(auto.banner_send_vcpu(ver), f"QEMU {ver[0]}.{ver[1]} banner (no store "
                        f"into send_vcpu found in the code: a last resort)", "guess")
        else:
            f = Finding(SEND_VCPU_OFFSET_OLD, "default (QEMU <= 8.0 layout; no store found in "
                        "the code, no QEMU banner)", "guess")
    res.findings["send_vcpu"] = f
    res.send_vcpu_offset = f.value
    res.send_vcpu_from = f.how
