"""Per-GPU diagnosis: pure functions from (snapshot, previous snapshot, Xid history) to verdicts, and a
`Diagnoser` that does the same with its own cache of the snapshot rules' findings (one per pipeline).

Each check is ok, warning or critical with a reason a person can read and one action from
xidcatalog.ACTIONS. The conditions are rows of tables, not branches: a row names the check, what it looks
at, the limit, the severity and the action. Thresholds come from NVIDIA's and DCGM's guidance
(NVML and DCGM documentation; the checks and their limits: docs/diagnosis.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .kernlog import location
from .snapshot import GpuSnapshot
from .xidcatalog import ACTIONS, DAY, REPEAT_RULES, count_bursts, lookup
from .xidstore import XidEvent

CHECKS = ("availability", "memory", "thermal", "power", "pcie", "nvlink", "xid", "recovery_action", "history")
STATUS_VALUE = {"ok": 0, "warning": 1, "critical": 2}

THERMAL_MARGIN_C = 3.0  # warn this close to the GPU's own limit
REMAP_UNCORRECTABLE_LIMIT = 512  # DCGM fails a GPU at 512 uncorrectable row remaps
RETIRED_PAGES_LIMIT = 60  # DCGM: 60 (now 63) retired pages -> field diag / RMA
NVLINK_CRC_PER_SECOND = 100.0  # "CRC errors only matter at rates of 100+ per second" (DCGM)
SINGLE_XID_WINDOW = 3600.0  # a one-off Xid keeps its verdict this long
# PCIe replays per minute per lane that DCGM tolerates (BER 1e-12 at the line rate), by generation
PCIE_REPLAYS_PER_LANE_MINUTE = {1: 0.15, 2: 0.3, 3: 0.48, 4: 0.96, 5: 1.92, 6: 3.84}
# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION value -> action
RECOVERY_ACTIONS = {1: "reset_gpu", 2: "reboot_node", 3: "drain_p2p", 4: "drain_and_reset",
                    5: "contact_support", 6: "reboot_node", 7: "reboot_node"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warning | critical
    reason: str
    action: str = "none"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    action: str
    reason: str


@dataclass(frozen=True)
class Diagnosis:
    checks: tuple[Check, ...]
    action: str  # the strongest action due: from the worst checks, the latest in ACTIONS

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=STATUS_VALUE.__getitem__, default="ok")

    @functools.cached_property
    def series(self) -> dict[str, dict[tuple[str, ...], float]]:
        """nvidia_gpu_health and nvidia_gpu_recommended_action, made once per diagnosis (a healthy GPU's
        is the same object every scrape, which exposition then reuses whole)."""
        return {"nvidia_gpu_health": {(c.name,): float(STATUS_VALUE[c.status]) for c in self.checks},
                "nvidia_gpu_recommended_action": {(self.action,): 1.0}}


def _v(g: GpuSnapshot, metric: str, *labels: str) -> float | None:
    return g.values.get(metric, _NONE).get(labels)  # GpuSnapshot.value, one call less: rules run per scrape


_NONE: Mapping[tuple[str, ...], float] = {}


def _sum(g: GpuSnapshot, metric: str, match: Callable[[tuple[str, ...]], bool] | None = None) -> float:
    series = g.values.get(metric, _NONE)
    return sum(series.values()) if match is None else sum(v for k, v in series.items() if match(k))


# (check, status, action, reason template with {v}, value of the condition or None when it does not hold)
Rule = tuple[str, str, str, str, Callable[[GpuSnapshot], float | None]]


def _when(value: float | None, holds: Callable[[float], bool]) -> float | None:
    return value if value is not None and holds(value) else None


def _active(reason: str) -> Callable[[GpuSnapshot], float | None]:
    return lambda g: _when(_v(g, "nvidia_gpu_clock_event_active", reason), lambda v: v >= 1)


def _near(metric: str, *thresholds: str) -> Callable[[GpuSnapshot], float | None]:
    def test(g: GpuSnapshot) -> float | None:
        t = _v(g, metric)
        limits = [x for name in thresholds if (x := _v(g, "nvidia_gpu_temperature_threshold_celsius", name))]
        return _when(t, lambda v: bool(limits) and v >= min(limits) - THERMAL_MARGIN_C)

    return test


def _at_slowdown(g: GpuSnapshot) -> float | None:
    t, limit = _v(g, "nvidia_gpu_temperature_celsius"), _v(g, "nvidia_gpu_temperature_threshold_celsius", "slowdown")
    return _when(t, lambda v: limit is not None and v >= limit)


def _limit_below_default(g: GpuSnapshot) -> float | None:
    limit, default = _v(g, "nvidia_gpu_power_limit_watts"), _v(g, "nvidia_gpu_power_default_limit_watts")
    return _when(limit, lambda v: default is not None and v < default)


def _retired(g: GpuSnapshot) -> float | None:
    return _when(_sum(g, "nvidia_gpu_retired_pages") if "nvidia_gpu_retired_pages" in g.values else None,
                 lambda v: v >= RETIRED_PAGES_LIMIT)


def _width_degraded(g: GpuSnapshot) -> float | None:
    width, top = _v(g, "nvidia_gpu_pcie_link_width"), _v(g, "nvidia_gpu_pcie_link_max_width")
    return _when(width, lambda v: top is not None and v < top)


def _gen_degraded(g: GpuSnapshot) -> float | None:
    # Some boards drop the link generation when idle to save power; only a busy GPU's downgrade counts.
    gen, top = _v(g, "nvidia_gpu_pcie_link_generation"), _v(g, "nvidia_gpu_pcie_link_max_generation")
    idle = _v(g, "nvidia_gpu_clock_event_active", "gpu_idle")
    return _when(gen, lambda v: top is not None and v < top and idle != 1)


def _links_down(g: GpuSnapshot) -> float | None:
    return _when(_v(g, "nvidia_gpu_nvlink_links", "down"), lambda v: v > 0)


SNAPSHOT_RULES: tuple[Rule, ...] = (
    ("memory", "critical", "drain_and_reset", "{v:g} uncorrectable ECC errors since the driver loaded",
     lambda g: _when(_v(g, "nvidia_gpu_ecc_errors_total", "uncorrected", "volatile"), lambda v: v > 0)),
    ("memory", "critical", "rma_eval", "row remapping failed: the memory cannot repair itself any more",
     lambda g: _when(_v(g, "nvidia_gpu_remapped_rows_failed"), lambda v: v >= 1)),
    ("memory", "critical", "rma_eval", "{v:g} rows remapped for uncorrectable errors (limit 512)",
     lambda g: _when(_v(g, "nvidia_gpu_remapped_rows", "uncorrectable"), lambda v: v >= REMAP_UNCORRECTABLE_LIMIT)),
    ("memory", "critical", "rma_eval", "{v:g} pages retired (limit 60)", _retired),
    ("memory", "warning", "reset_gpu", "a row remap waits for the next GPU reset",
     lambda g: _when(_v(g, "nvidia_gpu_remapped_rows_pending"), lambda v: v >= 1)),
    ("memory", "warning", "reset_gpu", "a page retirement waits for the next GPU reset",
     lambda g: _when(_v(g, "nvidia_gpu_retired_pages_pending"), lambda v: v >= 1)),
    ("memory", "warning", "rma_eval", "{v:g} uncorrectable ECC errors over the board's life",
     lambda g: _when(_v(g, "nvidia_gpu_ecc_errors_total", "uncorrected", "aggregate"), lambda v: v > 0)),
    ("thermal", "critical", "check_cooling", "hardware thermal slowdown is active", _active("hw_thermal_slowdown")),
    ("thermal", "critical", "check_cooling", "GPU at {v:g} °C, at or past its slowdown temperature", _at_slowdown),
    ("thermal", "warning", "check_cooling", "GPU at {v:g} °C, within 3 °C of its limit",
     _near("nvidia_gpu_temperature_celsius", "gpu_max", "slowdown")),
    ("thermal", "warning", "check_cooling", "HBM at {v:g} °C, within 3 °C of its limit",
     _near("nvidia_gpu_memory_temperature_celsius", "memory_max")),
    ("thermal", "warning", "check_cooling", "software thermal slowdown is active", _active("sw_thermal_slowdown")),
    ("power", "critical", "check_power", "hardware power brake is active (power delivery)",
     _active("hw_power_brake_slowdown")),
    ("power", "warning", "check_power", "hardware slowdown is active", _active("hw_slowdown")),
    ("power", "warning", "check_power", "power limit {v:g} W is below the board's default", _limit_below_default),
    ("pcie", "warning", "rma_eval", "PCIe link at x{v:g}, below the GPU's maximum width", _width_degraded),
    ("pcie", "warning", "rma_eval", "PCIe link at Gen{v:g} while busy, below the GPU's maximum", _gen_degraded),
    ("nvlink", "critical", "check_nvlink", "{v:g} NVLink link(s) down", _links_down),
)


def _rate(g: GpuSnapshot, prev: GpuSnapshot | None, seconds: float, metric: str,
          match: Callable[[tuple[str, ...]], bool] | None = None) -> float | None:
    """Increase per second since the previous collection; None without history or across a reset."""
    if prev is None or seconds <= 0 or metric not in g.values or metric not in prev.values:
        return None
    delta = _sum(g, metric, match) - _sum(prev, metric, match)
    return delta / seconds if delta >= 0 else None


def _rate_findings(g: GpuSnapshot, prev: GpuSnapshot | None, seconds: float) -> list[Finding]:
    out = []
    replays = _rate(g, prev, seconds, "nvidia_gpu_pcie_replay_errors_total")
    gen, width = _v(g, "nvidia_gpu_pcie_link_generation"), _v(g, "nvidia_gpu_pcie_link_width")
    if replays is not None and gen and width:
        limit = PCIE_REPLAYS_PER_LANE_MINUTE.get(int(gen), 1.92) * width
        if replays * 60 > limit:
            out.append(Finding("pcie", "warning", "rma_eval",
                               f"{replays * 60:.0f} PCIe replays/min (x{width:g} Gen{gen:g} tolerates {limit:.0f})"))
    if prev is not None and seconds > 0:
        (faults, crc), (faults0, crc0) = _link_errors(g), _link_errors(prev)
        if faults > faults0:
            out.append(Finding("nvlink", "warning", "check_nvlink", "NVLink replay/recovery errors are increasing"))
        rate = (crc - crc0) / seconds
        if rate >= NVLINK_CRC_PER_SECOND:
            out.append(Finding("nvlink", "warning", "check_nvlink", f"{rate:.0f} NVLink CRC errors/s"))
    return out


def _link_errors(g: GpuSnapshot) -> tuple[float, float]:
    """(replay + recovery, crc_flit + crc_data) over all links, from the GPU's per-type totals."""
    series = g.values.get("nvidia_gpu_nvlink_errors_total", _NONE)
    return (series.get(("replay",), 0.0) + series.get(("recovery",), 0.0),
            series.get(("crc_flit",), 0.0) + series.get(("crc_data",), 0.0))


# Every family SNAPSHOT_RULES read (tests/test_diagnosis.py holds the rules to this list).
RULE_INPUTS: tuple[str, ...] = (
    "nvidia_gpu_ecc_errors_total", "nvidia_gpu_remapped_rows", "nvidia_gpu_remapped_rows_failed",
    "nvidia_gpu_remapped_rows_pending", "nvidia_gpu_retired_pages", "nvidia_gpu_retired_pages_pending",
    "nvidia_gpu_clock_event_active", "nvidia_gpu_temperature_celsius", "nvidia_gpu_memory_temperature_celsius",
    "nvidia_gpu_temperature_threshold_celsius", "nvidia_gpu_power_limit_watts", "nvidia_gpu_power_default_limit_watts",
    "nvidia_gpu_pcie_link_width", "nvidia_gpu_pcie_link_max_width", "nvidia_gpu_pcie_link_generation",
    "nvidia_gpu_pcie_link_max_generation", "nvidia_gpu_nvlink_links",
)


def _snapshot_findings(g: GpuSnapshot) -> list[Finding]:
    """SNAPSHOT_RULES over the GPU's values."""
    found = []
    for check, status, action, reason, test in SNAPSHOT_RULES:
        value = test(g)
        if value is not None:
            found.append(Finding(check, status, action, reason.format(v=value)))
    return found


_RuleInputs = tuple[Mapping[tuple[str, ...], float] | None, ...]


class Diagnoser:
    """diagnose(), with each GPU's snapshot-rule findings kept while the rules' inputs compare equal to
    the last time (in C): they mostly read the same from one scrape to the next. The comparison is by
    the mappings' identity first, so it relies on the no-mutation invariant (snapshot.py). Not
    thread-safe: its owner (the pipeline) calls it under its lock."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[_RuleInputs, list[Finding]]] = {}  # uuid -> rule inputs, findings

    def diagnose(self, g: GpuSnapshot, history: Iterable[XidEvent] = (), prev: GpuSnapshot | None = None,
                 seconds: float = 0.0, now: float = 0.0, escalations: Iterable[Finding] = ()) -> Diagnosis:
        return _diagnose(g, history, prev, seconds, now, escalations, self._snapshot_findings)

    def _snapshot_findings(self, g: GpuSnapshot) -> list[Finding]:
        inputs = tuple(map(g.values.get, RULE_INPUTS))
        last = self._last.get(g.identity.uuid)
        if last is not None and last[0] == inputs:
            return last[1]
        found = _snapshot_findings(g)
        self._last[g.identity.uuid] = (inputs, found)
        return found


def _xid_findings(history: Iterable[XidEvent], now: float) -> list[Finding]:
    out: list[Finding] = []
    recent = [e for e in history if now - e.timestamp <= DAY]
    if not recent:
        return out
    for e in recent:
        x = lookup(e.code)
        if x.severity in ("warning", "critical") and now - e.timestamp <= SINGLE_XID_WINDOW:
            text = f"Xid {e.code} {x.name}: {x.category}" + (f" ({e.message})" if e.message else "")
            out.append(Finding("xid", x.severity, x.action, text))
    for rule in REPEAT_RULES:
        mine = [e for e in recent if e.code in rule.codes]
        for where, events in (_by_location(mine) if rule.same_location else {"": mine}).items():
            if count_bursts(e.timestamp for e in events) >= rule.bursts:
                out.append(Finding("xid", rule.severity, rule.action, rule.reason + (f" ({where})" if where else "")))
                break
    return out


def _by_location(events: list[XidEvent]) -> dict[str, list[XidEvent]]:
    """Xids by the GPC/TPC their lines name; all together where none names one (NVML events alone)."""
    groups: dict[str, list[XidEvent]] = {}
    for e in events:
        if where := location(e.code, e.message):
            groups.setdefault(where, []).append(e)
    return groups or {"": events}


def _strongest(findings: Iterable[Finding]) -> tuple[str, str]:
    """(status, action) of the worst findings; the action is the latest in ACTIONS among them."""
    worst = max((f for f in findings), key=lambda f: (STATUS_VALUE[f.status], ACTIONS.index(f.action)),
                default=None)
    return ("ok", "none") if worst is None else (worst.status, worst.action)


def diagnose(g: GpuSnapshot, history: Iterable[XidEvent] = (), prev: GpuSnapshot | None = None,
             seconds: float = 0.0, now: float = 0.0, escalations: Iterable[Finding] = ()) -> Diagnosis:
    """`escalations`: the incident history's findings (check "history"), see history.py."""
    return _diagnose(g, history, prev, seconds, now, escalations, _snapshot_findings)


def _diagnose(g: GpuSnapshot, history: Iterable[XidEvent], prev: GpuSnapshot | None, seconds: float, now: float,
              escalations: Iterable[Finding], rules: Callable[[GpuSnapshot], list[Finding]]) -> Diagnosis:
    findings: list[Finding] = list(escalations)
    if not g.up and _v(g, "nvidia_gpu_released"):
        pass  # let go on the node agent's request (a GPU reset): not a fault; nvidia_gpu_released says so
    elif not g.up:
        findings.append(Finding("availability", "critical", "reboot_node",
                                "NVML cannot reach the GPU (lost or fell off the bus)"))
    elif g.stale:
        findings.append(Finding("availability", "warning", "reset_gpu",
                                "a driver call on this GPU hung past the deadline"))
    if g.up:
        findings.extend(rules(g))
        findings.extend(_rate_findings(g, prev, seconds))
    findings.extend(_xid_findings(history, now))
    recovery = _v(g, "nvidia_gpu_recovery_action")
    if recovery:
        action = RECOVERY_ACTIONS.get(int(recovery), "contact_support")
        findings.append(Finding("recovery_action", "critical", action,
                                f"the driver asks for recovery action {int(recovery)} ({action})"))
    if not findings:
        return _HEALTHY
    checks = []
    for name in CHECKS:
        mine = [f for f in findings if f.check == name]
        status, action = _strongest(mine)
        reason = "; ".join(dict.fromkeys(f.reason for f in mine if f.status == status)) or "ok"
        checks.append(Check(name, status, reason, action))
    return Diagnosis(tuple(checks), _strongest(findings)[1])


_HEALTHY = Diagnosis(tuple(Check(name, "ok", "ok", "none") for name in CHECKS), "none")
