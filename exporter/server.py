"""HTTP: /metrics, a landing page, /-/healthy and /-/ready, with optional TLS and basic auth."""

from __future__ import annotations

import gzip
import html
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .exposition import CONTENT_TYPE, BuildInfo, render_chunks
from .snapshot import Snapshot
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


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    timeout = 30
    server_version = f"nvml-exporter/{__version__}"

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in the request's own thread, not in accept()

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError) as e:
            log.debug("connection closed", extra={"peer": self.client_address[0], "error": str(e)})

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):  # called for every request: format only when it is logged
            log.debug(format % args, extra={"peer": self.client_address[0]})

    def _send(self, code: int, body: bytes | list[bytes], content_type: str,
              extra: dict[str, str] | None = None) -> None:
        headers = dict(self.server.app.web.headers)
        headers.update(extra or {})
        chunks = [body] if isinstance(body, bytes) else body
        size = sum(map(len, chunks))
        if size > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
            chunks = [gzip.compress(b"".join(chunks), compresslevel=1)]
            size = len(chunks[0])
            headers["Content-Encoding"] = "gzip"
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(size))
        for k, v in headers.items():
            self.send_header(k, v)
        self._headers_buffer.append(b"\r\n")  # what end_headers() adds before flushing
        if self.command == "HEAD":
            chunks = []
        if isinstance(self.connection, ssl.SSLSocket):  # TLS has no scatter-gather send
            self.connection.sendall(b"".join([*self._headers_buffer, *chunks]))
        else:
            _send_chunks(self.connection, [*self._headers_buffer, *chunks])
        self._headers_buffer = []

    def do_GET(self) -> None:
        app = self.server.app
        if not app.web.authorized(self.headers.get("Authorization")):
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                       {"WWW-Authenticate": 'Basic realm="nvml-exporter"'})
            return
        path = urlsplit(self.path).path
        if path == app.telemetry_path:
            snap = app.collect(app.scrape_deadline(self.headers.get("X-Prometheus-Scrape-Timeout-Seconds")))
            self._send(200, render_chunks(snap, app.build), CONTENT_TYPE)
        elif path == "/":
            self._send(200, app.landing_page(), "text/html; charset=utf-8")
        elif path == "/-/healthy":
            self._send(200, b"OK\n", "text/plain; charset=utf-8")
        elif path == "/-/ready":
            if app.ready():
                self._send(200, b"OK\n", "text/plain; charset=utf-8")
            else:
                self._send(503, b"NVML has not been initialised yet\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET


_IOV_MAX = 1024  # buffers one sendmsg() may take (Linux)


def _send_chunks(sock: socket.socket, chunks: list[bytes]) -> None:
    """sendall() for a list of buffers: the headers and a page's blocks go out as they are, with a few
    system calls and no copy of the page (at 64 GPUs a page is a megabyte, made anew every scrape)."""
    views = [memoryview(c) for c in chunks if c]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first:first + _IOV_MAX])
        while sent and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


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

    def submit(self, request: Any, address: Any) -> None:
        with self._lock:
            if self._idle:  # an idle thread takes it; queued under the lock, so that it cannot time out first
                self._idle -= 1
                self._queue.put((request, address))
                return
        threading.Thread(target=self._run, args=((request, address),), name="http", daemon=True).start()

    def _run(self, item: tuple[Any, Any]) -> None:
        while True:
            self._serve(*item)
            with self._lock:
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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        self._connections.submit(request, client_address)

    def __init__(self, address: tuple[str, int], app: App, sock: socket.socket | None = None):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.app = app
        self._connections = _Threads(self.process_request_thread)
        if host == "":
            address = ("::", address[1])
        if sock is None:
            super().__init__(address, Handler)
            return
        # socket activation: systemd already bound and listens on it
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
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

