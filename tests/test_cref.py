"""bench/cref/cref.c, the C floor `make bench` compares the exporter with: it must make the exporter's
NVML calls and write the exporter's page (the per-GPU families of the metric contract), or the ratio
compares different work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from nvml_exporter.metrics import BY_NAME
from tests.conftest import require_tool, samples
from tests.fakenvml.scenario import REPO, FakeNvml, h100_node


def build_cref(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or require_tool("gcc")
    binary = tmp_path / "cref"
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-o", str(binary),
                    str(REPO / "bench" / "cref" / "cref.c"), "-ldl"], check=True, capture_output=True)
    return binary


def test_cref_writes_the_exporters_per_gpu_series_with_its_calls(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    page_path = tmp_path / "page.txt"
    run = subprocess.run([str(build_cref(tmp_path)), "-n", "5", "-o", str(page_path)],
                         env={**os.environ, **fake.env()}, capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout)
    assert figures["gpus"] == 2 and figures["iterations"] == 5 and figures["cpu_us_per_collection"] > 0
    page = page_path.read_text()
    assert figures["bytes"] == len(page.encode())
    check = subprocess.run([require_tool("promtool"), "check", "metrics"], input=page, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # every family is the contract's, with its type
    types = dict(line.split()[2:4] for line in page.splitlines() if line.startswith("# TYPE "))
    assert types and all(BY_NAME[name].type == kind for name, kind in types.items())
    # the same series as the exporter serves for those families, over the same fake
    exp = start_exporter(fake, "--no-xid.journal", "--collect.min-interval=0.000001", wait_ready=True)
    ours = {k for k in samples(exp.metrics()) if k.split("{")[0] in types}
    assert set(samples(page)) == ours

    # the same NVML calls per collection as a scrape of the exporter makes (its slow tier is not due)
    def collection_calls() -> int:  # the event watcher's waits and the 30 s re-discovery are not a scrape's
        return sum(n for name, n in fake.counts().items() if not name.startswith("nvmlEvent"))

    counts = []
    for _ in range(3):
        before = collection_calls()
        exp.metrics()
        counts.append(collection_calls() - before)
    assert figures["nvml_calls_per_collection"] == min(counts) > 0


def test_cref_refuses_bad_arguments(tmp_path: Path) -> None:
    run = subprocess.run([str(build_cref(tmp_path)), "-n", "zero"], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
