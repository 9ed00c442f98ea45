#!/usr/bin/env python3
"""Every PromQL query of iotrace's dashboards, with Grafana's variables substituted.

Used by the dashboard tests (parse every query with promtool, evaluate it against a real
Prometheus) and by hand, to try a panel's query without Grafana:

    python3 grafana/queries.py grafana/dashboards/*.json                 # all, "All" values
    python3 grafana/queries.py --var domain=web --rate-interval 5m grafana/dashboards/iotrace-domain.json

Substitution follows Grafana for the Prometheus datasource: a multi-value variable set to "All"
with allValue ".*" becomes ".*"; $__rate_interval, $__interval and $__range become durations.
Grafana's own variable function label_values(selector, label) is not PromQL; it is rendered as
the equivalent PromQL ``group by (label) (selector)``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


@dataclass
class Query:
    dashboard: str          # dashboard uid
    where: str              # "panel 3 'Requests/s' A", "variable domain", "annotation ..."
    kind: str               # "panel" | "variable" | "annotation"
    expr: str               # as written in the JSON
    panel: dict | None = None
    target: dict | None = None


def variables_used(text: str) -> list[str]:
    return [a or b for a, b in VAR_RE.findall(text)]


def iter_queries(dash: dict):
    uid = dash.get("uid", "?")
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            expr = q.get("query") if isinstance(q, dict) else q
            yield Query(uid, f"variable {var['name']}", "variable", expr or var.get("definition", ""))
    for ann in dash.get("annotations", {}).get("list", []):
        if "expr" in ann:
            yield Query(uid, f"annotation {ann.get('name')!r}", "annotation", ann["expr"])
    for panel in panels(dash):
        for t in panel.get("targets", []):
            yield Query(uid, f"panel {panel.get('id')} {panel.get('title')!r} {t.get('refId')}",
                        "panel", t.get("expr", ""), panel, t)


def panels(dash: dict):
    """Every panel, including those nested in collapsed rows."""
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", []) if p.get("type") == "row" else ()


def substitute(expr: str, values: dict[str, str] | None = None, *, rate_interval: str = "1m",
               interval: str = "30s", range_: str = "1h") -> str:
    values = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_,
              "__range_s": str(_seconds(range_)), "__interval_ms": str(_seconds(interval) * 1000),
              **(values or {})}

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            return ".*"       # a template variable left at "All"
        return values[name]
    return VAR_RE.sub(repl, expr)


def to_promql(q: Query, expr: str) -> str:
    """Panel and annotation queries are PromQL; label_values() of a variable becomes group by."""
    m = LABEL_VALUES_RE.match(expr)
    if q.kind == "variable" and m:
        return f"group by ({m.group(2)}) ({m.group(1)})"
    return expr


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)([smhd])", duration)
    if not m:
        raise ValueError(f"not a duration: {duration}")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print every dashboard query as plain PromQL.")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="value of a template variable (default: .*, Grafana's All)")
    ap.add_argument("--rate-interval", default="1m", help="$__rate_interval (default 1m)")
    args = ap.parse_args(argv)
    values = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"queries.py: --var {item}: expected NAME=VALUE", file=sys.stderr)
            return 2
        values[name] = value
    for path in args.files:
        try:
            dash = load(path)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"queries.py: {path}: {exc}", file=sys.stderr)
            return 2
        for q in iter_queries(dash):
            rendered = to_promql(q, substitute(q.expr, values, rate_interval=args.rate_interval))
            print(f"# {q.dashboard}: {q.where}\n{rendered}")
    return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # quiet when piped into head(1)
    sys.exit(main())
