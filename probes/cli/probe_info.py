"""``iotrace probe-info``: what iotrace finds in a device model binary, how, how sure, and whether
it attaches."""
from __future__ import annotations

import json
import os
import sys

from iotrace.core.errors import ProbeError, UserError
from iotrace.probes.hook.resolve import FIELDS, TABLE_FILE, ElfError, resolve

HELP = "show the build-id of a device model binary, where iotrace hooks it, and how sure that is"
EXAMPLES = f"""\
examples:
  iotrace probe-info                       # the device models at the known install paths
  iotrace probe-info /usr/libexec/xen-qemu-system-i386
  iotrace probe-info --strict /usr/lib/xen/bin/qemu-system-i386  # fail unless all is sure
  iotrace probe-info --attach /usr/libexec/xen-qemu-system-i386  # also attach (root)
  iotrace probe-info --table-entry ./qemu-dm >> my-offsets.yaml    # pin what was found
  iotrace probe-info --json ./qemu-dm

Resolution order: the binary's .symtab, debug info by build-id
(/usr/lib/debug/.build-id/xx/yyyy.debug), the per-build table probes/hook/{TABLE_FILE} (keyed
by build-id; when it has the build it wins, and the automatic resolver only cross-checks it),
then the automatic resolver for stripped builds: function bounds from .eh_frame, handle_ioreq
as the function that loads QEMU's handle_ioreq trace format string (log trace backend) or
holds its USDT probe (dtrace backend), its two call sites told apart (handle_buffered_iopage:
buffered, cpu_handle_ioreq: synchronous), send_vcpu from the store `state->send_vcpu = i`
before the synchronous call. The QEMU version banner is only a last resort for send_vcpu
(0x50 up to QEMU 8.0, 0x48 from 8.1).

Each number is printed with how it was found and how sure that is: exact (symbols, the
table), sure (from the code, independent observations agree), likely (one observation), guess
(banner or default), doubt (observations disagree). --strict (here and in serve, top, snoop,
record) refuses anything below sure.

USDT: a dtrace-built QEMU's qemu:handle_ioreq probe only locates the function; the uprobe goes
on its entry, where the XenIOState pointer (for the vCPU) and the return address (buffered or
not) are at hand: the probe's own arguments (the trace event's: req, type, dir, df,
data_is_ptr, addr, data, count, size) carry neither.
"""

LABELS = {"handle_ioreq": "handle_ioreq", "buffered": "buffered call", "sync": "sync call",
          "send_vcpu": "send_vcpu"}


def add_arguments(p) -> None:
    p.add_argument("binaries", nargs="*", metavar="BINARY",
                   help="device model binaries (default: those installed at the known paths)")
    p.add_argument("--json", action="store_true", help="one JSON object per binary")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 unless every number is exact or sure")
    p.add_argument("--table-entry", action="store_true",
                   help=f"print what was found as an entry for probes/hook/{TABLE_FILE}")
    p.add_argument("--attach", action="store_true",
                   help="also load the BPF program and attach its uprobes, then detach (root)")


def describe(res) -> dict:
    return {
        "path": res.path,
        "build_id": res.build_id,
        "method": res.method,
        "qemu_version": None if res.qemu_version is None else "%d.%d" % res.qemu_version,
        "handle_ioreq": None if res.func_offset is None else
        {"file_offset": res.func_offset, "vaddr": res.func_vaddr},
        "buffered_caller": None if res.buffered is None else list(res.buffered),
        "sync_caller": None if res.sync is None else list(res.sync),
        "send_vcpu_offset": res.send_vcpu_offset,
        "send_vcpu_from": res.send_vcpu_from or None,
        "findings": {k: {"value": f.value, "how": f.how, "confidence": f.confidence}
                     for k, f in res.findings.items()},
        "file_offsets": dict(res.file_offsets),
        "doubts": res.doubts(),
        "usdt": [{"provider": u.provider, "name": u.name, "pc": u.pc, "args": u.args}
                 for u in res.usdt],
        "notes": res.notes,
        "error": res.error,
    }


def _value(d: dict, key: str) -> str:
    f = d["findings"].get(key)
    if key == "handle_ioreq":
        h = d["handle_ioreq"]
        return f"file offset {h['file_offset']:#x}, vaddr {h['vaddr']:#x}"
    if key == "send_vcpu":
        return f"offset {d['send_vcpu_offset']:#x} in XenIOState"
    rng = d["buffered_caller" if key == "buffered" else "sync_caller"]
    if rng is None or f is None:
        return "not found"
    if rng[1] - rng[0] == 1:
        off = d["file_offsets"].get(key)
        where = f"file offset {off:#x}" if off is not None else f"vaddr {f['value']:#x}"
        return f"returns to {where} (handle_ioreq{rng[0]:+#x})"
    return f"returns within handle_ioreq{rng[0]:+#x} .. {rng[1]:+#x} (the caller's whole body)"


def _text(d: dict) -> str:
    lines = [f"binary:           {d['path']}",
             f"build-id:         {d['build_id'] or '(none)'}"]
    if d["qemu_version"]:
        lines.append(f"qemu banner:      {d['qemu_version']}")
    if d["handle_ioreq"]:
        how = {"table": f"the table probes/hook/{TABLE_FILE} (it wins when it has the build)",
               "automatic": "the automatic resolver (stripped build, no table entry)",
               "symtab": "the binary's .symtab", "debuginfo": "debug info by build-id"}
        lines.append(f"resolved from:    {how.get(d['method'], d['method'])}")
        for key in FIELDS:
            f = d["findings"].get(key)
            label = LABELS[key] + ":"
            if f is None:
                lines.append(f"{label:<18}not found")
                continue
            lines.append(f"{label:<18}{_value(d, key)}  [{f['confidence']}]")
            lines.append(f"{'':<18}{f['how']}")
        lines.append("strict:           " + ("ok (every number is exact or sure)" if not d["doubts"]
                                             else "refused: " + "; ".join(
                                                 x.split(" (")[0] for x in d["doubts"])))
    else:
        lines.append("handle_ioreq:     not found")
    lines.append("usdt:             " + (", ".join(f"{u['provider']}:{u['name']} at {u['pc']:#x}"
                                                  for u in d["usdt"]) or "none"))
    for n in d["notes"]:
        lines.append(f"note:             {n}")
    if "attach" in d:
        lines.append(f"attach:           {d['attach']}")
    return "\n".join(lines)


def table_entry(res) -> str:
    """The YAML lines of an offsets.yaml entry for what was found."""
    out = [f"  {res.build_id}:",
           f'    name: "{os.path.basename(res.path)} (pinned by iotrace probe-info from '
           f'{res.method})"',
           f"    handle_ioreq: {res.func_offset:#x}"]
    for key, tkey in (("buffered", "buffered_ret"), ("sync", "sync_ret")):
        off = res.file_offsets.get(key)
        rng = getattr(res, key)
        if off is not None and rng is not None and rng[1] - rng[0] == 1:
            out.append(f"    {tkey}: {off:#x}")
    out.append(f"    send_vcpu: {res.send_vcpu_offset:#x}")
    return "\n".join(out)


def default_paths() -> list[str]:
    from iotrace.probes.discovery import KNOWN_PATHS, installed_binaries
    paths = installed_binaries()
    if not paths:
        raise UserError("no device model at the known install paths (" + ", ".join(KNOWN_PATHS)
                        + "): name the binary")
    return paths


def run(args) -> int:
    paths = args.binaries or default_paths()
    failed = []
    for i, path in enumerate(paths):
        if not os.path.lexists(path):
            raise UserError(f"{path}: no such file")
        try:
            res = resolve(path)
        except ElfError as exc:
            raise UserError(str(exc)) from None
        d = describe(res)
        if args.attach and res.ok:
            from iotrace.probes.bpf import tracefs
            from iotrace.probes.bpf.loader import ProbeSet
            note = tracefs.ensure()
            if note:
                print(f"iotrace probe-info: {note}", file=sys.stderr)
            ps = ProbeSet(res, "metrics", timing=True)
            try:
                atts = ps.attach()
            finally:
                ps.close()
            d["attach"] = ", ".join(f"{a.point} {'ok' if a.ok else 'FAILED: ' + str(a.error)}"
                                    for a in atts)
            if not all(a.ok for a in atts):
                failed.append(f"{res.path}: attach failed")
        if args.json:
            print(json.dumps(d, sort_keys=True))
        elif args.table_entry and res.ok:
            print(table_entry(res))
        else:
            if i:
                print()
            print(_text(d))
        if res.error:
            failed.append(res.error)
        elif args.strict and res.doubts():
            failed.append(f"{res.path}: not sure of " + "; ".join(res.doubts()) + " (--strict)")
    if failed:
        raise ProbeError(failed[0] if len(failed) == 1 else
                         f"{failed[0]} (and {len(failed) - 1} more)")
    return 0
