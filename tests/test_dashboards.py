"""Dashboards: valid Grafana JSON, stable uids, a datasource variable, unique panel ids, and no query that
names a metric the exporter (or the recording rules) does not serve."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from nvml_exporter.metrics import ALL_METRICS, GPU_METRICS
from tests.fakenvml.scenario import REPO

DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
RECORDED = {r["record"] for g in yaml.safe_load((REPO / "rules" / "nvml-exporter-records.yml").read_text())["groups"]
            for r in g["rules"]}
HISTOGRAMS = {m.name for m in ALL_METRICS if m.type == "histogram"}
SERVED = ({m.name for m in ALL_METRICS} | RECORDED | {"ALERTS", "up"}
          | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")})


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings and label matchers that are
    ours (prefix), recorded (a colon) or Prometheus's own (ALERTS, up)."""
    bare = re.sub(r"\{[^}]*\}", "", re.sub(r'"[^"]*"', '""', expr))
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {t for t in tokens if t.startswith(("nvidia_", "nvml_")) or ":" in t or t in ("ALERTS", "up")}


def test_three_dashboards_generated_from_the_script() -> None:
    assert [d.name for d in DASHBOARDS] == ["nvml-exporter-fleet.json", "nvml-exporter-node.json",
                                           "nvml-exporter-reliability.json"]
    before = {d: d.read_text() for d in DASHBOARDS}
    subprocess.run([sys.executable, str(REPO / "dashboards" / "generate.py")], check=True)
    assert {d: d.read_text() for d in DASHBOARDS} == before, "dashboards/*.json must be what generate.py writes"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_model(path) -> None:  # type: ignore[no-untyped-def]
    dash = json.loads(path.read_text())
    assert dash["uid"] == path.stem and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    for expr in exprs(dash):
        unknown = metric_names(expr) - SERVED
        assert not unknown, (expr, unknown)


def test_node_dashboard_shows_every_metric_family() -> None:
    dash = json.loads((REPO / "dashboards" / "nvml-exporter-node.json").read_text())
    shown = set().union(*(metric_names(e) for e in exprs(dash)))
    shown |= {h for h in HISTOGRAMS if {f"{h}_bucket", f"{h}_count"} & shown}
    missing = {m.name for m in ALL_METRICS} - shown
    assert not missing
    assert [p["title"] for p in dash["panels"] if p["type"] == "row"] == [
        "Health", "Thermal", "Power", "Clocks and throttling", "Memory and ECC", "PCIe", "NVLink", "Xids and events",
        "Exporter"]
    assert {m.name for m in GPU_METRICS} <= shown
