"""The HTTP/1.1 server both services stand on: the protocol, hardened; the routes are the application's.

What this layer does, so that no application has to:

- reads each request whole (head and body) under one deadline, `Limits.request_timeout` from its first
  byte (from the accept, TLS handshake included, for a connection's first request): a client that
  trickles gets 408 and the connection closed, before any application code (authentication included);
- parses strictly: a bad request line, header or Content-Length (ASCII digits only, at most 18; no
  Transfer-Encoding) is a 400, a head over `max_head` a 431, a body over `max_body` a 413 (never read:
  the connection is closed after a short linger, so its bytes are never read as the next request);
- serves at most `max_connections` connections at once, a pooled thread each; past that a 503 and close,
  from the accepting thread without waiting on the client; the TLS handshake runs in the connection's
  thread under the deadline, so an idle connect never blocks another;
- answers 400, 401, 408, 413, 431, 500, 501 and 505 with `Connection: close` whatever the client
  asked; a handler's exception is a 500 (its traceback logged, rate-limited), never a dead thread or a
  lost slot;
- negotiates gzip from Accept-Encoding with q-values, and sends a page given as a list of blocks with
  scatter-gather I/O.

An application is one function, `handler(exchange)`, called in the connection's thread:

    from nvml_exporter.httpd import Exchange, Limits, Server

    def handle(ex: Exchange) -> None:
        req = ex.request  # .method .path .target .version .headers (lower-case names) .body (bytes)
        if req.method == "POST" and req.path == "/webhook":
            ex.respond(200, b'{"ok": true}\\n', "application/json")
        else:
            ex.text(404, "Not Found")  # text/plain, a newline added

    server = Server(("127.0.0.1", 9401), handle, limits=Limits(max_body=1 << 20),
                    ssl_context=web.ssl_context, headers=web.headers, server_header="app/1.0",
                    on_refused=lambda status, reason: refused.labels(str(status)).inc())
    server.serve_forever()  # socketserver's: shutdown() and server_close() as usual

`Exchange.respond(status, body, content_type, headers=None, close=False)` sends the answer, exactly once;
`body` may be a list of byte blocks. A handler that answers from another thread (the exporter's
collection watchdog does) sets `exchange.ended = True`: nothing more is read from that connection.
A handler that returns without answering gets a 500 sent for it. `on_refused(status, reason)` is
called for every request the layer itself refuses (and every connection past the cap), for metrics;
the layer logs those at debug only, and its warnings and errors are rate-limited.

Authentication is the application's (basic auth with a bounded bcrypt cost: `webconfig.WebConfig.check`).
"""

from .connection import CLOSES, TEXT, Exchange, Handler
from .protocol import BadRequest, Limits, Request, accepts_gzip, content_length, parse_head
from .server import Pool, Server

__all__ = ["CLOSES", "TEXT", "BadRequest", "Exchange", "Handler", "Limits", "Pool", "Request", "Server",
           "accepts_gzip", "content_length", "parse_head"]
