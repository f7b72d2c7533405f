"""The smoke version of `make bench-early-warning` (docs/early-warning.md): a small simulated fleet with
one GPU of each injected degradation, run through the exporter's model by the harness itself."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fakenvml.scenario import REPO


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "bench" / "early_warning.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_a_small_fleet_finds_every_degradation_ahead_and_raises_no_false_alarm() -> None:
    result = run("--nodes", "3", "--days", "4", "--faults", "1", "--step", "120")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    kinds = report["per_kind"]
    assert {k: v["detected"] for k, v in kinds.items()} == {"cooling": 1, "fail_slow": 1, "ecc_burst": 1,
                                                             "vanish": 1}
    faults = {f["kind"]: f for f in report["faults"]}
    # the degradations with a precursor are flagged 6 h or more before the throttle or failure, for the
    # reason that is theirs; a vanished GPU has none (docs/early-warning.md) and is flagged after it goes
    assert faults["cooling"]["lead_hours"] >= 6 and faults["cooling"]["reason"] == "temperature"
    assert faults["ecc_burst"]["lead_hours"] >= 6 and faults["ecc_burst"]["reason"] == "ecc"
    assert faults["fail_slow"]["reason"] == "clocks"
    # fail-slow shows only in busy time at the power limit (memory-bound jobs hide it): before its failure
    assert faults["fail_slow"]["lead_hours"] > 0
    assert faults["vanish"]["reason"] == "gpu_gone" and faults["vanish"]["lead_hours"] <= 0
    assert report["healthy_gpu_days"] > 50 and report["false_alarms"] == 0


def test_bad_arguments_are_refused() -> None:
    result = run("--gpus", "2")
    assert result.returncode == 2 and "two peers" in result.stderr
    result = run("--days", "2")
    assert result.returncode != 0 and "--days too short" in result.stderr
