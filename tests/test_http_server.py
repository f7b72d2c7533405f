"""The HTTP layer on its own, over a real socket: request parsing, keep-alive, and what a bad client gets."""

from __future__ import annotations

import gzip
import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from nvml_exporter.exposition import BuildInfo
from nvml_exporter.httpd import Limits
from nvml_exporter.server import App, BadRequest, Server, parse_head
from nvml_exporter.snapshot import ExporterState, GpuIdentity, GpuSnapshot, Snapshot
from nvml_exporter.webconfig import WebConfig

SNAP = Snapshot(gpus=(GpuSnapshot(GpuIdentity(0, "GPU-0", name="H100"), up=True,
                                  values={"nvidia_gpu_temperature_celsius": {(): 41.0}}),),
                state=ExporterState(nvml_up=True, driver_version="580.1"))


class Scrapes:
    def __init__(self) -> None:
        self.deadlines: list[float] = []
        self.fail = False

    def __call__(self, deadline: float) -> Snapshot:
        self.deadlines.append(deadline)
        if self.fail:
            raise RuntimeError("a bug in a reader")
        return SNAP


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[int, Scrapes]]:
    scrapes = Scrapes()
    app = App(collect=scrapes, ready=lambda: True, web=WebConfig(headers={"X-Frame-Options": "deny"}),
              build=BuildInfo(version="1.0", pynvml_version="13", python_version="3.11"), collect_timeout=5.0)
    param = getattr(request, "param", 64)  # max_connections, or the whole Limits
    limits = param if isinstance(param, Limits) else Limits(max_connections=param)
    server = Server(("127.0.0.1", 0), app, limits=limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1], scrapes
    server.shutdown()
    server.server_close()


def raw(port: int, data: bytes, pieces: int = 1) -> bytes:
    """Send `data` (in `pieces` writes) and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_parse_head_reads_request_line_and_headers() -> None:
    r = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\naccept-encoding:  br \r\n"
                   b"X-Prometheus-Scrape-Timeout-Seconds: 10")
    assert (r.method, r.path, r.version) == ("GET", "/metrics", "HTTP/1.1")
    assert r.headers == {"host": "a", "accept-encoding": "gzip, br", "x-prometheus-scrape-timeout-seconds": "10"}
    assert parse_head(b"GET http://node:9400/metrics HTTP/1.1").path == "/metrics"
    assert parse_head(b"GET / HTTP/1.1").keep_alive() and not parse_head(b"GET / HTTP/1.0").keep_alive()
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive").keep_alive()
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive()


@pytest.mark.parametrize(("head", "code"), [
    (b"GET /metrics", 400),
    (b"GET  /metrics HTTP/1.1", 400),
    (b"GET /metrics HTTP/2.0", 505),
    (b"GET /metrics FTP/1.0", 400),
    (b"GET / HTTP/1.1\r\nno colon here", 400),
    (b"GET / HTTP/1.1\r\nBad Name: x", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n  folded", 400),
    (b"GET / HTTP/1.1" + b"\r\nX: y" * 101, 431),
])
def test_parse_head_refuses_malformed_requests(head: bytes, code: int) -> None:
    with pytest.raises(BadRequest) as e:
        parse_head(head)
    assert e.value.code == code


def test_keep_alive_serves_several_scrapes_on_one_connection(served: tuple[int, Scrapes]) -> None:
    port, scrapes = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "10"})
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        assert r.getheader("X-Frame-Options") == "deny" and r.getheader("Connection") is None
        assert 'nvidia_gpu_temperature_celsius{gpu="0",uuid="GPU-0"} 41\n' in body
        assert int(r.getheader("Content-Length")) == len(body.encode())
    assert scrapes.deadlines == [5.0, 5.0, 5.0]  # 90 % of 10 s, capped at --collect.timeout
    conn.close()


def test_pipelined_requests_split_across_writes_and_http10(served: tuple[int, Scrapes]) -> None:
    port, _ = served
    out = raw(port, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\n"
                    b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n", pieces=7)
    assert out.count(b"HTTP/1.1 ") == 3
    first, rest = out.split(b"OK\n", 1)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 3\r\n" in first
    head, not_found = rest.split(b"HTTP/1.1 404", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")  # HEAD: length, no body
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 100
    assert not_found.endswith(b"Not Found\n") and b"Connection: close" in not_found
    assert raw(port, b"GET /-/healthy HTTP/1.0\r\n\r\n").endswith(b"Connection: close\r\n\r\nOK\n")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"garbage\r\n\r\n", b"400"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", b"405"),
    (b"BREW /metrics HTTP/1.1\r\n\r\n", b"501"),
    (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", b"413"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
])
def test_bad_requests_get_a_status_and_a_closed_connection(served: tuple[int, Scrapes], request_bytes: bytes,
                                                           status: bytes) -> None:
    port, scrapes = served
    out = raw(port, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status), out[:80]
    assert b"Connection: close\r\n" in out
    assert scrapes.deadlines == []
    assert raw(port, b"GET /-/ready HTTP/1.0\r\n\r\n").endswith(b"OK\n")  # and the server goes on


def test_a_get_body_is_read_and_ignored(served: tuple[int, Scrapes]) -> None:
    port, _ = served
    out = raw(port, b"GET /-/healthy HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                    b"GET /-/healthy HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 2


def test_a_failing_collection_is_a_500_and_the_server_goes_on(served: tuple[int, Scrapes]) -> None:
    port, scrapes = served
    scrapes.fail = True
    assert raw(port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500 ")
    scrapes.fail = False
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Encoding") == "gzip"
    assert b"nvidia_gpu_up" in gzip.decompress(r.read())


@pytest.mark.parametrize("served", [Limits(request_timeout=0.5)], indirect=True)
def test_a_request_trickled_in_is_cut_off_after_the_timeout(served: tuple[int, Scrapes]) -> None:
    port, _ = served
    head = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"y" * 200  # never whole: ~230 bytes 50 ms apart, >10 s
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        out, sent = b"", 0
        for byte in head:
            s.sendall(bytes([byte]))
            sent += 1
            # each byte well inside the timeout, the whole head not; stop once the server has answered
            if select.select([s], [], [], 0.05)[0]:
                break
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 408 "), out[:60]
    # answered while bytes still came (a timeout per read never fires then): the whole head's deadline
    assert sent < len(head), sent


@pytest.mark.parametrize("served", [2], indirect=True)
def test_connections_past_the_limit_get_a_503_until_one_closes(served: tuple[int, Scrapes]) -> None:
    port, _ = served
    held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    for conn in held:  # each kept alive after its scrape, holding a connection thread
        conn.request("GET", "/-/healthy")
        assert conn.getresponse().read() == b"OK\n"
    assert raw(port, b"GET /-/healthy HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    held.pop().close()
    deadline = time.monotonic() + 5
    while (out := raw(port, b"GET /-/healthy HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 503"):
        assert time.monotonic() < deadline, "the closed connection's slot never came back"
        time.sleep(0.02)
    assert out.endswith(b"OK\n")
    held[0].request("GET", "/-/healthy")  # the one still held is served as before
    assert held[0].getresponse().read() == b"OK\n"
    held[0].close()
