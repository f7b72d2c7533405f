"""The remediator's policy file: which alerts lead to which steps, and the rails around them.

    scheduler: slurm            # slurm | kubernetes | none
    node: any                   # "any", or this host's name: alerts for other nodes are not acted on
    node_label: instance        # the label that names the node ("host:port" -> host)
    commands: {scontrol: scontrol, kubectl: kubectl, nvidia_smi: nvidia-smi}
    timeouts: {default: 60s, reset_gpu: 300s}
    cooldowns: {node: 10m, drain_node: 30m, reset_gpu: 24h}
    circuit_breaker: {max_actions: 10, window: 10m}
    checkpoint_signal: SIGUSR1
    exec: {bug-report: [/usr/local/sbin/gpu-bug-report, --quiet]}
    node_agent:                 # present: checkpoint_signal and reset_gpu run on each node's agent
      holders: [nvidia-dcgm, dcgm-exporter]   # systemd units stopped around a reset, restarted after
      drain_wait: 15m           # how long the agent waits for the central remediator's drain
      reboot_node: false        # a failed or unconfirmed reset reboots the (drained) node
      resume_after_reset: false # a confirmed reset and a clean diagnose return the node to service
      exporter_socket: /run/prometheus-nvml-exporter/control.sock
    rules:
      - name: fell-off-bus
        match: ['alertname="GpuXidFellOffBus"']
        steps: [checkpoint_signal, drain_node]
      - name: named-script
        match: ['alertname="GpuXidNvlink"']
        steps: [log, {exec: bug-report}]

The first rule whose matchers all hold decides; an alert no rule matches is only logged.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..configfile import ConfigError, load_yaml, mapping, no_unknown

STEPS = ("log", "drain_node", "checkpoint_signal", "reset_gpu", "exec")
# Steps that act on the node itself (signals, GPU reset) rather than through the scheduler.
LOCAL_STEPS = frozenset({"checkpoint_signal", "reset_gpu"})
# Steps that are safe to run again if the process died while running them.
REPEATABLE_STEPS = frozenset({"log", "drain_node", "checkpoint_signal"})
SCHEDULERS = ("slurm", "kubernetes", "none")
UNIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._:-]{0,127}")  # a systemd unit name (fullmatch)
TIMEOUT_KEYS = frozenset({"default", "drain_node", "checkpoint_signal", "reset_gpu", "exec"})
COOLDOWN_KEYS = frozenset({"node", "drain_node", "checkpoint_signal", "reset_gpu", "exec"})
LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a Prometheus label name (fullmatch)
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # as the engine validates alerts' node names
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')  # fullmatch
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")  # fullmatch
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class PolicyError(ConfigError):
    pass


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as e:
                raise PolicyError(f"bad regex in matcher {self.label}{self.op}\"{self.value}\": {e}") from None

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.label, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        full = re.fullmatch(self.value, v) is not None
        return full if self.op == "=~" else not full


@dataclass(frozen=True)
class Step:
    kind: str
    script: str = ""  # exec only: the allow-list entry

    @property
    def name(self) -> str:
        return f"exec:{self.script}" if self.kind == "exec" else self.kind


@dataclass(frozen=True)
class Rule:
    name: str
    matchers: tuple[Matcher, ...]
    steps: tuple[Step, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)


@dataclass(frozen=True)
class AgentPolicy:
    """The node agent's part (`node_agent:`): how it resets a GPU safely, and what follows."""

    holders: tuple[str, ...] = ()
    drain_wait: float = 900.0
    reboot_node: bool = False
    resume_after_reset: bool = False
    exporter_socket: str = "/run/prometheus-nvml-exporter/control.sock"


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    scheduler: str = "none"
    node: str = "any"
    node_label: str = "instance"
    commands: Mapping[str, str] = field(default_factory=dict)
    timeouts: Mapping[str, float] = field(default_factory=dict)
    cooldowns: Mapping[str, float] = field(default_factory=dict)
    breaker_max: int = 10
    breaker_window: float = 600.0
    checkpoint_signal: int = int(signal.SIGUSR1)
    scripts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    drain_prefix: str = "nvml-remediator:"
    agent: AgentPolicy | None = None  # node_agent: set: the node-local steps are the node agents'

    def rule_for(self, labels: Mapping[str, str]) -> Rule | None:
        return next((r for r in self.rules if r.matches(labels)), None)

    def timeout(self, step: str) -> float:
        return self.timeouts.get(step, self.timeouts.get("default", 60.0))

    def command(self, name: str) -> str:
        return self.commands[name]


def duration(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = _DURATION.fullmatch(str(value))
    if not m or float(m.group(1)) <= 0:
        raise PolicyError(f"{where}: invalid duration {value!r} (want e.g. 30s, 10m, 24h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_matcher(text: Any, where: str) -> Matcher:
    m = MATCHER.fullmatch(str(text))
    if not m:
        raise PolicyError(f'{where}: bad matcher {text!r} (want label="value", label!="v", label=~"re" or label!~"re")')
    return Matcher(m.group(1), m.group(2), m.group(3).replace('\\"', '"'))


def _mapping(value: Any, where: str) -> dict[str, Any]:
    return mapping(value, where, PolicyError)


def _unknown(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    no_unknown(d, allowed, where, PolicyError)


def _signal(value: Any) -> int:
    name = str(value).upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if not hasattr(signal, name) or name in ("SIGKILL", "SIGSTOP"):
        raise PolicyError(f"checkpoint_signal: unknown or unusable signal {value!r}")
    return int(getattr(signal, name))


def load(path: str) -> Policy:
    return parse(_mapping(load_yaml(path, PolicyError), path))


def parse(raw: dict[str, Any]) -> Policy:
    _unknown(raw, {"scheduler", "node", "node_label", "commands", "timeouts", "cooldowns", "circuit_breaker",
                   "checkpoint_signal", "exec", "rules", "drain_reason_prefix", "node_agent"}, "policy")
    scheduler = str(raw.get("scheduler", "none"))
    if scheduler not in SCHEDULERS:
        raise PolicyError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
    commands = {"scontrol": "scontrol", "kubectl": "kubectl", "nvidia_smi": "nvidia-smi", "systemctl": "systemctl",
                "logger": "logger", "nvml_exporter": "nvml-exporter"}
    given = _mapping(raw.get("commands"), "commands")
    _unknown(given, set(commands), "commands")
    commands.update({k: str(v) for k, v in given.items()})
    scripts: dict[str, tuple[str, ...]] = {}
    for name, argv in _mapping(raw.get("exec"), "exec").items():
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise PolicyError(f"exec.{name}: want a list of strings (an argv, never a shell line)")
        if not argv[0].startswith("/"):
            raise PolicyError(f"exec.{name}: the program must be an absolute path, not {argv[0]!r}")
        scripts[str(name)] = tuple(argv)
    rules = []
    raw_rules = raw.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError("rules: want a non-empty list")
    for i, r in enumerate(raw_rules):
        where = f"rules[{i}]"
        r = _mapping(r, where)
        _unknown(r, {"name", "match", "steps"}, where)
        name = str(r.get("name") or where)
        match = r.get("match", [])
        if not isinstance(match, list):
            raise PolicyError(f"{where} ({name}): match must be a list of matchers")
        steps_raw = r.get("steps")
        if not isinstance(steps_raw, list) or not steps_raw:
            raise PolicyError(f"{where} ({name}): steps must be a non-empty list")
        steps = []
        for s in steps_raw:
            if isinstance(s, dict) and set(s) == {"exec"}:
                if s["exec"] not in scripts:
                    raise PolicyError(f"{where} ({name}): exec {s['exec']!r} is not in the exec allow-list")
                steps.append(Step("exec", str(s["exec"])))
            elif isinstance(s, str) and s in STEPS and s != "exec":
                steps.append(Step(s))
            else:
                raise PolicyError(f"{where} ({name}): unknown action {s!r} (want one of {', '.join(STEPS)})")
        if any(s.kind == "drain_node" for s in steps) and scheduler == "none":
            raise PolicyError(f"{where} ({name}): drain_node needs scheduler: slurm or kubernetes")
        if any(s.kind == "reset_gpu" for s in steps) and not any(s.kind == "drain_node" for s in steps):
            raise PolicyError(f"{where} ({name}): reset_gpu only after drain_node in the same rule")
        rules.append(Rule(name, tuple(parse_matcher(m, f"{where} ({name})") for m in match), tuple(steps)))
    raw_timeouts = _mapping(raw.get("timeouts"), "timeouts")
    _unknown(raw_timeouts, set(TIMEOUT_KEYS), "timeouts")  # a misspelt key would silently keep the default
    timeouts = {str(k): duration(v, f"timeouts.{k}") for k, v in raw_timeouts.items()}
    raw_cooldowns = _mapping(raw.get("cooldowns"), "cooldowns")
    _unknown(raw_cooldowns, set(COOLDOWN_KEYS), "cooldowns")
    cooldowns = {str(k): duration(v, f"cooldowns.{k}") for k, v in raw_cooldowns.items()}
    breaker = _mapping(raw.get("circuit_breaker"), "circuit_breaker")
    _unknown(breaker, {"max_actions", "window"}, "circuit_breaker")
    max_actions = breaker.get("max_actions", 10)
    if not isinstance(max_actions, int) or isinstance(max_actions, bool) or max_actions < 1:
        raise PolicyError(f"circuit_breaker.max_actions: want a positive integer, not {max_actions!r}")
    node_label = raw.get("node_label", "instance")
    if not isinstance(node_label, str) or not LABEL.fullmatch(node_label):
        raise PolicyError(f"node_label: want a label name, not {node_label!r}")
    node = raw.get("node", "any")
    if not isinstance(node, str) or not NODE_NAME.fullmatch(node):
        raise PolicyError(f"node: want \"any\" or a node name, not {node!r}")
    prefix = str(raw.get("drain_reason_prefix", "nvml-remediator:"))
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{3,32}", prefix):
        raise PolicyError("drain_reason_prefix: 3-32 characters of letters, digits, _ . : -")
    policy = Policy(
        agent=_agent(raw["node_agent"]) if "node_agent" in raw else None,
        rules=tuple(rules), scheduler=scheduler, node=node, node_label=node_label, commands=commands, timeouts=timeouts,
        cooldowns=cooldowns, breaker_max=max_actions,
        breaker_window=duration(breaker.get("window", "10m"), "circuit_breaker.window"),
        checkpoint_signal=_signal(raw.get("checkpoint_signal", "SIGUSR1")), scripts=scripts, drain_prefix=prefix,
    )
    return policy


def _agent(raw: Any) -> AgentPolicy:
    a = _mapping(raw, "node_agent")
    _unknown(a, {"holders", "drain_wait", "reboot_node", "resume_after_reset", "exporter_socket"}, "node_agent")
    holders = a.get("holders", [])
    if not isinstance(holders, list) or not all(isinstance(u, str) and UNIT.fullmatch(u) for u in holders):
        raise PolicyError("node_agent.holders: want a list of systemd unit names")
    for key in ("reboot_node", "resume_after_reset"):
        if not isinstance(a.get(key, False), bool):
            raise PolicyError(f"node_agent.{key}: want true or false")
    sock = a.get("exporter_socket", AgentPolicy.exporter_socket)
    if not isinstance(sock, str) or not sock.startswith("/"):
        raise PolicyError("node_agent.exporter_socket: want an absolute path")
    return AgentPolicy(holders=tuple(holders), drain_wait=duration(a.get("drain_wait", "15m"), "node_agent.drain_wait"),
                       reboot_node=a.get("reboot_node", False), resume_after_reset=a.get("resume_after_reset", False),
                       exporter_socket=sock)


def agent_commands(policy: Policy) -> list[str]:
    """What the node agent runs besides the rules' steps (checked at its start)."""
    if policy.agent is None:
        return []
    needed = [policy.command("logger")]
    if policy.agent.holders or policy.agent.reboot_node:
        needed.append(policy.command("systemctl"))
    if policy.agent.resume_after_reset:
        needed.append(policy.command("nvml_exporter"))
    if policy.scheduler == "slurm":
        needed.append(policy.command("scontrol"))
    elif policy.scheduler == "kubernetes":
        needed.append(policy.command("kubectl"))
    return sorted(c for c in set(needed) if shutil.which(c) is None)


def missing_commands(policy: Policy) -> list[str]:
    """Programs the rules need that cannot be found: checked at start, not when a GPU is failing."""
    needed: set[str] = set()
    for rule in policy.rules:
        for step in rule.steps:
            if step.kind == "drain_node":
                needed.add(policy.command("scontrol" if policy.scheduler == "slurm" else "kubectl"))
            elif step.kind in ("checkpoint_signal", "reset_gpu"):
                needed.add(policy.command("nvidia_smi"))
            elif step.kind == "exec":
                needed.add(policy.scripts[step.script][0])
    return sorted(c for c in needed if shutil.which(c) is None)
