"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit file format.

    tls_server_config: {cert_file, key_file, client_ca_file, client_auth_type, min_version, max_version}
    http_server_config: {headers: {Name: value}}
    basic_auth_users: {user: <bcrypt hash>}

Unknown keys are errors, as in exporter-toolkit, so a typo never silently turns security off.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
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


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> bytes:
    """A real hash to check unknown users against, so a wrong user costs as long as a wrong password."""
    import bcrypt

    return bcrypt.hashpw(b"unknown user", bcrypt.gensalt(10))


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    _ok_cache: set[bytes] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def authorized(self, authorization: str | None) -> bool:
        """Check an Authorization header against basic_auth_users (True when none are configured).
        bcrypt is slow on purpose; a digest of credentials that passed is cached, like exporter-toolkit."""
        if not self.users:
            return True
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(authorization[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if digest in self._ok_cache:
                return True
        import bcrypt

        hashed = self.users.get(user)
        ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else _dummy_hash())
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._ok_cache.add(digest)
        return ok


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
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"basic_auth_users: {user}: password must be a bcrypt hash ($2y$...)")
        users[str(user)] = hashed.encode()
    return WebConfig(
        ssl_context=_tls(tls, base) if tls else None,
        users=users,
        headers={str(k): str(v) for k, v in headers.items()},
    )


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9400', '0.0.0.0:9400', 'localhost:9400', '[::1]:9400' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {value!r}: want [host]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
