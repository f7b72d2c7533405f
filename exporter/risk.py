"""Early warning (issue 19, seed §4.2.3): a per-GPU risk score from how the GPU deviates from the node's
other GPUs of its kind, plus the leading indicators the literature names.

Minder (NSDI'25) found faulty machines without labels by comparing each with the others running the same
job; a 2026 B200 study found no single metric dominant. So each component is a peer-relative excess
mapped to 0..1 by a ramp that is 0 inside healthy noise (calibrated on the simulated healthy fleet of
`make bench-early-warning`, docs/early-warning.md) and 1 where the signal alone is conclusive:

| reason | what | ramp 0 -> 1 |
|---|---|---|
| temperature | rise of the temperature peer deviation over its own 24 h baseline | 2.5 -> 6 C |
|  | (cooling that degrades), or the deviation itself | 15 -> 25 C |
| clocks | SM clock below the peers' at the same temperature and power (fail-slow) | 5 % -> 8 % |
| ecc | corrected-ECC rate above the peers' median (a burst concentrated on one GPU) | 3 -> 30 /h |
| pcie | PCIe replay rate above the peers' median | 60 -> 600 /h |
| xid | Xid 13, 31 (MMU fault), 43 over the last ~12 h above the peers' median | 2 -> 5 |
| remap_pending | a row remap waits for a reset | 1 |

The score is 1 - prod(1 - component): weak signals on several fronts add up, and one conclusive signal
is enough. Healthy GPUs score exactly 0, so the two families are sparse (metrics.py): absent reads 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .snapshot import Values

RATE_TAU = 3600.0  # s: counter rates over about the last hour
XID_TAU = 12 * 3600.0  # s: Xid counts over about the last half day
BASELINE_TAU = 24 * 3600.0  # s: a GPU's own usual temperature deviation
XID_CODES = (13, 31, 43)

SCORE = "nvidia_gpu_risk_score"
REASON = "nvidia_gpu_risk_reason"


def peer_medians(values: list[float]) -> list[float]:
    """For each value, the median of the others: O(n log n) for the node, not O(n^2)."""
    n = len(values)
    if n < 2:
        raise ValueError("a median of the others needs two values")
    order = sorted(range(n), key=values.__getitem__)
    ranked = [values[i] for i in order]
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    half, odd = (n - 1) // 2, (n - 1) % 2 == 1
    out = []
    for i in range(n):
        r = rank[i]
        hi = ranked[half + 1] if half >= r else ranked[half]  # the others' element at `half`
        if odd:
            out.append(hi)
        else:
            lo = ranked[half] if half - 1 >= r else ranked[half - 1]
            out.append((lo + hi) / 2)
    return out


def ramp(x: float | None, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear between."""
    if x is None or x <= low:
        return 0.0
    return 1.0 if x >= high else (x - low) / (high - low)


@dataclass
class RiskInputs:
    uuid: str
    sku: str
    temperature_deviation: float | None = None  # C, from thermal.py
    clock_deviation: float | None = None  # ratio - 1, from thermal.py
    ecc_corrected: float | None = None  # counters since the driver loaded
    pcie_replays: float | None = None
    remap_pending: float | None = None
    xids: Mapping[int, float] = field(default_factory=dict)


class _Rate:
    """An exponentially weighted rate (per hour) of a counter's increases; a counter that goes back (driver
    reload, reset) restarts from its new value without counting the drop."""

    __slots__ = ("last", "sum", "tau")

    def __init__(self, tau: float):
        self.last: float | None = None
        self.sum = 0.0
        self.tau = tau

    def add(self, value: float | None, dt: float) -> float:
        if value is not None:
            increase = 0.0 if self.last is None or value < self.last else value - self.last
            self.sum = self.sum * math.exp(-dt / self.tau) + increase
            self.last = value
        return self.sum / (self.tau / 3600.0)  # events per hour over the window


class _State:
    __slots__ = ("baseline", "ecc", "last", "pcie", "xid")

    def __init__(self) -> None:
        self.ecc = _Rate(RATE_TAU)
        self.pcie = _Rate(RATE_TAU)
        self.xid = _Rate(XID_TAU)
        self.baseline: float | None = None
        self.last: float | None = None


class RiskTracker:
    """Per-GPU rates and baselines; `update` returns each GPU's score and components as series."""

    def __init__(self) -> None:
        self._state: dict[str, _State] = {}

    def update(self, now: float, gpus: Iterable[RiskInputs]) -> dict[str, Values]:
        batch = list(gpus)
        rates: dict[str, tuple[float, float, float]] = {}
        rise: dict[str, float | None] = {}
        for g in batch:
            st = self._state.get(g.uuid)
            if st is None:
                st = self._state[g.uuid] = _State()
            dt = 0.0 if st.last is None else max(now - st.last, 0.0)
            st.last = now
            xids = sum(g.xids.get(code, 0.0) for code in XID_CODES)
            rates[g.uuid] = (st.ecc.add(g.ecc_corrected, dt), st.pcie.add(g.pcie_replays, dt),
                             st.xid.add(xids, dt) * (XID_TAU / 3600.0))  # (the Xid one as a count over the window)
            dev = g.temperature_deviation
            if dev is None:
                rise[g.uuid] = None
                continue
            if st.baseline is None:
                st.baseline = dev
            rise[g.uuid] = dev - st.baseline
            st.baseline += (dev - st.baseline) * (1 - math.exp(-dt / BASELINE_TAU))
        # each rate above the median of the GPU's same-SKU peers (0 without peers: the rate itself counts)
        excess: dict[str, list[float]] = {}
        by_sku: dict[str, list[RiskInputs]] = {}
        for g in batch:
            by_sku.setdefault(g.sku, []).append(g)
        for members in by_sku.values():
            columns = [[rates[g.uuid][k] for g in members] for k in range(3)]
            medians = [peer_medians(c) if len(c) > 1 else [0.0] for c in columns]
            for j, g in enumerate(members):
                excess[g.uuid] = [columns[k][j] - medians[k][j] for k in range(3)]
        out: dict[str, Values] = {}
        for g in batch:
            ecc, pcie, xid = excess[g.uuid]
            components = {
                "temperature": max(ramp(rise[g.uuid], 2.5, 6.0), ramp(g.temperature_deviation, 15.0, 25.0)),
                "clocks": ramp(None if g.clock_deviation is None else -g.clock_deviation, 0.05, 0.08),
                "ecc": ramp(ecc, 3.0, 30.0),
                "pcie": ramp(pcie, 60.0, 600.0),
                "xid": ramp(xid, 2.0, 5.0),
                "remap_pending": 1.0 if g.remap_pending else 0.0,
            }
            keep = 1.0
            for v in components.values():
                keep *= 1.0 - v
            out[g.uuid] = {SCORE: {(): round(1.0 - keep, 3)},
                           REASON: {(reason,): round(v, 3) for reason, v in components.items()}}
        return out
