"""`nvml-remediator agent`: the node-local half of remediation, one per GPU node.

    nvml-remediator agent --config FILE --alertmanager.url URL [--alertmanager.url URL2] [--node NAME]
                          [--alertmanager.token-file F] [--alertmanager.ca-file F] [--execute] ...

It pulls its own node's firing alerts from Alertmanager's API v2 (every URL of an HA pair; the same alert
from both is one alert: fingerprint + startsAt) and feeds them to the same policy engine as the webhook,
with the same rails (dry run by default, idempotency, cooldowns, circuit breaker, audit, label validation,
per-step commits). It runs the node-local steps only: it signals the GPU's processes, waits for the
central remediator's drain, and resets the GPU safely (`NodeSteps.reset`):

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

import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .. import __version__, control, logs
from . import policy as policy_mod
from .cli import read_token
from .engine import NODE, Engine, Outcome, PayloadError, Runner, plan, resume
from .store import Job, StorageError, StorageHealth, open_state

log = logging.getLogger("nvml_remediator.agent")

DEFAULT_STORAGE = "/var/lib/prometheus-nvml-remediator-agent"
STATE_FILE = "agent.sqlite"
IN_PROGRESS = "reset-in-progress.json"  # what a reset stopped, until it is restored (survives a crash)
DRAIN_POLL = 2.0  # seconds between looks at the scheduler while waiting for the drain
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


class NodeSteps:
    """The steps only a node can run on itself, for the engine (role "agent")."""

    def __init__(self, engine: Engine, storage: str):
        self.engine = engine
        self.policy = engine.policy
        assert self.policy.agent is not None
        self.agent = self.policy.agent
        self._marker = os.path.join(storage, IN_PROGRESS)

    def _run(self, argv: list[str], step: str = "reset_gpu") -> Outcome:
        return self.engine._run(argv, self.policy.timeout(step))

    def _capture(self, argv: list[str], step: str = "reset_gpu") -> Outcome:
        """Like _run, with the whole output (up to 1 MiB): what is parsed must not be cut to the tail the
        audit keeps (nvidia-smi -q, diagnose --json)."""
        started = time.monotonic()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.policy.timeout(step),
                               env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"})
        except subprocess.TimeoutExpired:
            return Outcome("timeout", [argv], reason=f"killed after {self.policy.timeout(step):g}s")
        except OSError as e:
            return Outcome("failed", [argv], reason=f"cannot start {argv[0]}: {e.strerror}")
        out = r.stdout[: 1 << 20].decode(errors="replace")
        return Outcome("ok" if r.returncode == 0 else "failed", [argv], rc=r.returncode, output=out,
                       seconds=time.monotonic() - started)

    def _audit(self, job: Job, step: str, o: Outcome) -> None:
        self.engine.audit.write("ran" if o.result in ("ok", "dry_run") else o.result, step=step, result=o.result,
                                argv=o.argv, rc=o.rc, output_tail=o.output, reason=o.reason,
                                dry_run=not self.engine.execute, key=job.key, node=job.node, rule=job.rule,
                                alertname=job.alert["labels"].get("alertname", ""))
        self.engine._on_outcome(step, o.result)

    # -- the drain is the central remediator's: wait for it -------------------------------------------
    def wait_drained(self, job: Job) -> Outcome:
        if not self.engine.execute:
            return Outcome("dry_run", reason="dry run: would wait for the central remediator to drain the node")
        deadline = time.monotonic() + self.agent.drain_wait
        while True:
            drained, why = self.engine._drained(job.node)
            if drained:
                return Outcome("ok", reason=f"node drained ({why})")
            if time.monotonic() >= deadline:
                return Outcome("failed", reason=f"node not drained within {self.agent.drain_wait:g}s ({why})")
            if self.engine._stop.wait(DRAIN_POLL):
                return Outcome("interrupted", reason="the agent stopped while waiting for the drain")

    # -- the safe reset ---------------------------------------------------------------------------
    def reset(self, job: Job, uuid: str) -> Outcome:
        p, a = self.policy, self.agent
        reset = [p.command("nvidia_smi"), "--gpu-reset", "-i", uuid]
        query = [p.command("nvidia_smi"), "-q", "-i", uuid]
        if not self.engine.execute:
            plan_ = [["control", a.exporter_socket, "release all"],
                     *[[p.command("systemctl"), "stop", u] for u in a.holders], reset, query,
                     *[[p.command("systemctl"), "start", u] for u in a.holders],
                     ["control", a.exporter_socket, "reacquire"]]
            return Outcome("dry_run", plan_, reason="dry run: would have the exporter release NVML, stop the "
                                                    "holders, check no compute process and the drain, reset, "
                                                    "confirm, restore")
        outcome, attempted = self._reset_with_holders_down(job, uuid, reset, query)
        if attempted:
            ok = outcome.result == "ok"
            ack = self._run([p.command("logger"), "-t", "nvml-remediator", "-p", "daemon.err" if not ok else
                             "daemon.notice", f"GPU reset executed: {uuid}, success: {'true' if ok else 'false'}"])
            if ack.result != "ok":
                outcome.reason += f"; the journal acknowledgement could not be written ({ack.reason or ack.rc})"
            if ok and a.resume_after_reset:
                self._resume(job, uuid)
            elif not ok:
                self._escalate(job, outcome.reason)
        return outcome

    def _reset_with_holders_down(self, job: Job, uuid: str, reset: list[str], query: list[str],
                                 ) -> tuple[Outcome, bool]:
        """(outcome, whether the reset ran). Whatever happens, what was stopped is started again and the
        exporter takes NVML back."""
        held: dict[str, Any] = {"stopped": [], "released": False}
        try:
            outcome, attempted = self._held_down(job, uuid, reset, query, held)
        finally:
            notes = self._restore(held)
        if notes:
            log.error("restoring after a GPU reset was incomplete", extra={"problems": notes})
            outcome.reason = "; ".join([outcome.reason, *notes])
        return outcome, attempted

    def _held_down(self, job: Job, uuid: str, reset: list[str], query: list[str], held: dict[str, Any],
                   ) -> tuple[Outcome, bool]:
        p, a = self.policy, self.agent
        systemctl = p.command("systemctl")
        self._mark(uuid, [], released=True)  # before the release: a crash after it is restored at start
        try:
            control.request(a.exporter_socket, "release all", timeout=p.timeout("reset_gpu"))
            held["released"] = True
        except control.ControlError as e:
            return Outcome("refused", reason=f"the exporter did not release NVML: {e}"), False
        for unit in a.holders:
            if self._run([systemctl, "is-active", "--quiet", unit]).rc != 0:
                continue  # not running: nothing to stop, nothing to restore
            stop = self._run([systemctl, "stop", unit])
            if stop.result != "ok":
                return Outcome("refused", stop.argv, rc=stop.rc, output=stop.output,
                               reason=f"could not stop {unit}"), False
            held["stopped"].append(unit)
            self._mark(uuid, held["stopped"], released=True)
        apps, pids = self.engine._gpu_pids(None)
        if apps.result != "ok" or pids:
            return Outcome("refused", apps.argv, reason=f"compute processes on the node's GPUs: {pids}" if pids
                           else "cannot list compute processes"), False
        drained, why = self.engine._drained(job.node)
        if not drained:
            return Outcome("refused", reason=f"node not drained: {why}"), False
        done = self._run(reset)
        if done.result != "ok":
            done.argv = [reset]
            done.reason = done.reason or f"nvidia-smi --gpu-reset exited {done.rc}"
            return done, True
        confirmed, how = self._confirm(query)
        return Outcome("ok" if confirmed else "failed", [reset, query], rc=done.rc, output=done.output,
                       reason=f"reset and confirmed: {how}" if confirmed else f"reset not confirmed: {how}"), True

    def _restore(self, held: dict[str, Any]) -> list[str]:
        notes = []
        for unit in reversed(held["stopped"]):
            start = self._run([self.policy.command("systemctl"), "start", unit])
            if start.result != "ok":
                notes.append(f"could not start {unit} again (exit {start.rc})")
        if held["released"]:
            try:
                control.request(self.agent.exporter_socket, "reacquire", timeout=self.policy.timeout("reset_gpu"))
            except control.ControlError as e:
                notes.append(f"the exporter did not reacquire NVML: {e}")
        self._clear_mark()
        return notes

    def _confirm(self, query: list[str]) -> tuple[bool, str]:
        """The GPU answers NVML again and its recovery action is None (nvidia-smi -q "GPU Recovery Action";
        a driver too old to print it: the answer alone)."""
        o = self._capture(query)
        if o.result != "ok":
            return False, f"nvidia-smi -q failed ({o.reason or o.rc})"
        if re.search(r"Unable to determine|GPU is lost|requires reset", o.output, re.I):
            return False, "the GPU does not answer after the reset"
        m = re.search(r"Recovery Action\s*:\s*(\S.*)", o.output)
        if m is None:
            return True, "the GPU answers (this driver prints no recovery action)"
        action = m.group(1).strip()
        return (action.lower() == "none"), f"recovery action {action}"

    def _escalate(self, job: Job, why: str) -> None:
        """A failed or unconfirmed reset: reboot the node (policy, drained only), then RMA evaluation."""
        if not self.agent.reboot_node:
            self._audit(job, "reboot_node", Outcome("skipped", reason="reboot_node is not enabled in the policy"))
        else:
            drained, state = self.engine._drained(job.node)
            if not drained:
                self._audit(job, "reboot_node", Outcome("refused", reason=f"node not drained: {state}"))
            else:
                self.engine.store.record_action(job.node, "reboot_node", job.key, -1)
                self._audit(job, "reboot_node", self._run([self.policy.command("systemctl"), "reboot"]))
        uuid = job.alert["labels"].get("uuid", "")
        self._audit(job, "rma_eval", Outcome(
            "escalated", reason=f"GPU {uuid}: {why}; evaluate it for RMA (`nvml-exporter history --gpu {uuid}`)"))
        log.error("GPU reset failed: escalated", extra={"uuid": uuid, "reason": why})

    def _resume(self, job: Job, uuid: str) -> None:
        """After a confirmed reset: a clean diagnose of the GPU, then resume, only a drain of this tool."""
        diag = self._capture([self.policy.command("nvml_exporter"), "diagnose", "--json", "--no-xid.journal"],
                             "default")
        clean, why = _clean(diag, uuid)
        if not clean:
            self._audit(job, "resume_node", Outcome("refused", diag.argv, rc=diag.rc, output=diag.output[-2000:],
                                                    reason=f"diagnose: {why}"))
            return
        ok, message = resume(self.policy, job.node, self.engine._run)
        self._audit(job, "resume_node", Outcome("ok" if ok else "refused", reason=message))

    # -- a crash in the middle of a reset ----------------------------------------------------------
    def _mark(self, uuid: str, stopped: list[str], released: bool) -> None:
        tmp = self._marker + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"uuid": uuid, "stopped": stopped, "released": released}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._marker)

    def _clear_mark(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._marker)

    def recover(self) -> None:
        """At start: a reset the agent died in leaves holders stopped and NVML released: restore them."""
        try:
            with open(self._marker, encoding="utf-8") as f:
                left = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("cannot read the reset marker; restoring everything the policy names", extra={"error": str(e)})
            left = {"stopped": list(self.agent.holders), "released": True}
        problems = []
        if self.engine.execute:
            for unit in reversed(left.get("stopped", [])):
                if policy_mod.UNIT.fullmatch(str(unit)):
                    o = self._run([self.policy.command("systemctl"), "start", str(unit)])
                    if o.result != "ok":
                        problems.append(f"start {unit}: {o.rc}")
            if left.get("released"):
                try:
                    control.request(self.agent.exporter_socket, "reacquire", timeout=30)
                except control.ControlError as e:
                    problems.append(str(e))
        self.engine.audit.write("reset_recovered", uuid=left.get("uuid", ""), stopped=left.get("stopped", []),
                                problems=problems)
        self._clear_mark()


def _clean(diag: Outcome, uuid: str) -> tuple[bool, str]:
    """Whether `nvml-exporter diagnose --json` finds the GPU up with no critical or warning check other
    than the Xid and history checks (those are the past the reset dealt with)."""
    try:
        doc = json.loads(diag.output)
    except ValueError:
        return False, f"no JSON (exit {diag.rc})"
    for g in doc.get("gpus", []):
        if g.get("uuid") != uuid:
            continue
        if not g.get("up"):
            return False, "the GPU is down"
        bad = [c.get("name") for c in g.get("checks", [])
               if isinstance(c, dict) and c.get("status") in ("warning", "critical")
               and c.get("name") not in ("xid", "history")]
        return (not bad), ("clean" if not bad else f"checks not ok: {bad}")
    return False, "the GPU is not in the diagnosis"


def serve_agent(argv: Sequence[str]) -> int:
    from ..argtypes import Parser, duration
    from .cli import _policy

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
    policy = _policy(p, args.config)
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
    runner = Runner({"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"})
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
