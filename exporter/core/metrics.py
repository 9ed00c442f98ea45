"""The metric contract: every metric iotrace exports, declared once.

``METRICS`` is the one table (name, type, labels, optional labels, help). Everything else follows
from it:

* ``iotrace.serve.collector`` builds its families from it (names, label order, HELP text);
* ``iotrace.sources.remote`` (``top --from URL``) parses a remote exporter's page with it;
* ``rules/metrics-contract.yml`` (what the rules and dashboards may read) and the metrics table of
  ``docs/metrics.md`` are generated from it: ``python -m iotrace.core.metrics contract`` /
  ``python -m iotrace.core.metrics doc-table``; tests/core/test_metrics.py fails when either
  file differs from what the table gives.

Names follow Prometheus' conventions: ``iotrace_`` prefix, base units, counters end in ``_total``
(``name`` here is the family name without it; ``sample`` is the exposed name). No label carries an
address, a pid or guest data.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

# Histogram buckets of iotrace_ioreq_service_seconds (le, in ns here, in seconds when exposed;
# plus +Inf): two per power of two from 2^10 ns (1.02 us) to 2^20 ns (1.05 ms), where device
# emulation lives (2^k x 1 and 1.5), then one per power of two up to 2^33 ns (8.6 s). Each is a
# slot bound of iotrace.core.aggregate's log-linear histograms (tests/serve check it), so a
# bucket's count is an exact sum of slots: the durations below its bound (2^34 ns, where the
# histograms' last slot also takes everything longer, is no bound). 34 bounds: with +Inf, _sum
# and _count, 37 series per (source, domain, type, range). Four per power of two would bring
# histogram_quantile from within 50% to within 25% for 20 more series per (type, range), and
# half again the scrape time (bench/exporter_scrape.py: 100 domains x 30 ranges, 54 bounds about
# 150 ms against 100 ms with 34): the exact figures are in iotrace top and iotrace report.
BUCKET_FINE = (10, 20)           # [2^10, 2^20) ns: two buckets per power of two
BUCKET_LAST_EXP = 33
BUCKET_BOUNDS_NS = tuple(m << (k - 1) for k in range(*BUCKET_FINE) for m in (2, 3)) + \
    tuple(1 << k for k in range(BUCKET_FINE[1], BUCKET_LAST_EXP + 1))
BUCKET_BOUNDS_SECONDS = tuple(b / 1e9 for b in BUCKET_BOUNDS_NS)

DEFAULT_PORT = 9878
METRICS_PATH = "/metrics"


@dataclass(frozen=True)
class MetricDef:
    name: str                              # family name (counters without "_total")
    type: str                              # counter | gauge | histogram
    labels: tuple[str, ...]                # in exposition order, optional ones included
    help: str
    optional: tuple[str, ...] = ()         # labels a configuration may drop (vcpu_label: false)
    summary: str = ""                      # one line for the contract file and the doc table

    @property
    def sample(self) -> str:
        """The name a scraper sees (``_total`` for counters; histograms add _bucket/_sum/_count)."""
        return self.name + "_total" if self.type == "counter" else self.name

    def labels_without(self, dropped) -> tuple[str, ...]:
        """``labels`` minus the optional ones in ``dropped``."""
        return tuple(lb for lb in self.labels if lb not in dropped or lb not in self.optional)


_IO_LABELS = ("source", "domain", "domid", "vcpu", "type", "dir", "range")
_SRC = ("source",)
_DOM = ("source", "domain", "domid")

METRICS: tuple[MetricDef, ...] = (
    MetricDef(
        "iotrace_ioreqs", "counter", _IO_LABELS,
        "I/O requests HVM guests sent to emulated devices (port I/O, MMIO, PCI config), by domain, "
        "vCPU (-1: buffered or unknown), request type, direction and named address range. "
        "source=qemu: requests that reached qemu-dm; source=xentrace: requests Xen's trace points "
        "saw (including those Xen emulates itself).",
        optional=("vcpu",),
        summary="I/O requests (ioreqs to qemu-dm, TRC_HVM_IO* records, replayed rows)."),
    MetricDef(
        "iotrace_ioreq_bytes", "counter", _IO_LABELS,
        "Bytes moved by guest I/O requests (access size x repeat count), where the source knows "
        "the access size (the qemu probes do; xentrace does not record it).",
        optional=("vcpu",),
        summary="Bytes moved (size x count) where the source knows the size."),
    MetricDef(
        "iotrace_ioreq_service_seconds", "histogram", ("source", "domain", "domid", "type", "range"),
        "Time to serve one guest I/O request: emulation time in the device model (qemu) or VM "
        "exit until the request was answered: VM entry, or the wake-up of a vCPU that waited for "
        "the device model (xentrace).",
        summary="Time to serve a request."),
    MetricDef(
        "iotrace_domain_info", "gauge", ("domid", "domain", "source"),
        "Always 1: the name of each domain a source reports (join on domid).",
        summary="Domain names (value 1; join on domid)."),
    MetricDef(
        "iotrace_domain_ranges_seen", "gauge", _DOM,
        "Distinct named address ranges the domain has touched since it was first seen.",
        summary="Distinct ranges the domain has touched since first seen."),
    MetricDef(
        "iotrace_range_first_seen_timestamp_seconds", "gauge", _DOM + ("range",),
        "Unix time at which the domain first touched the named address range (device probing "
        "shows up as new ranges).",
        summary="Unix time of the domain's first access to the range."),
    MetricDef(
        "iotrace_domain_io_wait_ratio", "gauge", _DOM,
        "Share of the domain's vCPU time spent waiting for emulation over the last analysis "
        "interval: service time of its synchronous requests (those with a vCPU) / (interval x "
        "its vCPUs). vCPUs from xl where Xen is, else the highest vCPU its requests showed.",
        summary="I/O wait share of the domain's vCPU time (last analysis interval)."),
    MetricDef(
        "iotrace_domain_class", "gauge", _DOM + ("class",),
        "1 for the class the analysis gave the domain in its last interval, 0 for the others: "
        "idle, cpu-bound, io-bound, storming, dom0-starved, normal (domid 0 is Dom0: "
        "dom0-starved or normal).",
        summary="The domain's class in the last analysis interval (value 1; the others 0)."),
    MetricDef(
        "iotrace_domain_device_model_cpu_ratio", "gauge", _DOM,
        "CPU used by the domain's device-model process over the last analysis interval, as a "
        "share of one CPU (/proc/PID/stat utime + stime).",
        summary="Device-model CPU use, share of one CPU (last analysis interval)."),
    MetricDef(
        "iotrace_advised_weight", "gauge", _DOM + ("knob",),
        "The weight iotrace advise targets for the domain, after its hysteresis and bounds, on "
        "the knob's default scale: knob=xl is the credit2 weight (default 256, Dom0 included), "
        "knob=cgroup the device model's cpu.weight (default 100). advise applies the same factor "
        "to each domain's original weight, at most x2 per step.",
        summary="Weight advise targets (knob xl = credit2, default 256; cgroup = cpu.weight, 100)."),
    MetricDef(
        "iotrace_dom0_cpu_busy_ratio", "gauge", (),
        "Share of Dom0's CPU time busy over the last analysis interval, all its CPUs, steal "
        "included (time Xen ran other domains while Dom0 wanted to run); from /proc/stat.",
        summary="Dom0 CPU busy share, steal included (last analysis interval)."),
    MetricDef(
        "iotrace_source_up", "gauge", _SRC,
        "1 while the event source runs and counts all it was asked to (qemu: every device-model "
        "binary's probe programs loaded by the kernel and attached), 0 otherwise (the reason is "
        "in the log).",
        summary="1 while the source runs and counts."),
    MetricDef(
        "iotrace_probes_attached", "gauge", _DOM,
        "Uprobes counting on behalf of the domain's device model (qemu source): 0 when its "
        "binary's probes are refused or incomplete (a binary's probes are attached all together "
        "or not at all) or its binary cannot be probed.",
        summary="Probes attached on behalf of the domain."),
    MetricDef(
        "iotrace_probe_attach_failures", "counter", _SRC,
        "Probe attachments that failed (missing symbol, no permission, process gone).",
        summary="Failed probe attachments."),
    MetricDef(
        "iotrace_events_lost", "counter", _SRC,
        "Events the source lost (BPF ring buffer overruns, xentrace lost records).",
        summary="Events lost (buffer overruns, TRC_LOST_RECORDS)."),
    MetricDef(
        "iotrace_decode_errors", "counter", _SRC,
        "Records the source could not decode (a replayed recording: the records of the chunks "
        "skipped as damaged).",
        summary="Records that could not be decoded."),
    MetricDef(
        "iotrace_input_damage", "counter", ("source", "kind"),
        "Damage in the input file a source reads (serve --replay): kind=skipped_chunk counts "
        "recording chunks, or runs of bytes, that failed their checks and were skipped (their "
        "records count in iotrace_decode_errors_total); kind=truncated is 1 once the input "
        "ended inside a record, or a recording ended without its end chunk (its writer was "
        "killed). 0 for live sources.",
        summary="Damage in a replayed input (chunks skipped, truncation)."),
    MetricDef(
        "iotrace_source_events", "counter", _SRC,
        "I/O requests the source has delivered to iotrace.",
        summary="Events seen by the source."),
    MetricDef(
        "iotrace_build_info", "gauge", ("version",),
        "Always 1: the version of the iotrace exporter.",
        summary="Build information (value 1)."),
    MetricDef(
        "iotrace_scrape_duration_seconds", "gauge", (),
        "Time the last collection took to read the sources and build the metrics.",
        summary="Duration of the last collection."),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}
assert len(BY_NAME) == len(METRICS), "two metrics share a name"


def contract_yaml() -> str:
    """rules/metrics-contract.yml, as the table gives it."""
    out = [
        "# The metric contract between `iotrace serve` and the rules/dashboards of this repository.",
        "# GENERATED from iotrace/core/metrics.py (python -m iotrace.core.metrics contract): do not",
        "# edit; tests/core/test_metrics.py checks it. The tests check that every iotrace_* name used",
        "# by a rule or a dashboard panel is listed here, and (live test) that the exporter exposes",
        "# them with these labels.",
        "#",
        "# type: counter | gauge | histogram. labels: the labels the exporter sets (Prometheus adds",
        "# instance and job at scrape time). optional_labels: may be absent (vcpu is dropped when the",
        "# config switch exporter.vcpu_label is false).",
        f"default_port: {DEFAULT_PORT}",
        f"path: {METRICS_PATH}",
        "metrics:",
    ]
    for m in METRICS:
        out.append(f"  {m.sample}:")
        out.append(f"    type: {m.type}")
        fixed = [lb for lb in m.labels if lb not in m.optional]
        out.append(f"    labels: [{', '.join(fixed)}]")
        if m.optional:
            out.append(f"    optional_labels: [{', '.join(m.optional)}]")
        if m.type == "histogram":
            lo, hi = BUCKET_FINE
            out.append(f"    # le (in seconds, plus +Inf) = these ns: 2^k x 1 and 1.5 for "
                       f"k = {lo}..{hi - 1}, then 2^k for k = {hi}..{BUCKET_LAST_EXP}.")
            out.append(f"    buckets_ns: [{', '.join(map(str, BUCKET_BOUNDS_NS))}]")
        out.append(f"    help: {json.dumps(m.summary)}")     # a JSON string is a YAML string
    return "\n".join(out) + "\n"


DOC_BEGIN = "<!-- metrics table: generated from iotrace/core/metrics.py -->"
DOC_END = "<!-- end of the generated metrics table -->"


def doc_table() -> str:
    """The metrics table of docs/metrics.md (between DOC_BEGIN and DOC_END there)."""
    out = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        labels = ", ".join(f"{lb} (optional)" if lb in m.optional else lb for lb in m.labels)
        out.append(f"| `{m.sample}` | {m.type} | {labels or '—'} | {m.help} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m iotrace.core.metrics",
                                description="print what the metric table generates")
    p.add_argument("what", choices=("contract", "doc-table"))
    args = p.parse_args(argv)
    sys.stdout.write(contract_yaml() if args.what == "contract" else doc_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
