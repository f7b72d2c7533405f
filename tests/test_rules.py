"""The rule pack: written by rules/generate.py (the committed files equal its output), structural rules for
distributed rulers, promtool check and unit tests (with the default and with another cluster label and a
selector), vmalert's own validation, conventions every alert follows, Xid tiers from the catalog, and the
Alertmanager example."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nvml_exporter.xidcatalog import ACTIONS, CATALOG, CATEGORIES, tier_codes
from tests.conftest import require_tool
from tests.fakenvml.scenario import REPO

RULES = REPO / "rules"
_spec = importlib.util.spec_from_file_location("rules_generate", RULES / "generate.py")
assert _spec and _spec.loader
generate = importlib.util.module_from_spec(_spec)
sys.modules["rules_generate"] = generate  # dataclasses look their module up
_spec.loader.exec_module(generate)

ALERTS = [r for g in yaml.safe_load((RULES / "nvml-exporter-alerts.yml").read_text())["groups"] for r in g["rules"]]
BY_NAME = {r["alert"]: r for r in ALERTS}
CUSTOM = {"cluster": "k8s_cluster", "selector": 'job="nvml-exporter"',
          "runbook_url": "https://runbooks.example.com/gpu/{alertname}"}

# The alerts that name their GPU by the gpu and uuid labels (as before the pack was generated); their
# firing promtool cases assert both labels, so none can lose them.
GPU_ALERTS = {
    "GpuRecoveryActionRequired", "GpuLost", "GpuXidResetRequired", "GpuXidDoubleBitEcc", "GpuXidFellOffBus",
    "GpuXidNvlink", "GpuXidMechanical", "GpuXidContained", "GpuXidUnexpected", "GpuApplicationXidRepeating",
    "GpuUncorrectableEccErrors", "GpuRowRemapFailed", "GpuRowRemapPending", "GpuRetiredPagesPending",
    "GpuRetiredPagesHigh", "GpuHwThermalSlowdown", "GpuTemperatureNearSlowdown", "GpuMemoryTemperatureHigh",
    "GpuPowerBrake", "GpuPowerLimitBelowDefault", "GpuPcieLinkDegraded", "GpuPcieReplayRateHigh", "GpuNvlinkDown",
    "GpuNvlinkErrors", "GpuNvlinkCrcErrorRate", "GpuEscalatedToRma", "GpuReleasedTooLong",
    "GpuThermalMarginLow", "GpuHwSlowdownFrequent", "GpuHbmGradientAbnormal", "GpuRunsHotterThanPeers",
    "GpuClocksBelowPeers", "GpuEarlyWarning", "GpuSeriesVanished"}


def write_pack(directory: Path, **options: Any) -> Path:
    """The pack for these options, with the promtool unit tests beside it (the cluster label renamed)."""
    for name, text in generate.render(generate.Options(**options)).items():
        (directory / name).write_text(text)
    (directory / "tests").mkdir()
    label = options.get("cluster", "cluster")
    for test in (RULES / "tests").glob("*.test.yml"):
        text = re.sub(r'(?<=[{,])cluster(?==")|(?<=\n)(\s+)cluster(?=:)', lambda m: (m.group(1) or "") + label,
                      test.read_text())
        if "runbook_url" in options:
            text = re.sub(r"https://\S+/docs/runbooks/(\w+)\.md",
                          lambda m: options["runbook_url"].format(alertname=m.group(1)), text)
        (directory / "tests" / test.name).write_text(text)
    return directory


@pytest.fixture(scope="module", params=["default", "custom"])
def pack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    options = {} if request.param == "default" else CUSTOM
    return options, write_pack(tmp_path_factory.mktemp(request.param), **options)


def test_committed_files_are_the_generators_output() -> None:
    for path, text in generate.committed().items():
        assert path.read_text() == text, f"{path} is stale: run `python rules/generate.py`"
    result = subprocess.run([sys.executable, str(RULES / "generate.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_generator_rejects_bad_options(tmp_path: Path) -> None:
    for bad in (["--cluster-label=my-cluster"], ["--selector=job=nvml"], ["--runbook-url=https://x/y.md"],
                ["--cluster-label=dc"]):
        with pytest.raises(SystemExit) as e:
            generate.main(bad)  # the last: options other than the defaults without --out
        assert e.value.code == 2, bad
    assert generate.main([f"--out={tmp_path}", "--cluster-label=dc", '--selector=job="gpu"']) == 0
    assert 'nvidia_gpu_up{job="gpu"} == 0' in (tmp_path / "nvml-exporter-alerts.yml").read_text()


def test_promtool_check_rules_is_clean(pack: tuple[dict[str, Any], Path]) -> None:
    _, directory = pack
    for name in ("nvml-exporter-alerts.yml", "nvml-exporter-records.yml"):
        result = subprocess.run([require_tool("promtool"), "check", "rules", str(directory / name)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("name", ["alerts.test.yml", "records.test.yml", "clusters.test.yml"])
def test_promtool_unit_tests_pass(pack: tuple[dict[str, Any], Path], name: str) -> None:
    _, directory = pack
    result = subprocess.run([require_tool("promtool"), "test", "rules", name], capture_output=True, text=True,
                            cwd=directory / "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_vmalert_accepts_the_pack(pack: tuple[dict[str, Any], Path]) -> None:
    """vmalert's own parser: expressions (MetricsQL) and templates, as it would load them."""
    _, directory = pack
    result = subprocess.run([require_tool("vmalert"), "-dryRun", f"-rule={directory / 'nvml-exporter-alerts.yml'}",
                             f"-rule={directory / 'nvml-exporter-records.yml'}"], capture_output=True, text=True)
    assert result.returncode == 0 and "fatal" not in result.stderr, result.stderr


def dependencies(expr: str, names: set[str]) -> set[str]:
    return {n for n in names if re.search(rf"(?<![\w:]){re.escape(n)}(?![\w:])", expr)}


def test_structure_for_distributed_rulers(pack: tuple[dict[str, Any], Path]) -> None:
    options, directory = pack
    label = options.get("cluster", "cluster")
    url = options.get("runbook_url", generate.RUNBOOK_URL)
    groups = [g for name in ("nvml-exporter-alerts.yml", "nvml-exporter-records.yml")
              for g in yaml.safe_load((directory / name).read_text())["groups"]]
    assert len({g["name"] for g in groups}) == len(groups)
    for g in groups:
        assert 1 <= len(g["rules"]) <= 20, g["name"]  # Mimir's default per-group limit
        interval = re.fullmatch(r"(\d+)([sm])", g["interval"])
        assert interval, g["name"]
        assert int(interval.group(1)) * (60 if interval.group(2) == "m" else 1) <= 300, g["name"]
        recorded = {r["record"] for r in g["rules"] if "record" in r}
        for r in g["rules"]:
            name = r.get("record") or r["alert"]
            # vmalert, Thanos and Mimir rulers: a read of a series recorded in the same pass sees old data
            assert not dependencies(r["expr"], recorded), (g["name"], name)
            for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", r["expr"]):
                assert label in [x.strip() for x in clause.split(",")], (name, clause)
            aggregations = r"\b(sum|count|max|min|avg|group|stddev|stdvar|topk|bottomk|quantile)\s*(\(|by|without)"
            for agg in re.finditer(aggregations, r["expr"]):
                assert agg.group(2) in ("by", "without"), (name, "aggregation without by/without drops the cluster")
            if "alert" in r:
                assert r["annotations"]["runbook_url"] == url.format(alertname=name)
    # the reliability figures read only base series or slices recorded by another group
    by_group = {g["name"]: {r.get("record") for r in g["rules"]} for g in groups}
    figures = next(g for g in groups if g["name"] == "nvml-exporter-reliability")
    for r in figures["rules"]:
        assert dependencies(r["expr"], by_group["nvml-exporter-fleet-5m"]), r["record"]
    if "selector" in options:  # every selector of an exporter family carries the configured matchers
        for g in groups:
            for r in g["rules"]:
                # a metric name, not a label name (`{up="1"}`) nor a string (`count_values("up", ...)`)
                family = r'(?<![\w:"])((?:nvidia_gpu|nvml_exporter)_\w+|up)(\{[^}]*\})?(?![\w:("=])'
                for sel in re.findall(family, r["expr"]):
                    assert options["selector"] in sel[1], (r.get("record") or r["alert"], sel)


def test_thanos_variant_aborts_on_partial_responses() -> None:
    thanos = yaml.safe_load((RULES / "thanos" / "nvml-exporter-alerts.yml").read_text())["groups"]
    default = yaml.safe_load((RULES / "nvml-exporter-alerts.yml").read_text())["groups"]
    assert all(g.pop("partial_response_strategy") == "abort" for g in thanos)
    assert thanos == default


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load((RULES / "tests" / "alerts.test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                if case["alertname"] in GPU_ALERTS:
                    assert {"gpu", "uuid"} <= set(alert["exp_labels"]), case["alertname"]
    assert set(BY_NAME) == firing, set(BY_NAME) - firing
    assert set(BY_NAME) == quiet, set(BY_NAME) - quiet
    assert set(BY_NAME) >= GPU_ALERTS


def test_alert_conventions() -> None:
    for r in ALERTS:
        name, labels, ann = r["alert"], r["labels"], r["annotations"]
        assert labels["severity"] in ("critical", "warning", "info"), name
        words = set(re.findall(r"[a-z_0-9]+", re.sub(r"\{\{.*?\}\}", " ", labels["action"]))) or {labels["action"]}
        assert words <= set(ACTIONS), (name, words)
        assert {"summary", "description", "runbook_url"} <= set(ann), name
        assert (REPO / "docs" / "runbooks" / f"{name}.md").exists(), name
        if name in GPU_ALERTS:
            assert "{{ $labels.gpu }}" in ann["description"] and "{{ $labels.uuid }}" in ann["description"], name
        # the value is in the text, unless the alert is a 0/1 flag whose firing is the value
        flag = re.search(r"== [01]\b", r["expr"]) is not None
        assert flag or "{{ $value" in ann["description"] or "$labels.xid" in ann["description"], name


def test_runbooks_show_the_alerts_expression() -> None:
    """Each runbook quotes its alert's query as the pack evaluates it (default options)."""
    for r in ALERTS:
        text = (REPO / "docs" / "runbooks" / f"{r['alert']}.md").read_text()
        quoted = re.search(r"```promql\n(.*?)```", text, re.S)
        assert quoted, r["alert"]
        assert " ".join(quoted.group(1).split()) == " ".join(r["expr"].split()), r["alert"]


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
    records = (RULES / "nvml-exporter-records.yml").read_text()
    rule = records.split("record: category:nvidia_gpu_xids:increase1h", 1)[1].split("- record:", 1)[0]
    found = dict(re.findall(r'xid=~"([0-9|]+)"\}\[1h\]\), "category", "(\w+)"', rule))
    by_category = {cat: {int(c) for c in codes.split("|")} for codes, cat in found.items()}
    for category in CATEGORIES:
        if category != "hardware":
            assert by_category[category] == {c for c, x in CATALOG.items() if x.category == category}, category
    rest = {int(c) for c in re.search(r'xid!~"([0-9|]+)"', rule).group(1).split("|")}
    assert rest == {c for c, x in CATALOG.items() if x.category != "hardware"}


def test_docs_list_every_alert_and_group() -> None:
    doc = (REPO / "docs" / "alerts.md").read_text()
    listed = set(re.findall(r"^\| (\w+) \| (?:critical|warning|info) \|", doc, re.M))
    assert listed == set(BY_NAME)
    table = re.findall(r"^\| `(nvml-exporter-[\w-]+)` \| (\w+) \| (\d+) \|", doc, re.M)
    groups = {name: (interval, int(count)) for name, interval, count in table}
    pack = {g["name"]: (g["interval"], len(g["rules"]))
            for name in ("nvml-exporter-alerts.yml", "nvml-exporter-records.yml")
            for g in yaml.safe_load((RULES / name).read_text())["groups"]}
    assert groups == pack
