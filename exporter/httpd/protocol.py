"""HTTP/1.1 messages as RFC 9112 reads them: the request head, its body length, content coding.

Plain byte operations, no email-package header parsing: this runs on every scrape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server. Every limit answers the client with a status, never a hang."""

    request_timeout: float = 30.0  # seconds for a whole request, head and body (and the TLS handshake for the
    # first request on a connection) from its first byte: a client trickling a byte at a time gets a 408
    idle_timeout: float = 30.0  # seconds a kept-alive connection may wait for its next request
    max_head: int = 16384  # bytes of request line and headers (431 past it); Prometheus sends a few hundred
    max_body: int = 65536  # bytes of request body (413 past it)
    max_connections: int = 64  # connections served at once, a thread each (503 past it)
    linger: float = 1.0  # seconds, after an error answer, spent reading what the client still sends, so
    # that closing does not reset the connection before the client has read the answer

    def __post_init__(self) -> None:
        for name in ("request_timeout", "idle_timeout", "linger"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_head", "max_body", "max_connections"):
            if getattr(self, name) < (0 if name == "max_body" else 1):
                raise ValueError(f"{name} must be positive")


class BadRequest(Exception):
    """A request the server refuses: answered with `code` and the connection closed."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "
    path: str  # the target's path: origin form /metrics?x or absolute form http://host:port/metrics
    body: bytes = b""  # read whole, up to Limits.max_body, before the application sees the request

    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           409: "Conflict", 411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Content", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAX_LENGTH_DIGITS = 18  # fits any body a server would take; int() of more is the client's way to a ValueError


def _path(target: str) -> str:
    if target.startswith("/"):
        return target.split("?", 1)[0]
    try:
        return urlsplit(target).path  # absolute form: http://host:port/metrics
    except ValueError:  # http://[::1/metrics: an unclosed IPv6 literal
        raise BadRequest(400, "malformed request target") from None


def parse_head(head: bytes) -> Request:
    """The request line and headers (up to, not including, the blank line)."""
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
    return Request(method, target, version, headers, _path(target))


def content_length(request: Request, limit: int) -> int:
    """The body's length: ASCII digits only (str.isdigit() also takes '²', which int() refuses), at most
    18 of them, and at most `limit`. No chunked bodies: no client of ours sends one."""
    if "transfer-encoding" in request.headers:
        raise BadRequest(400, "Transfer-Encoding is not accepted; send Content-Length")
    value = request.headers.get("content-length")
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS):
        raise BadRequest(400, "bad Content-Length")  # also -1, 5,000 digits and "5, 5" (two headers)
    length = int(value)
    if length > limit:
        raise BadRequest(413, f"request body over the limit of {limit} bytes")
    return length


@functools.lru_cache(maxsize=64)
def accepts_gzip(accept_encoding: str) -> bool:
    """Whether Accept-Encoding allows gzip, q-values read (RFC 9110 12.5.3): `gzip;q=0` or `*;q=0`
    with no gzip listed mean no. Cached: a scraper sends the same header every time."""
    if accept_encoding == "gzip":
        return True
    star: float | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if coding not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0  # a weight we cannot read is not a yes
        if coding == "*":
            star = q
        else:
            return q > 0
    return star is not None and star > 0
