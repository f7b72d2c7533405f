"""Listening, accepting, the connection cap and the threads that serve connections."""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..logs import RateLimited
from .connection import TEXT, Connection, Handler
from .protocol import Limits

log = logging.getLogger("nvml_exporter.http")

_NO_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_TOO_MANY_BODY = b"too many connections\n"
_TOO_MANY = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {TEXT}\r\n"
             f"Content-Length: {len(_TOO_MANY_BODY)}\r\nConnection: close\r\n\r\n").encode() + _TOO_MANY_BODY


_DEFAULT_LIMITS = Limits()


class Pool:
    """Connection threads that are kept for the next connection instead of one new thread per scrape
    (starting a thread costs more CPU than serving a scrape from the last collection). A thread idle
    for IDLE seconds ends, so a burst of scrapers does not leave threads behind.

    A thread counts as idle only while it waits on the queue, and `serve` is run so that nothing it
    raises can end the thread with its connection still counted busy: a slot always comes back."""

    IDLE = 60.0

    def __init__(self, serve: Callable[[Any, Any], None], errors: RateLimited):
        self._serve, self._errors = serve, errors
        self._queue: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting on the queue
        self.busy = 0  # connections handed in and not yet done with

    def submit(self, sock: Any, peer: Any) -> None:
        with self._lock:
            self.busy += 1
            if self._idle:  # an idle thread takes it; queued under the lock, so that it cannot time out first
                self._idle -= 1
                self._queue.put((sock, peer))
                return
        try:
            threading.Thread(target=self._run, args=((sock, peer),), name="http", daemon=True).start()
        except BaseException:  # no thread (RuntimeError: can't start new thread): the caller closes the socket
            with self._lock:
                self.busy -= 1
            raise

    def _run(self, item: tuple[Any, Any] | None) -> None:
        while item is not None:
            try:
                self._serve(*item)
            except Exception:  # the serve function's own bug: the thread and the slot must survive it
                self._errors.log(logging.ERROR, "connection failed", key="connection failed", exc_info=True)
            finally:
                with self._lock:
                    self.busy -= 1
            item = self._next()

    def _next(self) -> tuple[Any, Any] | None:
        with self._lock:
            self._idle += 1
        try:
            return self._queue.get(timeout=self.IDLE)
        except queue.Empty:
            with self._lock:
                try:
                    return self._queue.get_nowait()  # handed over just as the wait ended
                except queue.Empty:
                    self._idle -= 1
                    return None


class Server(socketserver.TCPServer):
    """Serves `handler` on `address` (host "" is every address, IPv6 and IPv4), or on `sock`, a socket
    systemd already bound and listens on."""

    allow_reuse_address = True
    request_queue_size = 128  # a fleet's Prometheus pair and a few curls; more wait in the kernel

    def __init__(self, address: tuple[str, int], handler: Handler, *, limits: Limits = _DEFAULT_LIMITS,
                 ssl_context: ssl.SSLContext | None = None, headers: Mapping[str, str] | None = None,
                 server_header: str = "", sock: socket.socket | None = None,
                 on_refused: Callable[[int, str], None] | None = None):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.handler, self.limits, self.ssl_context = handler, limits, ssl_context
        self.headers = dict(headers or {})
        self.server_header, self.on_refused = server_header, on_refused
        self.errors = RateLimited(log, interval=10.0)
        self.pool = Pool(self._serve_connection, self.errors)
        self._accept_pause = 0.005  # seconds, doubled up to 1 s while accept() finds no file descriptor
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

    @property
    def max_connections(self) -> int:
        return self.limits.max_connections

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # also serve IPv4
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """accept(); out of file descriptors (or memory), wait a moment before the next try instead of
        spinning on a listening socket that stays readable (a core at 100 %, as http.server does)."""
        try:
            pair = super().get_request()
        except OSError as e:
            if e.errno in _NO_RESOURCES:
                self.errors.log(logging.ERROR, "cannot accept a connection; pausing", key="accept",
                                extra={"error": os.strerror(e.errno or 0), "pause_s": self._accept_pause})
                time.sleep(self._accept_pause)
                self._accept_pause = min(self._accept_pause * 2, 1.0)
            raise
        self._accept_pause = 0.005
        return pair

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver's last resort for what process_request raised: logged, rate-limited (not printed)."""
        self.errors.log(logging.ERROR, "connection not served", key="handle_error", exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accepting thread: nothing here may wait on the client (no TLS handshake, no read)."""
        if self.pool.busy >= self.limits.max_connections:
            self._refuse(request, client_address)
            return
        try:
            self.pool.submit(request, client_address)
        except RuntimeError as e:  # no thread to be had: as past the cap
            self.errors.log(logging.ERROR, "cannot start a connection thread", key="no thread",
                            extra={"error": str(e)})
            self._refuse(request, client_address)

    def _refuse(self, sock: socket.socket, peer: Any) -> None:
        """Past max_connections (each holds a thread): a 503 and close, sent without waiting (a TLS
        client is closed without one: a handshake would wait on the client)."""
        self.errors.log(logging.WARNING, "too many connections; refusing", key="too many connections",
                        extra={"peer": peer[0], "limit": self.limits.max_connections})
        if self.on_refused is not None:
            self.on_refused(503, "too many connections")
        try:
            if self.ssl_context is None:
                sock.setblocking(False)
                sock.send(_TOO_MANY)
        except OSError as e:
            log.debug("could not answer a refused connection", extra={"peer": peer[0], "error": str(e)})
        finally:
            self.shutdown_request(sock)

    def _serve_connection(self, sock: socket.socket, peer: Any) -> None:
        """In a pool thread: the handshake, then the connection's requests."""
        accepted = time.monotonic()
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            Connection(sock, peer, self.handler, self.limits, self.headers, self.server_header, self.errors,
                       self.on_refused, accepted).serve()
        except OSError as e:  # reset, timed out, TLS handshake refused: the client's business
            if log.isEnabledFor(logging.DEBUG):
                log.debug("connection closed", extra={"peer": peer[0], "error": str(e)})
        except Exception:  # a bug: logged (not a line per connection), the socket closed, the slot freed
            self.errors.log(logging.ERROR, "connection failed", key="connection failed", exc_info=True,
                            extra={"peer": peer[0]})
        finally:
            self.shutdown_request(sock)
