"""One interval of the advisor: read the knobs, plan, apply (or not), log; and ``--rollback``.

``Knobs`` adapts a backend (``iotrace.advise.xl``, ``iotrace.advise.cgroup``) to what the
advisor needs: every domain's current value (read-only, so a dry run can show real numbers),
one change applied and described for the audit log, one audit record undone. ``DefaultKnobs``
stands for a host whose knobs cannot be read from here (a replay, a remote exporter): every
domain is taken at the knob's default, and nothing can be applied.

``Advisor.step(analysis, pids)`` remembers each domain's *original* value (the first it read,
or the one an earlier run recorded in the audit log), plans with ``iotrace.advise.policy``,
and with ``apply`` makes the changes, Dom0 first, each one written to the audit log before the
next is tried. A domain whose identity went away (destroyed, or its domid reused) is
forgotten; the cgroup backend removes the empty group it had made for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from iotrace.advise.audit import AuditLog, originals
from iotrace.advise.cgroup import CgroupBackend, CgroupError
from iotrace.advise.policy import Decision, KnobState, Policy
from iotrace.advise.xl import XlBackend, XlError
from iotrace.analysis import classify as C
from iotrace.analysis.settings import KNOB_DEFAULT, AdviseSettings
from iotrace.core.errors import UserError


class DefaultKnobs:
    """Knobs nobody can read here: every domain at the knob's default; nothing applies."""

    can_apply = False

    def __init__(self, knob: str, why: str):
        self.knob, self.why = knob, why

    def states(self, analysis, pids, originals) -> dict:
        d = KNOB_DEFAULT[self.knob]
        reports = list(analysis.domains.values())
        if self.knob == "xl":
            reports.append(analysis.dom0)
        return {r.signals.domid: KnobState(
            d, originals.get((f"{self.knob}-weight", r.signals.identity), d)) for r in reports}


class XlKnobs:
    knob = "xl"
    can_apply = True

    def __init__(self, backend: XlBackend | None = None):
        self.backend = backend or XlBackend()

    def states(self, analysis, pids, originals) -> dict:
        rows = self.backend.read_all()
        out = {}
        for r in [analysis.dom0] + list(analysis.domains.values()):
            row = rows.get(r.signals.domid)
            if row is None:
                continue
            ident = r.signals.identity
            out[r.signals.domid] = KnobState(
                row.weight, originals.get(("xl-weight", ident), row.weight),
                row.cap, originals.get(("xl-cap", ident), row.cap))
        return out

    def apply(self, d: Decision) -> dict:
        if d.knob == "xl-cap":
            argv = self.backend.set_cap(d.domid, d.new, d.uuid)
        else:
            argv = self.backend.set_weight(d.domid, d.new, d.uuid)
        return {"command": argv}

    def restore(self, rec: dict) -> str:
        from iotrace.analysis.host import is_dom0
        if not is_dom0():
            raise XlError("this host is not a Xen Dom0: its credit2 weights are not here")
        domid = rec.get("domid")
        if rec.get("uuid"):
            domid = self.backend.domid_of(rec["uuid"])
            if domid is None:
                return f"domain {rec['uuid']} is not running: nothing to restore"
        orig = int(rec["original"])
        if rec.get("knob") == "xl-cap":
            argv = self.backend.set_cap(domid, orig, rec.get("uuid"))
        else:
            argv = self.backend.set_weight(domid, orig, rec.get("uuid"))
        return " ".join(argv)


class CgroupKnobs:
    knob = "cgroup"
    can_apply = True

    def __init__(self, backend: CgroupBackend | None = None):
        self.backend = backend or CgroupBackend()
        self._group_of: dict[int, object] = {}

    def states(self, analysis, pids, originals) -> dict:
        out = {}
        for domid, r in analysis.domains.items():
            pid = pids.get(domid)
            if pid is None:
                continue
            try:
                w = self.backend.read(pid[0])
            except CgroupError:
                continue                       # gone meanwhile: next interval
            orig = originals.get(("cgroup-weight", r.signals.identity), w)
            out[domid] = KnobState(w, orig)
        return out

    def apply(self, d: Decision, pid: tuple) -> dict:
        g = self.backend.prepare(pid[0], d.domid)
        raw_before, raw_after = self.backend.set_weight(g, d.new)
        info = g.as_dict()
        info.update(raw_before=raw_before, raw_new=raw_after)
        return {"cgroup": info}

    def restore(self, rec: dict) -> str:
        return self.backend.restore(rec)


def make_knobs(knob: str, *, local: bool, why_not: str = "") -> object:
    """The knobs for ``knob`` on this host (``local``: the source watches this host). xl knobs
    exist only in a Xen Dom0; elsewhere a plan for them starts from the default weight."""
    if not local:
        return DefaultKnobs(knob, why_not or "the source does not watch this host")
    if knob == "xl":
        from iotrace.analysis.host import is_dom0
        return XlKnobs() if is_dom0() else DefaultKnobs(knob, "this host is not a Xen Dom0")
    return CgroupKnobs()


@dataclass
class StepResult:
    decisions: list
    applied: list = field(default_factory=list)      # audit records written
    errors: list = field(default_factory=list)       # one line each
    note: str = ""                                   # e.g. why the knobs could not be read


class Advisor:
    def __init__(self, settings: AdviseSettings, knobs, *, apply: bool = False,
                 allow_caps: bool = False, audit: AuditLog | None = None,
                 prior: list[dict] | None = None):
        if apply and not getattr(knobs, "can_apply", False):
            raise UserError(f"--apply {knobs.knob}: {getattr(knobs, 'why', 'cannot apply here')}")
        self.settings, self.knobs, self.apply, self.audit = settings, knobs, apply, audit
        self.policy = Policy(settings, knobs.knob, allow_caps=allow_caps)
        # (knob, identity) -> original value: from an earlier run's audit log, then first reads
        self.originals: dict[tuple, int] = {}
        self._changed: set[str] = set()              # identities advise changed
        for rec in originals(prior or []):
            self.originals[(rec["knob"], rec["identity"])] = int(rec["original"])
            self._changed.add(rec["identity"])
        self._known: dict[str, tuple] = {}            # identity -> (domid, name, uuid, pid)

    def step(self, analysis, pids: dict | None = None) -> StepResult:
        pids = pids or {}
        reports = [analysis.dom0] + list(analysis.domains.values())
        self.policy.note_interval(reports)
        result = StepResult([])
        self._forget_gone(analysis, result)
        try:
            states = self.knobs.states(analysis, pids, self.originals)
        except UserError as exc:
            result.note = f"cannot read the {self.knobs.knob} knobs: {exc}"
            return result
        for domid, st in states.items():
            r = analysis.dom0 if domid == C.DOM0 else analysis.domains.get(domid)
            if r is None:
                continue
            ident = r.signals.identity
            self.originals.setdefault((f"{self.knobs.knob}-weight", ident), st.original)
            st.original = self.originals[(f"{self.knobs.knob}-weight", ident)]
            if st.cap is not None:
                self.originals.setdefault(("xl-cap", ident), st.original_cap or 0)
                st.original_cap = self.originals[("xl-cap", ident)]
            self._known[ident] = (domid, r.signals.name, r.signals.uuid, pids.get(domid))
        result.decisions = self.policy.plan(analysis, states)
        if not self.apply:
            return result
        for d in result.decisions:
            if not d.changes:
                continue
            try:
                extra = self.knobs.apply(d, pids[d.domid]) if self.knobs.knob == "cgroup" \
                    else self.knobs.apply(d)
            except (UserError, ValueError, KeyError) as exc:
                result.errors.append(f"{d.name} (domid {d.domid}) {d.knob} {d.current} -> "
                                     f"{d.new}: {exc}")
                continue
            self.policy.note_changed(d.identity)
            self._changed.add(d.identity)
            rec = {"action": "set", **d.as_dict(), "old": d.current, "signals": d.signals,
                   **extra}
            if "cgroup" in extra:
                rec["cgroup"]["raw_original"] = rec["cgroup"].get("raw_before")
            if self.audit is not None:
                try:
                    rec = self.audit.write(rec)
                except UserError as exc:
                    # a change nobody could undo from the log: stop here, saying what it was
                    raise UserError(f"{exc}; stopping: {d.name} (domid {d.domid}) {d.knob} was "
                                    f"changed {d.current} -> {d.new} (original {d.original}) "
                                    "and is not in the log") from None
            result.applied.append(rec)
        return result

    def _forget_gone(self, analysis, result: StepResult) -> None:
        present = {r.signals.identity for r in analysis.domains.values()}
        present.add(analysis.dom0.signals.identity)
        for ident in [i for i in self._known if i not in present]:
            domid, name, uuid, pid = self._known.pop(ident)
            self.policy.forget(ident)
            removed = None
            if isinstance(self.knobs, CgroupKnobs) and pid is not None:
                removed = self.knobs.backend.forget(*pid)
            if self.apply and self.audit is not None and ident in self._changed:
                self._changed.discard(ident)
                rec = {"action": "gone", "domid": domid, "domain": name, "identity": ident,
                       "uuid": uuid, "knob": f"{self.knobs.knob}-weight",
                       "reason": "the domain went away (destroyed, or its domid reused)"}
                if removed:
                    rec["removed"] = removed
                result.applied.append(self.audit.write(rec))


def rollback(records: list[dict], knobs, audit: AuditLog | None = None,
             dry_run: bool = False) -> list[tuple[dict, str, str]]:
    """Restore every original the records hold (their first ``set`` per knob and identity), in
    the reverse order of the changes (Dom0's last). Returns (record, status, what was done):
    status "restored", "gone" (the domain or its device model is not there any more: nothing
    to restore), "failed", or "dry-run"."""
    done = []
    for rec in reversed(originals(records)):
        if rec.get("knob", "").split("-")[0] != knobs.knob:
            continue
        if dry_run:
            done.append((rec, "dry-run", f"would restore {rec['knob']} {rec.get('original')}"))
            continue
        try:
            what = knobs.restore(rec)
            status = "gone" if (" is gone" in what or "not running" in what) else "restored"
        except UserError as exc:
            what, status = str(exc), "failed"
        done.append((rec, status, what))
        if audit is not None:
            audit.write({"action": "rollback", "knob": rec["knob"], "domid": rec.get("domid"),
                         "domain": rec.get("domain"), "identity": rec.get("identity"),
                         "uuid": rec.get("uuid"), "new": rec.get("original"),
                         "original": rec.get("original"), "reason": what})
    return done
