"""The rule pack: promtool check and unit tests, conventions every alert follows, Xid tiers from the
catalog, and the Alertmanager example."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from nvml_exporter.xid import ACTIONS, CATALOG, tier_codes
from tests.conftest import require_tool
from tests.fakenvml.scenario import REPO

RULES = REPO / "rules"
ALERTS = [r for g in yaml.safe_load((RULES / "nvml-exporter-alerts.yml").read_text())["groups"] for r in g["rules"]]
BY_NAME = {r["alert"]: r for r in ALERTS}


@pytest.mark.parametrize("name", ["nvml-exporter-alerts.yml", "nvml-exporter-records.yml"])
def test_promtool_check_rules_is_clean(name: str) -> None:
    result = subprocess.run([require_tool("promtool"), "check", "rules", str(RULES / name)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("name", ["alerts.test.yml", "records.test.yml"])
def test_promtool_unit_tests_pass(name: str) -> None:
    result = subprocess.run([require_tool("promtool"), "test", "rules", name], capture_output=True, text=True,
                            cwd=RULES / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load((RULES / "tests" / "alerts.test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert set(BY_NAME) == firing, set(BY_NAME) - firing
    assert set(BY_NAME) == quiet, set(BY_NAME) - quiet


def test_alert_conventions() -> None:
    for r in ALERTS:
        name, labels, ann = r["alert"], r["labels"], r["annotations"]
        assert labels["severity"] in ("critical", "warning", "info"), name
        words = set(re.findall(r"[a-z_0-9]+", re.sub(r"\{\{.*?\}\}", " ", labels["action"]))) or {labels["action"]}
        assert words <= set(ACTIONS), (name, words)
        assert {"summary", "description", "runbook_url"} <= set(ann), name
        assert ann["runbook_url"].endswith(f"/docs/runbooks/{name}.md"), name
        assert (REPO / "docs" / "runbooks" / f"{name}.md").exists(), name
        if "nvidia_gpu_" in r["expr"] and name != "GpuMissing":
            assert "{{ $labels.gpu }}" in ann["description"] and "{{ $labels.uuid }}" in ann["description"], name
        # the value is in the text, unless the alert is a 0/1 flag whose firing is the value
        flag = re.search(r"== [01]$", r["expr"].strip()) is not None
        assert flag or "{{ $value" in ann["description"] or "$labels.xid" in ann["description"], name


def test_no_alert_on_idle_power_capping_or_sync_boost() -> None:
    for r in ALERTS:
        assert "sw_power_cap" not in r["expr"] and "sync_boost" not in r["expr"], r["alert"]
        if "gpu_idle" in r["expr"]:  # only ever to exclude idle GPUs (a sparse series: absent until first idle)
            assert 'unless ignoring (reason) nvidia_gpu_clock_event_active{reason="gpu_idle"} == 1' in r["expr"], \
                r["alert"]


def xids_in(expr: str) -> set[int]:
    return {int(c) for c in re.search(r'xid[!=]~"([0-9|]+)"', expr).group(1).split("|")}


@pytest.mark.parametrize(("alert", "tiers"), [
    ("GpuXidResetRequired", ("reset",)), ("GpuXidDoubleBitEcc", ("double_bit_ecc",)),
    ("GpuXidFellOffBus", ("fell_off_bus",)), ("GpuXidNvlink", ("nvlink",)), ("GpuXidMechanical", ("mechanical",)),
    ("GpuXidContained", ("contained",))])
def test_xid_tiers_come_from_the_catalog(alert: str, tiers: tuple[str, ...]) -> None:
    assert xids_in(BY_NAME[alert]["expr"]) == set(tier_codes(*tiers))


def test_unexpected_xids_are_everything_but_the_documented_tiers() -> None:
    assert xids_in(BY_NAME["GpuXidUnexpected"]["expr"]) == {c for c, x in CATALOG.items() if x.tier != "unexpected"}
    records = (RULES / "nvml-exporter-records.yml").read_text()
    faults = records.split("record: fleet:nvidia_gpu_critical_faults:increase5m", 1)[1]
    critical = {int(c) for c in re.search(r'xid=~"([0-9|]+)"', faults).group(1).split("|")}
    assert critical == set(tier_codes("reset", "double_bit_ecc", "fell_off_bus", "nvlink", "mechanical"))


def test_alertmanager_example_is_valid() -> None:
    example = REPO / "examples" / "alertmanager.example.yml"
    result = subprocess.run([require_tool("amtool"), "check-config", str(example)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 inhibit rules" in result.stdout


def test_xid_categories_come_from_the_catalog() -> None:
    from nvml_exporter.xid import CATEGORIES

    records = (RULES / "nvml-exporter-records.yml").read_text()
    rule = records.split("record: category:nvidia_gpu_xids:increase1h", 1)[1].split("- record:", 1)[0]
    found = dict(re.findall(r'xid=~"([0-9|]+)"\}\[1h\]\), "category", "(\w+)"', rule))
    by_category = {cat: {int(c) for c in codes.split("|")} for codes, cat in found.items()}
    for category in CATEGORIES:
        if category != "hardware":
            assert by_category[category] == {c for c, x in CATALOG.items() if x.category == category}, category
    rest = {int(c) for c in re.search(r'xid!~"([0-9|]+)"', rule).group(1).split("|")}
    assert rest == {c for c, x in CATALOG.items() if x.category != "hardware"}
