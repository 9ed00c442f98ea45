"""The source options of the verbs that watch one source (``top``, ``advise``): defined, checked
and turned into a source (through ``iotrace.sources.registry``) in one place.

    --source qemu|xentrace   a live source on this host (default: the qemu-dm probes)
    --binary PATH            with the qemu source: also probe this device-model binary
    --replay FILE [--speed X]  a recording or xentrace capture through the live pipeline
    --from URL               a remote ``iotrace serve`` (--from-auth @FILE, --from-ca, --from-source,
                             --from-timeout); its password never on the command line (ps shows it):
                             a file, or the IOTRACE_FROM_AUTH environment variable
"""
from __future__ import annotations

import os
from urllib.parse import urlsplit

from iotrace.cli.args import argtype, seconds, speed
from iotrace.core.errors import UserError
from iotrace.sources import registry

AUTH_ENV = "IOTRACE_FROM_AUTH"


def add_source_arguments(p, *, replay_help: str, speed_help: str, from_help: str,
                         binary_help: str) -> None:
    """The source options, in a group of their own on parser ``p`` (the helps are the verb's)."""
    s = p.add_argument_group("sources (default: live qemu-dm probes)")
    s.add_argument("--source", choices=("qemu", "xentrace"), default=None,
                   help="live source: qemu-dm uprobes (default) or Xen trace points")
    s.add_argument("--binary", action="append", default=[], metavar="PATH", help=binary_help)
    s.add_argument("--replay", metavar="FILE", help=replay_help)
    s.add_argument("--speed", type=argtype(speed), default=None, metavar="X", help=speed_help)
    s.add_argument("--from", dest="from_url", metavar="URL", help=from_help)
    s.add_argument("--from-auth", metavar="@FILE",
                   help="basic auth for --from: a file holding USER:PASS (or set "
                        f"{AUTH_ENV}=USER:PASS; a password on the command line shows in ps)")
    s.add_argument("--from-ca", metavar="FILE", help="CA certificate(s) to verify an https --from")
    s.add_argument("--from-source", metavar="NAME",
                   help="which of the remote exporter's sources (default qemu, else the first)")
    s.add_argument("--from-timeout", type=argtype(seconds), default=5.0, metavar="S",
                   help="timeout of one --from scrape in seconds (default 5)")
    return s


def check_source_arguments(args) -> None:
    """The combinations that make no sense: one line each."""
    picked = [n for n, v in (("--replay", args.replay), ("--from", args.from_url),
                             ("--source", args.source)) if v]
    if len(picked) > 1:
        raise UserError(f"{' and '.join(picked)} are exclusive: pick one source")
    if args.speed is not None and not args.replay:
        raise UserError("--speed only applies with --replay")
    if args.binary and (args.replay or args.from_url or args.source == "xentrace"):
        raise UserError("--binary only applies to the qemu source")
    if (args.from_auth or args.from_ca or args.from_source) and not args.from_url:
        raise UserError("--from-auth, --from-ca and --from-source need --from URL")


def remote_auth(args) -> str | None:
    """--from credentials from a file (@FILE) or the environment, never the command line."""
    if args.from_auth is not None and not args.from_auth.startswith("@"):
        raise UserError(f"--from-auth: give @FILE (a file holding USER:PASS) or set {AUTH_ENV}: "
                        "a password on the command line shows in ps")
    if urlsplit(args.from_url).password is not None:
        raise UserError(f"--from: no password in the URL (it shows in ps): use --from-auth @FILE "
                        f"or {AUTH_ENV}")
    return args.from_auth or os.environ.get(AUTH_ENV) or None


def build_remote(args):
    """The --from source (not started)."""
    return registry.build("remote", args.from_url, auth=remote_auth(args), cafile=args.from_ca,
                          source=args.from_source, timeout=args.from_timeout)
