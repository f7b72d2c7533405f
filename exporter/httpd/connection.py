"""One client connection: the TLS handshake, requests read whole under one deadline, answers written."""

from __future__ import annotations

import email.utils
import gzip
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..logs import RateLimited
from .protocol import REASONS, BadRequest, Limits, Request, accepts_gzip, content_length, parse_head

log = logging.getLogger("nvml_exporter.http")

TEXT = "text/plain; charset=utf-8"
# Answers after which the connection is closed whatever the client asked: the client is refused or
# confused, and a refused request's unread bytes must never be read as the next request.
CLOSES = frozenset({400, 401, 408, 413, 431, 500, 501, 505})
_GZIP_MIN = 1024  # bytes; smaller answers go as they are
_IOV_MAX = 1024  # buffers one sendmsg() may take (Linux)
_LINGER_BYTES = 1 << 20  # at most this much is read and dropped after an error answer


class Exchange:
    """One request and its answer, as the application sees them."""

    __slots__ = ("_answered", "_conn", "ended", "peer", "request")

    def __init__(self, conn: Connection, request: Request):
        self.request, self.peer, self._conn = request, conn.peer[0], conn
        self.ended = False  # set by the application when another thread answers: serve no more on this connection
        self._answered = False

    def respond(self, status: int, body: bytes | list[bytes], content_type: str = TEXT,
                headers: Mapping[str, str] | None = None, close: bool = False) -> None:
        """Send the answer (once): a list of byte blocks goes out without being joined. The connection
        closes after it when `close`, when the client asked, or when the status is one of CLOSES."""
        if self._answered:
            raise RuntimeError("a request answered twice")
        self._answered = True
        self._conn.send(self.request, status, body, content_type, headers, close)

    def text(self, status: int, message: str, headers: Mapping[str, str] | None = None, close: bool = False) -> None:
        self.respond(status, f"{message}\n".encode(), TEXT, headers, close)


Handler = Callable[[Exchange], None]


class Connection:
    """Requests read with plain socket calls, answered in turn, kept alive as HTTP/1.1 asks.
    http.server's handler parses headers with the email package and costs a scraping Prometheus more
    CPU than the collection itself (make bench)."""

    def __init__(self, sock: socket.socket, peer: Any, handler: Handler, limits: Limits,
                 headers: Mapping[str, str], server_header: str, errors: RateLimited,
                 on_refused: Callable[[int, str], None] | None = None, accepted: float | None = None):
        self.sock, self.peer, self.handler, self.limits = sock, peer, handler, limits
        self.headers, self.server_header, self.errors, self.on_refused = headers, server_header, errors, on_refused
        self._buffer = bytearray()  # received and not yet part of a request read
        self._closing = False  # the last answer said Connection: close
        self._date: tuple[int, str] = (0, "")
        # the first request's deadline runs from the accept, handshake included
        self._deadline = (accepted if accepted is not None else time.monotonic()) + limits.request_timeout

    def serve(self) -> None:
        if isinstance(self.sock, ssl.SSLSocket) and not self._handshake():
            return
        first = True
        while True:
            try:
                request = self._read_request(first)
            except BadRequest as e:
                self._refuse(e.code, str(e))
                return
            if request is None:
                return
            first = False
            exchange = Exchange(self, request)
            try:
                self.handler(exchange)
            except OSError:
                raise  # the connection failed: nothing to answer on
            except Exception:
                # A bug, not the client's fault: say so (if nothing was sent yet), and keep serving others.
                self.errors.log(logging.ERROR, "request failed", key="request failed", exc_info=True,
                                extra={"peer": self.peer[0], "path": request.target[:200]})
                if not exchange._answered:
                    self.send(request, 500, b"Internal Server Error\n", TEXT, None, True)
                return
            if not exchange._answered:
                self.errors.log(logging.ERROR, "request not answered", key="request not answered",
                                extra={"peer": self.peer[0], "path": request.target[:200]})
                self.send(request, 500, b"Internal Server Error\n", TEXT, None, True)
                return
            if self._closing or exchange.ended:
                return

    def _handshake(self) -> bool:
        """The TLS handshake, here in the connection's own thread (never the accept loop's), within the
        first request's deadline: ssl takes a socket timeout as the whole handshake's limit, however
        slowly the client sends (Python >= 3.5)."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        assert isinstance(self.sock, ssl.SSLSocket)
        self.sock.do_handshake()
        return True

    def _recv(self, deadline: float, what: str) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(408, f"{what} not received in time")
        self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise BadRequest(408, f"{what} not received in time") from None

    def _read_request(self, first: bool) -> Request | None:
        """The next request, head and body, all within Limits.request_timeout from its first byte (from
        the accept for a connection's first request); None when the client closed or stayed idle between
        requests. The body is read here, before any application code (authentication included) runs.
        The buffer grows in place and is searched only where new bytes came: a client sending a byte at
        a time costs linear, not quadratic, work."""
        limits, buf = self.limits, self._buffer
        deadline = self._deadline
        if not first and not buf:  # kept alive: wait for the next request to begin
            self.sock.settimeout(limits.idle_timeout)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                return None
            buf += chunk
        if not first:
            deadline = time.monotonic() + limits.request_timeout
        scanned = 0
        while True:
            if buf.startswith((b"\r", b"\n")):  # blank lines before a request are allowed
                del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
                scanned = 0
            if (end := buf.find(b"\r\n\r\n", scanned)) >= 0:
                break
            if len(buf) > limits.max_head:
                raise BadRequest(431, "request head too large")
            scanned = max(0, len(buf) - 3)
            try:
                chunk = self._recv(deadline, "request")
            except BadRequest:
                if not buf:
                    return None  # nothing of a request yet: a connection opened and left idle
                raise
            if not chunk:
                if buf:
                    raise BadRequest(400, "connection closed in the middle of a request")
                return None
            buf += chunk
        if end > limits.max_head:
            raise BadRequest(431, "request head too large")
        request = parse_head(bytes(buf[:end]))
        del buf[:end + 4]
        length = content_length(request, limits.max_body)
        if length:
            while len(buf) < length:
                chunk = self._recv(deadline, "request body")
                if not chunk:
                    raise BadRequest(400, "connection closed in the middle of a request body")
                buf += chunk
            request.body = bytes(buf[:length])
            del buf[:length]
        return request

    def _refuse(self, code: int, message: str) -> None:
        """Answer a request the protocol refuses, and close: what the client is still sending is read and
        dropped for a moment first, so that the close does not reset the connection under the answer."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("bad request", extra={"peer": self.peer[0], "status": code, "error": message})
        if self.on_refused is not None:
            self.on_refused(code, message)
        self.send(None, code, f"{message}\n".encode(), TEXT, None, True)
        self._linger()

    def _linger(self) -> None:
        sock = self.sock
        try:
            if not isinstance(sock, ssl.SSLSocket):  # a TCP half-close: the client sees the end of the answer
                sock.shutdown(socket.SHUT_WR)
            end, read = time.monotonic() + self.limits.linger, 0
            while read < _LINGER_BYTES and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    return
                read += len(chunk)
        except OSError:  # timed out, reset, or TLS gave up: closing is all that is left
            return

    def send(self, request: Request | None, code: int, body: bytes | list[bytes], content_type: str,
             extra: Mapping[str, str] | None, close: bool) -> None:
        chunks = [body] if isinstance(body, bytes) else body
        size = sum(map(len, chunks))
        headers = dict(self.headers)
        headers.update(extra or {})
        close = close or code in CLOSES or request is None or not request.keep_alive()
        self._closing = close
        if request is not None and size > _GZIP_MIN and accepts_gzip(request.headers.get("accept-encoding", "")):
            chunks = [gzip.compress(b"".join(chunks), compresslevel=1)]
            size = len(chunks[0])
            headers["Content-Encoding"] = "gzip"
        now = time.time()
        if int(now) != self._date[0]:
            self._date = (int(now), email.utils.formatdate(now, usegmt=True))
        head = [f"HTTP/1.1 {code} {REASONS[code]}\r\n"
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
        if self.sock.gettimeout() != self.limits.request_timeout:  # (a system call; mostly already so)
            self.sock.settimeout(self.limits.request_timeout)  # a client that stops reading does not hold us
        if isinstance(self.sock, ssl.SSLSocket):  # TLS has no scatter-gather send
            self.sock.sendall(b"".join([data, *chunks]))
        else:
            _send_chunks(self.sock, [data, *chunks])


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
