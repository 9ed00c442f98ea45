"""``iotrace serve``: the Prometheus exporter (one per Dom0 host).

Order of work, so that every operator mistake is one line and exit 2 before anything runs:
config (address map + ``exporter:`` section), web config (TLS, basic auth), sources built, port
bound; only then are the sources started and the server served. A source that fails later
(probe detached, xentrace died) shows as ``iotrace_source_up 0`` and in the log; the rest keep
being served. SIGTERM/SIGINT stop the server and every source (their uprobes are detached).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry

from iotrace.cli.args import argtype, seconds, speed
from iotrace.cli.config import load_config
from iotrace.core.errors import InputError, UserError
from iotrace.serve.collector import IotraceCollector
from iotrace.serve.server import DEFAULT_LISTEN, ExporterServer
from iotrace.serve.settings import ExporterSettings
from iotrace.sources import registry

HELP = "Prometheus exporter: serve per-domain I/O request metrics on /metrics"
EXAMPLES = """\
examples:
  iotrace serve                                  # live qemu-dm probes, :9878/metrics (root)
  iotrace serve --source both                    # qemu-dm probes and Xen trace points
  iotrace serve --config /etc/iotrace/iotrace.yaml --web.config.file /etc/iotrace/web.yml
  iotrace serve --replay capture.bin             # serve the totals of a capture
  iotrace serve --replay capture.bin --speed 2   # replay it at twice real time
  iotrace serve --web.listen-address 127.0.0.1:9878 --strict

Metrics are documented in docs/metrics.md; deployment (systemd unit, scrape config, privileges)
in deploy/README.md. Default port 9878."""

MONITOR_INTERVAL = 1.0

log = logging.getLogger("iotrace.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=("qemu", "xentrace", "both"), default=None,
                   help="live event source: qemu-dm uprobes (default), Xen trace points, or both "
                        "(kept apart by the 'source' label)")
    p.add_argument("--binary", action="append", default=[], metavar="PATH",
                   help="with --source qemu/both: also probe this device-model binary "
                        "(repeatable; those at the known install paths and of any running "
                        "-xen-domid process are found by default)")
    p.add_argument("--replay", metavar="FILE",
                   help="serve a recording or xentrace capture instead of live sources")
    p.add_argument("--speed", type=argtype(speed), default=None, metavar="X",
                   help="with --replay: 0 loads everything at once (default); X replays on the "
                        "events' timestamps at X times real time")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config: address map (pio/mmio/pci_config) and 'exporter:' section "
                        "(vcpu_label, domain_grace_seconds)")
    p.add_argument("--web.listen-address", dest="listen_address", default=DEFAULT_LISTEN,
                   metavar="ADDR", help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    p.add_argument("--strict", action="store_true",
                   help="exit if any source fails to start or any probe fails to attach")
    p.add_argument("--analysis-interval", type=argtype(seconds), default=None, metavar="S",
                   help="seconds between two per-domain analyses (I/O wait share, class, advised "
                        "weight: the iotrace_domain_* metrics; default 60, or the config's "
                        "advise.interval)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="log verbosity on stderr (default info)")


# A gone domain's final totals stay in the qemu source this much longer than the exporter shows
# them (domain_grace_seconds): the collector, not the source, decides when its series go.
RETAIN_MARGIN_SECONDS = 30.0


def build_sources(args, addrmap, settings=None) -> list:
    # Metrics are per range, never per address: sources fold addresses away (keep_addr=False).
    if args.replay:
        if args.source is not None or args.binary:
            raise UserError("--replay excludes --source and --binary (a replay is its own "
                            "source)")
        # damage in the file (skipped chunks, truncation) is logged as it is found
        return [registry.build("replay", args.replay, speed=args.speed or 0.0, addrmap=addrmap,
                               warn=lambda msg: log.warning("source replay: %s", msg))]
    if args.speed is not None:
        raise UserError("--speed only applies with --replay")
    kinds = ["qemu", "xentrace"] if args.source == "both" else [args.source or "qemu"]
    if args.binary and "qemu" not in kinds:
        raise UserError("--binary only applies to the qemu source")
    out = []
    for kind in kinds:
        kw = {"addrmap": addrmap, "keep_addr": False}
        if kind == "qemu":
            grace = (settings or ExporterSettings()).domain_grace_seconds
            kw.update(strict=args.strict, warn=lambda msg: log.warning("source qemu: %s", msg),
                      retain_seconds=grace + RETAIN_MARGIN_SECONDS)
            if args.binary:
                kw["binaries"] = list(args.binary)
        out.append(registry.build(kind, **kw))
    return out


def _health(st) -> tuple:
    """What the monitor compares between passes: (up, error, failed attachments)."""
    return (st.up, st.error, st.probes_failed)


def _start_sources(sources, strict: bool) -> dict:
    """Start every source; returns each one's health as logged (the monitor's first state)."""
    logged = {}
    for src in sources:
        try:
            registry.start(src)
        except InputError:
            raise                       # a bad replay file is bad input, always fatal
        except UserError as exc:
            msg = str(exc)
            if not msg.startswith(f"source {src.name}"):
                msg = f"source {src.name} failed to start: {msg}"
            if strict:
                raise UserError(msg) from None
            log.error("%s (serving the others; iotrace_source_up{source=%r} is 0)", msg,
                      src.name)
            continue
        st = src.stats()
        if strict and st.probes_failed:
            raise UserError(f"source {src.name}: {st.probes_failed} probe(s) failed to "
                            f"attach{': ' + st.error if st.error else ''} (--strict)")
        if st.up:
            log.info("source %s started", src.name)
        else:
            # One line per reason (e.g. per binary the kernel refused the probes of, with the
            # verifier's verdict); the monitor does not repeat them.
            for why in getattr(src, "failures", None) or [st.error or "no reason given"]:
                log.error("source %s is down: %s", src.name, why)
        logged[src.name] = _health(st)
    return logged


STRICT_SETTLE_SECONDS = 1.5


def _check_settled(sources) -> None:
    """--strict: a source that dies right after start (xentrace exiting at once, say) failed to
    start too. Give each a moment, then demand it is up with no failed attachment."""
    deadline = time.monotonic() + STRICT_SETTLE_SECONDS
    while True:
        bad = []
        for src in sources:
            st = src.stats()
            if not st.up or st.probes_failed:
                bad.append(f"source {src.name}: "
                           f"{'down' if not st.up else f'{st.probes_failed} probe(s) failed'}"
                           f"{': ' + st.error if st.error else ''}")
        if bad:
            raise UserError("; ".join(bad) + " (--strict)")
        if time.monotonic() >= deadline:
            return                      # up and attached for the whole settling period
        time.sleep(0.1)


def _stop_sources(sources) -> None:
    for src in sources:
        try:
            src.stop()
        except Exception as exc:  # keep stopping the others: no uprobe must be left behind
            log.error("source %s: error while stopping: %s", src.name, exc)


def _monitor(sources, stop: threading.Event, last: dict | None = None) -> None:
    """Log each source's health changes (up/down, new errors, new attach failures), from the
    states already logged at start (``last``)."""
    last = dict(last or {})
    while not stop.wait(MONITOR_INTERVAL):
        for src in sources:
            try:
                st = src.stats()
                state = _health(st)
            except Exception as exc:
                state = (False, f"stats() failed: {exc}", None)
            prev = last.get(src.name)
            if prev is None and not state[0]:
                log.error("source %s is down: %s", src.name, state[1] or "no reason given")
            elif prev is not None and prev != state:
                up, err, failed = state
                if not up:
                    log.error("source %s is down: %s", src.name, err or "no reason given")
                elif prev[0] is False:
                    log.info("source %s is up again", src.name)
                if failed and prev[2] is not None and failed > (prev[2] or 0):
                    log.warning("source %s: %d probe attach failure(s) so far", src.name, failed)
            last[src.name] = state


def _analysis(args, sources):
    """The per-domain analysis beside the exporter (iotrace.analysis.live); the host's own figures
    (Dom0 and device-model CPU, xl) only when the sources watch this host."""
    from iotrace.analysis.host import LocalHost
    from iotrace.analysis.live import LiveAnalysis
    from iotrace.analysis.settings import load_advise
    advise = load_advise(args.config)
    if args.analysis_interval is not None:
        advise = advise.with_(interval=args.analysis_interval)
    return LiveAnalysis(sources, advise, host=None if args.replay else LocalHost())


def run(args) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s iotrace serve %(levelname)s: %(message)s")
    cfg = load_config(args.config)
    for w in cfg.warnings:
        log.warning("%s", w)
    settings, addrmap = cfg.exporter, cfg.addrmap
    web = None
    if args.web_config_file:
        from iotrace.serve.webconfig import load_web_config
        web = load_web_config(args.web_config_file)
    sources = build_sources(args, addrmap, settings)
    analysis = _analysis(args, sources)

    registry = CollectorRegistry()
    collector = IotraceCollector(sources, settings, analysis=analysis)
    registry.register(collector)
    desc = "sources: " + ", ".join(s.name for s in sources)
    if args.replay:
        desc += f" ({args.replay})"
    server = ExporterServer(registry, args.listen_address, web, description=desc,
                            fast_text=collector.iter_chunks)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # The CLI entry point restores SIGPIPE's default (die) for commands piped into head(1); a
    # server must not die when a scraper hangs up mid-response: ignore it, so the write fails
    # with BrokenPipeError in that connection's thread only.
    if hasattr(signal, "SIGPIPE"):
        old[signal.SIGPIPE] = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        logged = _start_sources(sources, args.strict)  # on failure: the finally below cleans up
        if args.strict:
            _check_settled(sources)
        analysis.start()
        server.start()
        log.info("serving %s/metrics (%s)", server.url, desc)
        monitor = threading.Thread(target=_monitor, args=(sources, stop, logged), name="monitor",
                                   daemon=True)
        monitor.start()
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        analysis.stop()
        _stop_sources(sources)
        for s, h in old.items():
            signal.signal(s, h)
    log.info("stopped")
    return 0
