"""What ``iotrace advise`` prints for an interval: the domains with their class and signals, then
the plan (changes with their reasons, and the changes held back with why). ``as_json`` is the
same as one JSON object (``--format json``: one line per interval)."""
from __future__ import annotations

import time

from iotrace.analysis.classify import fmt_seconds, pct

KNOB_WORDS = {"xl-weight": "credit2 weight", "xl-cap": "credit2 cap",
              "cgroup-weight": "cgroup cpu.weight"}


def _when(wall: float | None, t: float) -> str:
    if wall is not None:
        return time.strftime("%H:%M:%S", time.localtime(wall))
    return f"t={t:.0f}s"


def domain_table(analysis) -> list[str]:
    rows = [("DOMAIN", "DOMID", "CLASS", "REQ/S", "SYNC/S", "IO-WAIT", "P95", "DM-CPU", "VCPU-CPU",
             "REASON")]
    for r in [analysis.dom0] + [r for _, r in sorted(analysis.domains.items())]:
        s = r.signals
        if s.domid == 0:
            rows.append((s.name, "0", r.cls, "", "", "", "", "", "", r.verdict.reason()))
            continue
        rows.append((s.name, str(s.domid), r.cls, f"{s.rate:,.0f}", f"{s.sync_rate:,.0f}",
                     pct(s.io_wait_ratio), fmt_seconds(s.p95_s), pct(s.dm_cpu_ratio),
                     pct(s.cpu_ratio), r.verdict.reason()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]
            for row in rows]


def plan_lines(result, *, knob: str, applying: bool, dry_why: str = "") -> list[str]:
    changes = [d for d in result.decisions if d.changes]
    held = [d for d in result.decisions if not d.changes and d.reason and
            not d.reason.endswith(": no change") and "at its target" not in d.reason]
    if applying:
        head = "changes:" if changes else "changes: none"
    else:
        head = (f"plan (dry run, nothing changed{'; ' + dry_why if dry_why else ''}; "
                f"--apply {knob} to act):" if changes else
                f"plan: no change{' (' + dry_why + ')' if dry_why else ''}")
    out = [head]
    for d in changes:
        ok = "" if not applying else (" [done]" if any(
            a.get("identity") == d.identity and a.get("knob") == d.knob for a in result.applied)
            else " [FAILED]")
        out.append(f"  {d.name} (domid {d.domid}) {KNOB_WORDS[d.knob]} {d.current} -> {d.new}"
                   f" (target {d.target}, original {d.original}){ok}: {d.reason}")
    for d in held:
        out.append(f"  held: {d.name} (domid {d.domid}): {d.reason}")
    for e in result.errors:
        out.append(f"  error: {e}")
    if result.note:
        out.append(f"  note: {result.note}")
    return out


def interval_text(analysis, result, *, knob: str, applying: bool, wall: float | None = None,
                  dry_why: str = "") -> str:
    h = analysis.host
    dom0 = (f"Dom0 CPU {pct(h.busy_ratio)} busy" if h.busy_ratio is not None else "Dom0 CPU ?")
    if h.steal_ratio:
        dom0 += f" (steal {pct(h.steal_ratio)})"
    if h.pressure_ratio is not None:
        dom0 += f", pressure {pct(h.pressure_ratio)}"
    lines = [f"{_when(wall, analysis.t)}  interval {analysis.interval_s:.1f} s  {dom0}"]
    lines += domain_table(analysis)
    lines += plan_lines(result, knob=knob, applying=applying, dry_why=dry_why)
    return "\n".join(lines) + "\n"


def as_json(analysis, result, *, knob: str, applying: bool, wall: float | None = None) -> dict:
    doc = analysis.as_dict()
    doc.update(time=wall, knob=knob, applied=applying,
               plan=[d.as_dict() for d in result.decisions],
               changes=[d.as_dict() for d in result.decisions if d.changes],
               audit=result.applied, errors=list(result.errors), note=result.note)
    return doc
