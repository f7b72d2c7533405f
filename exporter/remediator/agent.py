"""`nvml-remediator agent`: the node-local half of remediation, one per GPU node.

    nvml-remediator agent --config FILE --alertmanager.url URL [--alertmanager.url URL2] [--node NAME]
                          [--alertmanager.token-file F] [--alertmanager.ca-file F] [--execute] ...

It pulls its own node's firing alerts from Alertmanager's API v2 (every URL of an HA pair; the same alert
from both is one alert: fingerprint + startsAt) and feeds them to the same policy engine as the webhook,
with the same rails (dry run by default, idempotency, cooldowns, circuit breaker, audit, label validation,
per-step commits). It runs the node-local steps only: it signals the GPU's processes, waits for the
central remediator's drain, and resets the GPU safely (nodesteps.py):

    exporter releases NVML (control socket) -> holders stopped (systemctl) -> no compute process on any
    GPU, node drained -> nvidia-smi --gpu-reset -i UUID -> confirmed (recovery action None) ->
    holders restarted and the exporter reacquires, whatever happened -> acknowledgement line in the
    journal (the exporter records it in the GPU's incident history) -> resume (policy) or escalate.

The outcome reaches the incident history through the journal line ("GPU reset executed: UUID, success:
…", NVSentinel's convention), not by opening the exporter's database: the exporter stays its only writer,
the line survives an exporter that is restarting (its journal backfill reads it), and the agent needs no
access to the exporter's private state directory.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .. import __version__, logs
from . import policy as policy_mod
from .cli import read_token
from .engine import Engine, Runner
from .nodesteps import NodeSteps
from .plan import NODE, PayloadError, plan
from .store import StorageError, StorageHealth, open_state

log = logging.getLogger("nvml_remediator.agent")

DEFAULT_STORAGE = "/var/lib/prometheus-nvml-remediator-agent"
STATE_FILE = "agent.sqlite"
MAX_ALERTS_BYTES = 8 << 20


class SourceError(Exception):
    pass


class AlertmanagerSource:
    """The node's firing, unsilenced, uninhibited alerts from every Alertmanager of an HA pair."""

    def __init__(self, urls: Sequence[str], node_label: str, node: str, *, token: str | None = None,
                 ca_file: str | None = None, timeout: float = 10.0):
        self.urls = [u.rstrip("/") for u in urls]
        self._headers = {"Accept": "application/json", "User-Agent": f"nvml-remediator-agent/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._timeout = timeout
        # A regex matcher: the node label may carry a port (instance="node:9400"). Only the node name's
        # dots need escaping (NODE allows letters, digits, . _ -); the engine checks the node again.
        pattern = node.replace(".", "\\.") + "(:[0-9]+)?"
        self.query = urllib.parse.urlencode([("filter", f'{node_label}=~"{pattern}"'), ("active", "true"),
                                             ("silenced", "false"), ("inhibited", "false")])

    def fetch(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """(alerts, errors by URL): each alert once, however many Alertmanagers hold it. Raises
        SourceError when none answered."""
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        errors: dict[str, str] = {}
        for url in self.urls:
            try:
                for a in self._get(url):
                    key = (str(a.get("fingerprint", "")), str(a.get("startsAt", "")))
                    seen.setdefault(key, a)
            except SourceError as e:
                errors[url] = str(e)
        if len(errors) == len(self.urls):
            raise SourceError("; ".join(f"{u}: {e}" for u, e in errors.items()))
        return list(seen.values()), errors

    def _get(self, url: str) -> list[dict[str, Any]]:
        req = urllib.request.Request(f"{url}/api/v2/alerts?{self.query}", headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._context) as r:
                body = r.read(MAX_ALERTS_BYTES + 1)
        except urllib.error.HTTPError as e:
            raise SourceError(f"HTTP {e.code}") from None
        except (OSError, ValueError) as e:
            raise SourceError(str(getattr(e, "reason", e))) from None
        if len(body) > MAX_ALERTS_BYTES:
            raise SourceError("answer too large")
        try:
            alerts = json.loads(body)
        except ValueError as e:
            raise SourceError(f"not JSON: {e}") from None
        if not isinstance(alerts, list) or not all(isinstance(a, dict) for a in alerts):
            raise SourceError("not a list of alerts")
        return alerts


def as_payload(alerts: list[dict[str, Any]]) -> dict[str, Any]:
    """API v2 alerts in the webhook's form (version 4), so that they take the same path through plan():
    only active ones are firing."""
    out = []
    for a in alerts:
        state = a.get("status", {}).get("state") if isinstance(a.get("status"), dict) else None
        out.append({"status": "firing" if state == "active" else "resolved", "labels": a.get("labels"),
                    "annotations": a.get("annotations", {}),  # (the `workloads` one names the GPU's jobs)
                    "fingerprint": a.get("fingerprint", ""), "startsAt": a.get("startsAt", "")})
    return {"version": "4", "alerts": out}


def serve_agent(argv: Sequence[str]) -> int:
    from ..argtypes import Parser, duration
    from .cli import load_policy

    p = Parser(prog="nvml-remediator agent", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="policy file (YAML), with a node_agent: section")
    p.add_argument("--node", default=socket.gethostname().split(".")[0],
                   help="this node's name as the node label carries it (default: the short hostname)")
    p.add_argument("--alertmanager.url", dest="urls", action="append", required=True, metavar="URL",
                   help="an Alertmanager to pull alerts from; repeat for each of an HA pair")
    p.add_argument("--alertmanager.token-file", dest="token_file", help="bearer token for the Alertmanager API")
    p.add_argument("--alertmanager.ca-file", dest="ca_file", help="CA bundle for https Alertmanager URLs")
    p.add_argument("--poll-interval", dest="interval", type=duration, default=30.0,
                   help="how often the alerts are pulled (default 30s)")
    p.add_argument("--audit.log", dest="audit_log", default=DEFAULT_STORAGE + "/audit.jsonl")
    p.add_argument("--storage.path", dest="storage", default=DEFAULT_STORAGE)
    p.add_argument("--execute", action="store_true", help="really run actions (default: dry run, log only)")
    p.add_argument("--once", action="store_true",
                   help="pull once, run what is due and exit: 1 if no Alertmanager answered (for cron or a test)")
    p.add_argument("--log.level", dest="log_level", choices=sorted(logs.LEVELS), default="info")
    p.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt")
    args = p.parse_args(argv)
    logs.setup(args.log_level, args.log_format, "nvml-remediator")
    if not NODE.fullmatch(args.node):
        p.error(f"--node: invalid node name {args.node!r}")
    for url in args.urls:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            p.error(f"--alertmanager.url: want http:// or https://, not {url!r}")
    policy = load_policy(p, args.config)
    if policy.agent is None:
        p.error(f"{args.config}: no node_agent: section (the agent runs the node-local steps it describes)")
    missing = policy_mod.agent_commands(policy)
    if missing:
        p.error(f"{args.config}: missing command(s): {', '.join(missing)}")
    policy = replace(policy, node=args.node)  # the engine's own check: alerts for other nodes are refused
    token = read_token(p, args.token_file, "--alertmanager.token-file")
    try:
        source = AlertmanagerSource(args.urls, policy.node_label, args.node, token=token, ca_file=args.ca_file)
    except (OSError, ssl.SSLError) as e:
        p.error(f"--alertmanager.ca-file: {e}")
    health = StorageHealth()
    try:
        store, audit = open_state(args.storage, STATE_FILE, args.audit_log, health)
    except StorageError as e:
        p.error(str(e))
    runner = Runner()
    engine = Engine(policy, store, audit, execute=args.execute, runner=runner, workers=1, role="agent")
    steps = NodeSteps(engine, args.storage)
    engine.node_steps = steps
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        steps.recover()
        engine.start()
        audit.write("started", role="agent", node=args.node, execute=args.execute, alertmanagers=source.urls,
                    version=__version__)
    except StorageError as e:
        p.error(f"cannot write state: {e}")
    log.info("agent started", extra={"node": args.node, "execute": args.execute, "alertmanagers": len(source.urls)})
    seen: set[tuple[str, str]] = set()
    rc = 0
    try:
        while not stopping.is_set():
            queued = poll(source, engine, seen)
            if args.once:
                engine_idle(engine, stopping)
                rc = 1 if queued < 0 else 0
                break
            stopping.wait(args.interval)
    finally:
        engine.stop()
        engine.join()
        try:
            audit.write("stopped", role="agent")
        except StorageError as e:
            log.error("cannot write the audit log on the way out", extra={"error": str(e)})
    return rc


def poll(source: AlertmanagerSource, engine: Engine, seen: set[tuple[str, str]]) -> int:
    """One pull: queue what is new; how many were queued, -1 when no Alertmanager answered. An alert is
    planned (and audited) once per process: `seen` holds the (fingerprint, startsAt) of those planned
    already, since a firing alert is pulled again every interval; the store's keys make it run once
    across restarts too."""
    try:
        alerts, errors = source.fetch()
    except SourceError as e:
        log.error("no Alertmanager answered", extra={"error": str(e)})
        return -1
    for url, why in errors.items():
        log.warning("an Alertmanager did not answer; using the others", extra={"url": url, "error": why})
    new = [a for a in alerts if (str(a.get("fingerprint", "")), str(a.get("startsAt", ""))) not in seen]
    if not new:
        return 0
    try:
        verdicts = plan(as_payload(new), engine.policy, engine.audit)
        fresh = engine.store.enqueue([(x.key, x.node, x.rule, x.alert, x.steps) for x in verdicts.planned])
        for x, queued in zip(verdicts.planned, fresh, strict=True):
            if queued:
                engine.audit.write("queued", key=x.key, node=x.node, rule=x.rule, source="alertmanager")
    except (PayloadError, StorageError) as e:
        log.error("could not queue the pulled alerts", extra={"error": str(e)})
        return 0  # (not marked seen: tried again at the next pull)
    seen.update((str(a.get("fingerprint", "")), str(a.get("startsAt", ""))) for a in new)
    engine.notify()
    return sum(fresh)


def engine_idle(engine: Engine, stopping: threading.Event, timeout: float = 600.0) -> None:
    """--once: wait until no job is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping.is_set():
        if engine.store.queue_depth() == 0:
            return
        time.sleep(0.1)
