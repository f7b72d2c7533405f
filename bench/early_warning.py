"""The early-warning evaluation harness (issue 19): a simulated fleet with healthy noise and injected
degradations, run through the exporter's own model (exporter/thermal.py, exporter/risk.py: the code that
computes the served series, called as the collector calls it), with the shipped alerts applied as
Prometheus would evaluate them (`expr` true for `for`). Prints one JSON document; docs/early-warning.md
is its report.

    .venv/bin/python bench/early_warning.py                 # 64 nodes x 8 GPUs x 7 days, ~minutes
    .venv/bin/python bench/early_warning.py --nodes 2 --days 3 --faults 1   # the smoke run of make test

What it does not do: it does not serve the series to a real Prometheus (the model runs in the exporter,
so the rules only compare its output with a threshold; the alert rules themselves are checked by promtool
in tests/test_rules.py). Every parameter below is cited or marked as an assumption.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nvml_exporter.risk import REASON, SCORE
from nvml_exporter.thermal import NodeModel, Sample

# --- the board: H100/H200 SXM (docs/hardware, /work real-board captures summarised in docs/hardware) ---
SKU = "NVIDIA H100 80GB HBM3"
POWER_LIMIT = 700.0  # W
IDLE_POWER = (66.0, 101.0)  # W, idle draw seen across captured H100 nodes
SLOWDOWN = 89.0  # C: T.Limit 87 C, HW slowdown at the slowdown_tlimit offset -2 C
MAX_CLOCK, IDLE_CLOCK = 1980e6, 345e6
# --- healthy noise (assumptions unless cited) ---
DIURNAL = 3.0  # C amplitude of the inlet/ambient swing (issue 19: +-3 C)
RESISTANCE = (0.055, 0.004)  # C/W mean and per-board spread (assumption, fits the demo's 60-66 C at 640-661 W)
INTERCEPT_SPREAD = 1.5  # C per-board offset, standard deviation (assumption: "per-board spread")
THERMAL_TAU = 90.0  # s: die temperature follows power with this time constant (assumption)
TEMP_NOISE = 0.4  # C per reading
SILICON_SPREAD = 0.006  # per-board clock spread at the same temperature and power (assumption)
DVFS_SLOPE = 0.002  # fraction of the clock lost per C above 60 C at the power limit (assumption)
JOB_HOURS, GAP_HOURS = 5.0, 0.75  # mean job length and idle gap, exponential (assumption)
MEMORY_BOUND = 0.3  # share of jobs that do not reach the power limit (assumption)
APP_CRASH = 0.03  # share of jobs that end in Xid 13 on every GPU of the job (assumption)
XID31_PER_DAY = 0.02  # isolated MMU faults per GPU-day (assumption)
ECC_PER_HOUR, NOISY_ECC, NOISY_ECC_RATE = 0.01, 0.02, 0.5  # corrected ECC; 2 % of boards run noisier
REPLAY_PER_HOUR, NOISY_PCIE, NOISY_PCIE_RATE = 2.0, 0.03, 40.0  # PCIe replays; 3 % marginal links
# --- injected degradations ---
COOLING_RATE = 0.5 / 3600  # C/s at the same power, until HW slowdown (issue 19)
FAIL_SLOW = 0.08  # clocks -8 % (issue 19)
ECC_START, ECC_DOUBLING, ECC_HOURS = 1.0, 3.0, 24.0  # burst: 1/h doubling every 3 h, remap pending after 24 h
FAIL_SLOW_FAILURE_HOURS = 24.0  # assumption: when a fail-slow GPU's job would be declared failed
KINDS = ("cooling", "fail_slow", "ecc_burst", "vanish")
# --- the shipped alerts, read from the generated pack so the harness judges what ships ---
ALERTS = Path(__file__).resolve().parent.parent / "rules" / "nvml-exporter-alerts.yml"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def shipped_alert(name: str) -> dict[str, Any]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                return dict(rule)
    raise SystemExit(f"{ALERTS}: no alert {name}")


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)([smh])", text)
    if not m:
        raise SystemExit(f"{ALERTS}: cannot read the duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def risk_alert() -> tuple[float, float]:
    """GpuEarlyWarning: (score threshold, for) — the score alert every degradation but a vanish must raise."""
    rule = shipped_alert("GpuEarlyWarning")
    m = re.search(r"nvidia_gpu_risk_score(?:\{[^}]*\})? >= ([0-9.]+)", rule["expr"])
    if not m:
        raise SystemExit(f"{ALERTS}: GpuEarlyWarning's threshold is not a plain '>= X'")
    return float(m.group(1)), seconds(rule["for"])


RISK_THRESHOLD, RISK_FOR = risk_alert()
GONE_FOR = seconds(shipped_alert("GpuGoneFromNvml")["for"])  # NVML counts fewer GPUs than the PCI bus
GRID = [(t, f) for t in (0.3, 0.5, 0.7) for f in (900.0, 1800.0, 3600.0)]
WARMUP = 86400.0  # s: the first day settles baselines; false alarms are counted after it


@dataclass
class Fault:
    kind: str
    node: int
    gpu: int
    onset: float
    event: float | None = None  # the throttle or failure the degradation leads to (s)
    detected: float | None = None
    reason: str = ""

    end: float = 0.0  # the end of the run: a throttle after it leaves the lead a lower bound

    @property
    def lead_hours(self) -> float | None:
        if self.detected is None:
            return None
        return round(((self.end if self.event is None else self.event) - self.detected) / 3600, 2)


@dataclass
class Board:
    resistance: float
    offset: float
    silicon: float
    noisy_ecc: bool
    noisy_pcie: bool
    temp: float = 30.0
    ecc: int = 0
    replays: int = 0
    xids: dict[int, float] = field(default_factory=dict)
    remap_pending: float = 0.0


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p < limit:
            return k
        k += 1


class Alert:
    """`expr for: F` as Prometheus evaluates it: firing once true for F, each new firing one alarm."""

    __slots__ = ("fired", "firing", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.firing = False
        self.fired: list[float] = []

    def step(self, t: float, true: bool, hold: float) -> None:
        if not true:
            self.since, self.firing = None, False
            return
        if self.since is None:
            self.since = t
        if not self.firing and t - self.since >= hold:
            self.firing = True
            self.fired.append(t)


def run_node(node: int, args: argparse.Namespace, faults: list[Fault], seed: int) -> dict:
    rng = random.Random(seed)
    gpus, k = args.gpus, args.noise  # k scales every healthy spread and noise
    boards = [Board(rng.gauss(RESISTANCE[0], RESISTANCE[1] * k), rng.gauss(0, INTERCEPT_SPREAD * k),
                    rng.gauss(1, SILICON_SPREAD * k), rng.random() < NOISY_ECC * k, rng.random() < NOISY_PCIE * k)
              for _ in range(gpus)]
    mine = {f.gpu: f for f in faults}
    phase, node_offset = rng.uniform(0, 86400), rng.gauss(0, 1.0 * k)
    model = NodeModel()
    alerts = {(g, th, hold): Alert() for g in range(gpus) for th, hold in GRID}
    shipped = {g: alerts[(g, RISK_THRESHOLD, RISK_FOR)] for g in range(gpus)}
    job_until, gap_until, job_kind = 0.0, 0.0, "idle"
    step, end = args.step, args.days * 86400
    t = 0.0
    reasons: dict[int, str] = {}
    firing_reasons: list[tuple[int, float, str]] = []  # (gpu, t, top reason) of each firing of the shipped alert
    while t < end:
        if t >= job_until and t >= gap_until:
            if job_kind != "idle":  # the job ended: maybe in an application crash (Xid 13 on every GPU)
                if rng.random() < APP_CRASH:
                    for b in boards:
                        b.xids[13] = b.xids.get(13, 0) + 1
                job_kind, gap_until = "idle", t + rng.expovariate(1 / (GAP_HOURS * 3600))
            else:
                job_kind = "memory" if rng.random() < MEMORY_BOUND else "compute"
                job_until = t + min(max(rng.expovariate(1 / (JOB_HOURS * 3600)), 1200.0), 86400.0)
        ambient = 22 + node_offset + DIURNAL * k * math.sin(2 * math.pi * (t - phase) / 86400)
        batch = []
        for g, b in enumerate(boards):
            f = mine.get(g)
            if f is not None and f.kind == "vanish" and t >= f.onset:
                continue  # fallen off the bus: NVML no longer answers for it
            if job_kind == "compute":
                power, util = min(POWER_LIMIT, POWER_LIMIT * rng.gauss(0.985, 0.01)), rng.uniform(0.95, 1.0)
            elif job_kind == "memory":
                power, util = rng.gauss(450, 30), rng.uniform(0.85, 0.95)
            else:
                power, util = rng.uniform(*IDLE_POWER), 0.0
            extra = 0.0
            if f is not None and f.kind == "cooling" and t >= f.onset:
                stop = f.event if f.event is not None else t
                extra = COOLING_RATE * (stop - f.onset)
            target = ambient + 8 + b.resistance * power + b.offset + extra
            b.temp += (target - b.temp) * (1 - math.exp(-step / THERMAL_TAU))
            temp = b.temp + rng.gauss(0, TEMP_NOISE * k)
            if job_kind == "idle":
                clock = IDLE_CLOCK
            elif job_kind == "memory":
                clock = MAX_CLOCK
            else:
                clock = min(MAX_CLOCK, MAX_CLOCK * b.silicon * (1 - DVFS_SLOPE * max(temp - 60, 0)))
            if f is not None and f.kind == "fail_slow" and t >= f.onset and job_kind != "idle":
                clock *= 1 - FAIL_SLOW
            if temp >= SLOWDOWN and job_kind != "idle":
                clock *= 0.7  # HW slowdown
                if f is not None and f.kind == "cooling" and t >= f.onset and f.event is None:
                    f.event = t
            hours = step / 3600
            rate = NOISY_ECC_RATE * k if b.noisy_ecc else ECC_PER_HOUR
            if f is not None and f.kind == "ecc_burst" and t >= f.onset:
                age = (t - f.onset) / 3600
                rate += ECC_START * 2 ** (age / ECC_DOUBLING)
                if age >= ECC_HOURS:
                    b.remap_pending = 1.0
            b.ecc += poisson(rng, rate * hours)
            b.replays += poisson(rng, (NOISY_PCIE_RATE * k if b.noisy_pcie else REPLAY_PER_HOUR) * hours)
            if rng.random() < XID31_PER_DAY * k * step / 86400:
                b.xids[31] = b.xids.get(31, 0) + 1
            batch.append(Sample(uuid=f"n{node}-g{g}", sku=SKU, temperature=round(temp), power=power,
                                power_limit=POWER_LIMIT, sm_clock=clock, utilization=util, ecc_corrected=b.ecc,
                                pcie_replays=b.replays, remap_pending=b.remap_pending, xids=dict(b.xids)))
        out = model.update(t, batch)
        for s in batch:
            g = int(s.uuid.rpartition("g")[2])
            score = out[s.uuid][SCORE][()]
            for th, hold in GRID:
                alerts[(g, th, hold)].step(t, score >= th, hold)
            if shipped[g].fired and shipped[g].fired[-1] == t:
                reason_values = out[s.uuid][REASON]
                top = max(reason_values, key=lambda k: reason_values[k])[0]
                firing_reasons.append((g, t, top))
                f = mine.get(g)
                if f is not None and t >= f.onset and g not in reasons:
                    reasons[g] = top
        for f in faults:
            if f.kind == "vanish" and f.detected is None and t >= f.onset + GONE_FOR:
                f.detected, f.event, f.reason = t, f.onset, "gpu_gone"  # NVML count < PCI count, for 2m
        t += step
    for f in faults:
        f.end = end
        if f.kind == "fail_slow":
            f.event = f.onset + FAIL_SLOW_FAILURE_HOURS * 3600
        if f.kind == "ecc_burst":
            f.event = f.onset + ECC_HOURS * 3600
        if f.kind != "vanish":
            fired = [x for x in shipped[f.gpu].fired if x >= f.onset]
            f.detected = fired[0] if fired else None
            f.reason = reasons.get(f.gpu, "")
    # false alarms: firings on healthy GPUs after the warm-up, and on faulty ones before their onset
    healthy_seconds, false = 0.0, {key: 0 for key in GRID}
    for g in range(gpus):
        f = mine.get(g)
        until = end if f is None else f.onset
        if until > WARMUP:
            healthy_seconds += until - WARMUP
        for th, hold in GRID:
            false[(th, hold)] += sum(1 for x in alerts[(g, th, hold)].fired if WARMUP <= x < until)
    false_reasons = [r for g, x, r in firing_reasons
                     if x >= WARMUP and (mine.get(g) is None or x < mine[g].onset)]
    return {"healthy_gpu_days": healthy_seconds / 86400, "false": false, "false_reasons": false_reasons}


def place_faults(args: argparse.Namespace, rng: random.Random) -> list[Fault]:
    slots = rng.sample([(n, g) for n in range(args.nodes) for g in range(args.gpus)], args.faults * len(KINDS))
    earliest, latest = WARMUP * 1.25, args.days * 86400 - 45 * 3600  # cooling needs ~40 h to throttle
    if latest <= earliest:
        raise SystemExit("--days too short: faults need a day of warm-up and ~45 h to play out")
    return [Fault(kind, n, g, rng.uniform(earliest, latest))
            for i, (kind, (n, g)) in enumerate(zip([k for k in KINDS for _ in range(args.faults)], slots, strict=True))]


def cost(gpus: int, iterations: int) -> dict:
    """CPU per scrape of the exporter-side model for one node: NodeModel.update as the collector calls it,
    every call a new sample (15 s apart, as a 15 s scrape interval gives it)."""
    rng = random.Random(1)
    model = NodeModel()
    batches = [[Sample(uuid=f"GPU-{g}", sku=SKU, temperature=60.0 + rng.random() * 5, power=650 + rng.random() * 50,
                       power_limit=POWER_LIMIT, sm_clock=1.9e9, utilization=0.97, ecc_corrected=0.0,
                       pcie_replays=float(k), remap_pending=0.0, xids={})
                for g in range(gpus)] for k in range(64)]
    for k in range(200):  # warm
        model.update(k * 15.0, batches[k % 64])
    started = time.process_time()
    for k in range(iterations):
        model.update((200 + k) * 15.0, batches[k % 64])
    per_scrape = (time.process_time() - started) / iterations
    return {"gpus": gpus, "iterations": iterations, "cpu_us_per_scrape": round(per_scrape * 1e6, 1),
            "cpu_us_per_gpu": round(per_scrape * 1e6 / gpus, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--step", type=float, default=60.0, help="seconds between samples (default 60)")
    p.add_argument("--faults", type=int, default=8, help="GPUs per degradation kind (default 8)")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--noise", type=float, default=1.0,
                   help="scale every healthy spread and noise rate (default 1; 2: a fleet twice as noisy)")
    p.add_argument("--cost", action="store_true", help="only time the model's CPU per scrape (8 and 64 GPUs)")
    args = p.parse_args(argv)
    if args.cost:
        json.dump([cost(8, 5000), cost(64, 1000)], sys.stdout)
        sys.stdout.write("\n")
        return 0
    if args.nodes < 1 or args.gpus < 3 or args.step < 10 or args.faults < 0 or args.noise < 0:
        p.error("need --nodes >= 1, --gpus >= 3 (two peers), --step >= 10, --faults >= 0, --noise >= 0")
    if args.faults * len(KINDS) > args.nodes * args.gpus:
        p.error("more faults than GPUs")
    rng = random.Random(args.seed)
    faults = place_faults(args, rng)
    started, cpu = time.monotonic(), time.process_time()
    healthy_days, false, false_reasons = 0.0, {key: 0 for key in GRID}, {}
    for n in range(args.nodes):
        r = run_node(n, args, [f for f in faults if f.node == n], rng.randrange(1 << 30))
        healthy_days += r["healthy_gpu_days"]
        for reason in r["false_reasons"]:
            false_reasons[reason] = false_reasons.get(reason, 0) + 1
        for key, v in r["false"].items():
            false[key] += v
    per_kind = {}
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        leads = [f.lead_hours for f in mine if f.lead_hours is not None]
        per_kind[kind] = {"injected": len(mine), "detected": sum(f.detected is not None for f in mine),
                          "lead_hours_min": min(leads) if leads else None,
                          "lead_hours_median": sorted(leads)[len(leads) // 2] if leads else None,
                          "detected_6h_ahead": sum(1 for x in leads if x >= 6)}
    report = {
        "fleet": {"nodes": args.nodes, "gpus_per_node": args.gpus, "days": args.days, "step_s": args.step,
                  "seed": args.seed, "noise": args.noise},
        "alert": {"threshold": RISK_THRESHOLD, "for_s": RISK_FOR},
        "healthy_gpu_days": round(healthy_days, 1),
        "false_alarms": false[(RISK_THRESHOLD, RISK_FOR)],
        "false_alarms_per_1000_gpu_days": round(1000 * false[(RISK_THRESHOLD, RISK_FOR)] / max(healthy_days, 1e-9), 3),
        "false_alarms_by_reason": false_reasons,
        "grid": [{"threshold": th, "for_s": hold, "false_alarms": false[(th, hold)],
                  "per_1000_gpu_days": round(1000 * false[(th, hold)] / max(healthy_days, 1e-9), 3)}
                 for th, hold in GRID],
        "per_kind": per_kind,
        "faults": [{**asdict(f), "lead_hours": f.lead_hours, "lead_is_lower_bound": f.event is None}
                   for f in faults],
        "wall_s": round(time.monotonic() - started, 1), "cpu_s": round(time.process_time() - cpu, 1),
    }
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
