"""`nvml-remediator`: an Alertmanager webhook receiver that drains, signals and resets — safely.

    nvml-remediator --config FILE --auth.token-file FILE [--execute] ...
    nvml-remediator check-config FILE
    nvml-remediator reset-breaker [--storage.path DIR]
    nvml-remediator resume --config FILE NODE     (only nodes it drained itself)

Separate from the exporter on purpose: it imports nothing of the collector and runs with the
privileges its enabled actions need, no more.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from .. import __version__, logs, webconfig
from ..webconfig import parse_listen_address
from . import policy as policy_mod
from .engine import Engine, PayloadError, Runner, plan, resume
from .store import Audit, Store

log = logging.getLogger("nvml_remediator")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("nvml_remediator_webhooks_received", "Webhook requests, by how they were answered.",
                                ["result"], registry=self.registry)
        self.alerts = Counter("nvml_remediator_alerts", "Alerts received, by what became of them.", ["outcome"],
                              registry=self.registry)
        self.actions = Counter("nvml_remediator_actions", "Steps carried out or refused, by action and result.",
                               ["action", "result"], registry=self.registry)
        self.breaker = Gauge("nvml_remediator_circuit_breaker_open", "1 while the circuit breaker stops all actions.",
                             registry=self.registry)
        self.queue = Gauge("nvml_remediator_queue_depth", "Jobs queued or running.", registry=self.registry)
        self.dry_run = Gauge("nvml_remediator_dry_run", "1 when actions are only logged (no --execute).",
                             registry=self.registry)
        self.info = Gauge("nvml_remediator_build_info", "Build of the remediator; always 1.", ["version"],
                          registry=self.registry)
        self.info.labels(__version__).set(1)


class App:
    def __init__(self, engine: Engine, metrics: Metrics, token: str | None, web: webconfig.WebConfig,
                 max_bytes: int):
        self.engine, self.metrics, self.token, self.web, self.max_bytes = engine, metrics, token, web, max_bytes

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return self.web.authorized(header)  # mTLS or basic auth from the web config, or --insecure-no-auth
        presented = header[7:] if header and header.startswith("Bearer ") else ""
        return hmac.compare_digest(presented.encode(), self.token.encode())


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    timeout = 30
    server_version = f"nvml-remediator/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format % args)

    def _send(self, code: int, body: dict[str, Any] | bytes, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in self.server.app.web.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        app = self.server.app
        if self.path == "/metrics":
            app.metrics.breaker.set(1 if app.engine.store.breaker() else 0)
            app.metrics.queue.set(app.engine.store.queue_depth())
            self._send(200, generate_latest(app.metrics.registry), CONTENT_TYPE_LATEST)
        elif self.path in ("/-/healthy", "/-/ready"):
            self._send(200, b"OK\n", "text/plain")
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        app = self.server.app
        m = app.metrics

        def refuse(code: int, result: str, message: str) -> None:
            m.received.labels(result).inc()
            app.engine.audit.write("request_refused", status=code, reason=message, peer=self.client_address[0])
            self._send(code, {"error": message})

        if self.path != "/webhook":
            return refuse(404, "not_found", "POST to /webhook")
        if not app.authorized(self.headers.get("Authorization")):
            return refuse(401, "unauthorized", "missing or wrong credentials")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return refuse(411, "bad_request", "Content-Length required")
        if length > app.max_bytes:
            return refuse(413, "too_large", f"body of {length} bytes is over the limit of {app.max_bytes}")
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return refuse(400, "bad_request", f"body is not JSON: {e}")
        try:
            verdicts = plan(payload, app.engine.policy, app.engine.audit)
        except PayloadError as e:
            return refuse(400, "bad_request", str(e))
        try:
            fresh = app.engine.store.enqueue([(p.key, p.node, p.rule, p.alert, p.steps) for p in verdicts.planned])
        except Exception as e:  # the one case Alertmanager should retry: we could not queue durably
            log.exception("cannot queue")
            m.received.labels("unavailable").inc()
            return self._send(503, {"error": f"cannot queue: {e}"})
        for p, new in zip(verdicts.planned, fresh, strict=True):
            app.engine.audit.write("queued" if new else "duplicate", key=p.key, node=p.node, rule=p.rule)
            if not new:
                verdicts.skip("duplicate")
        queued = sum(fresh)
        m.alerts.labels("queued").inc(queued)
        for why, n in verdicts.skipped.items():
            m.alerts.labels(why).inc(n)
        m.received.labels("accepted").inc()
        app.engine.notify()
        self._send(200, {"queued": queued, "skipped": verdicts.skipped})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        ctx = self.app.web.ssl_context
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True)
        return sock, addr


# The state directory: the packaged unit's StateDirectory= (/var/lib/ + its name), which
# tests/test_remediator_state.py holds equal to these, so that `reset-breaker` with no flag opens the service's
# database. STATE_FILE is the SQLite queue, keys, cooldowns and breaker inside it.
DEFAULT_STORAGE = "/var/lib/prometheus-nvml-remediator"
DEFAULT_AUDIT_LOG = DEFAULT_STORAGE + "/audit.jsonl"
STATE_FILE = "remediator.sqlite"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(argv: Sequence[str]) -> int:
    p = _Parser(prog="nvml-remediator", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="policy file (YAML)")
    p.add_argument("--web.listen-address", dest="listen", default="127.0.0.1:9401")
    p.add_argument("--web.config.file", dest="web_config",
                   help="TLS / mTLS (client_auth_type) in exporter-toolkit form")
    p.add_argument("--web.max-request-bytes", dest="max_bytes", type=int, default=1 << 20)
    p.add_argument("--auth.token-file", dest="token_file", help="file holding the bearer token Alertmanager sends")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow no authentication (loopback only)")
    p.add_argument("--audit.log", dest="audit_log", default=DEFAULT_AUDIT_LOG)
    p.add_argument("--storage.path", dest="storage", default=DEFAULT_STORAGE)
    p.add_argument("--execute", action="store_true", help="really run actions (default: dry run, log only)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--log.level", dest="log_level", choices=sorted(logs.LEVELS), default="info")
    p.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt")
    args = p.parse_args(argv)
    logs.setup(args.log_level, args.log_format, "nvml-remediator")
    try:
        host, port = parse_listen_address(args.listen)
    except ValueError as e:
        p.error(str(e))
    policy = _policy(p, args.config)
    try:
        web = webconfig.load(args.web_config) if args.web_config else webconfig.WebConfig()
    except webconfig.WebConfigError as e:
        p.error(str(e))
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            p.error(f"--auth.token-file: {e.strerror}")
        if len(token) < 16:
            p.error("--auth.token-file: the token must be at least 16 characters")
    mtls = web.ssl_context is not None and web.ssl_context.verify_mode == 2  # ssl.CERT_REQUIRED
    if token is None and not mtls and not web.users:
        if not args.insecure_no_auth:
            p.error("refusing to start without authentication: give --auth.token-file (or mTLS / basic auth in "
                    "--web.config.file)")
        if not _loopback(host):
            p.error("--insecure-no-auth is only allowed on a loopback address")
    try:
        os.makedirs(args.storage, exist_ok=True)
        store = Store(os.path.join(args.storage, STATE_FILE))
        audit = Audit(args.audit_log)
    except OSError as e:
        p.error(f"cannot open state: {e}")
    metrics = Metrics()
    metrics.dry_run.set(0 if args.execute else 1)
    runner = Runner({"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"})
    engine = Engine(policy, store, audit, execute=args.execute, runner=runner, workers=args.workers,
                    on_outcome=lambda action, result: metrics.actions.labels(action, result).inc())
    try:
        server = Server((host, port), App(engine, metrics, token, web, args.max_bytes))
    except OSError as e:
        print(f"nvml-remediator: error: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 1

    def stop(signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    engine.start()
    audit.write("started", execute=args.execute, rules=[r.name for r in policy.rules], version=__version__)
    log.info("listening", extra={"address": f"{host}:{server.server_address[1]}", "execute": args.execute,
                                  "rules": len(policy.rules)})
    try:
        server.serve_forever()
    finally:
        engine.stop()
        server.server_close()
    return 0


def _policy(p: argparse.ArgumentParser, path: str) -> policy_mod.Policy:
    """The policy, valid and with every command it needs on this host, or one line and exit 2."""
    try:
        policy = policy_mod.load(path)
    except policy_mod.PolicyError as e:
        p.error(str(e))
    missing = policy_mod.missing_commands(policy)
    if missing:
        p.error(f"{path}: missing command(s): {', '.join(missing)}")
    return policy


def check_config(argv: Sequence[str]) -> int:
    p = _Parser(prog="nvml-remediator check-config", allow_abbrev=False)
    p.add_argument("file")
    args = p.parse_args(argv)
    policy = _policy(p, args.file)
    print(f"{args.file}: OK, {len(policy.rules)} rule(s), scheduler {policy.scheduler}")
    return 0


def resume_node(argv: Sequence[str]) -> int:
    p = _Parser(prog="nvml-remediator resume", allow_abbrev=False,
                description="Return a node to service, only if nvml-remediator drained it.")
    p.add_argument("--config", required=True)
    p.add_argument("node")
    args = p.parse_args(argv)
    policy = _policy(p, args.config)
    ok, message = resume(policy, args.node, Runner({"PATH": os.environ.get("PATH", "/usr/bin:/bin")}))
    print(message)
    return 0 if ok else 1


def reset_breaker(argv: Sequence[str]) -> int:
    p = _Parser(prog="nvml-remediator reset-breaker", allow_abbrev=False,
                description="Close the circuit breaker of the remediator whose state is in --storage.path.")
    p.add_argument("--storage.path", dest="storage", default=DEFAULT_STORAGE,
                   help=f"the service's state directory (default: {DEFAULT_STORAGE}, the packaged unit's)")
    args = p.parse_args(argv)
    path = os.path.join(args.storage, STATE_FILE)
    if not os.path.isfile(path):  # opening it would make an empty database and "reset" nothing
        print(f"{p.prog}: error: no remediator state at {path}: give the --storage.path the service runs with",
              file=sys.stderr)
        return 1
    try:
        store = Store(path)
    except sqlite3.Error as e:
        print(f"{p.prog}: error: cannot open {path}: {e}", file=sys.stderr)
        return 1
    try:
        was = store.breaker()
        store.reset_breaker()
    except sqlite3.Error as e:
        print(f"{p.prog}: error: {path}: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print("circuit breaker reset" + (f" (was open: {was[1]})" if was else " (was closed)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])
    if argv[:1] == ["reset-breaker"]:
        return reset_breaker(argv[1:])
    if argv[:1] == ["resume"]:
        return resume_node(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    raise SystemExit(main())
