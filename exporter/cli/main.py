"""``iotrace <verb>``: the command-line entry point.

Each verb lives in a module of its own exposing ``HELP`` (one line), ``EXAMPLES`` (the epilog),
``add_arguments(parser)`` and ``run(args) -> int``. Errors the operator can fix (``iotrace.core.errors.UserError``
and its kinds) print one line and exit non-zero; they never show a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys

from iotrace.core.errors import UserError

# verb -> module. A verb whose module is absent from this installation is not offered.
VERBS = {
    "report": "iotrace.cli.report",
    "serve": "iotrace.cli.serve",
    "top": "iotrace.cli.top",
    "advise": "iotrace.cli.advise",
    "snoop": "iotrace.probes.cli.snoop",
    "record": "iotrace.probes.cli.record",
    "probe-info": "iotrace.probes.cli.probe_info",
    "standin": "iotrace.probes.cli.standin",
    "demo": "iotrace.cli.demo",
}

DESCRIPTION = """\
Observe the I/O requests Xen HVM guests send to their emulated devices (port I/O, MMIO,
PCI config), per domain, vCPU and named device range, from Dom0."""


def _available():
    for verb, modname in VERBS.items():
        try:
            if importlib.util.find_spec(modname) is not None:
                yield verb, modname
        except ModuleNotFoundError:
            continue


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb, or of ``only`` that one (its module alone is imported: a verb
    does not pay for the others' imports, e.g. report for prometheus_client)."""
    parser = argparse.ArgumentParser(prog="iotrace", description=DESCRIPTION)
    from iotrace import __version__
    parser.add_argument("--version", action="version", version=f"iotrace {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, modname in _available():
        if only is not None and verb != only:
            continue
        mod = importlib.import_module(modname)
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP,
                           epilog=getattr(mod, "EXAMPLES", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


# Verbs a Debian package leaves out (deploy/debian/rules): they need the stand-in device model,
# which is built at run time with a C compiler and libxen-dev: not an operator's Dom0.
NOT_INSTALLED = ("not part of this installation: the iotrace package leaves out the stand-in "
                 "device model and the demo; run them from a source tree (make demo)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in VERBS and argv[0] not in dict(_available()):
        print(f"iotrace {argv[0]}: {NOT_INSTALLED}", file=sys.stderr)
        return 2
    parser = build_parser(argv[0] if argv and argv[0] in VERBS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:       # ConfigError, InputError, ProbeError are UserErrors
        print(f"iotrace {args.verb}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into head(1) and the like: not an error.
        try:
            sys.stdout = None
        except Exception:
            pass
        return 0


def entry_point() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
    sys.exit(main())
