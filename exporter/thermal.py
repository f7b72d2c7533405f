"""The thermal model of each GPU from its own history, compared with its peers on the node (issue 19, seed
§4.2.2), and the inputs of the risk score (risk.py).

Per GPU, O(1) per update, from exponentially weighted sums (time-weighted, so an irregular scrape
interval does not change what the model says):

- **Thermal resistance**: temperature = intercept + R * power, a least-squares fit over the last day
  (time constant SLOPE_TAU: long enough to hold jobs starting and stopping). A GPU whose power hardly
  moved has no slope of its own to tell: the fit is shrunk toward a prior slope (ridge, PRIOR_WEIGHT
  W^2), so R is the prior until the GPU's power varies by tens of watts, and the data's once it varies
  by hundreds.
- **Temperature peer deviation**: the GPU's temperature at its power limit, from its mean temperature and
  power over the last hours (LEVEL_TAU) carried to the limit along its own R, minus the median of its
  same-SKU peers' the same way: "GPU 3 runs 7 C above its peers at the same power". Ambient swings and
  shared inlet air cancel out; cooling that degrades shows within hours. Carrying each GPU along its own
  slope, to one reference power, keeps the per-board spread of R from reading as a change whenever the
  node goes from idle to busy.
- **DVFS response and clock peer deviation**: SM clock = c0 + k * temperature, fitted only over samples
  at the power limit and busy (there the clock is what DVFS grants at that temperature), with time that
  counts only while busy (an idle spell neither erases nor dilutes it). The deviation is the GPU's fitted
  clock at the node's median busy temperature over the median of its peers' at that temperature, minus
  1: "GPU 5 clocks 8 % below its peers at the same temperature and power" (fail-slow).

Peers are the node's other GPUs of the same name; with fewer than two peers no deviation is served.
Where it is computed, and why there rather than in recording rules: docs/early-warning.md.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .risk import RiskInputs, RiskTracker, peer_medians
from .snapshot import Values

SLOPE_TAU = 24 * 3600.0  # s: the thermal resistance fit's memory
LEVEL_TAU = 2 * 3600.0  # s: the mean temperature and power the deviation starts from
DVFS_TAU = 3600.0  # s of busy time at the power limit: the DVFS fit's memory
MIN_STEP = 10.0  # s: the model takes at most one sample per GPU this often, whatever the scrape rate
MAX_STEP = 120.0  # s: a gap (exporter stalled, GPU lost) counts as this much, not as hours of one reading
PRIOR_SLOPE = 0.06  # C/W: H100/H200 SXM, ~30 C idle at ~70 W to ~70 C at 700 W (docs/hardware, demo)
PRIOR_WEIGHT = 50.0**2  # W^2: a GPU whose power varies by +-50 W weighs its own slope as much as the prior
PRIOR_DVFS = -4e6  # Hz/C: SM clock lost per degree at the power limit (assumption; leakage grows with heat)
PRIOR_DVFS_WEIGHT = 3.0**2  # C^2
BUSY_UTIL = 0.8
AT_LIMIT = 0.85  # power / enforced limit: "at the power limit"
# A fit is served from its first sample (the first counts as MAX_STEP): early on the prior dominates it.
MIN_FIT_WEIGHT = MIN_DVFS_WEIGHT = 1.0  # s

RESISTANCE = "nvidia_gpu_thermal_resistance_celsius_per_watt"
TEMP_DEVIATION = "nvidia_gpu_temperature_peer_deviation_celsius"
CLOCK_DEVIATION = "nvidia_gpu_clock_peer_deviation_ratio"


@dataclass
class Sample:
    """What the model reads of one GPU at one collection (base units)."""

    uuid: str
    sku: str
    temperature: float | None = None
    power: float | None = None
    power_limit: float | None = None
    sm_clock: float | None = None
    utilization: float | None = None
    ecc_corrected: float | None = None  # volatile corrected ECC count
    pcie_replays: float | None = None
    remap_pending: float | None = None
    xids: Mapping[int, float] = field(default_factory=dict)  # code -> count since boot


class _Fit:
    """Exponentially weighted least squares of y on x, shrunk toward a prior slope."""

    __slots__ = ("prior", "prior_weight", "w", "x", "xx", "xy", "y")

    def __init__(self, prior: float, prior_weight: float):
        self.w = self.x = self.y = self.xx = self.xy = 0.0
        self.prior, self.prior_weight = prior, prior_weight

    def add(self, decay: float, weight: float, x: float, y: float) -> None:
        self.w = self.w * decay + weight
        self.x = self.x * decay + weight * x
        self.y = self.y * decay + weight * y
        self.xx = self.xx * decay + weight * x * x
        self.xy = self.xy * decay + weight * x * y

    def coefficients(self) -> tuple[float, float, float]:
        """(intercept, slope, mean x). The slope is the ridge estimate on the weighted moments: the data's
        covariance and the prior each count by their variance (the spread of x, and `prior_weight`)."""
        mx, my = self.x / self.w, self.y / self.w
        var = max(self.xx / self.w - mx * mx, 0.0)
        cov = self.xy / self.w - mx * my
        slope = (cov + self.prior_weight * self.prior) / (var + self.prior_weight)
        return my - slope * mx, slope, mx

    def at(self, x: float) -> float:
        a, b, _ = self.coefficients()
        return a + b * x


class _Gpu:
    __slots__ = ("dvfs", "last", "level", "limit", "sku", "thermal")

    def __init__(self, sku: str):
        self.sku = sku
        self.thermal = _Fit(PRIOR_SLOPE, PRIOR_WEIGHT)
        self.level = _Fit(PRIOR_SLOPE, PRIOR_WEIGHT)  # (only its means are read)
        self.limit = 0.0  # the last enforced power limit: the reference power
        self.dvfs = _Fit(PRIOR_DVFS, PRIOR_DVFS_WEIGHT)
        self.last = float("nan")  # time of the last sample taken


class NodeModel:
    """The node's GPUs' thermal and DVFS fits, their peer deviations and risk scores. One instance per
    exporter; `update` is called with every collection's GPUs and returns the series to add per UUID.
    Not thread-safe: its owner (the pipeline) calls it under its lock."""

    def __init__(self) -> None:
        self._gpus: dict[str, _Gpu] = {}
        self.risk = RiskTracker()
        self._out: dict[str, Values] = {}

    def update(self, now: float, samples: Iterable[Sample]) -> dict[str, Values]:
        batch = list(samples)
        took = False
        for s in batch:
            g = self._gpus.get(s.uuid)
            if g is None or g.sku != s.sku:
                g = self._gpus[s.uuid] = _Gpu(s.sku)
            if not now - g.last < MIN_STEP:  # (also true for the first sample: last is NaN)
                self._take(g, s, now)
                took = True
        if took or not self._out:
            self._out = self._outputs(now, batch)
        return self._out

    def _take(self, g: _Gpu, s: Sample, now: float) -> None:
        dt = MAX_STEP if math.isnan(g.last) else min(now - g.last, MAX_STEP)
        g.last = now
        if s.temperature is None or s.power is None:
            return
        g.thermal.add(math.exp(-dt / SLOPE_TAU), dt, s.power, s.temperature)
        g.level.add(math.exp(-dt / LEVEL_TAU), dt, s.power, s.temperature)
        if s.power_limit:
            g.limit = s.power_limit
        busy = (s.utilization is not None and s.utilization >= BUSY_UTIL and s.sm_clock is not None
                and s.power_limit is not None and s.power_limit > 0 and s.power >= AT_LIMIT * s.power_limit)
        if busy:
            assert s.sm_clock is not None
            g.dvfs.add(math.exp(-dt / DVFS_TAU), dt, s.temperature, s.sm_clock)

    def _outputs(self, now: float, batch: list[Sample]) -> dict[str, Values]:
        out: dict[str, Values] = {}
        temp_dev: dict[str, float] = {}
        clock_dev: dict[str, float] = {}
        by_sku: dict[str, list[tuple[str, _Gpu]]] = {}
        for s in batch:
            by_sku.setdefault(s.sku, []).append((s.uuid, self._gpus[s.uuid]))
        for members in by_sku.values():
            fitted = [(u, g) for u, g in members if g.thermal.w >= MIN_FIT_WEIGHT]
            busy = [(u, g) for u, g in members if g.dvfs.w >= MIN_DVFS_WEIGHT]
            reference = max((p.limit for _, p in fitted), default=0.0)
            at_limit = [_at(p, reference) for _, p in fitted]
            temps = ({u: t - m for (u, _), t, m in zip(fitted, at_limit, peer_medians(at_limit), strict=True)}
                     if len(fitted) >= 3 else {})
            for uuid, g in fitted:
                values = out.setdefault(uuid, {})
                values[RESISTANCE] = {(): round(g.thermal.coefficients()[1], 5)}
                if len(fitted) >= 3:
                    temp_dev[uuid] = temps[uuid]
                    values[TEMP_DEVIATION] = {(): round(temp_dev[uuid], 2)}
            if len(busy) >= 3:  # every GPU's DVFS fit at one temperature: the node's median busy temperature
                hot = statistics.median(g.dvfs.x / g.dvfs.w for _, g in busy)
                clocks = [g.dvfs.at(hot) for _, g in busy]
                for (uuid, _), clock, reference in zip(busy, clocks, peer_medians(clocks), strict=True):
                    if reference > 0:
                        clock_dev[uuid] = clock / reference - 1
                        out.setdefault(uuid, {})[CLOCK_DEVIATION] = {(): round(clock_dev[uuid], 4)}
        inputs = [RiskInputs(uuid=s.uuid, sku=s.sku, temperature_deviation=temp_dev.get(s.uuid),
                             clock_deviation=clock_dev.get(s.uuid), ecc_corrected=s.ecc_corrected,
                             pcie_replays=s.pcie_replays, remap_pending=s.remap_pending, xids=s.xids)
                  for s in batch]
        for uuid, series in self.risk.update(now, inputs).items():
            out.setdefault(uuid, {}).update(series)
        return out


def _at(g: _Gpu, power: float) -> float:
    """The GPU's recent temperature carried to `power` along its fitted resistance."""
    level = g.level
    return level.y / level.w + g.thermal.coefficients()[1] * (power - level.x / level.w)


def sample_of(uuid: str, sku: str, values: Mapping[str, Mapping[tuple[str, ...], float]],
              xids: Mapping[int, float]) -> Sample:
    """A collection's readings of one GPU, as the model reads them."""

    def one(metric: str, *labels: str) -> float | None:
        return values.get(metric, {}).get(tuple(labels))

    return Sample(uuid=uuid, sku=sku, temperature=one("nvidia_gpu_temperature_celsius"),
                  power=one("nvidia_gpu_power_watts"), power_limit=one("nvidia_gpu_power_limit_watts"),
                  sm_clock=one("nvidia_gpu_clock_hertz", "sm"), utilization=one("nvidia_gpu_utilization_ratio"),
                  ecc_corrected=one("nvidia_gpu_ecc_errors_total", "corrected", "volatile"),
                  pcie_replays=one("nvidia_gpu_pcie_replay_errors_total"),
                  remap_pending=one("nvidia_gpu_remapped_rows_pending"), xids=xids)
