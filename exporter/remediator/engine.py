"""From jobs to commands — with every rail on the way: cooldowns, the circuit breaker, dry run, resume.

Alert data never reaches a shell: each step is a fixed argv built from labels that plan.py validated;
all labels reach an `exec` script only as environment variables.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..workload.procfs import attribute
from .plan import LABEL_NAME, NODE
from .policy import LOCAL_STEPS, REPEATABLE_STEPS, Policy, Step
from .store import Audit, Job, StorageError, Store

log = logging.getLogger("nvml_remediator")

def _job_of(pid: int) -> str | None:
    w = attribute(pid)
    return w.workload_id if w is not None else None


OUTPUT_TAIL = 2000
DEFAULT_COOLDOWNS = {"node": 600.0, "drain_node": 1800.0, "reset_gpu": 86400.0, "checkpoint_signal": 600.0}
FAILED_OUTCOMES = frozenset({"failed", "timeout", "refused", "circuit_open", "interrupted"})


@dataclass
class Outcome:
    result: str  # ok | dry_run | failed | timeout | refused | cooldown | circuit_open | interrupted
    argv: list[list[str]] = field(default_factory=list)
    rc: int | None = None
    output: str = ""
    reason: str = ""
    seconds: float = 0.0


class LocalSteps(Protocol):
    """The node-local steps an agent runs itself (agent.py): waiting for the drain, the safe reset."""

    def wait_drained(self, job: Job) -> Outcome: ...

    def reset(self, job: Job, uuid: str) -> Outcome: ...


def command_env() -> dict[str, str]:
    """The environment every command runs in (and no more of ours): the PATH, and a stable locale."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


class Runner:
    """Runs one argv with a timeout; the whole process group is killed when it runs over."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self._env = command_env() if env is None else dict(env)

    def __call__(self, argv: list[str], timeout: float, env: Mapping[str, str] | None = None) -> Outcome:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, env={**self._env, **(env or {})}, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return Outcome("failed", [argv], reason=f"cannot start {argv[0]}: {e.strerror}")
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return Outcome("timeout", [argv], rc=proc.returncode, output=out.decode(errors="replace")[-OUTPUT_TAIL:],
                           reason=f"killed after {timeout:g}s", seconds=time.monotonic() - started)
        text = out.decode(errors="replace")[-OUTPUT_TAIL:]
        return Outcome("ok" if proc.returncode == 0 else "failed", [argv], rc=proc.returncode, output=text,
                       seconds=time.monotonic() - started)


def alert_env(job: Job) -> dict[str, str]:
    """Alert data for scripts, as environment variables only (values are passed as they are, inertly)."""
    labels = job.alert["labels"]
    env = {"AM_NODE": job.node, "AM_FINGERPRINT": job.alert["fingerprint"], "AM_STARTS_AT": job.alert["startsAt"],
           "AM_RULE": job.rule}
    env.update({f"AM_LABEL_{k.upper()}": v for k, v in labels.items() if LABEL_NAME.fullmatch(k)})
    return env


class Engine:
    PROBE_EVERY = 2.0  # seconds between attempts to write the state again while it cannot be written

    def __init__(self, policy: Policy, store: Store, audit: Audit, *, execute: bool, runner: Runner,
                 workers: int = 4, on_outcome: Callable[[str, str], None] = lambda a, r: None,
                 clock: Callable[[], float] = time.time, role: str = "central", node_steps: LocalSteps | None = None):
        """role "central" (the webhook) or "agent" (`nvml-remediator agent`, agent.py, with its
        node_steps): with a `node_agent:` policy the central one leaves the node-local steps to the
        agents and the agents wait for its drain."""
        self.policy = policy
        self.store = store
        self.audit = audit
        self.health = store.health
        self.execute = execute
        self._run = runner
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._on_outcome = on_outcome
        self._clock = clock
        self._wake = threading.Condition()
        self._busy: set[str] = set()
        self._running = 0  # steps running now (for the log line at a stop), under _count
        self._count = threading.Lock()
        self._stop = threading.Event()
        self._breaker_lock = threading.Lock()
        self.cooldowns = {**DEFAULT_COOLDOWNS, **policy.cooldowns}
        self.role = role
        self.node_steps = node_steps

    # -- queue ---------------------------------------------------------------------------------
    def start(self) -> None:
        for job in self.store.recover():
            self.audit.write("recovered", key=job.key, node=job.node, next_step=job.next_step, steps=job.steps)
        self._threads = [threading.Thread(target=self._work, name=f"remediate-{i}", daemon=True)
                         for i in range(self._workers)]
        self._threads.append(threading.Thread(target=self._watch_storage, name="storage-probe", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """No new job or step starts; a running step finishes (each command is bounded by its timeout)
        and its job waits in the queue, at its next step, for the next start."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()

    def join(self) -> None:
        if self._running:
            log.info("stopping: waiting for running steps to finish (each is bounded by its timeout)",
                     extra={"steps": self._running})
        for t in self._threads:
            t.join()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self.health.healthy:  # the storage probe says when the state can be written again
                self._stop.wait(0.5)
                continue
            try:
                with self._wake:
                    job = self.store.claim(self._busy)
                    if job is None:
                        self._wake.wait(1.0)
                        continue
                    self._busy.add(job.node)  # one job at a time per node
            except StorageError:
                continue  # counted and logged by the health; wait for it
            try:
                self._run_job(job)
            except StorageError:
                self._hold(job)
            except Exception as e:  # a bug must not kill the worker: record it and fail the job
                log.exception("job failed unexpectedly")
                try:
                    self.audit.write("failed", key=job.key, node=job.node, reason=f"internal error: {e}")
                    self.store.advance(job, job.next_step, "failed")
                except StorageError:
                    self._hold(job)
            finally:
                with self._wake:
                    self._busy.discard(job.node)
                    self._wake.notify_all()

    def _hold(self, job: Job) -> None:
        """A job whose progress could not be recorded: back to the queue once the state can be written,
        to go on from its last recorded step (a step that was started runs again only if it is
        repeatable). Stopping first leaves it 'running', which the next start recovers the same way."""
        while not self._stop.is_set():
            if self.health.healthy:
                try:
                    self.store.release(job)
                    return
                except StorageError:
                    pass
            self._stop.wait(0.5)

    def _watch_storage(self) -> None:
        """While the state cannot be written, try a small write every few seconds: readiness and the
        workers come back on their own once space is freed."""
        while not self._stop.wait(self.PROBE_EVERY):
            if self.health.healthy:
                continue
            failed_for, reason = self.health.failing_seconds(), self.health.reason()
            try:
                self.store.probe()
                self.audit.write("storage_recovered", failed_seconds=round(failed_for, 1), error=reason)
            except StorageError:
                continue
            self.notify()

    # -- one job ---------------------------------------------------------------------------------
    def _run_job(self, job: Job) -> None:
        labels = job.alert["labels"]
        base = {"key": job.key, "node": job.node, "rule": job.rule, "alertname": labels.get("alertname", "")}
        if workloads := job.alert.get("workloads"):
            base["workloads"] = workloads  # the jobs on the GPU, in every record of what was done to it
        if job.next_step == 0 and not self.store.step_started(job.key, 0):
            last = self.store.last_node_action(job.node, job.key)
            if last is not None and self._clock() - last < self.cooldowns["node"]:
                self._finish(job, "cooldown", base, "the node was acted on less than its cooldown ago", len(job.steps))
                return
        for index in range(job.next_step, len(job.steps)):
            if self._stop.is_set():  # stopping: the job waits for the next start at this step
                self.store.advance(job, index, "queued")
                self.audit.write("paused", reason="the remediator stopped; the job goes on at the next start",
                                 next_step=index, **base)
                return
            step = self._step(job.steps[index])
            # started before and never finished: the process died in it, or could not record how it ended
            resumed = self.store.step_started(job.key, index)
            if resumed and step.kind not in REPEATABLE_STEPS:
                outcome = Outcome("interrupted", reason=f"{step.name} was started and its end never recorded (the "
                                                         "remediator stopped, or could not write its state); not "
                                                         "repeated (it may have run): check the node by hand")
            else:
                with self._count:
                    self._running += 1
                try:
                    outcome = self._do(job, step, index, resumed)
                finally:
                    with self._count:
                        self._running -= 1
            self._on_outcome(step.kind, outcome.result)
            self.audit.write("ran" if outcome.result in ("ok", "dry_run") else outcome.result, step=step.name,
                             result=outcome.result, argv=outcome.argv, rc=outcome.rc, output_tail=outcome.output,
                             reason=outcome.reason, duration_seconds=round(outcome.seconds, 3),
                             dry_run=not self.execute, resumed=resumed, **base)
            if outcome.result in FAILED_OUTCOMES:
                self.store.advance(job, index + 1, "failed")
                return
            self.store.advance(job, index + 1, "running")
        self.store.advance(job, len(job.steps), "done")
        self.audit.write("done", **base)

    def _finish(self, job: Job, result: str, base: dict[str, Any], reason: str, next_step: int) -> None:
        self._on_outcome("job", result)
        self.audit.write(result, reason=reason, **base)
        self.store.advance(job, next_step, "done")

    def _step(self, name: str) -> Step:
        kind, _, script = name.partition(":")
        return Step(kind, script)

    def _local(self) -> LocalSteps:
        if self.node_steps is None:  # (agent.py hands them in before it starts the engine)
            raise RuntimeError("an agent's engine has no node-local steps")
        return self.node_steps

    def _do(self, job: Job, step: Step, index: int, resumed: bool) -> Outcome:
        """One step. `resumed`: a repeatable step this job started before: it runs again, neither held
        back by its own cooldown record nor counted a second time by the breaker."""
        if step.kind == "log":
            return Outcome("ok", reason="recorded")
        if self.role == "central" and self.policy.agent is not None and step.kind in LOCAL_STEPS:
            return Outcome("delegated", reason="a node-local step: the node's agent runs it")
        if self.role == "agent" and step.kind == "drain_node":  # the central remediator drains
            return self._local().wait_drained(job)
        uuid = job.alert["labels"].get("uuid", "")
        action_key = f"{step.name}:{uuid}" if step.kind == "reset_gpu" else step.name
        cooldown = self.cooldowns.get(step.kind, 0.0)
        last = self.store.last_action(job.node, action_key, job.key)
        if last is not None and self._clock() - last < cooldown:
            return Outcome("cooldown", reason=f"{step.name} ran on {job.node} {self._clock() - last:.0f}s ago")
        if step.kind == "reset_gpu" and self.execute:
            refused = self._reset_refused(job)  # a refused reset is not an action: no cooldown, no breaker
            if refused is not None:
                return refused
        with self._breaker_lock:
            if self.store.breaker() is not None:
                return Outcome("circuit_open", reason="circuit breaker is open: no action until it is reset")
            if not resumed:
                recent = self.store.actions_since(self._clock() - self.policy.breaker_window)
                if recent >= self.policy.breaker_max:
                    reason = (f"{recent} actions in {self.policy.breaker_window:g}s reached the limit of "
                              f"{self.policy.breaker_max}: stopping all actions")
                    self.store.trip(reason)
                    self.audit.write("breaker_tripped", reason=reason)
                    log.error("circuit breaker tripped", extra={"reason": reason})
                    return Outcome("circuit_open", reason=reason)
                self.store.record_action(job.node, action_key, job.key, index)
        if step.kind == "drain_node":
            return self._drain(job)
        if step.kind == "checkpoint_signal":
            return self._checkpoint(job, uuid)
        if step.kind == "reset_gpu":
            return self._local().reset(job, uuid) if self.role == "agent" else self._reset(job, uuid)
        argv = list(self.policy.scripts[step.script])
        return self._exec(argv, step, alert_env(job))

    def _exec(self, argv: list[str], step: Step, env: Mapping[str, str] | None = None) -> Outcome:
        if not self.execute:
            return Outcome("dry_run", [argv], reason="dry run: would run this")
        return self._run(argv, self.policy.timeout(step.kind), env)

    def _drain(self, job: Job) -> Outcome:
        p, labels = self.policy, job.alert["labels"]
        reason = (f"{p.drain_prefix} {labels.get('alertname')} gpu={labels.get('gpu', '-')} "
                  f"uuid={labels.get('uuid', '-')} fp={job.alert['fingerprint']}")
        if workloads := job.alert.get("workloads"):  # (absent from jobs queued by an older remediator)
            reason += f" jobs={','.join(workloads)}"
        if p.scheduler == "slurm":
            plan = [[p.command("scontrol"), "update", f"NodeName={job.node}", "State=DRAIN", f"Reason={reason}"]]
        else:
            plan = [[p.command("kubectl"), "cordon", job.node],
                    [p.command("kubectl"), "annotate", "--overwrite", "node", job.node,
                     f"nvml-remediator/reason={reason}"]]
        return self._sequence(plan, Step("drain_node"))

    def _sequence(self, plan: list[list[str]], step: Step) -> Outcome:
        if not self.execute:
            return Outcome("dry_run", plan, reason="dry run: would run these")
        total = Outcome("ok")
        for argv in plan:
            o = self._run(argv, self.policy.timeout(step.kind))
            total.argv.append(argv)
            total.rc, total.output, total.seconds = o.rc, o.output, total.seconds + o.seconds
            if o.result != "ok":
                total.result, total.reason = o.result, o.reason or f"{argv[0]} exited {o.rc}"
                break
        return total

    def _apps_query(self) -> list[str]:
        return [self.policy.command("nvidia_smi"), "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"]

    def _gpu_pids(self, uuid: str | None, jobs: Sequence[str] = ()) -> tuple[Outcome, list[int]]:
        """The compute processes on GPU `uuid` (every GPU if None), and those on other GPUs that /proc
        names as one of `jobs` (the other ranks of the GPU's jobs: a checkpoint needs all of them)."""
        o = self._run(self._apps_query(), self.policy.timeout("checkpoint_signal"))
        if o.result != "ok":
            return o, []
        pids = []
        for line in o.output.splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) < 2 or not parts[0].isdigit():
                continue
            if uuid is None or parts[1] == uuid or (jobs and _job_of(int(parts[0])) in jobs):
                pids.append(int(parts[0]))
        return o, pids

    def _checkpoint(self, job: Job, uuid: str) -> Outcome:
        query = self._apps_query()
        sig = signal.Signals(self.policy.checkpoint_signal).name
        if not self.execute:
            return Outcome("dry_run", [query], reason=f"dry run: would send {sig} to the processes on {uuid}")
        o, pids = self._gpu_pids(uuid, job.alert.get("workloads") or ())
        if o.result != "ok":
            return o
        sent, gone = [], []
        for pid in pids:
            try:
                os.kill(pid, self.policy.checkpoint_signal)
                sent.append(pid)
            except ProcessLookupError:
                gone.append(pid)
            except PermissionError:
                return Outcome("failed", [query], reason=f"no permission to signal pid {pid} (needs CAP_KILL)")
        return Outcome("ok", [query], reason=f"sent {sig} to pids {sent}" + (f"; gone: {gone}" if gone else ""))

    def _reset(self, job: Job, uuid: str) -> Outcome:
        p = self.policy
        reset = [p.command("nvidia_smi"), "--gpu-reset", "-i", uuid]
        check = [p.command("nvidia_smi"), "-q", "-i", uuid]
        if not self.execute:
            return Outcome("dry_run", [reset, check], reason="dry run: would check the node is drained and no GPU "
                                                              "has a compute process, then reset and re-check")
        done = self._run(reset, p.timeout("reset_gpu"))
        if done.result != "ok":
            done.reason = done.reason or "reset failed: reboot the node (no retry)"
            return done
        health = self._run(check, p.timeout("reset_gpu"))
        health.argv = [reset, check]
        if health.result != "ok":
            health.reason = "GPU unhealthy after the reset: reboot the node or RMA (no retry)"
        else:
            health.reason = "reset and healthy"
        return health

    def _reset_refused(self, job: Job) -> Outcome | None:
        """The reset preconditions (nvidia-smi(1)): the node drained, no compute process on any GPU."""
        drained, why = self._drained(job.node)
        if not drained:
            return Outcome("refused", reason=f"node not drained: {why}")
        o, pids = self._gpu_pids(None)
        if o.result != "ok":
            return Outcome("refused", o.argv, reason="cannot list compute processes")
        if pids:
            return Outcome("refused", o.argv, reason=f"compute processes still run on the node's GPUs: {pids}")
        return None

    def _drained(self, node: str) -> tuple[bool, str]:
        p = self.policy
        if p.scheduler == "slurm":
            o = self._run([p.command("scontrol"), "show", "node", "-o", node], p.timeout("default"))
            m = re.search(r"\bState=(\S+)", o.output)
            state = m.group(1) if m else ""
            busy = any(s in state for s in ("ALLOCATED", "MIXED", "COMPLETING"))
            return ("DRAIN" in state and not busy), f"Slurm state {state or 'unknown'}"
        if p.scheduler == "kubernetes":
            o = self._run([p.command("kubectl"), "get", "node", node, "-o", "jsonpath={.spec.unschedulable}"],
                          p.timeout("default"))
            return o.output.strip() == "true", f"unschedulable={o.output.strip() or 'false'}"
        return False, "no scheduler configured"


def resume(policy: Policy, node: str, runner: Runner) -> tuple[bool, str]:
    """Return a node this tool drained to service — and only such a node: its drain reason (Slurm) or
    annotation (Kubernetes) must carry the remediator's prefix. Someone else's drain is left alone."""
    if not NODE.fullmatch(node):
        return False, f"invalid node name {node!r}"
    timeout = policy.timeout("default")
    if policy.scheduler == "slurm":
        shown = runner([policy.command("scontrol"), "show", "node", "-o", node], timeout)
        m = re.search(r"\bReason=(.*?)(?: \w+=|$)", shown.output)
        reason = m.group(1) if m else ""
        if not reason.startswith(policy.drain_prefix):
            return False, f"not resuming {node}: drained for another reason ({reason or 'none'})"
        done = runner([policy.command("scontrol"), "update", f"NodeName={node}", "State=RESUME"], timeout)
    elif policy.scheduler == "kubernetes":
        shown = runner([policy.command("kubectl"), "get", "node", node, "-o",
                        "jsonpath={.metadata.annotations.nvml-remediator/reason}"], timeout)
        if not shown.output.startswith(policy.drain_prefix):
            return False, f"not uncordoning {node}: it was not cordoned by nvml-remediator"
        done = runner([policy.command("kubectl"), "uncordon", node], timeout)
    else:
        return False, "no scheduler configured"
    return done.result == "ok", f"{node}: {done.result} {done.output.strip()}".strip()
