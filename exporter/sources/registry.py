"""The one place sources are built and started: live qemu probes, live xentrace, replay, remote.

``serve``, ``top``, ``snoop`` and ``record`` build their sources here, so every verb gets the same
source for the same request and the same one-line errors. Each builder imports its source's module
only when asked: a replay or a ``--from`` view never loads BCC.

* ``build(kind, ...)``: ``qemu`` (``iotrace.probes.live.QemuProbeSource``: uprobes on the device
  models, metrics or events mode), ``xentrace`` (``iotrace.xentrace.live.XentraceLiveSource``),
  ``replay`` (``iotrace.sources.replay.ReplaySource``, a recording or xentrace capture fed through
  the live pipeline), ``remote`` (``iotrace.sources.remote.RemoteSource``, another host's
  ``iotrace serve``);
* ``start(src)``: start it; any failure is one ``UserError`` line (permission problems say how to
  get the permission, or to watch the host through ``--from``);
* ``require_attached(src)``: for the verbs that need live probes (snoop, record): at least one
  uprobe attached, else one line saying why.
"""
from __future__ import annotations

import importlib

from iotrace.core.errors import ProbeError, UserError

# kind -> (module, class). LIVE: the sources that trace this host (they need privileges).
KINDS = {
    "qemu": ("iotrace.probes.live", "QemuProbeSource"),
    "xentrace": ("iotrace.xentrace.live", "XentraceLiveSource"),
    "replay": ("iotrace.sources.replay", "ReplaySource"),
    "remote": ("iotrace.sources.remote", "RemoteSource"),
}
LIVE = ("qemu", "xentrace")


def source_class(kind: str):
    """The class of source ``kind``; UserError (one line) when it cannot be loaded here."""
    if kind not in KINDS:
        raise UserError(f"unknown source {kind!r} (expected one of: {', '.join(KINDS)})")
    modname, clsname = KINDS[kind]
    try:
        mod = importlib.import_module(modname)
    except ImportError as exc:
        raise UserError(f"--source {kind}: {modname} is not available here ({exc})") from None
    cls = getattr(mod, clsname, None)
    if cls is None:
        raise UserError(f"--source {kind}: {modname} has no {clsname}")
    return cls


def build(kind: str, *args, **options):
    """A new, not yet started source of ``kind``; ``options`` are its constructor's (see the
    classes in KINDS: e.g. qemu takes addrmap, binaries, strict, mode, timing, defaults,
    send_vcpu_offset, keep_addr, warn; replay takes the path, speed, addrmap, keep_addr; remote
    the URL, auth, cafile, source, timeout)."""
    return source_class(kind)(*args, **options)


def start(src) -> None:
    """Start ``src``; every failure becomes one UserError line."""
    try:
        src.start()
    except UserError:
        raise
    except PermissionError as exc:
        raise UserError(f"source {src.name}: permission denied ({exc}); run as root, or watch "
                        "the host's 'iotrace serve' with --from URL") from None
    except Exception as exc:  # a source's own bug or environment: one line, not a traceback
        raise UserError(f"source {getattr(src, 'name', '?')} failed to start: "
                        f"{type(exc).__name__}: {exc}") from None


def require_attached(src) -> None:
    """A started qemu source has at least one uprobe attached (else ProbeError: why)."""
    if not src.attached:
        msg = src.stats().error or "no device model binary found"
        raise ProbeError(f"nothing attached: {msg}")
