"""Regression tests for the hostile-client findings of issue 15 that the HTTP layer answers, each named by
its finding. Loopback only; the server's timeouts are set short here so that every deadline is a
fraction of a second and each assertion allows several times that."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from nvml_exporter import logs, webconfig
from nvml_exporter.exposition import BuildInfo
from nvml_exporter.httpd import Exchange, Limits, Pool
from nvml_exporter.httpd import Server as HttpServer
from nvml_exporter.nvml import EVENT_XID, Event, events
from nvml_exporter.server import App, Server
from nvml_exporter.webconfig import Auth, WebConfig
from nvml_exporter.xidstore import XidEvent, XidStore
from tests.conftest import wait_for
from tests.test_http_security import make_cert
from tests.test_http_server import Scrapes, raw

FAST = Limits(request_timeout=0.5, idle_timeout=0.5, linger=0.2, max_connections=4)


def _hash(password: bytes, cost: int = 4) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(cost))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextlib.contextmanager
def exporter(web: WebConfig | None = None, limits: Limits = FAST) -> Iterator[tuple[int, Scrapes, Server]]:
    scrapes = Scrapes()
    app = App(collect=scrapes, ready=lambda: True, web=web or WebConfig(),
              build=BuildInfo(version="1.0", pynvml_version="13", python_version="3.11"))
    server = Server(("127.0.0.1", 0), app, limits=limits)
    with serving(server) as port:
        yield port, scrapes, server


def settle(server: HttpServer) -> None:
    """Wait until every connection's slot is back (a client sees the close a moment before that)."""
    deadline = time.monotonic() + 10
    while server.pool.busy:
        assert time.monotonic() < deadline, f"{server.pool.busy} connection slots never came back"
        time.sleep(0.005)


@contextlib.contextmanager
def serving(server: HttpServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    return int(response[9:12])


def get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


# H1 ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [b"\xb2", b"9" * 5000, b"-1", b"+5", b" 5 5", b"5, 5", b"0x10", b"\xd9\xa5"])
def test_h1_m6_a_content_length_that_is_not_ascii_digits_is_a_400(length: bytes) -> None:
    """H1 / M6: `Content-Length: ²` (str.isdigit() true, int() raises) or 5,000 digits (past Python's
    int-string limit) raised out of the request reader and killed its thread; -1 read to the end of the
    stream. Each is now a 400 and a closed connection."""
    with exporter() as (port, scrapes, _):
        out = raw(port, b"GET /metrics HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n")
        assert status(out) == 400 and b"Connection: close\r\n" in out
        assert scrapes.deadlines == []


def test_h1_bad_lengths_past_twice_the_connection_cap_leave_the_server_serving() -> None:
    """H1: 2 x max-connections requests with `Content-Length: ²` left every later scrape a 503 until
    restart (each dead thread still counted idle, its slot never freed)."""
    with exporter(limits=Limits(max_connections=2, request_timeout=2.0)) as (port, _, server):
        for _ in range(2 * 2 + 1):
            assert status(raw(port, b"GET /metrics HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n")) == 400
            settle(server)
        assert get(port).status == 200


def test_h1_the_pool_frees_a_slot_whatever_serving_raises() -> None:
    """H1, at the pool's depth: a connection whose serving raises anything frees its slot, and its thread
    lives on to serve the next connection (it is never counted idle while dead)."""
    served: list[int] = []
    errors = logs.RateLimited(logging.getLogger("test.pool"))

    def serve(n: int, _peer: Any) -> None:
        served.append(n)
        if n % 2 == 0:
            raise ValueError("a bug in serving")

    pool = Pool(serve, errors)
    for n in range(20):
        pool.submit(n, None)
    deadline = time.monotonic() + 10
    while pool.busy or len(served) < 20:
        assert time.monotonic() < deadline, f"slots never came back: busy={pool.busy}, served={len(served)}"
        time.sleep(0.01)
    assert sorted(served) == list(range(20))
    threads_before = threading.active_count()
    for n in range(20, 24):
        pool.submit(n, None)
        while pool.busy:  # one at a time: an idle thread from before takes each, no new thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert len(served) == 24 and threading.active_count() <= threads_before


# H2 (the shared layer's TLS) ----------------------------------------------------------------------

@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = make_cert(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_h2_an_idle_tcp_connect_does_not_hold_up_tls_clients(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """H2 (the remediator's finding, for the layer it moves onto; the exporter already did this): with TLS
    on, a client that connects and sends nothing must not block others: the handshake runs in the
    connection's own thread, never in the accept loop."""
    server_ctx, client_ctx = tls
    web = WebConfig(ssl_context=server_ctx)
    with exporter(web, Limits(request_timeout=30.0)) as (port, _, _), \
            socket.create_connection(("127.0.0.1", port), timeout=10):  # idle: no ClientHello
        # the client's 10 s socket timeout is the bound: a handshake waiting behind the idle one would wait
        # for its 30 s deadline, and this request would fail
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=client_ctx)
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().read() == b"OK\n"
        conn.close()


def test_h2_a_trickled_tls_handshake_is_cut_off_at_the_deadline(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """H2 (for the layer the remediator moves onto): the handshake has a deadline, and it covers the whole
    handshake: a ClientHello sent a byte every 50 ms is cut off at the 0.5 s request deadline, freeing
    the slot."""
    server_ctx, client_ctx = tls
    hello = _client_hello(client_ctx)
    limits = Limits(request_timeout=0.5, max_connections=1)
    with exporter(WebConfig(ssl_context=server_ctx), limits) as (port, _, server):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # A byte at least every 50 ms: a deadline per read would never fire; only one over the whole
            # handshake cuts it off before the client runs out of bytes (0.5 s in; ~500 bytes take ~25 s).
            closed = False
            for byte in hello[:-1]:  # never the last byte: the handshake can never finish
                try:
                    s.sendall(bytes([byte]))
                except OSError:  # reset by the server: cut off
                    closed = True
                    break
                s.settimeout(0.05)
                try:
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
                    break
            assert closed, f"the trickled handshake held its connection for all {len(hello) - 1} bytes"
        settle(server)  # the one slot is free again
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=client_ctx)
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().read() == b"OK\n"
        conn.close()


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a TLS client, as bytes, made without a server."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# M3 ---------------------------------------------------------------------------------------------------

def test_m3_a_body_trickled_in_gets_a_408_at_the_whole_request_deadline_before_auth() -> None:
    """M3: the deadline covered the request head only; a body dribbled a byte at a time held a connection
    slot indefinitely, before authentication. Now head and body share one deadline: 408, not 401."""
    web = WebConfig(users={"prometheus": _hash(b"pw")})
    with exporter(web, Limits(request_timeout=0.5)) as (port, _, _), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        out, sent = b"", 0
        while sent < 200:  # a byte every 50 ms, 200 of the 1000: at least 10 s of trickle
            sent += 1
            try:
                s.sendall(b"x")
            except OSError:
                break
            s.settimeout(0.05)
            try:
                if not (chunk := s.recv(65536)):
                    break
                out += chunk
            except TimeoutError:
                continue
        s.settimeout(10)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
    assert status(out) == 408 and b"Connection: close\r\n" in out
    # answered while bytes still came every 50 ms (a deadline per read, or one that restarts with every
    # byte, answers only once the client stops): the whole request's deadline
    assert out and sent < 200, sent


# M4, L1, L2 ------------------------------------------------------------------------------------------

class CountingBcrypt:
    """bcrypt.checkpw, slowed down and watched: how many run at once, with which hashes."""

    def __init__(self, delay: float) -> None:
        self.delay, self.running, self.most, self.calls = delay, 0, 0, []
        self._lock = threading.Lock()
        self._real = bcrypt.checkpw

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(hashed)
        try:
            time.sleep(self.delay)
            return self._real(password, hashed)
        finally:
            with self._lock:
                self.running -= 1


def test_m4_wrong_password_floods_are_bounded_and_never_starve_the_cached_scraper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """M4: bcrypt work was bounded only by max-connections (8 wrong-password clients took both cores; with
    64 the real scraper got 503 on 16 of 18 scrapes). Now at most 2 checks run at once, a client that
    waits past hash_wait gets 503, and the scraper, its credentials cached, is answered throughout."""
    checks = CountingBcrypt(delay=0.2)
    monkeypatch.setattr(bcrypt, "checkpw", checks)
    web = WebConfig(users={"prometheus": _hash(b"s3cret")}, hash_wait=0.1)
    good = {"Authorization": basic("prometheus", "s3cret")}
    with exporter(web, Limits(max_connections=32, request_timeout=5.0)) as (port, _, _):
        assert get(port, headers=good).status == 200  # the one bcrypt check for these credentials
        stop = threading.Event()
        answers: list[int] = []

        def flood() -> None:
            while not stop.is_set():
                answers.append(get(port, headers={"Authorization": basic("prometheus", "guess")}).status)

        flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
        for t in flooders:
            t.start()
        try:
            time.sleep(0.3)
            scrapes = [get(port, headers=good).status for _ in range(10)]
        finally:
            stop.set()
            for t in flooders:
                t.join(10)
    assert scrapes == [200] * 10
    assert checks.most <= webconfig.HASH_SLOTS == 2
    assert set(answers) <= {401, 503} and 503 in answers, answers
    assert checks.calls.count(web.users["prometheus"]) - 1 == len([a for a in answers if a == 401])


def test_m4_a_flood_larger_than_the_connection_cap_does_not_starve_a_kept_alive_scraper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """M4, the finding's own case: more wrong-password clients than --web.max-connections (there: 64 and
    64; the real scraper got 503 on 16 of 18 scrapes). The scraper, on its kept-alive connection as
    Prometheus scrapes, is answered 200 every time; the flood gets 401, 503 (password checks busy) or
    503 (too many connections), and at most 2 hash checks run at once."""
    checks = CountingBcrypt(delay=0.2)
    monkeypatch.setattr(bcrypt, "checkpw", checks)
    web = WebConfig(users={"prometheus": _hash(b"s3cret")}, hash_wait=0.1)
    with exporter(web, Limits(max_connections=8, request_timeout=5.0, idle_timeout=30.0)) as (port, _, _):
        scraper = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        stop = threading.Event()
        outcomes: list[str] = []

        def scrape() -> int:
            scraper.request("GET", "/metrics", headers={"Authorization": basic("prometheus", "s3cret")})
            response = scraper.getresponse()
            response.read()
            return response.status

        def flood() -> None:
            guess = basic("prometheus", "guess")
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                        s.sendall(f"GET /metrics HTTP/1.1\r\nAuthorization: {guess}\r\n\r\n".encode())
                        out = b""
                        while chunk := s.recv(65536):
                            out += chunk
                    outcomes.append(out[9:12].decode() + (" busy" if b"password checks" in out else ""))
                except OSError:  # refused past the cap before the request was sent
                    outcomes.append("reset")

        assert scrape() == 200  # connected, and its credentials checked (and cached) once
        flooders = [threading.Thread(target=flood, daemon=True) for _ in range(16)]
        for t in flooders:
            t.start()
        try:
            time.sleep(0.5)
            scrapes = [scrape() for _ in range(10)]
        finally:
            stop.set()
            for t in flooders:
                t.join(10)
            scraper.close()
    assert scrapes == [200] * 10
    assert checks.most <= 2
    assert set(outcomes) <= {"401", "503", "503 busy", "reset"}, set(outcomes)
    assert "503 busy" in outcomes and "503" in outcomes, set(outcomes)  # both bounds were reached


def test_m4_verified_credentials_are_cached_and_skip_the_hash_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """M4: credentials that passed are not hashed again, and do not wait for a hash slot even while every
    slot is taken (a wrong guess then is BUSY)."""
    checks = CountingBcrypt(delay=0.0)
    monkeypatch.setattr(bcrypt, "checkpw", checks)
    web = WebConfig(users={"prometheus": _hash(b"s3cret")}, hash_wait=0.05)
    good = basic("prometheus", "s3cret")
    assert web.check(good) is Auth.OK and len(checks.calls) == 1
    for _ in range(2):
        assert web._slots.acquire(timeout=1)  # every slot taken, as by a flood
    try:
        assert [web.check(good) for _ in range(5)] == [Auth.OK] * 5
        assert web.check(basic("prometheus", "guess")) is Auth.BUSY
    finally:
        web._slots.release()
        web._slots.release()
    assert len(checks.calls) == 1
    assert web.check(basic("prometheus", "guess")) is Auth.DENIED


def test_l1_a_password_over_72_bytes_is_a_401() -> None:
    """L1: a basic-auth password over 72 bytes (bcrypt 5 raises ValueError) gave a 500 and a traceback."""
    web = WebConfig(users={"prometheus": _hash(b"s3cret")})
    with exporter(web) as (port, _, _):
        response = get(port, headers={"Authorization": basic("prometheus", "s3cret" + "x" * 80)})
        assert response.status == 401 and response.getheader("Connection") == "close"
        assert get(port, headers={"Authorization": basic("prometheus", "s3cret")}).status == 200


def test_l2_an_unknown_user_costs_as_much_as_the_dearest_configured_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """L2: the stand-in hash for unknown users was always cost 10, so with cost-12 hashes an unknown user
    answered 4x faster than a wrong password. It now has the highest cost of the configured users."""
    checks = CountingBcrypt(delay=0.0)
    monkeypatch.setattr(bcrypt, "checkpw", checks)
    web = WebConfig(users={"a": _hash(b"x", 4), "b": _hash(b"y", 6)})
    assert web.check(basic("nobody", "x")) is Auth.DENIED
    assert checks.calls[-1][:7] == b"$2b$06$"


def test_a_401_closes_the_connection() -> None:
    """L5's other half for the shared layer: a 401 is answered with `Connection: close` whatever the client
    asked, so a refused client's next bytes are never served on the same connection."""
    web = WebConfig(users={"prometheus": _hash(b"s3cret")})
    with exporter(web) as (port, _, _):
        out = raw(port, b"GET /metrics HTTP/1.1\r\n\r\nGET /-/healthy HTTP/1.1\r\n\r\n")
        assert status(out) == 401 and b"Connection: close\r\n" in out and out.count(b"HTTP/1.1 ") == 1


# L6, L9 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [b"http://[::1/metrics", b"http://[v1.x/", b"http://[zz]/metrics"])
def test_l6_a_malformed_absolute_target_is_a_400(target: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """L6: `GET http://[::1/metrics` raised in urlsplit and was a 500 with a traceback."""
    with exporter() as (port, scrapes, _):
        out = raw(port, b"GET " + target + b" HTTP/1.1\r\n\r\n")
    assert status(out) == 400 and b"Connection: close\r\n" in out
    assert scrapes.deadlines == [] and not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(("accept", "gzipped"), [
    ("gzip", True), ("gzip;q=0", False), ("gzip; q=0.0", False), ("gzip;q=0.5", True), ("*;q=0", False),
    ("*", True), ("identity, *;q=0", False), ("gzip;q=0, *", False), ("br, *;q=0.1", True), ("deflate", False),
    ("GZIP", True), ("x-gzip", True), ("gzip;q=nonsense", False), ("", False),
])
def test_l9_accept_encoding_q_values_are_read(accept: str, gzipped: bool) -> None:
    """L9: `Accept-Encoding: gzip;q=0` still got gzip (a substring test); q-values are now read."""
    with exporter() as (port, _, _):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics", headers={"Accept-Encoding": accept})
        response = conn.getresponse()
        body = response.read()
        conn.close()
    assert response.status == 200
    assert (response.getheader("Content-Encoding") == "gzip") is gzipped
    assert b"nvidia_gpu_up" in (gzip.decompress(body) if gzipped else body)


# L8 -------------------------------------------------------------------------------------------------------

def test_l8_the_rate_limited_log_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    """L8: one line per key per interval; the next line says how many were held back."""
    now = [0.0]
    limited = logs.RateLimited(logging.getLogger("test.l8"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.l8"):
        for _ in range(100):
            limited.log(logging.WARNING, "refused", key="a", extra={"peer": "x"})
        limited.log(logging.WARNING, "refused", key="b")
        now[0] = 10.0
        limited.log(logging.WARNING, "refused", key="a")
    lines = [(r.getMessage(), getattr(r, "suppressed", 0)) for r in caplog.records]
    assert lines == [("refused", 0), ("refused", 0), ("refused", 99)]


def test_l8_refused_connections_are_not_a_log_line_each(caplog: pytest.LogCaptureFixture) -> None:
    """L8: every connection refused past the cap was its own warning line."""
    with exporter(limits=Limits(max_connections=1, idle_timeout=10.0)) as (port, _, _), \
            caplog.at_level(logging.WARNING, logger="nvml_exporter.http"):
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        held.request("GET", "/-/healthy")
        assert held.getresponse().read() == b"OK\n"  # kept alive: the one slot taken
        refused = [status(raw(port, b"GET /-/healthy HTTP/1.1\r\n\r\n")) for _ in range(20)]
        held.close()
    assert refused == [503] * 20
    assert len([r for r in caplog.records if "too many connections" in r.getMessage()]) == 1


def test_l8_an_xid_storm_is_counted_in_full_and_logged_once_per_gpu_and_code(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """L8: every Xid was an error line; 10,000 Xids were 10,000 lines."""
    recorded: list[XidEvent] = []
    store = XidStore()
    monkeypatch.setattr(store, "record", recorded.append)
    watcher = events.EventWatcher(dict, store, lambda function, code: None)
    with caplog.at_level(logging.ERROR, logger="nvml_exporter.events"):
        for i in range(1000):
            watcher._record(Event(f"GPU-{i % 2}", EVENT_XID, 79))
    assert len(recorded) == 1000
    assert sorted(r.uuid for r in caplog.records if r.getMessage() == "Xid") == ["GPU-0", "GPU-1"]


# The layer as another application uses it (the remediator's webhook) ------------------------------------

TOKEN = "t" * 24


def webhook(ex: Exchange) -> None:
    """A second application: POST /webhook with a JSON body and a bearer token."""
    req = ex.request
    if req.path != "/webhook":
        ex.text(404, "Not Found")
    elif req.method != "POST":
        ex.text(405, "POST only", {"Allow": "POST"}, close=True)
    elif req.headers.get("authorization") != f"Bearer {TOKEN}":
        ex.respond(401, b'{"error": "unauthorized"}\n', "application/json")
    else:
        ex.respond(200, (json.dumps({"got": json.loads(req.body)}) + "\n").encode(), "application/json")


@contextlib.contextmanager
def webhook_server(limits: Limits) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    refused: list[tuple[int, str]] = []
    server = HttpServer(("127.0.0.1", 0), webhook, limits=limits, server_header="hook/1",
                        on_refused=lambda code, reason: refused.append((code, reason)))
    with serving(server) as port:
        yield port, refused


def post(body: bytes, token: str = TOKEN, length: int | None = None, then: bytes = b"") -> bytes:
    return (f"POST /webhook HTTP/1.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body + then


SMUGGLED = b"GET /webhook HTTP/1.1\r\n\r\n"  # a body that is also a request: never to be served


def test_l5_a_body_over_the_limit_is_a_413_and_never_read_as_the_next_request() -> None:
    """L5 (for the layer the remediator moves onto): a 413 was answered without reading the body and the
    connection kept, so the body was parsed as the next request. Now: 413, `Connection: close`, and the
    body's bytes are never served as a request."""
    with webhook_server(Limits(max_body=64, request_timeout=2.0, linger=0.2)) as (port, refused):
        body = SMUGGLED * 4  # 100 bytes, over the 64 allowed
        out = raw(port, post(body))
        assert status(out) == 413 and b"Connection: close\r\n" in out
        assert out.count(b"HTTP/1.1 ") == 1
        assert refused == [(413, "request body over the limit of 64 bytes")]
        ok = raw(port, post(b'{"a": 1}', then=SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")))
        assert ok.count(b"HTTP/1.1 ") == 2 and b'{"got": {"a": 1}}' in ok  # kept alive when all is well


def test_l5_a_401_with_a_body_that_looks_like_a_request_answers_once() -> None:
    """L5: a refused (401) webhook's body was read as the next request. The layer reads the body whole
    before the application runs, and a 401 closes the connection."""
    with webhook_server(Limits(max_body=1024, request_timeout=2.0)) as (port, _):
        out = raw(port, post(SMUGGLED, token="wrong") + SMUGGLED)
        assert status(out) == 401 and out.count(b"HTTP/1.1 ") == 1 and b"Connection: close\r\n" in out


def test_m6_a_negative_content_length_is_a_400_not_a_read_to_the_end() -> None:
    """M6: `Content-Length: -1` read to the end of the stream, past the request size limit."""
    with webhook_server(Limits(max_body=1024, request_timeout=2.0)) as (port, refused):
        out = raw(port, post(b"{}" * 100, length=-1))
        assert status(out) == 400 and b"Connection: close\r\n" in out
        assert refused == [(400, "bad Content-Length")]


def test_m2_m3_the_connection_cap_and_the_whole_request_deadline_hold_for_another_application() -> None:
    """M2 / M3 for the layer the remediator moves onto: a head dribbled a byte at a time gets a 408 at the
    request deadline; connections past the cap get a 503 and are counted through on_refused."""
    with webhook_server(Limits(max_connections=1, request_timeout=0.5, idle_timeout=5.0)) as (port, refused), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"P")  # holds the one slot: a request has begun
        time.sleep(0.1)
        assert status(raw(port, post(b"{}"))) == 503
        out = b""
        deadline = time.monotonic() + 5
        with contextlib.suppress(OSError):
            for byte in b"OST /webhook HTTP/1.1\r\nX: " + b"y" * 200:
                s.sendall(bytes([byte]))
                s.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    if chunk := s.recv(65536):
                        out += chunk
                        break
                assert time.monotonic() < deadline
        s.settimeout(10)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
        assert status(out) == 408
    assert (503, "too many connections") in refused and (408, "request not received in time") in refused


def test_a_handler_that_raises_or_does_not_answer_is_a_500_and_the_server_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """A handler's bug is a 500 for that request (its traceback logged once), never a lost slot."""
    def handler(ex: Exchange) -> None:
        if ex.request.path == "/raise":
            raise RuntimeError("a bug")
        if ex.request.path == "/ok":
            ex.text(200, "OK")

    server = HttpServer(("127.0.0.1", 0), handler)
    with serving(server) as port:
        for _ in range(3):
            assert status(raw(port, b"GET /raise HTTP/1.1\r\n\r\n")) == 500
            assert status(raw(port, b"GET /silent HTTP/1.1\r\n\r\n")) == 500
        assert raw(port, b"GET /ok HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nOK\n")
        settle(server)  # every connection's slot comes back
    assert len([r for r in caplog.records if r.getMessage() == "request failed"]) == 1


SERVE_WITH_FEW_FDS = """
import resource, sys, threading
from nvml_exporter.exposition import BuildInfo
from nvml_exporter.httpd import Limits
from nvml_exporter.server import App, Server
from nvml_exporter.snapshot import Snapshot
from nvml_exporter.webconfig import WebConfig

class Counted(Server):
    failed = 0  # accept() calls that failed: the accept loop's tries while out of descriptors

    def get_request(self):
        try:
            return super().get_request()
        except OSError:
            self.failed += 1
            raise

resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
app = App(collect=lambda timeout: Snapshot(gpus=()), ready=lambda: True, web=WebConfig(),
          build=BuildInfo(version="1", pynvml_version="1", python_version="3"))
server = Counted(("127.0.0.1", 0), app, limits=Limits(max_connections=1000, request_timeout=60, idle_timeout=60))
print(server.server_address[1], flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
for _ in sys.stdin:  # a line in: the count out
    print(server.failed, flush=True)
"""


def test_m2_out_of_file_descriptors_the_accept_loop_pauses_instead_of_spinning() -> None:
    """M2 (the remediator's "at the fd limit it spins at 99 % CPU", for the layer it moves onto, and the
    exporter's too): when accept() fails for want of a file descriptor the listening socket stays
    readable; the accept loop now pauses (5 ms doubling up to 1 s) instead of retrying at once, and serves
    again once descriptors are free. Counted, not timed: the failed accept() calls over 3 s at the limit are
    a dozen or so when it pauses, tens of thousands when it spins (however slow the machine, a pausing loop
    only makes fewer)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_FEW_FDS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []

    def failed_accepts() -> int:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        return int(proc.stdout.readline())

    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(60):  # past the 48 descriptors: the rest wait in the kernel's accept queue
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for(failed_accepts)  # the limit is reached: accept() fails
        before = failed_accepts()
        time.sleep(3.0)
        tries = failed_accepts() - before
        assert 1 <= tries <= 20, f"{tries} failed accept() calls in 3 s at the descriptor limit"
        for c in clients:
            c.close()
        clients.clear()
        deadline = time.monotonic() + 20
        while True:
            try:
                if raw(port, b"GET /-/healthy HTTP/1.0\r\n\r\n").endswith(b"OK\n"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not serve again once descriptors were free"
            time.sleep(0.1)
    finally:
        for c in clients:
            c.close()
        proc.kill()
        proc.wait(10)


def test_a_413_reaches_a_client_that_sent_its_whole_oversized_body() -> None:
    """Not a finding (loopback delivers an answer ahead of a reset, so the old code passed too): the 413
    for a body over the limit reaches a client that already sent that body. Over a real network closing
    with the body unread can reset the connection under the answer; the layer half-closes and reads and
    drops what still comes, for a moment, before it closes — this runs that path."""
    with exporter() as (port, _, _):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300000)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            assert status(out) == 413 and b"Connection: close\r\n" in out
