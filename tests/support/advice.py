"""Hand-made analysis results for the policy tests: one report per domain with the class (and the
settled class) a test wants, without running the analysis (iotrace.analysis.analyzer has its own
tests)."""
from __future__ import annotations

from iotrace.analysis import classify as C
from iotrace.analysis.analyzer import Analysis, DomainReport
from iotrace.analysis.signals import DomainSignals, HostSignals


def report(domid, cls, settled=None, streak=3, history=1e6):
    sig = DomainSignals(domid, f"dom{domid}", f"id:{domid}", None, 1.0)
    return DomainReport(sig, C.Verdict(cls, [f"{cls} because"]), history, streak,
                        settled or cls, 0.0, f"{settled or cls} because")


def analysis(reports, t=0.0):
    dom0 = next((r for r in reports if r.signals.domid == 0), report(0, C.NORMAL))
    return Analysis(t, 1.0, HostSignals(1.0), None,
                    {r.signals.domid: r for r in reports if r.signals.domid}, dom0)
