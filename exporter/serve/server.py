"""The HTTP(S) server of ``iotrace serve``: ``/`` landing page, ``/metrics`` exposition.

A ``ThreadingHTTPServer``: every connection has its own thread, so a slow scraper (or a slow TLS
handshake, which is done in that thread, not in the accept loop) never blocks other scrapers, and
the sources run on their own threads regardless. Hostile clients are bounded (issue #12):

* a request head (TLS handshake, request line and headers) must arrive within
  ``HEAD_TIMEOUT_SECONDS`` in all, not per byte: a client sending a byte a second is dropped
  (``_DeadlineReader``); a keep-alive connection waits that long for its next request;
* at most ``MAX_CONNECTIONS`` connections at once: a new one beyond that evicts the oldest
  connection still sending its head (a slowloris, never a scrape being answered), and when none
  is, it is answered 503 and closed: a scraper always gets in;
* basic auth keeps bcrypt off the path of a known credential and bounds the bcrypt work done at
  once (``iotrace.serve.webconfig.WebConfig.verify``); with no slot free the answer is 503.

Metrics are rendered from a private ``CollectorRegistry`` with prometheus_client's encoders
(text 0.0.4, or OpenMetrics when the scraper asks for it; gzip when accepted).
"""
from __future__ import annotations

import base64
import binascii
import errno
import html
import io
import logging
import socket
import ssl
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from iotrace import __version__
from iotrace.core.errors import UserError
from iotrace.serve.webconfig import Verdict

log = logging.getLogger("iotrace.serve")

HEAD_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 64

# Prometheus' text format 0.0.4 (prometheus-client >= 0.2x names it CONTENT_TYPE_PLAIN_0_0_4;
# Debian 12's 0.16, which the package runs on, only has CONTENT_TYPE_LATEST, then the same string)
CONTENT_TYPE_PLAIN_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"

DEFAULT_PORT = 9878
DEFAULT_LISTEN = f":{DEFAULT_PORT}"
METRICS_PATH = "/metrics"


def parse_listen_address(addr: str) -> tuple[str, int]:
    """'host:port', ':port' (all addresses) or '[v6addr]:port' -> (host, port)."""
    if not isinstance(addr, str) or ":" not in addr:
        raise UserError(f"--web.listen-address {addr!r}: expected HOST:PORT or :PORT")
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep:
            raise UserError(f"--web.listen-address {addr!r}: expected [IPv6]:PORT")
    else:
        host, _, port = addr.rpartition(":")
        if ":" in host:
            raise UserError(f"--web.listen-address {addr!r}: write IPv6 addresses as [addr]:port")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise UserError(f"--web.listen-address {addr!r}: port must be 0..65535")
    return host, p


class _Handler(BaseHTTPRequestHandler):
    server_version = f"iotrace/{__version__}"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.head_deadline = time.monotonic() + self.server.head_timeout
        self.request.settimeout(min(self.server.timeout_seconds, self.server.head_timeout))
        if isinstance(self.request, ssl.SSLSocket):
            # The handshake runs here, in this connection's thread (see module doc).
            self.request.do_handshake()
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self), self.rbufsize if self.rbufsize > 0
                                       else io.DEFAULT_BUFFER_SIZE)

    def handle_one_request(self):
        # each request of a keep-alive connection has its head deadline
        self.head_deadline = time.monotonic() + self.server.head_timeout
        self.server.head_started(self.request)
        super().handle_one_request()

    def parse_request(self):
        ok = super().parse_request()
        self.head_deadline = None           # the head is in: answering it is not bounded here
        self.server.head_done(self.request)
        return ok

    def finish(self):
        self.server.head_done(self.request)
        super().finish()

    def log_message(self, fmt, *args):  # access log at debug level only
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, code: int, body, ctype: str, extra: dict | None = None):
        """``body``: bytes, or a list of bytes written one after the other."""
        chunks = body if isinstance(body, list) else [body]
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(sum(map(len, chunks))))
        for k, v in self.server.extra_headers.items():
            self.send_header(k, v)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            for chunk in chunks:
                self.wfile.write(chunk)

    def _authorised(self) -> bool:
        web = self.server.web_config
        if web is None or not web.auth_required:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True) \
                    .decode("utf-8", "surrogateescape").partition(":")
            except (binascii.Error, ValueError):
                sep = ""
            if sep:
                verdict = web.verify(user, password)
                if verdict is Verdict.OK:
                    return True
                if verdict is Verdict.BUSY:
                    self._send(503, b"Too many credentials being checked: try again\n",
                               "text/plain; charset=utf-8", {"Retry-After": "1"})
                    return False
        self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                   {"WWW-Authenticate": 'Basic realm="iotrace"'})
        return False

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        if not self._authorised():
            return
        path = urlsplit(self.path).path
        if path == METRICS_PATH:
            self._metrics()
        elif path == "/":
            self._send(200, self.server.landing_page(), "text/html; charset=utf-8")
        else:
            self._send(404, b"Not found: try /metrics\n", "text/plain; charset=utf-8")

    def _metrics(self):
        accept = self.headers.get("Accept", "")
        encoder, ctype = choose_encoder(accept)
        fast = self.server.fast_text
        # The text format 0.0.4 whenever the scraper accepts it (Prometheus offers it beside
        # OpenMetrics): iotrace's metrics use nothing OpenMetrics adds, and this path is the fast
        # one. OpenMetrics (prometheus_client's encoder) for clients that accept nothing else.
        use_fast = fast is not None and (not accept.strip() or "text/plain" in accept
                                         or "*/*" in accept)
        extra = {}
        try:
            if use_fast:
                body, ctype = fast(), CONTENT_TYPE_PLAIN_0_0_4
            else:
                body = encoder(self.server.registry)
            chunks = [body] if isinstance(body, bytes) else body
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                # Level 1: several times faster than the default 6 on a body of many megabytes,
                # for a body about 1.1x as big (label sets repeat: it still shrinks ~25x). Each
                # piece is compressed as it arrives: zlib lets go of the GIL, so this overlaps
                # with the rendering of the next pieces.
                z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)    # gzip container
                body = [z.compress(c) for c in chunks]
                body.append(z.flush())
                extra["Content-Encoding"] = "gzip"
            else:
                body = list(chunks)
        except Exception as exc:  # a collector bug: say so, keep serving
            log.exception("collecting metrics failed")
            self._send(500, f"error collecting metrics: {exc}\n".encode(),
                       "text/plain; charset=utf-8")
            return
        self._send(200, body, ctype, extra)


class _DeadlineReader(io.RawIOBase):
    """The connection's socket as a raw stream whose reads stop at the handler's head deadline
    (a total time for the request head, not a time per byte)."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = handler.connection

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        deadline = self.handler.head_deadline
        base = self.handler.server.timeout_seconds
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            self.sock.settimeout(min(base, left))
        else:
            self.sock.settimeout(base)
        return self.sock.recv_into(b)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, registry, web_config, timeout_seconds, family, fast_text,
                 head_timeout=HEAD_TIMEOUT_SECONDS, max_connections=MAX_CONNECTIONS):
        self.address_family = family
        self.registry = registry
        self.fast_text = fast_text
        self.web_config = web_config
        self.timeout_seconds = timeout_seconds
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.extra_headers = dict(web_config.headers) if web_config else {}
        self.landing_text = ""
        self._conn_lock = threading.Lock()
        self._open: set = set()              # connections being served
        self._in_head: dict = {}             # connection -> when it began sending a head
        super().__init__(addr, _Handler, bind_and_activate=False)

    # -- the connection cap (see the module docstring) -----------------------------------------
    def process_request(self, request, client_address):
        with self._conn_lock:
            if len(self._open) >= self.max_connections:
                victim = min(self._in_head, key=self._in_head.get) if self._in_head else None
                if victim is None:
                    refuse = True
                else:
                    refuse = False
                    del self._in_head[victim]
                    self._open.discard(victim)
                    _drop(victim)
            else:
                refuse = False
            if not refuse:
                self._open.add(request)
                self._in_head[request] = time.monotonic()
        if refuse:
            log.warning("connection from %s refused: %d connections open", client_address[0],
                        self.max_connections)
            _refuse(request)
            return
        super().process_request(request, client_address)

    def head_started(self, conn) -> None:
        with self._conn_lock:
            if conn in self._open:
                self._in_head.setdefault(conn, time.monotonic())

    def head_done(self, conn) -> None:
        with self._conn_lock:
            self._in_head.pop(conn, None)

    def shutdown_request(self, request):
        with self._conn_lock:
            self._open.discard(request)
            self._in_head.pop(request, None)
        super().shutdown_request(request)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # ':PORT' listens on IPv4 and IPv6 alike (dual stack), as Go exporters do.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                   0 if self.server_address[0] == "::" else 1)
        super().server_bind()

    def get_request(self):
        conn, addr = self.socket.accept()
        ctx = self.web_config.ssl_context if self.web_config else None
        if ctx is not None:
            conn = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request, client_address):
        # Client went away, TLS handshake failed, timeout: routine for a server on a network.
        import sys
        exc = sys.exc_info()[1]
        log.debug("connection from %s: %s: %s", client_address, type(exc).__name__, exc)

    def landing_page(self) -> bytes:
        return self.landing_text.encode()


def _drop(conn) -> None:
    """Cut a connection another thread is reading from (its read fails at once)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _refuse(conn) -> None:
    """Answer 503 to a connection beyond the cap, without reading it, and close it."""
    try:
        conn.settimeout(1.0)
        if not isinstance(conn, ssl.SSLSocket):
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                         b"Retry-After: 1\r\nConnection: close\r\n\r\n")
    except OSError:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


class ExporterServer:
    """Binds at construction (so 'address in use' is reported before anything starts)."""

    def __init__(self, registry, listen_address: str = DEFAULT_LISTEN, web_config=None,
                 timeout_seconds: float = 30.0, description: str = "", fast_text=None,
                 head_timeout: float = HEAD_TIMEOUT_SECONDS,
                 max_connections: int = MAX_CONNECTIONS):
        """``fast_text``: optional callable returning the registry's metrics in the text format
        0.0.4, as bytes or as pieces to send one after the other (a list, or an iterator that
        makes them: ``IotraceCollector.render_text`` / ``render_chunks`` / ``iter_chunks``),
        used instead of prometheus_client's
        encoder for that format when the registry holds only that collector."""
        host, port = parse_listen_address(listen_address)
        family = socket.AF_INET
        bind_host = host
        if host == "" and socket.has_ipv6 and socket.has_dualstack_ipv6():
            family, bind_host = socket.AF_INET6, "::"
        elif host == "":
            bind_host = "0.0.0.0"
        elif ":" in host:
            family = socket.AF_INET6
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise UserError(f"--web.listen-address {listen_address}: cannot resolve "
                                f"{host!r}: {exc.strerror}") from None
            family, bind_host = infos[0][0], infos[0][4][0]
        self.httpd = _Server((bind_host, port), registry, web_config, timeout_seconds, family,
                             fast_text, head_timeout, max_connections)
        try:
            self.httpd.server_bind()
            self.httpd.server_activate()
        except OSError as exc:
            self.httpd.server_close()
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"cannot listen on {listen_address}: address already in use "
                                f"(another exporter running? pick another port with "
                                f"--web.listen-address)") from None
            if exc.errno == errno.EACCES:
                raise UserError(f"cannot listen on {listen_address}: permission denied") from None
            raise UserError(f"cannot listen on {listen_address}: {exc.strerror}") from None
        self.web_config = web_config
        self.port = self.httpd.server_address[1]
        self.host = bind_host
        self.scheme = "https" if web_config is not None and web_config.tls else "http"
        self.httpd.landing_text = _landing(description, web_config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": 0.2}, name="http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()


def _landing(description: str, web_config) -> str:
    sec = []
    if web_config is not None and web_config.tls:
        sec.append("TLS")
    if web_config is not None and web_config.auth_required:
        sec.append("basic auth")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>iotrace exporter</title></head>
<body>
<h1>iotrace exporter</h1>
<p>Guest I/O requests (port I/O, MMIO, PCI config) of the Xen HVM domains on this host.</p>
<p>{html.escape(description)}</p>
<p><a href="{METRICS_PATH}">Metrics</a> ({html.escape(', '.join(sec) or 'plain HTTP')})</p>
<p>iotrace {html.escape(__version__)}</p>
</body></html>
"""
