"""``iotrace top --from URL``: read a remote ``iotrace serve`` /metrics page back into Key/Cell totals.

An operator can then watch a host without root on it (or without iotrace's probes installed there):
the remote exporter does the tracing, this side only scrapes it like Prometheus would.

The page is parsed with ``prometheus_client.parser.text_string_to_metric_families`` (the classic
text format; we ask for it with ``Accept: text/plain; version=0.0.4``). Metrics read, as
``iotrace serve`` exports them:

* ``iotrace_ioreqs_total`` / ``iotrace_ioreq_bytes_total`` {source, domain, domid, vcpu, type, dir,
  range}: counts and bytes per Key (addresses are not labels, so ``Key.addr`` is 0).
* ``iotrace_ioreq_service_seconds`` histogram {source, domain, domid, type, range}, buckets
  ``le`` in seconds (``iotrace.core.metrics.BUCKET_BOUNDS_NS``: two per power of two from
  1.02 us to 1.05 ms, one per power of two beyond). It has no vcpu or dir label, so it becomes a
  *service-only* cell ``Key(domid, -1, type, DIR_ANY, range, 0)`` with ``count == 0``; the top model
  uses such cells for domain and range service times but not for vCPU rows. Each bucket's count
  is spread over the slots of ``iotrace.core.aggregate`` it covers, in proportion to their width
  (the lowest bucket from 0 ns, +Inf into the slot above the highest bound). Quantiles are
  therefore as fine as the exported buckets: within 50% of the exact ones from 1 us to 1 ms
  (a bucket there is at most half its lower bound wide), within 100% beyond.
  An exporter configured with ``vcpu_label: false`` has no vcpu label at all: its cells get vcpu
  -1 and ``stats().extra["no_vcpu_label"]`` tells the view to show no vCPU counts.
* ``iotrace_domain_info`` {domid, domain, source}, ``iotrace_probes_attached`` {source, domain,
  domid}: domain names and attached probes.
* ``iotrace_source_up`` {source}, ``iotrace_events_lost_total`` {source}: the source state.

A remote exporter may run several sources (qemu and xentrace see the same requests twice, see
the README's two sources), so one source is shown: ``source=`` if given, else ``qemu`` if present, else the first
by name.
"""
from __future__ import annotations

import base64
import copy
import math
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from iotrace.core.aggregate import N_SLOTS, SLOT_LOWER_NS, SLOT_UPPER_NS, Cell, Key
from iotrace.core.domains import fallback_name
from iotrace.core.errors import UserError
from iotrace.core.events import DIR_CODES, TYPE_CODES, UNKNOWN
from iotrace.core.metrics import BY_NAME, MetricDef
from iotrace.core.source import DomainInfo, SourceStats

# The metrics read, from the one metric table (iotrace.core.metrics).
IOREQS, BYTES, SERVICE = (BY_NAME[n] for n in ("iotrace_ioreqs", "iotrace_ioreq_bytes",
                                               "iotrace_ioreq_service_seconds"))
INFO, PROBES, UP, LOST = (BY_NAME[n] for n in ("iotrace_domain_info", "iotrace_probes_attached",
                                               "iotrace_source_up", "iotrace_events_lost"))

DIR_ANY = 255          # service-only cells: the histogram has no dir label
MAX_BODY = 64 << 20    # a /metrics page larger than this is not an iotrace exporter's


class RemoteError(UserError):
    """The remote page could not be fetched or is not an iotrace /metrics page."""


@dataclass
class Parsed:
    """What one /metrics page says, for one source."""
    totals: dict[Key, Cell] = field(default_factory=dict)
    domains: dict[int, DomainInfo] = field(default_factory=dict)
    sources: dict[str, bool] = field(default_factory=dict)     # source -> up
    lost: dict[str, int] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)
    source: str | None = None                                 # the one chosen
    vcpu_label: bool = True      # False: the exporter sums over vCPUs (exporter: vcpu_label: false)


def _int(v, default=UNKNOWN) -> int:
    try:
        return int(str(v), 0)
    except (TypeError, ValueError):
        return default


def _type_code(name: str) -> int:
    if name in TYPE_CODES:
        return TYPE_CODES[name]
    if name.startswith("type") and name[4:].isdigit():
        return int(name[4:])
    return _int(name, 255)


def _dir_code(name: str) -> int:
    if name in DIR_CODES:
        return DIR_CODES[name]
    return _int(name, DIR_ANY)


def le_slot(le_seconds: float) -> int:
    """The first slot at or above the bucket bound ``le``: slot k holds the durations of
    [SLOT_LOWER_NS[k], SLOT_UPPER_NS[k]); an exported bound is a slot's upper bound, so the
    durations below it end in slot ``le_slot(le) - 1``."""
    ns = le_seconds * 1e9
    return int(min(N_SLOTS - 1, np.searchsorted(SLOT_LOWER_NS, ns - 0.5)))


def buckets_to_hist(buckets: list[tuple[float, float]]) -> "list[int]":
    """Cumulative (le, count) buckets -> per-slot counts of a histogram of
    ``iotrace.core.aggregate`` (see the module doc): each bucket's count spread over the slots
    it covers in proportion to their widths (uniform inside the bucket, as Prometheus'
    histogram_quantile assumes), in whole requests (largest remainders)."""
    hist = [0] * N_SLOTS
    finite = sorted((le, c) for le, c in buckets if not math.isinf(le))
    inf = [c for le, c in buckets if math.isinf(le)]
    prev_c, lo = 0.0, 0
    for le, c in finite:
        hi = max(lo + 1, le_slot(le))               # slots lo .. hi-1
        _spread(hist, lo, hi, int(round(c - prev_c)))
        prev_c, lo = c, min(hi, N_SLOTS - 1)
    if inf:
        n = int(round(inf[0] - prev_c))
        if n > 0:
            hist[lo] += n                           # above the highest bound: its first slot
    return hist


def _spread(hist: list, lo: int, hi: int, n: int) -> None:
    if n <= 0:
        return
    hi = min(hi, N_SLOTS)
    w = SLOT_UPPER_NS[lo:hi] - SLOT_LOWER_NS[lo:hi]
    share = n * w / w.sum()
    whole = np.floor(share).astype(np.int64)
    rest = n - int(whole.sum())
    if rest:
        whole[np.argsort(-(share - whole), kind="stable")[:rest]] += 1
    for i, x in enumerate(whole.tolist()):
        hist[lo + i] += x


def parse_metrics(text: str, source: str | None = None) -> Parsed:
    """Parse an iotrace /metrics page (classic text format) into totals for one source."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises ValueError/IndexError/... on malformed lines
        raise RemoteError(f"not a Prometheus text page: {exc}") from None
    page = _Page({f.name: f for f in families})
    out = Parsed()
    _read_sources(page, out)
    out.source = _pick_source(out, source)
    _read_domains(page, out)
    _read_counters(page, out)
    _read_service(page, out)
    return out


class _Page:
    """The families of one page, read through the metric table."""

    def __init__(self, by_name: dict):
        self.by_name = by_name

    def samples(self, m: MetricDef, source: str | None = None) -> list:
        """The samples of a counter or gauge, by its exposed name (of one source if given)."""
        fam = self.by_name.get(m.name)
        if fam is None:
            return []
        return [s for s in fam.samples if s.name == m.sample
                and (source is None or s.labels.get("source") == source)]


def _read_sources(page: _Page, out: Parsed) -> None:
    for s in page.samples(UP):
        out.sources[s.labels.get("source", "")] = s.value >= 1
    for s in page.samples(IOREQS):
        out.sources.setdefault(s.labels.get("source", ""), True)
    if IOREQS.name not in page.by_name and UP.name not in page.by_name:
        raise RemoteError(f"no {IOREQS.sample} or {UP.sample}: not an iotrace exporter")
    for s in page.samples(LOST):
        out.lost[s.labels.get("source", "")] = int(s.value)


def _pick_source(out: Parsed, source: str | None) -> str | None:
    """``source`` if the page has it (else RemoteError), by default qemu, else the first."""
    if source is None:
        names = sorted(out.sources)
        return "qemu" if "qemu" in out.sources else (names[0] if names else None)
    if source not in out.sources:
        known = ", ".join(sorted(out.sources)) or "none"
        raise RemoteError(f"the exporter has no source {source!r} (it has: {known})")
    return source


def _read_domains(page: _Page, out: Parsed) -> None:
    for s in page.samples(INFO, out.source):
        d = _int(s.labels.get("domid"))
        out.domains[d] = DomainInfo(d, s.labels.get("domain") or fallback_name(d))
    for s in page.samples(PROBES, out.source):
        d = _int(s.labels.get("domid"))
        info = out.domains.setdefault(d, DomainInfo(d, s.labels.get("domain") or fallback_name(d)))
        info.probes_attached += int(s.value)
        out.probes[out.source] = out.probes.get(out.source, 0) + int(s.value)


def _key_of(out: Parsed, labels: dict, vcpu=None, dir_=None) -> Key:
    """The Key of a series' labels (addresses are not labels: addr 0); names its domain."""
    d = _int(labels.get("domid"))
    if d not in out.domains and labels.get("domain"):
        out.domains[d] = DomainInfo(d, labels["domain"])
    return Key(d, _int(labels.get("vcpu")) if vcpu is None else vcpu,
               _type_code(labels.get("type", "")),
               _dir_code(labels.get("dir", "")) if dir_ is None else dir_,
               labels.get("range", "other"), 0)


def _read_counters(page: _Page, out: Parsed) -> None:
    for s in page.samples(IOREQS, out.source):
        out.totals.setdefault(_key_of(out, s.labels), Cell()).count += int(s.value)
        if "vcpu" not in s.labels:
            out.vcpu_label = False
    for s in page.samples(BYTES, out.source):
        out.totals.setdefault(_key_of(out, s.labels), Cell()).bytes += int(s.value)


def _read_service(page: _Page, out: Parsed) -> None:
    """The service histogram as service-only cells (no vcpu, no dir: see the module doc)."""
    fam = page.by_name.get(SERVICE.name)
    if fam is None:
        return
    groups: dict[Key, dict] = {}
    base = SERVICE.name
    for s in fam.samples:
        if s.labels.get("source") != out.source:
            continue
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        key = _key_of(out, labels, vcpu=UNKNOWN, dir_=DIR_ANY)
        g = groups.setdefault(key, {"buckets": [], "count": 0, "sum": 0.0})
        if s.name == base + "_bucket":
            le = s.labels.get("le", "+Inf")
            g["buckets"].append((float("inf") if le in ("+Inf", "Inf") else float(le), s.value))
        elif s.name == base + "_count":
            g["count"] = int(s.value)
        elif s.name == base + "_sum":
            g["sum"] = s.value
    for key, g in groups.items():
        if not g["count"]:
            continue
        cell = out.totals.setdefault(key, Cell())
        cell.service_n += g["count"]
        cell.service_sum_ns += int(round(g["sum"] * 1e9))
        cell.hist += buckets_to_hist(g["buckets"])


def split_auth(url: str, auth: str | None) -> tuple[str, str | None]:
    """The URL without user:pass, and the 'user:pass' to send (``auth`` wins over the URL's)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--from: expected an http:// or https:// URL, got {redact(url)!r}")
    cred = None
    if parts.username is not None:
        cred = urllib.parse.unquote(parts.username) + ":" + \
            urllib.parse.unquote(parts.password or "")
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    path = parts.path or "/metrics"
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))
    if auth is not None:
        if auth.startswith("@"):
            try:
                with open(auth[1:], encoding="utf-8") as fh:
                    auth = fh.readline().strip()
            except OSError as exc:
                raise UserError(f"--from-auth: cannot read {auth[1:]}: {exc.strerror}") from None
        if ":" not in auth:
            raise UserError("--from-auth: expected USER:PASSWORD (or @FILE holding it)")
        cred = auth
    return clean, cred


def redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def fetch(url: str, cred: str | None = None, cafile: str | None = None,
          timeout: float = 5.0) -> str:
    """GET the page; any failure is a one-line RemoteError."""
    req = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4",
                                               "User-Agent": "iotrace-top"})
    if cred is not None:
        req.add_header("Authorization",
                       "Basic " + base64.b64encode(cred.encode("utf-8")).decode("ascii"))
    ctx = None
    if url.startswith("https:"):
        try:
            ctx = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise RemoteError(f"--from-ca {cafile}: {getattr(exc, 'strerror', None) or exc}") \
                from None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            body = resp.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        hint = " (wrong or missing --from-auth?)" if exc.code in (401, 403) else ""
        raise RemoteError(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            reason = f"{reason.verify_message} (give the CA with --from-ca)"
        raise RemoteError(f"{url}: {reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, bad URLs
        raise RemoteError(f"{url}: {exc}") from None
    if len(body) > MAX_BODY:
        raise RemoteError(f"{url}: page larger than {MAX_BODY >> 20} MiB")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteError(f"{url}: not a UTF-8 text page") from None


class RemoteSource:
    """A Source whose totals come from a remote ``iotrace serve``; ``scrape()`` reads it once."""

    totals_predate_start = True     # counters since the remote started: rates need two scrapes

    def __init__(self, url: str, auth: str | None = None, cafile: str | None = None,
                 source: str | None = None, timeout: float = 5.0):
        self.url, self.cred = split_auth(url, auth)
        self.cafile = cafile
        self.want = source
        self.timeout = timeout
        self.name = "remote"
        self._parsed = Parsed()
        self._stats = SourceStats(self.name)

    def start(self) -> None:
        """First scrape: an unreachable or wrong endpoint is an error the operator sees at once."""
        if self.cafile and not os.path.isfile(self.cafile):
            raise UserError(f"--from-ca: {self.cafile}: no such file")
        self._apply(parse_metrics(fetch(self.url, self.cred, self.cafile, self.timeout),
                                  self.want))

    def stop(self) -> None:
        pass

    def scrape(self) -> None:
        """Scrape again; a failure marks the source down and keeps the last totals."""
        try:
            self._apply(parse_metrics(fetch(self.url, self.cred, self.cafile, self.timeout),
                                      self.want))
        except RemoteError as exc:
            self._stats.up = False
            self._stats.error = str(exc)

    def _apply(self, p: Parsed) -> None:
        self._parsed = p
        src = p.source or "?"
        host = urllib.parse.urlsplit(self.url).netloc
        self.name = f"{src}@{host}"
        self._stats = SourceStats(self.name, up=bool(p.sources.get(src, False)),
                                  events=sum(c.count for c in p.totals.values()),
                                  lost=p.lost.get(src, 0),
                                  probes_attached=p.probes.get(src, 0),
                                  extra={"url": self.url, "remote_sources": sorted(p.sources),
                                         "no_vcpu_label": not p.vcpu_label})

    def totals(self) -> dict[Key, Cell]:
        return {k: copy.deepcopy(c) for k, c in self._parsed.totals.items()}

    def domains(self) -> dict[int, DomainInfo]:
        return dict(self._parsed.domains)

    def stats(self) -> SourceStats:
        return copy.deepcopy(self._stats)
