"""Escalation from a GPU's incident history, as data: the same fatal Xid on a GPU that came back after N
resets or reboots goes to `rma_eval` (ESCALATION_THRESHOLDS); N incidents on the node within a window go
to `contact_support` (NODE_RULE). `assess` is a pure function of the rows history.py keeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from .xidcatalog import DAY, lookup

# -- escalation, as data ----------------------------------------------------------------------------
# Tiers whose Xids are incidents: they take a GPU out of service. Contained (94), application and
# informational Xids are recorded for the repeat rules but are not incidents and never escalate.
INCIDENT_TIERS = frozenset({"reset", "double_bit_ecc", "fell_off_bus", "nvlink", "mechanical"})
REMAP_XIDS = frozenset({63, 64})  # row remapping: they feed the remap state, not the fatal path
# tier or Xid -> resets or reboots the same Xid may come back after before the GPU goes to RMA evaluation;
# None: never escalates. A code's own row wins over its tier's.
ESCALATION_THRESHOLDS: dict[str | int, int | None] = {
    "reset": 2, "double_bit_ecc": 2, "fell_off_bus": 2, "nvlink": 2, "mechanical": 2,
    94: None,  # contained: the application died, the GPU is fine (gpud: never escalates)
    63: None, 64: None,  # row remapping: pending remaps may happen several times before a failure
    45: None,  # preemptive cleanup after another Xid
}
ESCALATION_WINDOW = 30 * DAY
ESCALATION_ACTION = ("critical", "rma_eval")


@dataclass(frozen=True)
class NodeRule:
    incidents: int
    window_seconds: float
    severity: str
    action: str


NODE_RULE = NodeRule(5, 7 * DAY, "critical", "contact_support")


def threshold(code: int) -> int | None:
    if code in ESCALATION_THRESHOLDS:
        return ESCALATION_THRESHOLDS[code]
    return ESCALATION_THRESHOLDS.get(lookup(code).tier)


def is_incident(kind: str, code: int) -> bool:
    return kind == "xid" and lookup(code).tier in INCIDENT_TIERS


@dataclass(slots=True)
class Row:
    id: int
    uuid: str
    kind: str
    code: int
    first_ts: float
    last_ts: float
    count: int
    boot_id: str
    detail: str


@dataclass(frozen=True)
class Finding:
    status: str
    action: str
    reason: str


def cleared_at(rows: Iterable[Row]) -> float:
    return max((r.first_ts for r in rows if r.kind == "clear"), default=float("-inf"))


def assess(uuid: str, rows: list[Row], node_incidents: list[Row], now: float) -> list[Finding]:
    """Escalations due for one GPU, from its rows (with the node's boots) and the node's incidents."""
    cleared = cleared_at(rows)
    rows = [r for r in rows if r.first_ts > cleared]
    resets = [r for r in rows if r.kind == "reset"]
    out: list[Finding] = []
    by_code: dict[int, list[Row]] = {}
    for r in rows:
        if r.kind == "xid" and now - r.last_ts <= ESCALATION_WINDOW:
            by_code.setdefault(r.code, []).append(r)
    for code, incidents in sorted(by_code.items()):
        limit = threshold(code)
        if limit is None:
            continue
        # An epoch is the time between two remedies: a boot, or a reset of this GPU within the boot.
        epochs = {(r.boot_id, sum(1 for s in resets if s.boot_id == r.boot_id and s.first_ts < r.first_ts))
                  for r in incidents}
        boots = len({b for b, _ in epochs})
        remedies = len(epochs) - 1
        if remedies >= limit:
            x = lookup(code)
            since = _day(min(r.first_ts for r in incidents))
            out.append(Finding(*ESCALATION_ACTION,
                               f"Xid {code} {x.name} came back after {remedies} GPU resets or reboots "
                               f"({len(incidents)} incidents in {boots} boot(s) since {since}; limit {limit}): "
                               f"resets are not fixing this GPU, evaluate it for RMA"))
    if len(node_incidents) >= NODE_RULE.incidents and any(r.uuid == uuid for r in node_incidents):
        gpus = len({r.uuid for r in node_incidents})
        out.append(Finding(NODE_RULE.severity, NODE_RULE.action,
                           f"{len(node_incidents)} incidents on this node's GPUs ({gpus} GPU(s)) within "
                           f"{NODE_RULE.window_seconds / DAY:g} days (limit {NODE_RULE.incidents}): contact support"))
    return out


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
