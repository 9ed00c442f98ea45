"""What the probe verbs (``snoop``, ``record``) share: their options, and their live source.

The source is built and started through ``iotrace.sources.registry`` like every other verb's, in
events mode (one ring-buffer record per request, exact addresses).
"""
from __future__ import annotations

from iotrace.cli.args import argtype, byte_offset, seconds
from iotrace.cli.config import load_config
from iotrace.core.errors import ProbeError
from iotrace.probes.live import DEBIAN_DM
from iotrace.sources import registry


def add_probe_arguments(p) -> None:
    """The options every probe verb takes (snoop, record)."""
    p.add_argument("--duration", type=argtype(seconds), default=None, metavar="S",
                   help="stop after S seconds (default: until SIGINT/SIGTERM)")
    p.add_argument("--binary", action="append", default=[], metavar="PATH",
                   help="also probe this device model binary (repeatable); the defaults are "
                        "the known install paths (e.g. " + DEBIAN_DM + ", <libexecdir>/xen/bin/"
                        "qemu-system-i386) and the binary of any -xen-domid process, also "
                        "those started later")
    p.add_argument("--no-default-binaries", action="store_true",
                   help="probe only the --binary paths (and follow no new device model)")
    p.add_argument("--strict", action="store_true",
                   help="any binary that cannot be resolved or attached is fatal")
    p.add_argument("--no-service-time", action="store_true",
                   help="no return probe: no service times, one trap per request instead of two")
    p.add_argument("--send-vcpu-offset", type=argtype(byte_offset), default=None, metavar="OFF",
                   help="offsetof(XenIOState, send_vcpu) for binaries the table does not know "
                        "(0x50 up to QEMU 8.0, 0x48 from 8.1; default: read from the code, see "
                        "`iotrace probe-info`)")
    p.add_argument("--config", metavar="YAML", default=None,
                   help="address map overriding the PC default range names")


def events_source(args):
    """The qemu source in events mode, as the options say (not started)."""
    if not args.binary and args.no_default_binaries:
        raise ProbeError("--no-default-binaries needs at least one --binary PATH")
    cfg = load_config(args.config)
    cfg.print_warnings(getattr(args, "verb", "probe"))
    addrmap = cfg.addrmap
    return registry.build("qemu", addrmap, binaries=args.binary, strict=args.strict,
                          mode="events", timing=not args.no_service_time,
                          defaults=not args.no_default_binaries,
                          send_vcpu_offset=args.send_vcpu_offset)


def start_attached(src) -> None:
    """Start ``src``: an error when nothing counts, a warning line per binary that is not
    counted while others are (``--strict`` made those fatal already)."""
    registry.start(src)
    registry.require_attached(src)
    for msg in src.failures:
        src.warn(f"warning: {msg}")
