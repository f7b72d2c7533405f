"""From an Alertmanager payload to jobs: which alerts a policy acts on, with their labels validated.

The label values that go into an argv later (node, GPU UUID, alert name, GPU index) must match strict
patterns here or the alert is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .policy import LOCAL_STEPS, Policy
from .store import Audit

# Used with fullmatch only: `$` would also match before a final newline ("node1\n" would pass).
NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SAFE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
FINGERPRINT = re.compile(r"[0-9a-f]{1,32}")
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# The jobs on the alert's GPU, from the alert's `workloads` annotation (docs/workloads.md): Slurm job ids,
# namespace/pod. Anything else is left out of the drain reason and the audit.
WORKLOAD = re.compile(r"[A-Za-z0-9_.:+/@-]{1,128}")
MAX_WORKLOADS = 16


def workloads_of(alert: Mapping[str, Any]) -> tuple[list[str], int]:
    """(the valid workload ids of the alert's annotation, how many words were refused)."""
    annotations = alert.get("annotations")
    text = annotations.get("workloads", "") if isinstance(annotations, dict) else ""
    words = [w for w in re.split(r"[\s,]+", str(text)) if w]
    valid = [w for w in words if WORKLOAD.fullmatch(w)][:MAX_WORKLOADS]
    return valid, len(words) - len(valid)


class PayloadError(ValueError):
    """The request is not an Alertmanager v4 payload: 400, which Alertmanager does not retry."""


@dataclass(frozen=True)
class Planned:
    key: str
    node: str
    rule: str
    alert: dict[str, Any]
    steps: list[str]


@dataclass
class Verdicts:
    """What became of each alert of one payload (for the HTTP answer and the metrics)."""

    planned: list[Planned] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def node_of(labels: Mapping[str, str], label: str) -> str:
    value = labels.get(label, "")
    if value.startswith("["):  # [ipv6]:port
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def plan(payload: Any, policy: Policy, audit: Audit) -> Verdicts:
    if not isinstance(payload, dict):
        raise PayloadError("body must be a JSON object")
    if payload.get("version") != "4":
        raise PayloadError(f"unsupported webhook payload version {payload.get('version')!r} (want \"4\")")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts must be a list")
    if payload.get("truncatedAlerts"):
        audit.write("truncated", count=payload["truncatedAlerts"], group_key=str(payload.get("groupKey", "")))
    out = Verdicts()
    for a in alerts:
        if not isinstance(a, dict) or not isinstance(a.get("labels"), dict):
            raise PayloadError("every alert needs a labels object")
        labels = {str(k): str(v) for k, v in a["labels"].items()}
        fingerprint, starts = str(a.get("fingerprint", "")), str(a.get("startsAt", ""))
        base = {"alertname": labels.get("alertname", ""), "fingerprint": fingerprint, "starts_at": starts}
        audit.write("received", status=a.get("status"), labels=labels, **base)
        if a.get("status") != "firing":
            audit.write("skipped", reason="resolved alerts are never acted on", **base)
            out.skip("resolved")
            continue
        node = node_of(labels, policy.node_label)
        problem = _invalid(labels, node, fingerprint, starts)
        if problem:
            audit.write("rejected", reason=f"label failed validation: {problem}", **base)
            out.skip("invalid_label")
            continue
        rule = policy.rule_for(labels)
        if rule is None:
            audit.write("skipped", reason="no rule matches", node=node, **base)
            out.skip("no_rule")
            continue
        local = [s.name for s in rule.steps if s.kind in LOCAL_STEPS]
        if policy.node != "any" and node != policy.node:
            audit.write("skipped", reason=f"alert is for node {node}, this remediator acts for {policy.node}",
                        node=node, **base)
            out.skip("other_node")
            continue
        if local and not UUID.fullmatch(labels.get("uuid", "")):
            audit.write("rejected", reason=f"steps {local} need a valid uuid label", node=node, **base)
            out.skip("invalid_label")
            continue
        steps = [s.name for s in rule.steps]
        key = f"{fingerprint}|{starts}|{rule.name}"
        workloads, refused = workloads_of(a)
        audit.write("matched", rule=rule.name, steps=steps, node=node, key=key, workloads=workloads,
                    **({"workloads_refused": refused} if refused else {}), **base)
        out.planned.append(Planned(key, node, rule.name, {"labels": labels, "fingerprint": fingerprint,
                                                          "startsAt": starts, "workloads": workloads}, steps))
    return out


def _invalid(labels: Mapping[str, str], node: str, fingerprint: str, starts: str) -> str:
    if not NODE.fullmatch(node):
        return f"node {node!r}"
    if not FINGERPRINT.fullmatch(fingerprint):
        return f"fingerprint {fingerprint!r}"
    if not re.fullmatch(r"[0-9T:.Z+-]{10,40}", starts):
        return f"startsAt {starts!r}"
    if not SAFE.fullmatch(labels.get("alertname", "")):
        return "alertname"
    for name in ("gpu", "xid"):
        if name in labels and not SAFE.fullmatch(labels[name]):
            return name
    if labels.get("uuid") and not UUID.fullmatch(labels["uuid"]):
        return "uuid"
    return ""


