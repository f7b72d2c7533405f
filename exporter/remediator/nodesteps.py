"""The steps only a node can run on itself, for the agent's engine: waiting for the central drain, and the
safe GPU reset:

    exporter releases NVML (control socket) -> holders stopped (systemctl) -> no compute process on any
    GPU, node drained -> nvidia-smi --gpu-reset -i UUID -> confirmed (recovery action None) ->
    holders restarted and the exporter reacquires, whatever happened -> acknowledgement line in the
    journal (the exporter records it in the GPU's incident history) -> resume (policy) or escalate.

What a reset stopped is written down first (IN_PROGRESS), so a crash in the middle is undone at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import time
from typing import Any

from .. import control
from . import policy as policy_mod
from .engine import Engine, Outcome, command_env, resume
from .store import Job

log = logging.getLogger("nvml_remediator.agent")

IN_PROGRESS = "reset-in-progress.json"  # what a reset stopped, until it is restored (survives a crash)
DRAIN_POLL = 2.0  # seconds between looks at the scheduler while waiting for the drain


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
                               env=command_env())
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
                    control.request(self.agent.exporter_socket, "reacquire",
                                    timeout=self.policy.timeout("reset_gpu"))  # (as _restore does)
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
