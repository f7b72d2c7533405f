"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit file format.

    tls_server_config: {cert_file, key_file, client_ca_file, client_auth_type, min_version, max_version}
    http_server_config: {headers: {Name: value}}
    basic_auth_users: {user: <bcrypt hash>}

Unknown keys are errors, as in exporter-toolkit, so a typo never silently turns security off.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .configfile import ConfigError, load_yaml, mapping, no_unknown

# PyYAML and bcrypt are imported where a web config is used, so the exporter runs without them when
# it has none (a bare GPU host with only prometheus-client and nvidia-ml-py, for example).


class WebConfigError(ConfigError):
    pass


_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version",
             "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


class Auth(enum.Enum):
    OK = "ok"
    DENIED = "denied"  # answer 401
    BUSY = "busy"  # every hash slot taken for HASH_WAIT: answer 503, the client tries again


HASH_SLOTS = 2  # bcrypt checks at once: each takes a core for its cost (~0.3 s at cost 12)
HASH_WAIT = 1.0  # seconds a request waits for a slot before it is answered BUSY
_MAX_PASSWORD = 72  # bytes bcrypt reads; bcrypt 5 raises past it, older ones cut the rest silently
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


@dataclass
class WebConfig:
    """TLS, extra headers and basic-auth users. Credentials that passed are cached (as a digest), like
    exporter-toolkit, so the scraper's every request after the first costs no bcrypt. Checks that need
    bcrypt run at most `hash_slots` at a time; one that cannot get a slot within `hash_wait` seconds is
    BUSY, so a flood of wrong passwords costs at most that many cores and never delays cached ones."""

    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    hash_slots: int = HASH_SLOTS
    hash_wait: float = HASH_WAIT
    _ok_cache: set[bytes] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _slots: threading.Semaphore = field(init=False, repr=False)
    _dummy: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.hash_slots)

    def authorized(self, authorization: str | None) -> bool:
        """Whether an Authorization header passes basic_auth_users (True when none are configured)."""
        return self.check(authorization) is Auth.OK

    def check(self, authorization: str | None) -> Auth:
        """An Authorization header against basic_auth_users (OK when none are configured)."""
        if not self.users:
            return Auth.OK
        if not authorization or not authorization.startswith("Basic "):
            return Auth.DENIED
        try:
            user, _, password = base64.b64decode(authorization[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return Auth.DENIED
        secret = password.encode()
        if len(secret) > _MAX_PASSWORD or b"\0" in secret:  # no bcrypt hash can match: no work for it
            return Auth.DENIED
        digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if digest in self._ok_cache:
                return Auth.OK
        if not self._slots.acquire(timeout=self.hash_wait):
            return Auth.BUSY
        try:
            import bcrypt

            hashed = self.users.get(user)
            # an unknown user costs what a wrong password does, so that user names cannot be told by time
            ok = bcrypt.checkpw(secret, hashed if hashed is not None else self._dummy_hash())
        except ValueError:  # a hash load() would have refused, given to WebConfig directly: no match
            ok = False
        finally:
            self._slots.release()
        if not ok or hashed is None:
            return Auth.DENIED
        with self._lock:
            self._ok_cache.add(digest)
        return Auth.OK

    def _dummy_hash(self) -> bytes:
        """A real hash at the highest cost of the configured users' (made once, in a hash slot)."""
        if self._dummy is None:
            import bcrypt

            self._dummy = bcrypt.hashpw(b"unknown user", bcrypt.gensalt(max(map(_cost, self.users.values()))))
        return self._dummy


def _mapping(value: Any, where: str) -> dict[str, Any]:
    return mapping(value, where, WebConfigError)


def _unknown(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    no_unknown(d, allowed, where, WebConfigError)


def _tls(cfg: dict[str, Any], base: str) -> ssl.SSLContext:
    _unknown(cfg, _TLS_KEYS, "tls_server_config")

    def path(key: str) -> str:
        p = cfg.get(key)
        if not isinstance(p, str) or not p:
            raise WebConfigError(f"tls_server_config: {key} is required")
        p = os.path.join(base, p)
        if not os.access(p, os.R_OK):
            raise WebConfigError(f"tls_server_config: cannot read {key} {p}")
        return p

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(path("cert_file"), path("key_file"))
    except ssl.SSLError as e:
        raise WebConfigError(f"tls_server_config: bad certificate or key: {e.reason or e}") from None
    for key, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in cfg:
            if cfg[key] not in _TLS_VERSIONS:
                raise WebConfigError(f"tls_server_config: {key} must be one of {', '.join(_TLS_VERSIONS)}")
            setattr(ctx, attr, _TLS_VERSIONS[cfg[key]])
    auth = cfg.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config: client_auth_type must be one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if ctx.verify_mode != ssl.CERT_NONE:
        ctx.load_verify_locations(path("client_ca_file"))
    return ctx


def load(path: str) -> WebConfig:
    raw = load_yaml(path, WebConfigError)
    top = _mapping(raw, path)
    _unknown(top, {"tls_server_config", "http_server_config", "basic_auth_users"}, path)
    base = os.path.dirname(os.path.abspath(path))
    tls = _mapping(top.get("tls_server_config"), "tls_server_config")
    http = _mapping(top.get("http_server_config"), "http_server_config")
    _unknown(http, {"headers", "http2"}, "http_server_config")
    headers = _mapping(http.get("headers"), "http_server_config.headers")
    users: dict[str, bytes] = {}
    for user, hashed in _mapping(top.get("basic_auth_users"), "basic_auth_users").items():
        if not isinstance(hashed, str) or not (m := _BCRYPT.fullmatch(hashed)) or not 4 <= int(m[1]) <= 31:
            raise WebConfigError(f"basic_auth_users: {user}: password must be a bcrypt hash ($2y$...)")
        users[str(user)] = hashed.encode()
    web = WebConfig(
        ssl_context=_tls(tls, base) if tls else None,
        users=users,
        headers={str(k): str(v) for k, v in headers.items()},
    )
    if users:
        web._dummy_hash()  # now, not in the first unknown user's check, which would take twice as long
    return web


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9400', '0.0.0.0:9400', 'localhost:9400', '[::1]:9400' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {value!r}: want [host]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
