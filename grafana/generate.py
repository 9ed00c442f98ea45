#!/usr/bin/env python3
"""Build iotrace's Grafana dashboards (Grafana JSON model, schemaVersion 39).

The JSON files in grafana/dashboards/ are what Grafana loads (see grafana/provisioning/); this
script is where they come from. After editing it, regenerate and commit both:

    python3 grafana/generate.py            # writes grafana/dashboards/*.json
    python3 grafana/generate.py --check    # exit 1 if the committed JSON is out of date

Standard library only, so it runs anywhere. Metric names follow rules/metrics-contract.yml;
recorded series (level:metric:operation) come from rules/iotrace-recording.yml.

Every dashboard has the same template variables, in this order (each one's query uses only the
ones before it): datasource, instance (a Dom0's exporter), source (qemu | xentrace | replay),
domain, range. Multi-value variables match with =~ and "All" means ".*".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39

# Label matchers every query of a panel applies (built from the template variables).
M_INST = 'instance=~"$instance"'
M_SRC = 'source=~"$source"'
M_DOM = 'domain=~"$domain"'
M_RANGE = 'range=~"$range"'
SEL_DOMAIN = "{" + ", ".join((M_INST, M_SRC, M_DOM)) + "}"
SEL_RANGE = "{" + ", ".join((M_INST, M_SRC, M_DOM, M_RANGE)) + "}"
SEL_SOURCE = "{" + ", ".join((M_INST, M_SRC)) + "}"
RI = "[$__rate_interval]"


# --- template variables -------------------------------------------------------------------------

def _query_var(name, label, metric_selector, label_name, *, multi=True):
    definition = f"label_values({metric_selector}, {label_name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": definition,
        "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,                     # on time-range change
        "regex": "",
        "sort": 1,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "skipUrlSync": False,
    }


def variables():
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "regex": "",
            "refresh": 1,
            "current": {},
            "options": [],
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "skipUrlSync": False,
        },
        _query_var("instance", "Host (exporter)", "iotrace_build_info", "instance"),
        _query_var("source", "Source", "iotrace_source_up{%s}" % M_INST, "source"),
        _query_var("domain", "Domain", "iotrace_domain_info{%s, %s}" % (M_INST, M_SRC), "domain"),
        _query_var("range", "Device range",
                   "iotrace_ioreqs_total{%s, %s, %s}" % (M_INST, M_SRC, M_DOM), "range"),
    ]


# --- panels -------------------------------------------------------------------------------------

class Layout:
    """Places panels left to right on Grafana's 24-column grid and numbers them."""

    def __init__(self):
        self.panels, self.x, self.y, self.row_h, self.next_id = [], 0, 0, 0, 1

    def _place(self, panel, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = self.next_id
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)
        return panel

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self._place({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0

    def add(self, panel, w=12, h=8):
        return self._place(panel, w, h)


def target(expr, legend="__auto", *, ref="A", instant=False, fmt="time_series"):
    t = {"datasource": DS, "expr": expr, "refId": ref, "legendFormat": legend,
         "range": not instant, "instant": instant, "format": fmt, "editorMode": "code"}
    return t


def _targets(exprs):
    out = []
    for i, item in enumerate(exprs):
        expr, legend = item if isinstance(item, tuple) else (item, "__auto")
        out.append(target(expr, legend, ref=chr(ord("A") + i)))
    return out


def _steps(thresholds):
    """Grafana threshold steps: green from the bottom, then each (value, colour)."""
    return [{"color": "green", "value": None}] + \
        [{"color": color, "value": value} for value, color in thresholds or []]


def _panel(kind, title, description, targets, defaults, options, **rest):
    """The fields every panel has, in Grafana's order; ``rest`` adds panel-specific ones."""
    return {"type": kind, "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options, **rest}


def timeseries(title, description, exprs, unit="short", *, stack=False, thresholds=None):
    defaults = {
        "unit": unit,
        "custom": {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
            "showPoints": "never", "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if thresholds else "off"},
        },
        "thresholds": {"mode": "absolute", "steps": _steps(thresholds)},
    }
    options = {
        "legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                   "calcs": ["mean", "max", "lastNotNull"]},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return _panel("timeseries", title, description, _targets(exprs), defaults, options)


def stat(title, description, exprs, unit="short", *, thresholds=None, mappings=None):
    defaults = {"unit": unit, "thresholds": {"mode": "absolute", "steps": _steps(thresholds)},
                "mappings": mappings or [], "color": {"mode": "thresholds"}}
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
               "orientation": "auto", "textMode": "auto"}
    return _panel("stat", title, description, _targets(exprs), defaults, options)


def table(title, description, expr, *, unit="short", exclude=(), rename=None, legend="__auto",
          sort_by=None):
    t = target(expr, legend, instant=True, fmt="table")
    excluded = {"Time": True, **{name: True for name in exclude}}
    panel = _panel("table", title, description, [t], {"unit": unit, "custom": {"align": "auto"}},
                   {"showHeader": True, "cellHeight": "sm",
                    "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
                   transformations=[{"id": "organize", "options": {
                       "excludeByName": excluded, "renameByName": rename or {}, "indexByName": {}}}])
    if sort_by:
        panel["options"]["sortBy"] = [{"displayName": sort_by, "desc": True}]
    return panel


def heatmap(title, description, expr):
    defaults = {"custom": {"scaleDistribution": {"type": "linear"},
                           "hideFrom": {"legend": False, "tooltip": False, "viz": False}}}
    options = {
        "calculate": False,
        "cellGap": 1,
        "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange",
                  "scale": "exponential", "exponent": 0.5, "steps": 64, "reverse": False},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
        "yAxis": {"axisPlacement": "left", "unit": "s", "reverse": False},
        "cellValues": {"unit": "reqps"},
    }
    return _panel("heatmap", title, description, [target(expr, "{{le}}", fmt="heatmap")], defaults,
                  options)


def dashboard(uid, title, description, layout, *, annotations=()):
    builtin = {
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts", "type": "dashboard",
    }
    return {
        "annotations": {"list": [builtin, *annotations]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"type": "dashboards", "tags": ["iotrace"], "asDropdown": True,
                   "title": "iotrace dashboards", "includeVars": True, "keepTime": True,
                   "icon": "external link", "targetBlank": False, "tooltip": "",
                   "url": ""}],
        "liveNow": False,
        "panels": layout.panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["iotrace", "xen"],
        "templating": {"list": variables()},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# --- the dashboards -----------------------------------------------------------------------------

def overview():
    L = Layout()
    L.row("Host overview")
    L.add(stat("Requests/s", "Guest I/O requests per second, all selected domains, per source.",
               [(f"sum by (source) (rate(iotrace_ioreqs_total{SEL_RANGE}{RI}))", "{{source}}")],
               "reqps"), 6, 4)
    L.add(stat("Bytes/s", "Bytes moved per second (size x count; the xentrace source does not "
               "know sizes).",
               [(f"sum by (source) (rate(iotrace_ioreq_bytes_total{SEL_RANGE}{RI}))", "{{source}}")],
               "Bps"), 6, 4)
    L.add(stat("Active domains", "Domains with at least one request in the interval.",
               [(f"count by (source) (sum by (instance, source, domid) "
                 f"(rate(iotrace_ioreqs_total{SEL_RANGE}{RI})) > 0)", "{{source}}")]), 6, 4)
    L.add(stat("Ranges in use", "Distinct named device ranges the selected domains have touched.",
               [(f"count by (source) (count by (source, range) (iotrace_ioreqs_total{SEL_RANGE}))",
                 "{{source}}")]), 6, 4)
    L.add(timeseries("Requests/s by domain", "Per domain and source.",
                     [(f"sum by (instance, source, domain) "
                       f"(rate(iotrace_ioreqs_total{SEL_RANGE}{RI}))",
                       "{{domain}} · {{source}} · {{instance}}")], "reqps"))
    L.add(timeseries("Bytes/s by domain", "Per domain and source (where the size is known).",
                     [(f"sum by (instance, source, domain) "
                       f"(rate(iotrace_ioreq_bytes_total{SEL_RANGE}{RI}))",
                       "{{domain}} · {{source}} · {{instance}}")], "Bps"))
    L.add(timeseries("Requests/s by type", "pio, mmio (IOREQ_TYPE_COPY), pci_config, ...",
                     [(f"sum by (source, type) (rate(iotrace_ioreqs_total{SEL_RANGE}{RI}))",
                       "{{type}} · {{source}}")], "reqps", stack=True))
    L.add(timeseries("Bytes/s by type", "Bytes per request type.",
                     [(f"sum by (source, type) (rate(iotrace_ioreq_bytes_total{SEL_RANGE}{RI}))",
                       "{{type}} · {{source}}")], "Bps", stack=True))

    L.row("Fleet: busiest devices")
    L.add(table("Busiest devices across the fleet (top 15)",
                "Domain x device range pairs with the highest request rate on every host "
                "(recorded 1m rate, source_domain_range:iotrace_ioreqs:rate1m).",
                f"topk(15, source_domain_range:iotrace_ioreqs:rate1m{{{M_SRC}}})",
                unit="reqps", exclude=("job",), rename={"Value": "req/s"}, sort_by="req/s"), 12, 10)
    L.add(timeseries("Busiest ranges across the fleet (top 10)",
                     "Device ranges summed over every host and domain (recorded).",
                     [(f"topk(10, source_range:iotrace_ioreqs:rate1m{{{M_SRC}}})",
                       "{{range}} · {{source}}")], "reqps"), 12, 10)
    L.add(timeseries("Busiest domains across the fleet (top 10)",
                     "Domains with the highest request rate on any host (recorded).",
                     [(f"topk(10, source_domain:iotrace_ioreqs:rate1m{{{M_SRC}}})",
                       "{{domain}} · {{source}} · {{instance}}")], "reqps"), 24, 8)

    L.row("What Xen kept vs what reached qemu-dm (both sources running)")
    xen = (f'sum by (range) (rate(iotrace_ioreqs_total{{{M_INST}, source="xentrace", {M_DOM}, '
           f'{M_RANGE}}}{RI}))')
    qemu = (f'sum by (range) (rate(iotrace_ioreqs_total{{{M_INST}, source="qemu", {M_DOM}, '
            f'{M_RANGE}}}{RI}))')
    L.add(timeseries("Requests/s by range: xentrace vs qemu",
                     "xentrace counts every I/O exit Xen traced; qemu counts the ioreqs that "
                     "reached the device model. Ranges Xen emulates itself (PIC, PIT, RTC, HPET, "
                     "LAPIC, IOAPIC, ACPI PM timer) appear only under xentrace.",
                     [(xen, "{{range}} · xentrace"), (qemu, "{{range}} · qemu")], "reqps"))
    L.add(timeseries("Kept by Xen (xentrace − qemu) by range",
                     "Requests/s Xen handled without qemu-dm: the xentrace rate minus the qemu "
                     "rate (a range qemu never saw counts in full).",
                     [(f"{xen} - ({qemu} or {xen} * 0)", "{{range}}")], "reqps"))
    L.add(timeseries("Forwarded to qemu-dm (qemu ÷ xentrace) by range",
                     "Share of the traced requests of each range that reached the device model.",
                     [(f"{qemu} / {xen}", "{{range}}")], "percentunit"), 24, 8)
    return dashboard("iotrace-overview", "iotrace / Overview",
                     "Guest I/O requests to emulated devices: hosts, domains, types, the busiest "
                     "devices of the fleet, and what Xen kept vs what reached qemu-dm.", L)


def domain_detail():
    L = Layout()
    L.row("Requests")
    L.add(timeseries("Requests/s by vCPU",
                     "vcpu -1: buffered ioreqs and accesses with no known vCPU. Empty vcpu: the "
                     "exporter runs with exporter.vcpu_label: false.",
                     [(f"sum by (domain, source, vcpu) (rate(iotrace_ioreqs_total{SEL_RANGE}{RI}))",
                       "{{domain}} vcpu {{vcpu}} · {{source}}")], "reqps"))
    L.add(timeseries("Requests/s by range", "Per named device range.",
                     [(f"sum by (domain, source, range) "
                       f"(rate(iotrace_ioreqs_total{SEL_RANGE}{RI}))",
                       "{{domain}} {{range}} · {{source}}")], "reqps"))
    L.add(timeseries("Reads vs writes", "Requests/s per direction (ioreq_t dir bit: 1 = read).",
                     [(f"sum by (domain, source, dir) (rate(iotrace_ioreqs_total{SEL_RANGE}{RI}))",
                       "{{domain}} {{dir}} · {{source}}")], "reqps"))
    L.add(timeseries("Bytes/s by range and direction", "Where the source knows the size.",
                     [(f"sum by (domain, source, range, dir) "
                       f"(rate(iotrace_ioreq_bytes_total{SEL_RANGE}{RI}))",
                       "{{domain}} {{range}} {{dir}} · {{source}}")], "Bps"))
    L.add(table("Device ranges and first access",
                "Every range the selected domains have touched, with the time of the first access "
                "(iotrace_range_first_seen_timestamp_seconds).",
                f"iotrace_range_first_seen_timestamp_seconds{SEL_RANGE} * 1000",
                unit="dateTimeAsIso", exclude=("job", "__name__"),
                rename={"Value": "first access"}), 16, 8)
    L.add(stat("Ranges seen", "Distinct ranges each domain has touched since first seen.",
               [(f"iotrace_domain_ranges_seen{SEL_DOMAIN}", "{{domain}} · {{source}}")]), 8, 8)

    L.row("Service time")
    L.add(heatmap("Service time distribution",
                  "Requests/s per service-time bucket (qemu: emulation in the device model; "
                  "xentrace: VM exit until answered). Buckets are powers of 4 ns from 1 µs to 17 s.",
                  f"sum by (le) (rate(iotrace_ioreq_service_seconds_bucket{SEL_RANGE}{RI}))"), 12, 9)
    L.add(timeseries("p95 service time by range", "From the histogram, over the panel's interval.",
                     [(f"histogram_quantile(0.95, sum by (domain, source, range, le) "
                       f"(rate(iotrace_ioreq_service_seconds_bucket{SEL_RANGE}{RI})))",
                       "{{domain}} {{range}} · {{source}}")], "s",
                     thresholds=[(0.01, "red")]), 12, 9)
    L.add(timeseries("Mean service time by range", "Sum of service times / requests.",
                     [(f"sum by (domain, source, range) "
                       f"(rate(iotrace_ioreq_service_seconds_sum{SEL_RANGE}{RI})) / "
                       f"sum by (domain, source, range) "
                       f"(rate(iotrace_ioreq_service_seconds_count{SEL_RANGE}{RI}))",
                       "{{domain}} {{range}} · {{source}}")], "s"), 12, 8)
    L.add(timeseries("Service time by type (p50 / p95)", "Per request type.",
                     [(f"histogram_quantile(0.5, sum by (source, type, le) "
                       f"(rate(iotrace_ioreq_service_seconds_bucket{SEL_RANGE}{RI})))",
                       "p50 {{type}} · {{source}}"),
                      (f"histogram_quantile(0.95, sum by (source, type, le) "
                       f"(rate(iotrace_ioreq_service_seconds_bucket{SEL_RANGE}{RI})))",
                       "p95 {{type}} · {{source}}")], "s"), 12, 8)
    return dashboard("iotrace-domain", "iotrace / Domain detail",
                     "One domain's I/O: by vCPU, by device range, reads vs writes, service times.",
                     L)


def anomalies():
    L = Layout()
    L.row("Alerts")
    L.add(table("iotrace alerts now", "Pending and firing alerts of rules/iotrace-alerts.yml.",
                'ALERTS{alertname=~"Iotrace.*"}', exclude=("__name__", "Value", "component")),
          24, 7)
    L.add(timeseries("Alert state over time", "Number of alerts per name and state.",
                     [('sum by (alertname, alertstate) (ALERTS{alertname=~"Iotrace.*"})',
                       "{{alertname}} {{alertstate}}")], stack=True), 24, 6)

    L.row("I/O storm (z-score against the 6h baseline)")
    L.add(timeseries("Request-rate z-score by domain",
                     "source_domain:iotrace_ioreqs:rate1m_zscore: (1m rate - baseline mean) / "
                     "max(baseline stddev, 1/s); IotraceIOStorm needs > 4 for 5m.",
                     [(f"source_domain:iotrace_ioreqs:rate1m_zscore{SEL_DOMAIN}",
                       "{{domain}} · {{source}} · {{instance}}")], thresholds=[(4, "red")]))
    L.add(timeseries("Request rate vs baseline",
                     "Current 1m rate, the baseline mean, and the z = 4 line.",
                     [(f"source_domain:iotrace_ioreqs:rate1m{SEL_DOMAIN}", "{{domain}} now"),
                      (f"source_domain:iotrace_ioreqs:rate1m_avg6h{SEL_DOMAIN}",
                       "{{domain}} baseline"),
                      (f"source_domain:iotrace_ioreqs:rate1m_avg6h{SEL_DOMAIN} + 4 * clamp_min("
                       f"source_domain:iotrace_ioreqs:rate1m_stddev6h{SEL_DOMAIN}, 1)",
                       "{{domain}} storm line")], "reqps"))

    L.row("Scheduler advice (iotrace.analysis; what iotrace advise acts on)")
    L.add(table("Domain class now",
                "The class of each domain in the exporter's last analysis interval (idle, "
                "cpu-bound, io-bound, storming, dom0-starved, normal; domid 0 is Dom0). "
                "IotraceDom0Starved fires on Dom0's dom0-starved for 10m.",
                f"iotrace_domain_class{SEL_DOMAIN} == 1",
                exclude=("__name__", "Value", "job")), 8, 8)
    L.add(timeseries("I/O wait share by domain",
                     "Share of each domain's vCPU time spent waiting for emulation (service time "
                     "of its synchronous requests / (interval x vCPUs)); io-bound from 10% "
                     "(advise.thresholds.io_wait).",
                     [(f"iotrace_domain_io_wait_ratio{SEL_DOMAIN}",
                       "{{domain}} · {{source}} · {{instance}}")], "percentunit",
                     thresholds=[(0.10, "orange")]), 8, 8)
    L.add(timeseries("Advised weight by domain",
                     "The weight advise targets after its hysteresis, on each knob's default "
                     "scale: xl = credit2 (256), cgroup = device-model cpu.weight (100).",
                     [(f"iotrace_advised_weight{SEL_DOMAIN}",
                       "{{domain}} {{knob}} · {{instance}}")]), 8, 8)
    L.add(timeseries("Dom0 CPU and device-model CPU",
                     "Dom0's busy share (steal included) and each device model's CPU (share of "
                     "one CPU): a saturated Dom0 slows every guest's emulated I/O.",
                     [(f"iotrace_dom0_cpu_busy_ratio{{{M_INST}}}", "Dom0 busy · {{instance}}"),
                      (f"iotrace_domain_device_model_cpu_ratio{SEL_DOMAIN}",
                       "{{domain}} device model · {{instance}}")], "percentunit",
                     thresholds=[(0.9, "red")]), 24, 7)

    L.row("Device probing and slow emulation")
    L.add(table("Ranges first touched in the last hour",
                "Age in seconds of each domain's first access to a range, where under an hour.",
                f"time() - iotrace_range_first_seen_timestamp_seconds{SEL_RANGE} < 3600",
                unit="s", exclude=("job",), rename={"Value": "first access, ago"}), 12, 8)
    L.add(timeseries("Ranges seen per domain", "A step up is a new device range.",
                     [(f"iotrace_domain_ranges_seen{SEL_DOMAIN}",
                       "{{domain}} · {{source}} · {{instance}}")]), 12, 8)
    L.add(timeseries("p95 service time by range (5m, recorded)",
                     "source_domain_range:iotrace_ioreq_service_seconds:p95_5m; "
                     "IotraceSlowEmulation fires above 10 ms for 10m.",
                     [(f"source_domain_range:iotrace_ioreq_service_seconds:p95_5m{SEL_RANGE}",
                       "{{domain}} {{range}} · {{source}}")], "s", thresholds=[(0.01, "red")]),
          24, 8)
    firing = {
        "datasource": DS, "enable": True, "hide": False, "iconColor": "red",
        "name": "iotrace alerts firing",
        "expr": 'ALERTS{alertname=~"Iotrace.*", alertstate="firing"}',
        "step": "60s", "titleFormat": "{{alertname}}",
        "textFormat": "{{domain}} {{range}} {{instance}}", "useValueForTime": False,
    }
    return dashboard("iotrace-anomalies", "iotrace / Anomalies",
                     "Alert state, I/O-storm z-scores, new device ranges and slow emulation.", L,
                     annotations=[firing])


def exporter_health():
    L = Layout()
    L.row("Exporter")
    L.add(stat("Exporter up", "Prometheus's up for the iotrace scrape job.",
               [(f'up{{job=~"iotrace.*", {M_INST}}}', "{{instance}}")],
               thresholds=[(1, "green")],
               mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                       "1": {"text": "UP", "color": "green"}}}]),
          8, 5)
    L.add(stat("Sources up", "iotrace_source_up per source.",
               [(f"iotrace_source_up{SEL_SOURCE}", "{{instance}} {{source}}")],
               mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"},
                                                       "1": {"text": "UP", "color": "green"}}}]),
          8, 5)
    L.add(table("Build", "iotrace_build_info: the version each host runs.",
                f"iotrace_build_info{{{M_INST}}}", exclude=("__name__", "Value", "job")), 8, 5)
    L.add(timeseries("Probes attached by domain",
                     "uprobes attached on each domain's device model (qemu source).",
                     [(f"iotrace_probes_attached{SEL_DOMAIN}",
                       "{{domain}} · {{source}} · {{instance}}")]))
    L.add(timeseries("Probe attach failures", "Failed attachments per interval.",
                     [(f"sum by (instance, source) "
                       f"(increase(iotrace_probe_attach_failures_total{SEL_SOURCE}{RI}))",
                       "{{instance}} {{source}}")]))
    L.add(timeseries("Events/s per source", "Events each source delivered.",
                     [(f"sum by (instance, source) (rate(iotrace_source_events_total{SEL_SOURCE}{RI}))",
                       "{{instance}} {{source}}")], "ops"))
    L.add(timeseries("Lost events and decode errors /s",
                     "Lost: buffer overruns, TRC_LOST_RECORDS. Decode errors: records not decoded.",
                     [(f"sum by (instance, source) (rate(iotrace_events_lost_total{SEL_SOURCE}{RI}))",
                       "lost {{instance}} {{source}}"),
                      (f"sum by (instance, source) "
                       f"(rate(iotrace_decode_errors_total{SEL_SOURCE}{RI}))",
                       "decode errors {{instance}} {{source}}")], "ops",
                     thresholds=[(0.0001, "red")]))
    L.add(timeseries("Collection and scrape duration",
                     "iotrace_scrape_duration_seconds: the exporter's last collection; "
                     "scrape_duration_seconds: the whole scrape as Prometheus saw it.",
                     [(f"iotrace_scrape_duration_seconds{{{M_INST}}}", "collect {{instance}}"),
                      (f'scrape_duration_seconds{{job=~"iotrace.*", {M_INST}}}',
                       "scrape {{instance}}")], "s"))
    L.add(timeseries("Exposed series", "Samples per scrape (label cardinality).",
                     [(f'scrape_samples_scraped{{job=~"iotrace.*", {M_INST}}}', "{{instance}}")]))
    return dashboard("iotrace-exporter", "iotrace / Exporter health",
                     "Is iotrace itself healthy: scrape, sources, probes, lost events.", L)


DASHBOARDS = {
    "iotrace-overview.json": overview,
    "iotrace-domain.json": domain_detail,
    "iotrace-anomalies.json": anomalies,
    "iotrace-exporter.json": exporter_health,
}


def render(builder) -> str:
    return json.dumps(builder(), indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the files on disk instead of writing them")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    stale = []
    for name, builder in DASHBOARDS.items():
        text, path = render(builder), args.out / name
        try:
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(name)
            else:
                args.out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        except OSError as exc:
            print(f"generate.py: {path}: {exc.strerror}", file=sys.stderr)
            return 2
    if stale:
        print("out of date (run python3 grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # quiet when piped into head(1)
    sys.exit(main())
