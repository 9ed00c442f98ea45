"""``iotrace advise``: from observed I/O to domain priorities to the scheduler (the paper's loop).

Every interval (default 60 s) it analyses each domain (``iotrace.analysis``: synchronous request
rate, I/O wait share, p95 service time per range, device-model CPU, domain CPU and vCPUs where
Xen is, Dom0's CPU), classifies it (idle, CPU-bound, I/O-bound, storming, Dom0-starved, normal)
and plans priorities for one knob (``iotrace.advise``): ``xl`` credit2 weights or the device
models' ``cgroup`` CPU weights. Dry run by default: it prints the plan with its reasons;
``--apply KNOB`` acts, writes every change to an append-only JSONL audit log, and
``--rollback AUDIT`` restores what that log recorded. Changes are runtime only, never persisted.

Sources as ``top``: the live qemu-dm probes (default), ``--source xentrace``, ``--from URL``, or
``--replay FILE``, which evaluates a capture offline on its own timeline (``--speed X`` replays
it through the live pipeline instead).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from iotrace.cli.args import argtype, count, seconds
from iotrace.cli.source_args import add_source_arguments, build_remote, check_source_arguments
from iotrace.cli.stopsignals import interrupt_on_stop_signals
from iotrace.core.errors import UserError

HELP = "advise domain priorities from their I/O (dry run), or apply them (xl, cgroup)"
EXAMPLES = """\
examples:
  iotrace advise                          # dry run every 60 s on the live qemu-dm probes (root)
  iotrace advise 10 6                     # every 10 s, 6 times
  iotrace advise --apply xl --audit /var/log/iotrace/advise.jsonl        # credit2 weights, Dom0 first
  iotrace advise --apply cgroup --config /etc/iotrace/iotrace.yaml       # device-model cpu.weight
  iotrace advise --rollback /var/log/iotrace/advise.jsonl               # restore the originals
  iotrace advise --rollback advise.jsonl --dry-run                      # show what it would restore
  iotrace advise --replay capture.iotrec --interval 10                   # offline, on the capture's clock
  iotrace advise --from https://dom0-7:9878 --knob xl                    # a remote host's plan (dry run)
  iotrace advise --format json 60 | jq .changes

Safety: a change needs --agree-intervals agreeing intervals (default 3) and --min-history of the
domain (default 600 s); a step is at most x2; bounds and Dom0's floor come from the config's
'advise:' section (docs/advise.md); domains are followed by UUID (a reused domid is a new
domain). Changes are runtime only: they last until --rollback or the domain's restart."""

DEFAULT_AUDIT = "/var/log/iotrace/advise.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("interval_pos", nargs="?", type=argtype(seconds), default=None,
                   metavar="interval", help="seconds between analyses (default 60, or the "
                                            "config's advise.interval)")
    p.add_argument("count", nargs="?", type=argtype(count), default=None,
                   help="number of intervals, then exit (default: until Ctrl-C)")
    p.add_argument("--interval", type=argtype(seconds), default=None, metavar="S",
                   help="the same as the positional interval")
    a = p.add_argument_group("acting")
    a.add_argument("--apply", choices=("xl", "cgroup"), default=None,
                   help="act on this knob: xl credit2 weights, or the device models' cgroup "
                        "CPU weight (default: dry run)")
    a.add_argument("--knob", choices=("xl", "cgroup"), default=None,
                   help="the knob a dry run plans for (default: xl in a Xen Dom0, else cgroup)")
    a.add_argument("--allow-caps", action="store_true",
                   help="with xl: also cap a storming domain's vCPUs (advise.xl.storm_cap)")
    a.add_argument("--audit", metavar="FILE", default=None,
                   help=f"append-only JSONL log of every change (default with --apply: "
                        f"{DEFAULT_AUDIT})")
    a.add_argument("--rollback", metavar="AUDIT",
                   help="restore every original value AUDIT recorded, then exit")
    a.add_argument("--dry-run", action="store_true",
                   help="with --rollback: print what would be restored, change nothing")
    a.add_argument("--agree-intervals", type=argtype(count), default=None, metavar="N",
                   help="agreeing intervals a change needs (default 3, config advise.agree_intervals)")
    a.add_argument("--min-history", type=argtype(_nonneg), default=None, metavar="S",
                   help="seconds a domain must have been followed (default 600)")
    p.add_argument("-d", "--domain", action="append", default=[], metavar="NAME|ID",
                   help="only these domains (id, or name with shell wildcards; repeatable): "
                        "the others are neither shown nor changed")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text (default) or one JSON object per interval")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config: address map and the 'advise:' section (thresholds, bounds)")
    s = add_source_arguments(
        p, replay_help="a recording or xentrace capture, evaluated on its own clock",
        speed_help="with --replay: replay it live at X times real time instead",
        from_help="a remote 'iotrace serve' /metrics page (dry run only)",
        binary_help="with --source qemu: device-model binary to probe (repeatable)")
    s.add_argument("--binaries-only", action="store_true",
                   help="with --binary: probe only those (not Debian's qemu-dm nor the binaries "
                        "of the device models running here)")


def _nonneg(text) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        v = -1.0
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"expected a number of seconds (0 or more), got {text!r}")
    return v


# -- settings -----------------------------------------------------------------------------------

def _settings(args):
    from iotrace.analysis.settings import load_advise
    s = load_advise(args.config)
    if args.interval is not None and args.interval_pos is not None and \
            args.interval != args.interval_pos:
        raise UserError("the positional interval and --interval disagree: give one")
    interval = args.interval if args.interval is not None else args.interval_pos
    changes = {}
    if interval is not None:
        changes["interval"] = float(interval)
    if args.agree_intervals is not None:
        changes["agree_intervals"] = args.agree_intervals
    if args.min_history is not None:
        changes["min_history_seconds"] = args.min_history
    return s.with_(**changes) if changes else s


def _check_args(args) -> None:
    check_source_arguments(args)
    if args.binaries_only and not args.binary:
        raise UserError("--binaries-only needs --binary PATH")
    if args.apply and (args.from_url or args.replay):
        raise UserError(f"--apply {args.apply} acts on this host: it needs a live source "
                        "(the qemu probes or --source xentrace), not "
                        f"{'--from' if args.from_url else '--replay'}")
    if args.apply and args.knob and args.knob != args.apply:
        raise UserError(f"--knob {args.knob} and --apply {args.apply} disagree")
    if args.allow_caps and (args.apply or args.knob) == "cgroup":
        raise UserError("--allow-caps applies to the xl knob only")
    if args.dry_run and not args.rollback:
        raise UserError("--dry-run goes with --rollback (advise is a dry run unless --apply)")
    if args.audit and not args.apply and not args.rollback:
        raise UserError("--audit goes with --apply (a dry run changes nothing to log)")


def _check_can_apply(args) -> None:
    """--apply's preconditions on this host, checked before any source starts."""
    from iotrace.analysis.host import is_dom0
    if args.apply == "xl" and not is_dom0():
        raise UserError("--apply xl: this host is not a Xen Dom0 (/proc/xen/capabilities has no "
                        "control_d): there is no credit2 scheduler to set here")
    if args.apply == "cgroup" and os.geteuid() != 0:
        raise UserError("--apply cgroup needs root: it creates cgroups and moves device-model "
                        "processes (a dry run needs no root)")


def _knob(args) -> str:
    if args.apply or args.knob:
        return args.apply or args.knob
    from iotrace.analysis.host import is_dom0
    return "xl" if is_dom0() else "cgroup"


# -- rollback -----------------------------------------------------------------------------------

def run_rollback(args) -> int:
    from iotrace.advise.advisor import CgroupKnobs, XlKnobs, rollback
    from iotrace.advise.audit import AuditLog, read_audit
    records = read_audit(args.rollback)
    knobs = sorted({r.get("knob", "").split("-")[0] for r in records if r.get("action") == "set"})
    if not knobs:
        print(f"iotrace advise: {args.rollback}: no change recorded, nothing to restore")
        return 0
    failed = 0
    audit = None if args.dry_run else AuditLog(args.rollback)
    try:
        for knob in knobs:
            knobs = XlKnobs() if knob == "xl" else CgroupKnobs()
            for rec, status, what in rollback(records, knobs, audit, dry_run=args.dry_run):
                failed += status == "failed"
                word = {"dry-run": "would restore", "restored": "restored", "gone": "skipped",
                        "failed": "NOT restored"}[status]
                print(f"{word} {rec.get('domain')} (domid {rec.get('domid')}, "
                      f"{rec.get('identity')}) {rec['knob']} -> {rec.get('original')}: {what}")
    finally:
        if audit is not None:
            audit.close()
    return 1 if failed else 0


# -- sources ------------------------------------------------------------------------------------

def _build_source(args):
    from iotrace.sources import registry
    if args.from_url:
        return build_remote(args)
    from iotrace.cli.config import load_config
    cfg = load_config(args.config)
    cfg.print_warnings("advise")
    addrmap = cfg.addrmap
    if args.replay:
        return registry.build("replay", args.replay, speed=args.speed, addrmap=addrmap)
    kwargs = {"addrmap": addrmap, "keep_addr": False}
    if args.binary:
        kwargs["binaries"] = list(args.binary)
    if args.binaries_only:
        kwargs["defaults"] = False
    return registry.build(args.source or "qemu", **kwargs)


def _pids(src, host_sample) -> dict:
    """domid -> (pid, start ticks) of the device models, from the host sample's identities."""
    out = {}
    for domid, ident in (host_sample.dm_ident if host_sample is not None else {}).items():
        _, pid, start = ident.split(":")
        out[domid] = (int(pid), int(start))
    return out


def _source_pids(src) -> dict | None:
    doms = src.domains()
    pids = {d: i.pid for d, i in doms.items() if i.pid}
    return pids or None


def _domain_filter(patterns):
    """A function keeping only the analysis' domains that ``-d`` names (all without -d)."""
    import fnmatch
    if not patterns:
        return lambda a: a
    ids, globs = set(), []
    for p in (x.strip() for arg in patterns for x in arg.split(",")):
        if p.isdigit():
            ids.add(int(p))
        elif p:
            globs.append(p)

    def keep(a):
        a.domains = {d: r for d, r in a.domains.items()
                     if d in ids or any(fnmatch.fnmatchcase(r.signals.name, g) for g in globs)}
        return a
    return keep


class _Printer:
    def __init__(self, args, knob, applying, dry_why=""):
        self.args, self.knob, self.applying, self.dry_why = args, knob, applying, dry_why

    def __call__(self, analysis, result, wall=None):
        from iotrace.advise import text
        if self.args.format == "json":
            doc = text.as_json(analysis, result, knob=self.knob, applying=self.applying, wall=wall)
            sys.stdout.write(json.dumps(doc, default=str, sort_keys=True) + "\n")
        else:
            sys.stdout.write(text.interval_text(analysis, result, knob=self.knob,
                                                applying=self.applying, wall=wall,
                                                dry_why=self.dry_why) + "\n")
        sys.stdout.flush()


def run_offline(args, settings, knob) -> int:
    """--replay without --speed: the capture's own timeline, as fast as it can be read."""
    from iotrace.advise.advisor import Advisor, DefaultKnobs
    from iotrace.analysis.analyzer import Analyzer
    from iotrace.analysis.timeline import host_samples_from_meta, windows
    from iotrace.core.addrmap import AddressMap
    from iotrace.core.errors import open_input
    from iotrace.offline import recording
    from iotrace.offline.capture import load_capture
    with open_input(args.replay, "a capture file") as fh:
        head = fh.read(16)
    if recording.is_recording(head):
        rec = recording.read_recording(args.replay)
        events, names = rec.events, dict(rec.domains)
        samples = host_samples_from_meta(rec.meta, args.replay)
    else:
        cap = load_capture(args.replay)
        events, names, samples = cap.events, dict(cap.domain_names), []
    addrmap = AddressMap.load(args.config) if args.config else None
    why = "a replay" if samples else "a replay (no host samples: Dom0 and device-model CPU unknown)"
    knobs = DefaultKnobs(knob, "a replay acts on nothing")
    advisor = Advisor(settings, knobs)
    analyzer = Analyzer(settings)
    out = _Printer(args, knob, False, dry_why=f"{why}; weights from the default")
    keep = _domain_filter(args.domain)
    n = 0
    for w in windows(events, settings.interval, addrmap, samples):
        a = analyzer.step(w.t, w.totals, names, w.host)
        if a is None:
            continue
        a = keep(a)
        out(a, advisor.step(a))
        n += 1
        if args.count is not None and n >= args.count:
            break
    return 0


def run_live(args, settings, knob) -> int:
    from iotrace.advise.advisor import Advisor, make_knobs
    from iotrace.advise.audit import AuditLog, read_audit
    from iotrace.analysis.analyzer import Analyzer
    from iotrace.analysis.host import LocalHost
    from iotrace.sources import registry
    src = _build_source(args)
    local = not (args.from_url or args.replay)
    knobs = make_knobs(knob, local=local,
                       why_not="--from watches another host" if args.from_url else "a replay")
    audit = prior = None
    if args.apply:
        path = args.audit or DEFAULT_AUDIT
        prior = read_audit(path) if os.path.exists(path) else []
        audit = AuditLog(path)
    advisor = Advisor(settings, knobs, apply=bool(args.apply), allow_caps=args.allow_caps,
                      audit=audit, prior=prior)
    host = LocalHost() if local else None
    analyzer = Analyzer(settings, dm_wait_counts=src.name != "xentrace")
    out = _Printer(args, knob, bool(args.apply),
                   dry_why=f"{knobs.why}; weights from the default" if hasattr(knobs, "why")
                   else "")
    keep = _domain_filter(args.domain)
    interrupt_on_stop_signals()
    changed = 0
    try:
        registry.start(src)
        t0 = time.monotonic()
        scrape = getattr(src, "scrape", None)
        first = {}
        if getattr(src, "totals_predate_start", False):
            if scrape is not None:
                scrape()
            first = src.totals()
        sample0 = host.sample(t0, _source_pids(src)) if host else None
        analyzer.step(t0, first, _names(src), sample0)
        if args.format == "text":
            mode = f"applying on {knob}" if args.apply else f"dry run, planning for {knob}"
            print(f"iotrace advise: {mode}; source {src.name}; first analysis in "
                  f"{settings.interval:g} s (a change needs {settings.agree_intervals} agreeing "
                  f"intervals and {settings.min_history_seconds:g} s of history)",
                  file=sys.stderr, flush=True)
        n, next_t = 0, t0 + settings.interval
        while args.count is None or n < args.count:
            time.sleep(max(0.0, next_t - time.monotonic()))
            next_t += settings.interval
            if scrape is not None:
                scrape()
            t = time.monotonic()
            totals, names = src.totals(), _names(src)
            sample = host.sample(t, _source_pids(src)) if host else None
            a = analyzer.step(t, totals, names, sample)
            if a is None:
                continue
            a = keep(a)
            res = advisor.step(a, _pids(src, sample))
            changed += len([r for r in res.applied if r.get("action") == "set"])
            out(a, res, wall=time.time())
            n += 1
    except KeyboardInterrupt:
        pass
    finally:
        try:
            src.stop()
        except Exception as exc:  # never leave uprobes behind because of a later error
            print(f"iotrace advise: stopping {src.name}: {exc}", file=sys.stderr)
        if audit is not None:
            audit.close()
            if changed:
                print(f"iotrace advise: {changed} change(s) stay in place (runtime only); undo "
                      f"with: iotrace advise --rollback {audit.path}", file=sys.stderr)
    return 0


def _names(src) -> dict:
    return {d: i.name for d, i in src.domains().items()}





def run(args) -> int:
    if args.rollback:
        for flag, v in (("--apply", args.apply), ("--replay", args.replay),
                        ("--from", args.from_url), ("--source", args.source)):
            if v:
                raise UserError(f"--rollback restores and exits: {flag} does not go with it")
        return run_rollback(args)
    _check_args(args)
    settings = _settings(args)
    _check_can_apply(args)
    knob = _knob(args)
    if args.replay and args.speed is None:
        return run_offline(args, settings, knob)
    return run_live(args, settings, knob)
