"""HTTP: /metrics, a landing page, /-/healthy and /-/ready, with optional TLS and basic auth."""

from __future__ import annotations

import email.utils
import functools
import gzip
import html
import logging
import queue
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .exposition import CONTENT_TYPE, BuildInfo, render_chunks
from .snapshot import Deliver, Snapshot
from .webconfig import WebConfig

log = logging.getLogger("nvml_exporter.http")

MIN_DEADLINE = 0.05  # seconds; below this a scrape could only ever be served stale data


@dataclass
class App:
    collect: Callable[[float], Snapshot]
    ready: Callable[[], bool]
    web: WebConfig
    build: BuildInfo
    telemetry_path: str = "/metrics"
    collect_timeout: float = 5.0
    # collect_into(timeout, deliver) -> whether this thread delivered (Collector.collect_into): a scrape
    # collected in the connection's own thread, delivered by another where a driver call holds it
    collect_into: Callable[[float, Deliver], bool] | None = None

    def scrape(self, timeout: float, deliver: Deliver) -> bool:
        if self.collect_into is None:
            deliver(self.collect(timeout), False)
            return True
        return self.collect_into(timeout, deliver)

    def scrape_deadline(self, header: str | None) -> float:
        """Prometheus says how long it will wait; leave a tenth of that for rendering and the network."""
        if header:
            try:
                return max(MIN_DEADLINE, min(float(header) * 0.9, self.collect_timeout))
            except ValueError:
                pass
        return self.collect_timeout

    def landing_page(self) -> bytes:
        snap = self.collect(self.collect_timeout)
        rows = []
        for g in snap.gpus:
            i = g.identity
            state = "up" if g.up and not g.stale else "stale" if g.up else "down"
            rows.append(
                f"<tr><td>{i.index}</td><td>{html.escape(i.name)}</td><td>{html.escape(i.uuid)}</td>"
                f"<td>{html.escape(i.pci_bus_id)}</td><td class={state}>{state}</td></tr>"
            )
        nvml = "up" if snap.state.nvml_up else "down (retrying)"
        path = html.escape(self.telemetry_path)
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>nvml-exporter</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 10px;text-align:left}}
.up{{color:green}}.down{{color:red}}.stale{{color:orange}}</style></head>
<body><h1>nvml-exporter {html.escape(__version__)}</h1>
<p>NVML: {nvml}; driver {html.escape(snap.state.driver_version or "unknown")}.
Metrics at <a href="{path}">{path}</a>.</p>
<table><tr><th>gpu</th><th>name</th><th>uuid</th><th>PCI bus id</th><th>state</th></tr>
{"".join(rows)}
</table></body></html>
"""
        return page.encode()


class BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "

    @property
    def path(self) -> str:
        if self.target.startswith("/"):
            return self.target.split("?", 1)[0]
        return urlsplit(self.target).path  # absolute form: http://host:port/metrics

    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


MAX_HEAD = 16384  # bytes of request line and headers; Prometheus sends a few hundred
MAX_BODY = 65536  # a GET's body is read and ignored up to this size
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_head(head: bytes) -> Request:
    """The request line and headers (up to, not including, the blank line), as RFC 9112 reads them."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if not version.startswith("HTTP/1.") or version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, f"unsupported version {version[:16]!r}")
    if len(lines) > 101:
        raise BadRequest(431, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):  # also refuses obsolete line folding
            raise BadRequest(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method, target, version, headers)


def _date(now: float) -> str:
    return email.utils.formatdate(now, usegmt=True)


class Connection:
    """One client connection: requests read with plain socket calls, answered in turn, kept alive as
    HTTP/1.1 asks. http.server's handler parses headers with the email package and costs a scraping
    Prometheus more CPU than the collection itself (make bench)."""

    timeout = 30.0  # seconds a client may take to send a request, or stay idle between requests
    server_header = f"nvml-exporter/{__version__}"

    def __init__(self, sock: socket.socket, peer: Any, app: App):
        self.sock, self.peer, self.app = sock, peer, app
        self._buffer = b""
        self._ended = False  # a page was sent for this connection from another thread: serve no more
        self._date: tuple[int, str] = (0, "")

    def serve(self) -> None:
        self.sock.settimeout(self.timeout)  # the TLS handshake's too
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.do_handshake()  # here, in the connection's own thread, not in accept()
        while True:
            try:
                request = self._read_request()
            except BadRequest as e:
                log.debug("bad request", extra={"peer": self.peer[0], "error": str(e)})
                self._text(None, e.code, f"{e}\n".encode(), close=True)
                return
            if request is None:
                return
            keep = request.keep_alive() and request.method in ("GET", "HEAD")  # other methods: answer, close
            try:
                self.dispatch(request, keep)
            except OSError:
                raise  # the connection failed: nothing to answer on
            except Exception:
                # A bug, not the client's fault: say so, and keep serving others.
                log.exception("request failed", extra={"peer": self.peer[0], "path": request.target[:200]})
                self._text(request, 500, b"Internal Server Error\n", close=True)
                return
            if not keep or self._ended:
                return

    def _read_request(self) -> Request | None:
        """The next request, None when the client closed the connection between requests. Once a request
        has begun, all of its head must arrive within `timeout` (a client trickling a byte at a time
        does not hold a thread for longer)."""
        self.sock.settimeout(self.timeout)
        started: float | None = None
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise BadRequest(431, "request head too large")
            if self._buffer:
                started = time.monotonic() if started is None else started
                left = self.timeout - (time.monotonic() - started)
                if left <= 0:
                    raise BadRequest(408, "request not received in time")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if self._buffer:
                    raise BadRequest(408, "request not received in time") from None
                return None  # an idle keep-alive connection
            if not chunk:
                if self._buffer.strip():
                    raise BadRequest(400, "connection closed in the middle of a request")
                return None
            self._buffer = (self._buffer + chunk).lstrip(b"\r\n")  # blank lines before a request are allowed
        if end > MAX_HEAD:
            raise BadRequest(431, "request head too large")
        request = parse_head(self._buffer[:end])
        self._buffer = self._buffer[end + 4:]
        if "transfer-encoding" in request.headers:
            raise BadRequest(400, "request bodies are not accepted")
        length = request.headers.get("content-length", "0")
        if not length.isdigit():
            raise BadRequest(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise BadRequest(413, "request body too large")
        while len(self._buffer) < int(length):  # a GET has no use for a body: read it and drop it
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BadRequest(400, "connection closed in the middle of a request body")
            self._buffer += chunk
        self._buffer = self._buffer[int(length):]
        return request

    def dispatch(self, request: Request, keep: bool) -> None:
        app = self.app
        close = not keep
        if request.method not in ("GET", "HEAD"):
            self._text(request, 405 if request.method in _KNOWN_METHODS else 501, b"Only GET and HEAD are served\n",
                       close, {"Allow": "GET, HEAD"})
            return
        if not app.web.authorized(request.headers.get("authorization")):
            self._text(request, 401, b"Unauthorized\n", close, {"WWW-Authenticate": 'Basic realm="nvml-exporter"'})
            return
        path = request.path
        if path == app.telemetry_path:
            deadline = app.scrape_deadline(request.headers.get("x-prometheus-scrape-timeout-seconds"))
            self._ended = not app.scrape(deadline, functools.partial(self._page, request, close))
        elif path == "/":
            self._send(request, 200, app.landing_page(), "text/html; charset=utf-8", close=close)
        elif path == "/-/healthy":
            self._text(request, 200, b"OK\n", close)
        elif path == "/-/ready":
            if app.ready():
                self._text(request, 200, b"OK\n", close)
            else:
                self._text(request, 503, b"NVML has not been initialised yet\n", close)
        else:
            self._text(request, 404, b"Not Found\n", close)
        if log.isEnabledFor(logging.DEBUG):  # every scrape passes here: format only what is logged
            log.debug("request", extra={"peer": self.peer[0], "method": request.method, "path": path[:200]})

    def _page(self, request: Request, close: bool, snap: Snapshot, taken_over: bool) -> None:
        """Send the metrics page. Taken over (sent by the collector's watchdog while a driver call holds
        this connection's thread), it closes the connection: the client's next scrape must not wait
        on that thread."""
        self._send(request, 200, render_chunks(snap, self.app.build), CONTENT_TYPE, close=close or taken_over)

    def _text(self, request: Request | None, code: int, body: bytes, close: bool,
              extra: dict[str, str] | None = None) -> None:
        self._send(request, code, body, _TEXT, extra, close)

    def _send(self, request: Request | None, code: int, body: bytes | list[bytes], content_type: str,
              extra: dict[str, str] | None = None, close: bool = False) -> None:
        chunks = [body] if isinstance(body, bytes) else body
        size = sum(map(len, chunks))
        headers = dict(self.app.web.headers)
        headers.update(extra or {})
        if request is not None and size > 1024 and "gzip" in request.headers.get("accept-encoding", ""):
            chunks = [gzip.compress(b"".join(chunks), compresslevel=1)]
            size = len(chunks[0])
            headers["Content-Encoding"] = "gzip"
        now = time.time()
        if int(now) != self._date[0]:
            self._date = (int(now), _date(now))
        head = [f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
                f"Server: {self.server_header}\r\nDate: {self._date[1]}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {size}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        if close:
            head.append("Connection: close\r\n")
        elif request is not None and request.version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        if request is not None and request.method == "HEAD":
            chunks = []
        if isinstance(self.sock, ssl.SSLSocket):  # TLS has no scatter-gather send
            self.sock.sendall(b"".join([data, *chunks]))
        else:
            _send_chunks(self.sock, [data, *chunks])


_TEXT = "text/plain; charset=utf-8"
_TOO_MANY_BODY = b"too many connections\n"
_TOO_MANY = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {_TEXT}\r\nContent-Length: {len(_TOO_MANY_BODY)}\r\n"
             "Connection: close\r\n\r\n").encode() + _TOO_MANY_BODY
_KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


_IOV_MAX = 1024  # buffers one sendmsg() may take (Linux)


def _send_chunks(sock: socket.socket, chunks: list[bytes]) -> None:
    """sendall() for a list of buffers: the headers and a page's blocks go out as they are, with a few
    system calls and no copy of the page (at 64 GPUs a page is a megabyte, made anew every scrape)."""
    pending: list[bytes | memoryview] = [c for c in chunks if c]
    first = 0
    while first < len(pending):
        sent = sock.sendmsg(pending[first:first + _IOV_MAX])
        while sent and sent >= len(pending[first]):
            sent -= len(pending[first])
            first += 1
        if sent:  # the socket took part of a buffer: the rest goes next
            pending[first] = memoryview(pending[first])[sent:]


class _Threads:
    """Connection threads that are kept for the next connection instead of one new thread per scrape
    (starting a thread costs more CPU than serving a scrape from the last collection). A thread idle
    for IDLE seconds ends, so a burst of scrapers does not leave threads behind."""

    IDLE = 60.0

    def __init__(self, serve: Callable[[Any, Any], None]):
        self._serve = serve
        self._queue: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self.busy = 0  # connections being served

    def submit(self, request: Any, address: Any) -> None:
        with self._lock:
            self.busy += 1
            if self._idle:  # an idle thread takes it; queued under the lock, so that it cannot time out first
                self._idle -= 1
                self._queue.put((request, address))
                return
        threading.Thread(target=self._run, args=((request, address),), name="http", daemon=True).start()

    def _run(self, item: tuple[Any, Any]) -> None:
        while True:
            try:
                self._serve(*item)
            finally:
                with self._lock:
                    self.busy -= 1
                    self._idle += 1
            try:
                item = self._queue.get(timeout=self.IDLE)
            except queue.Empty:
                with self._lock:
                    try:
                        item = self._queue.get_nowait()  # handed over just as the wait ended
                    except queue.Empty:
                        self._idle -= 1
                        return


class Server(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 128  # a fleet's Prometheus pair and a few curls; more wait in the kernel

    def __init__(self, address: tuple[str, int], app: App, sock: socket.socket | None = None,
                 max_connections: int = 64):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.app = app
        self.max_connections = max_connections
        self._connections = _Threads(self._serve_connection)
        if host == "":
            address = ("::", address[1])
        if sock is None:
            super().__init__(address, socketserver.BaseRequestHandler)
            return
        # socket activation: systemd already bound and listens on it
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], socketserver.BaseRequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # also serve IPv4
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        ctx = self.app.web.ssl_context
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._connections.busy >= self.max_connections:
            self._refuse(request, client_address)
            return
        self._connections.submit(request, client_address)

    def _refuse(self, sock: socket.socket, peer: Any) -> None:
        """Past --web.max-connections (each holds a thread): a 503 and close, from the accepting thread,
        which must not wait on the client (a TLS client is closed without one: no handshake here)."""
        log.warning("too many connections; refusing one", extra={"peer": peer[0], "limit": self.max_connections})
        try:
            if not isinstance(sock, ssl.SSLSocket):
                sock.setblocking(False)
                sock.send(_TOO_MANY)
        except OSError as e:
            log.debug("could not answer a refused connection", extra={"peer": peer[0], "error": str(e)})
        finally:
            self.shutdown_request(sock)

    def _serve_connection(self, sock: socket.socket, peer: Any) -> None:
        try:
            Connection(sock, peer, self.app).serve()
        except OSError as e:  # reset, timed out, TLS handshake refused: the client's business
            log.debug("connection closed", extra={"peer": peer[0], "error": str(e)})
        finally:
            self.shutdown_request(sock)
