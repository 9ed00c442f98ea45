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
import sys
from dataclasses import dataclass

# Histogram buckets of iotrace_ioreq_service_seconds: le = 2^k ns for these k, in seconds (+Inf).
BUCKET_EXPONENTS = tuple(range(10, 35, 2))
BUCKET_BOUNDS_SECONDS = tuple((2 ** k) / 1e9 for k in BUCKET_EXPONENTS)

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
        "iotrace_source_up", "gauge", _SRC,
        "1 if the event source is running and readable, 0 if it failed (see the log).",
        summary="1 while the source runs."),
    MetricDef(
        "iotrace_probes_attached", "gauge", _DOM,
        "Uprobes attached to the domain's device model process.",
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
            out.append(f"    # le = 2^k ns for k = {BUCKET_EXPONENTS[0]}, {BUCKET_EXPONENTS[1]}, ..., "
                       f"{BUCKET_EXPONENTS[-1]}, in seconds, plus +Inf.")
            out.append(f"    buckets_log2_ns: [{', '.join(map(str, BUCKET_EXPONENTS))}]")
        out.append(f"    help: {m.summary}")
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
