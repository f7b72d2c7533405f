"""The exporter's HTTP application: /metrics, a landing page, /-/healthy and /-/ready, with optional TLS
and basic auth, on the hardened protocol layer of `httpd` (request reading, limits, connections)."""

from __future__ import annotations

import html
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__
from .exposition import CONTENT_TYPE, BuildInfo, Renderer
from .httpd import BadRequest, Exchange, Limits, Request, parse_head
from .httpd import Server as HttpServer
from .snapshot import Deliver, Snapshot
from .webconfig import Auth, WebConfig

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
    renderer: Renderer = field(default_factory=Renderer)  # this server's: its caches are no one else's

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

    def __call__(self, ex: Exchange) -> None:
        """Route one request (the protocol layer's handler)."""
        request = ex.request
        if request.method not in ("GET", "HEAD"):  # answered, and the connection closed
            ex.text(405 if request.method in _KNOWN_METHODS else 501, "Only GET and HEAD are served",
                    {"Allow": "GET, HEAD"}, close=True)
            return
        auth = self.web.check(request.headers.get("authorization"))
        if auth is not Auth.OK:
            if auth is Auth.BUSY:
                ex.text(503, "too many password checks at once; try again", {"Retry-After": "1"}, close=True)
            else:
                ex.text(401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="nvml-exporter"'})
            return
        path = request.path
        if path == self.telemetry_path:
            deadline = self.scrape_deadline(request.headers.get("x-prometheus-scrape-timeout-seconds"))
            build, renderer = self.build, self.renderer

            def page(snap: Snapshot, taken_over: bool) -> None:
                # Taken over (sent by the collector's hung-call watchdog while a driver call holds this connection's
                # thread), the connection closes: the client's next scrape must not wait on that thread.
                ex.respond(200, renderer.render_chunks(snap, build), CONTENT_TYPE, close=taken_over)

            ex.ended = not self.scrape(deadline, page)
        elif path == "/":
            ex.respond(200, self.landing_page(), "text/html; charset=utf-8")
        elif path == "/-/healthy":
            ex.text(200, "OK")
        elif path == "/-/ready":
            if self.ready():
                ex.text(200, "OK")
            else:
                ex.text(503, "NVML has not been initialised yet")
        else:
            ex.text(404, "Not Found")
        if log.isEnabledFor(logging.DEBUG):  # every scrape passes here: format only what is logged
            log.debug("request", extra={"peer": ex.peer, "method": request.method, "path": path[:200]})


_KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


class Server(HttpServer):
    """The exporter's server: `app` on the protocol layer, with the web config's TLS and headers."""

    def __init__(self, address: tuple[str, int], app: App, sock: socket.socket | None = None,
                 max_connections: int = 64, limits: Limits | None = None):
        limits = limits or Limits(max_connections=max_connections)
        self.app = app
        super().__init__(address, app, limits=limits, ssl_context=app.web.ssl_context, headers=app.web.headers,
                         server_header=f"nvml-exporter/{__version__}", sock=sock)


__all__ = ["App", "BadRequest", "Request", "Server", "parse_head"]
