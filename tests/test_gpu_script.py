"""tests/gpu/run.sh, the real-GPU check, exercised without a GPU: the fake library stands in for the driver
and a stand-in nvidia-smi answers from the same NVML, so the plumbing (start, scrape, promtool, cross-
check, latency, C floor, diagnose, event registration) is proven before a GPU machine runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool
from tests.fakenvml.scenario import REPO, FakeNvml


def test_run_sh_against_the_fake(tmp_path: Path, fake: FakeNvml) -> None:
    require_tool("promtool")
    out = tmp_path / "out"
    path = f"{REPO / 'tests/gpu/standin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}, **fake.env(), "PATH": path}
    result = subprocess.run([str(REPO / "tests/gpu/run.sh"), str(out)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 cross-check mismatches" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["diagnose.json", "exporter.log", "metrics.txt",
                                                     "nvidia-smi-q.xml", "raw.json", "results.json", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "## promtool check metrics\n\n```\nrc=0\n```" in summary
    assert summary.count("| ok |") > 300  # 8 GPUs x (metrics, states, clock events, identity)
    assert "| 3 | nvidia_gpu_compute_processes | 1 | 1.0 (`--query-compute-apps`) | 0 | ok |" in summary
    # H100 SXM: no page retirement (row remapping instead), which the exporter drops without a word
    assert "- nvmlDeviceGetFieldValues field 29 (nvidia_gpu_retired_pages{single_bit}): not_supported" in summary
    assert "## What a field-value call costs (GPU 0)" in summary and "entries failed: none" in summary
    assert "torch with CUDA is not available to this python: not run." in summary
    assert "registered 0xc00a (Xid: yes)" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["mismatches"] == 0 and results["diagnose_exit"] == 0
    assert results["perf"]["ours"]["cpu_ms_per_scrape"] > 0 and results["perf"]["cref"]["gpus"] == 8
    assert json.loads((out / "diagnose.json").read_text())["status"] == "ok"


def test_run_sh_without_a_driver_says_so(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(REPO / "tests/gpu/run.sh"), str(tmp_path / "out")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and "nvidia-smi not found" in result.stderr
