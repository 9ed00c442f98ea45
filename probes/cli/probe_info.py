"""``iotrace probe-info``: what iotrace finds in a device model binary, and whether it attaches."""
from __future__ import annotations

import json
import os
import sys

from iotrace.core.errors import ProbeError, UserError
from iotrace.probes.hook.resolve import ElfError, resolve

HELP = "show the build-id of a device model binary and where iotrace hooks it"
EXAMPLES = """\
examples:
  iotrace probe-info /usr/libexec/xen-qemu-system-i386      # Debian 12: a per-build table hit
  iotrace probe-info --attach /usr/libexec/xen-qemu-system-i386   # also attach a uprobe (root)
  iotrace probe-info --json ./qemu-dm

Resolution order: the binary's .symtab, debug info by build-id (/usr/lib/debug/.build-id/xx/yyyy.debug),
then the per-build table probes/hook/offsets.yaml (keyed by build-id). For a stripped build the table does
not know, add an entry there: the file offsets of handle_ioreq and of the return addresses of its
calls in handle_buffered_iopage and cpu_handle_ioreq, and offsetof(XenIOState, send_vcpu).
"""


def add_arguments(p) -> None:
    p.add_argument("binaries", nargs="*", metavar="BINARY",
                   help="device model binaries (default: /usr/libexec/xen-qemu-system-i386)")
    p.add_argument("--json", action="store_true", help="one JSON object per binary")
    p.add_argument("--attach", action="store_true",
                   help="also load the BPF program and attach its uprobes, then detach (root)")


def describe(res) -> dict:
    return {
        "path": res.path,
        "build_id": res.build_id,
        "method": res.method,
        "handle_ioreq": None if res.func_offset is None else
        {"file_offset": res.func_offset, "vaddr": res.func_vaddr},
        "buffered_caller": None if res.buffered is None else list(res.buffered),
        "sync_caller": None if res.sync is None else list(res.sync),
        "send_vcpu_offset": res.send_vcpu_offset,
        "send_vcpu_from": res.send_vcpu_from or None,
        "usdt": [{"provider": u.provider, "name": u.name, "pc": u.pc, "args": u.args}
                 for u in res.usdt],
        "notes": res.notes,
        "error": res.error,
    }


def _text(d: dict) -> str:
    h = d["handle_ioreq"]
    lines = [f"binary:           {d['path']}",
             f"build-id:         {d['build_id'] or '(none)'}"]
    if h:
        lines.append(f"handle_ioreq:     file offset {h['file_offset']:#x}, vaddr {h['vaddr']:#x} "
                     f"(from {d['method']})")
        for label, key in (("buffered caller", "buffered_caller"), ("sync caller", "sync_caller")):
            r = d[key]
            lines.append(f"{label + ':':<18}" + ("not found" if r is None else
                         f"return address at handle_ioreq{r[0]:+#x} .. {r[1]:+#x}"))
        lines.append(f"send_vcpu:        offset {d['send_vcpu_offset']:#x} ({d['send_vcpu_from']})")
    else:
        lines.append("handle_ioreq:     not found")
    lines.append("usdt:             " + (", ".join(f"{u['provider']}:{u['name']} at {u['pc']:#x}"
                                                  for u in d["usdt"]) or "none"))
    for n in d["notes"]:
        lines.append(f"note:             {n}")
    if "attach" in d:
        lines.append(f"attach:           {d['attach']}")
    return "\n".join(lines)


def run(args) -> int:
    paths = args.binaries or ["/usr/libexec/xen-qemu-system-i386"]
    failed = []
    for i, path in enumerate(paths):
        if not os.path.exists(path):
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
        else:
            if i:
                print()
            print(_text(d))
        if res.error:
            failed.append(res.error)
    if failed:
        raise ProbeError(failed[0] if len(failed) == 1 else
                         f"{failed[0]} (and {len(failed) - 1} more)")
    return 0
