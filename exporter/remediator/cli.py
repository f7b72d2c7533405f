"""`nvml-remediator`: an Alertmanager webhook receiver that drains, signals and resets — safely.

    nvml-remediator --config FILE --auth.token-file FILE [--execute] ...
    nvml-remediator check-config FILE
    nvml-remediator reset-breaker [--storage.path DIR]
    nvml-remediator resume --config FILE NODE     (only nodes it drained itself)
    nvml-remediator agent --config FILE --alertmanager.url URL ...   (the node agent: agent.py)

Separate from the exporter on purpose: it imports nothing of the collector and runs with the
privileges its enabled actions need, no more.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from .. import __version__, logs, webconfig
from ..argtypes import Parser, duration, listen_address, positive_int
from ..httpd import TEXT, Exchange, Limits, Server
from . import policy as policy_mod
from .engine import Engine, Runner, resume
from .plan import PayloadError, plan
from .store import StorageError, StorageHealth, Store, open_state

log = logging.getLogger("nvml_remediator")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("nvml_remediator_webhooks_received", "Webhook requests, by how they were answered.",
                                ["result"], registry=self.registry)
        self.refused = Counter("nvml_remediator_requests_refused",
                               "Requests refused (any path), by HTTP status: counted here and logged at most "
                               "every 10 s, never written to the audit log.", ["code"], registry=self.registry)
        self.alerts = Counter("nvml_remediator_alerts", "Alerts received, by what became of them.", ["outcome"],
                              registry=self.registry)
        self.actions = Counter("nvml_remediator_actions", "Steps carried out or refused, by action and result.",
                               ["action", "result"], registry=self.registry)
        self.breaker = Gauge("nvml_remediator_circuit_breaker_open", "1 while the circuit breaker stops all actions.",
                             registry=self.registry)
        self.queue = Gauge("nvml_remediator_queue_depth", "Jobs queued or running.", registry=self.registry)
        self.storage_ok = Gauge("nvml_remediator_storage_ok",
                                "1 while the queue and the audit log can be written; 0 while not (a full disk): "
                                "webhooks are answered 503 and no job runs.", registry=self.registry)
        self.storage_errors = Counter("nvml_remediator_storage_errors",
                                      "Failed writes of the remediator's state, by store (queue, audit).",
                                      ["store"], registry=self.registry)
        self.dry_run = Gauge("nvml_remediator_dry_run", "1 when actions are only logged (no --execute).",
                             registry=self.registry)
        self.info = Gauge("nvml_remediator_build_info", "Build of the remediator; always 1.", ["version"],
                          registry=self.registry)
        self.info.labels(__version__).set(1)
        self.storage_ok.set(1)
        for store in ("queue", "audit"):
            self.storage_errors.labels(store)


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
        return cls(status, (json.dumps(body) + "\n").encode(), "application/json", headers or {})


class App:
    """The remediator's routes, on the shared HTTP layer (httpd), which reads each request whole under
    one deadline, caps connections, does TLS off the accept loop and refuses what is malformed. Routes:
    POST /webhook and GET /metrics (both need the credentials), /-/healthy and /-/ready (open: they
    tell only whether it runs and can queue)."""

    def __init__(self, engine: Engine, metrics: Metrics, token: str | None, web: webconfig.WebConfig):
        self.engine, self.metrics, self.token, self.web = engine, metrics, token, web
        self.refusals = logs.RateLimited(log, interval=10.0)

    def auth(self, header: str | None) -> webconfig.Auth:
        if self.token is None:
            return self.web.check(header)  # mTLS or basic auth from the web config, or --insecure-no-auth
        presented = header[7:] if header and header.startswith("Bearer ") else ""
        ok = hmac.compare_digest(presented.encode(), self.token.encode())
        return webconfig.Auth.OK if ok else webconfig.Auth.DENIED

    def refused(self, status: int, message: str, peer: str = "") -> None:
        """Every refusal, the layer's (bad request, 408, 413, too many connections) and the routes', is
        counted and logged at most once per status per 10 s — never audited: the audit log is fsynced,
        and an unauthenticated client must not be able to fill the disk with it."""
        self.metrics.refused.labels(str(status)).inc()
        self.refusals.log(logging.WARNING, "request refused", key=status,
                          extra={"status": status, "reason": message, **({"peer": peer} if peer else {})})

    def __call__(self, ex: Exchange) -> None:
        req = ex.request
        authorization = req.headers.get("authorization")
        if req.method in ("GET", "HEAD"):
            answer = self.get(req.path, authorization, ex.peer)
        elif req.method == "POST" and req.path == "/webhook":
            if "content-length" not in req.headers:
                answer = self._refuse(411, "bad_request", "Content-Length required", ex.peer)
            else:
                answer = self.webhook(authorization, req.body, ex.peer)
        elif req.method == "POST":
            answer = self._refuse(404, "not_found", "POST to /webhook", ex.peer)
        else:
            answer = self._refuse(405, None, "GET, HEAD or POST", ex.peer, {"Allow": "GET, HEAD, POST"})
        ex.respond(answer.status, answer.body, answer.content_type, answer.headers)

    def _refuse(self, status: int, result: str | None, message: str, peer: str,
                headers: dict[str, str] | None = None) -> Answer:
        if result is not None:
            self.metrics.received.labels(result).inc()
        self.refused(status, message, peer)
        return Answer.json(status, {"error": message}, headers)

    def _unauthorized(self, auth: webconfig.Auth, result: str | None, peer: str) -> Answer:
        if auth is webconfig.Auth.BUSY:  # every bcrypt slot taken: try again (Alertmanager retries a 503)
            return self._refuse(503, result and "unavailable", "too many password checks at once; try again",
                                peer, {"Retry-After": "1"})
        challenge = {"WWW-Authenticate": 'Basic realm="nvml-remediator"'} if self.token is None else {}
        return self._refuse(401, result, "missing or wrong credentials", peer, challenge)

    def get(self, path: str, authorization: str | None, peer: str) -> Answer:
        if path in ("/-/healthy", "/-/ready"):
            health = self.engine.health
            if path == "/-/ready" and not health.healthy:
                return Answer(503, f"cannot write the remediator's state: {health.reason()}\n".encode(), TEXT)
            return Answer(200, b"OK\n", TEXT)
        if path != "/metrics":
            return self._refuse(404, None, "not found", peer)
        auth = self.auth(authorization)
        if auth is not webconfig.Auth.OK:
            return self._unauthorized(auth, None, peer)
        m, store = self.metrics, self.engine.store
        m.storage_ok.set(1 if self.engine.health.healthy else 0)
        try:
            m.breaker.set(1 if store.breaker() else 0)
            m.queue.set(store.queue_depth())
        except StorageError as e:  # the rest of the page still says what is wrong
            log.debug("cannot read the queue for /metrics", extra={"error": str(e)})
        return Answer(200, generate_latest(m.registry), CONTENT_TYPE_LATEST)

    def webhook(self, authorization: str | None, body: bytes, peer: str) -> Answer:
        """The body was read whole by the layer (at most --web.max-request-bytes, else 413)."""
        app, m = self.engine, self.metrics
        auth = self.auth(authorization)
        if auth is not webconfig.Auth.OK:
            return self._unauthorized(auth, "unauthorized", peer)
        try:
            payload = json.loads(body)
        except RecursionError:
            return self._refuse(400, "bad_request", "body is not JSON: nested too deeply", peer)
        except ValueError as e:  # also a number past Python's int-string limit, and bytes that are not UTF-8
            return self._refuse(400, "bad_request", f"body is not JSON: {e}", peer)
        try:
            verdicts = plan(payload, app.policy, app.audit)
            fresh = app.store.enqueue([(p.key, p.node, p.rule, p.alert, p.steps) for p in verdicts.planned])
            for p, new in zip(verdicts.planned, fresh, strict=True):
                app.audit.write("queued" if new else "duplicate", key=p.key, node=p.node, rule=p.rule)
        except PayloadError as e:
            return self._refuse(400, "bad_request", str(e), peer)
        except RecursionError:
            return self._refuse(400, "bad_request", "payload nested too deeply", peer)
        except StorageError as e:
            # the one case Alertmanager should retry: the alerts could not be queued and audited durably
            # (what was queued before the failure is a duplicate on the retry, and runs once)
            m.received.labels("unavailable").inc()
            m.refused.labels("503").inc()
            return Answer.json(503, {"error": f"cannot record the alerts durably ({e}); retry later"})
        for _ in range(fresh.count(False)):
            verdicts.skip("duplicate")
        queued = sum(fresh)
        m.alerts.labels("queued").inc(queued)
        for why, n in verdicts.skipped.items():
            m.alerts.labels(why).inc(n)
        m.received.labels("accepted").inc()
        app.notify()
        return Answer.json(200, {"queued": queued, "skipped": verdicts.skipped})


# The state directory: the packaged unit's StateDirectory= (/var/lib/ + its name), which
# tests/test_remediator_state.py holds equal to these, so that `reset-breaker` with no flag opens the service's
# database. STATE_FILE is the SQLite queue, keys, cooldowns and breaker inside it.
DEFAULT_STORAGE = "/var/lib/prometheus-nvml-remediator"
DEFAULT_AUDIT_LOG = DEFAULT_STORAGE + "/audit.jsonl"
STATE_FILE = "remediator.sqlite"


def read_token(p: argparse.ArgumentParser, path: str | None, flag: str) -> str | None:
    """The token in the file a flag names (None without the flag); an unreadable file is a usage error."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        p.error(f"{flag}: {e.strerror}")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(argv: Sequence[str]) -> int:
    p = Parser(prog="nvml-remediator", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="policy file (YAML)")
    p.add_argument("--web.listen-address", dest="listen", type=listen_address, default="127.0.0.1:9401")
    p.add_argument("--web.config.file", dest="web_config",
                   help="TLS / mTLS (client_auth_type) in exporter-toolkit form")
    p.add_argument("--web.max-request-bytes", dest="max_bytes", type=positive_int, default=1 << 20,
                   help="largest webhook body accepted (413 past it; default 1 MiB)")
    p.add_argument("--web.max-connections", dest="max_connections", type=positive_int, default=64,
                   help="connections served at once; more get a 503 (default 64)")
    p.add_argument("--web.request-timeout", dest="request_timeout", type=duration, default=30.0,
                   help="a whole request (TLS handshake, head and body) must arrive within this; 408 past it "
                        "(default 30s)")
    p.add_argument("--auth.token-file", dest="token_file", help="file holding the bearer token Alertmanager sends")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow no authentication (loopback only)")
    p.add_argument("--audit.log", dest="audit_log", default=DEFAULT_AUDIT_LOG)
    p.add_argument("--storage.path", dest="storage", default=DEFAULT_STORAGE)
    p.add_argument("--execute", action="store_true", help="really run actions (default: dry run, log only)")
    p.add_argument("--workers", type=positive_int, default=4, help="jobs run at once (never two on one node)")
    p.add_argument("--log.level", dest="log_level", choices=sorted(logs.LEVELS), default="info")
    p.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt")
    args = p.parse_args(argv)
    logs.setup(args.log_level, args.log_format, "nvml-remediator")
    host, port = args.listen
    policy = load_policy(p, args.config)
    try:
        web = webconfig.load(args.web_config) if args.web_config else webconfig.WebConfig()
    except webconfig.WebConfigError as e:
        p.error(str(e))
    token = read_token(p, args.token_file, "--auth.token-file")
    if token is not None and len(token) < 16:
        p.error("--auth.token-file: the token must be at least 16 characters")
    mtls = web.ssl_context is not None and web.ssl_context.verify_mode == 2  # ssl.CERT_REQUIRED
    if token is None and not mtls and not web.users:
        if not args.insecure_no_auth:
            p.error("refusing to start without authentication: give --auth.token-file (or mTLS / basic auth in "
                    "--web.config.file)")
        if not _loopback(host):
            p.error("--insecure-no-auth is only allowed on a loopback address")
    metrics = Metrics()
    metrics.dry_run.set(0 if args.execute else 1)
    health = StorageHealth(on_error=lambda store: metrics.storage_errors.labels(store).inc())
    try:
        store, audit = open_state(args.storage, STATE_FILE, args.audit_log, health)
    except StorageError as e:
        p.error(str(e))
    runner = Runner()
    engine = Engine(policy, store, audit, execute=args.execute, runner=runner, workers=args.workers,
                    on_outcome=lambda action, result: metrics.actions.labels(action, result).inc())
    app = App(engine, metrics, token, web)
    limits = Limits(request_timeout=args.request_timeout, idle_timeout=args.request_timeout, max_body=args.max_bytes,
                    max_connections=args.max_connections)
    try:
        server = Server((host, port), app, limits=limits, ssl_context=web.ssl_context, headers=web.headers,
                        server_header=f"nvml-remediator/{__version__}", on_refused=app.refused)
    except OSError as e:
        print(f"nvml-remediator: error: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 1

    def stop(signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        engine.start()
        audit.write("started", execute=args.execute, rules=[r.name for r in policy.rules], version=__version__)
    except StorageError as e:  # a full disk at start: say so and let systemd try again
        server.server_close()
        p.error(f"cannot write state: {e}")
    log.info("listening", extra={"address": f"{host}:{server.server_address[1]}", "execute": args.execute,
                                  "rules": len(policy.rules)})
    try:
        server.serve_forever()
    finally:
        # No new webhook, job or step; a running step finishes within its timeout (the unit's
        # TimeoutStopSec covers the longest), its job resumes at its next step at the next start.
        server.server_close()
        engine.stop()
        engine.join()
        with contextlib.suppress(StorageError):  # already logged and counted; nothing to do on the way out
            audit.write("stopped")
    log.info("stopped")
    return 0


def load_policy(p: argparse.ArgumentParser, path: str) -> policy_mod.Policy:
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
    p = Parser(prog="nvml-remediator check-config", allow_abbrev=False)
    p.add_argument("file")
    args = p.parse_args(argv)
    policy = load_policy(p, args.file)
    print(f"{args.file}: OK, {len(policy.rules)} rule(s), scheduler {policy.scheduler}")
    return 0


def resume_node(argv: Sequence[str]) -> int:
    p = Parser(prog="nvml-remediator resume", allow_abbrev=False,
                description="Return a node to service, only if nvml-remediator drained it.")
    p.add_argument("--config", required=True)
    p.add_argument("node")
    args = p.parse_args(argv)
    policy = load_policy(p, args.config)
    ok, message = resume(policy, args.node, Runner())
    print(message)
    return 0 if ok else 1


def reset_breaker(argv: Sequence[str]) -> int:
    p = Parser(prog="nvml-remediator reset-breaker", allow_abbrev=False,
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
    except (StorageError, sqlite3.Error) as e:
        print(f"{p.prog}: error: cannot open {path}: {e}", file=sys.stderr)
        return 1
    try:
        was = store.breaker()
        store.reset_breaker()
    except (StorageError, sqlite3.Error) as e:
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
    if argv[:1] == ["agent"]:
        from .agent import serve_agent

        return serve_agent(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    raise SystemExit(main())
