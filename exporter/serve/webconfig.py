"""``--web.config.file``: TLS and basic auth in the Prometheus exporter-toolkit format.

The same YAML file the Go exporters (node_exporter, ...) accept, so operators reuse theirs:

    tls_server_config:
      cert_file: /etc/iotrace/tls.crt      # relative paths are relative to this file
      key_file: /etc/iotrace/tls.key
      client_auth_type: RequireAndVerifyClientCert   # optional (see below)
      client_ca_file: /etc/iotrace/clients-ca.crt
      min_version: TLS12                   # optional: TLS10 TLS11 TLS12 TLS13
      max_version: TLS13
    http_server_config:
      headers: {X-Frame-Options: deny}     # optional extra response headers
    basic_auth_users:
      prometheus: $2b$12$...               # bcrypt hashes (htpasswd -nBC 12 "" | tr -d ':\\n')

Supported client_auth_type values: NoClientCert (default), VerifyClientCertIfGiven,
RequireAndVerifyClientCert. RequestClientCert and RequireAnyClientCert accept certificates without
verifying them, which Python's ssl module cannot do: they are refused with a clear message rather
than silently made stricter or looser. Keys the toolkit has but iotrace does not implement
(cipher_suites, curve_preferences, client_allowed_sans, ...) are refused too: a security setting
must never be ignored silently.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import bcrypt

from iotrace.core.errors import ConfigError
from iotrace.core.yamlfile import MarkedDict, check_keys, load_yaml, require_mapping

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3,
}
TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
            "max_version")
HTTP_KEYS = ("headers", "http2")
# Headers the server sets itself; the toolkit refuses to let the config override them too.
RESERVED_HEADERS = {"authorization", "content-type", "content-length", "content-encoding",
                    "www-authenticate", "date", "server", "connection"}
_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
GOOD_CACHE_MAX = 1024        # credentials that were right: an LRU (Prometheus's stays in it)
BAD_CACHE_MAX = 4096         # recent wrong ones: answered without bcrypt when tried again
BCRYPT_SLOTS = 1             # bcrypt checks at once: the other core stays free for scrapes
BCRYPT_WAIT_SECONDS = 2.0    # a check that finds no slot that long is answered "busy"


class Verdict(enum.Enum):
    OK = "ok"
    BAD = "bad"
    BUSY = "busy"            # too many unknown credentials being checked: try again later


@dataclass
class WebConfig:
    path: str
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._bcrypt_slots = threading.BoundedSemaphore(BCRYPT_SLOTS)
        # Checked against when the user is unknown, so that a wrong user name costs the same
        # bcrypt time as a wrong password (no user enumeration by timing).
        rounds = max((int(h[4:6]) for h in self.users.values()), default=4)
        self._dummy = bcrypt.hashpw(b"iotrace-no-such-user", bcrypt.gensalt(rounds=rounds))

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def auth_required(self) -> bool:
        return bool(self.users)

    def check_password(self, user: str, password: str) -> bool:
        """True if ``user`` is configured and ``password`` matches its bcrypt hash (waits for a
        bcrypt slot as long as it takes; the server uses ``verify``)."""
        return self.verify(user, password, wait=None) is Verdict.OK

    def verify(self, user: str, password: str, wait: float | None = BCRYPT_WAIT_SECONDS) -> Verdict:
        """Whether ``user``/``password`` may scrape.

        bcrypt is slow on purpose (tens of ms at cost 10-12), so it is kept off the path of a
        credential already known: a right one is remembered in an LRU (every scrape of a
        Prometheus carries the same credentials; a flood of other credentials cannot evict it
        by filling a cache that is cleared whole), a wrong one in another, so guessing the same
        thing twice costs nothing. New credentials take one of BCRYPT_SLOTS bcrypt slots; with
        none free within ``wait`` seconds the answer is BUSY (the server says 503, Retry-After),
        so password guessing costs the server a bounded amount of CPU and never delays a known
        scraper. The caches hold keyed digests of (user, password, hash), never a password.
        """
        if not self.users:
            return Verdict.OK
        hashed = self.users.get(user)
        target = hashed if hashed is not None else self._dummy
        digest = hmac.new(target, f"{user}\0{password}".encode("utf-8", "surrogateescape"),
                          hashlib.sha256).digest()
        with self._cache_lock:
            if digest in self._good:
                self._good.move_to_end(digest)
                return Verdict.OK
            if digest in self._bad:
                self._bad.move_to_end(digest)
                return Verdict.BAD
        if not self._bcrypt_slots.acquire(timeout=wait):
            return Verdict.BUSY
        try:
            ok = bcrypt.checkpw(password.encode("utf-8", "surrogateescape"), target)
        except ValueError:
            ok = False
        finally:
            self._bcrypt_slots.release()
        ok = ok and hashed is not None
        with self._cache_lock:
            cache, limit = (self._good, GOOD_CACHE_MAX) if ok else (self._bad, BAD_CACHE_MAX)
            cache[digest] = None
            while len(cache) > limit:
                cache.popitem(last=False)           # the least recently used
        return Verdict.OK if ok else Verdict.BAD


def _lines(mapping, default):
    return mapping.line_of if isinstance(mapping, MarkedDict) else (lambda k: default)


def _file(value, base: str, path: str, line, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("expected a file path", path, line, key)
    full = value if os.path.isabs(value) else os.path.join(base, value)
    if not os.path.isfile(full):
        raise ConfigError(f"{full}: no such file", path, line, key)
    return full


def _tls_context(tls, path: str, base: str, line) -> ssl.SSLContext:
    require_mapping(tls, path, "tls_server_config", line)
    check_keys(tls, TLS_KEYS, path, "tls_server_config.")
    lof = _lines(tls, line)
    for k in ("cert_file", "key_file"):
        if k not in tls:
            raise ConfigError(f"needs {k} (both cert_file and key_file are required for TLS)",
                              path, getattr(tls, "line", line), f"tls_server_config.{k}")
    cert = _file(tls["cert_file"], base, path, lof("cert_file"), "tls_server_config.cert_file")
    key = _file(tls["key_file"], base, path, lof("key_file"), "tls_server_config.key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot use {cert} with {key}: {exc.reason or exc}", path,
                          lof("cert_file"), "tls_server_config.cert_file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {cert} / {key}: {exc.strerror}", path,
                          lof("cert_file"), "tls_server_config.cert_file") from None

    ctx.minimum_version = ssl.TLSVersion.TLSv1_2          # the toolkit's default minimum
    for k in ("min_version", "max_version"):
        if k in tls:
            v = tls[k]
            if v not in TLS_VERSIONS:
                raise ConfigError(f"expected one of {', '.join(TLS_VERSIONS)}, got {v!r}", path,
                                  lof(k), f"tls_server_config.{k}")
            try:
                setattr(ctx, "minimum_version" if k == "min_version" else "maximum_version",
                        TLS_VERSIONS[v])
            except (ValueError, ssl.SSLError) as exc:
                raise ConfigError(f"{v} not available here: {exc}", path, lof(k),
                                  f"tls_server_config.{k}") from None
    if ctx.maximum_version != ssl.TLSVersion.MAXIMUM_SUPPORTED and \
            ctx.maximum_version < ctx.minimum_version:
        raise ConfigError("max_version is below min_version", path, lof("max_version"),
                          "tls_server_config.max_version")

    auth = tls.get("client_auth_type", "NoClientCert")
    if auth in UNSUPPORTED_CLIENT_AUTH:
        raise ConfigError(f"{auth} (client certificates without verification) is not supported "
                          f"by iotrace: use VerifyClientCertIfGiven or "
                          f"RequireAndVerifyClientCert with a client_ca_file", path,
                          lof("client_auth_type"), "tls_server_config.client_auth_type")
    if auth not in CLIENT_AUTH:
        raise ConfigError(f"expected one of {', '.join(CLIENT_AUTH)}, got {auth!r}", path,
                          lof("client_auth_type"), "tls_server_config.client_auth_type")
    ctx.verify_mode = CLIENT_AUTH[auth]
    if "client_ca_file" in tls:
        ca = _file(tls["client_ca_file"], base, path, lof("client_ca_file"),
                   "tls_server_config.client_ca_file")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(f"{ca}: not a PEM CA certificate: {exc.reason or exc}", path,
                              lof("client_ca_file"), "tls_server_config.client_ca_file") from None
    elif ctx.verify_mode != ssl.CERT_NONE:
        raise ConfigError(f"client_auth_type {auth} needs a client_ca_file", path,
                          lof("client_auth_type"), "tls_server_config.client_auth_type")
    return ctx


def _users(section, path: str, line) -> dict[str, bytes]:
    if section is None:
        return {}
    require_mapping(section, path, "basic_auth_users", line)
    lof = _lines(section, line)
    users = {}
    for user, hashed in section.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError("user names must be non-empty strings without ':'", path,
                              lof(user), where)
        if not isinstance(hashed, str):
            raise ConfigError("expected a bcrypt hash such as $2b$12$...", path, lof(user), where)
        raw = hashed.encode("ascii", "replace")
        if not raw.startswith(_BCRYPT_PREFIXES) or len(raw) != 60:
            raise ConfigError("not a bcrypt hash (expected 60 characters starting with $2b$, "
                              "$2a$ or $2y$; plain passwords are not accepted)", path,
                              lof(user), where)
        try:
            bcrypt.checkpw(b"", raw)          # rejects malformed salts/costs now, not per scrape
        except ValueError:
            raise ConfigError("malformed bcrypt hash", path, lof(user), where) from None
        users[user] = raw
    return users


def _headers(http, path: str, line) -> dict[str, str]:
    if http is None:
        return {}
    require_mapping(http, path, "http_server_config", line)
    check_keys(http, HTTP_KEYS, path, "http_server_config.")
    lof = _lines(http, line)
    if "http2" in http and not isinstance(http["http2"], bool):
        raise ConfigError("expected true or false", path, lof("http2"), "http_server_config.http2")
    headers = http.get("headers") or {}
    require_mapping(headers, path, "http_server_config.headers", lof("headers"))
    hl = _lines(headers, lof("headers"))
    out = {}
    for name, value in headers.items():
        where = f"http_server_config.headers.{name}"
        if not isinstance(name, str) or not name or any(c in name for c in " :\r\n\t"):
            raise ConfigError("not a valid header name", path, hl(name), where)
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError("this header is set by the server and cannot be configured",
                              path, hl(name), where)
        if not isinstance(value, (str, int, float)) or any(c in str(value) for c in "\r\n"):
            raise ConfigError("expected a one-line string value", path, hl(name), where)
        out[name] = str(value)
    return out


def load_web_config(path: str) -> WebConfig:
    """Parse and check a web config file; every problem is a one-line ConfigError."""
    doc = load_yaml(path)
    if doc is None:
        return WebConfig(path)
    require_mapping(doc, path, "top level")
    check_keys(doc, TOP_KEYS, path)
    base = os.path.dirname(os.path.abspath(path))
    lof = _lines(doc, None)
    ctx = None
    if doc.get("tls_server_config") is not None:
        ctx = _tls_context(doc["tls_server_config"], path, base, lof("tls_server_config"))
    users = _users(doc.get("basic_auth_users"), path, lof("basic_auth_users"))
    headers = _headers(doc.get("http_server_config"), path, lof("http_server_config"))
    return WebConfig(path, ctx, users, headers)
