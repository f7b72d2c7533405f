"""Diagnosis: every check at each severity, table-driven, and a healthy node read through the real
collector over the fake library that yields no warning at all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nvml_exporter.diagnosis import CHECKS, RULE_INPUTS, SNAPSHOT_RULES, Finding, diagnose
from nvml_exporter.snapshot import GpuIdentity, GpuSnapshot, Values
from nvml_exporter.xidstore import XidEvent
from tests.conftest import collector_over
from tests.fakenvml.scenario import FakeNvml, h100_node

NOW = 1_800_000_000.0
REASONS = ("gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
           "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting")


def healthy() -> Values:
    """What the exporter reads from a busy, healthy H100."""
    return {
        "nvidia_gpu_temperature_celsius": {(): 60.0},
        "nvidia_gpu_memory_temperature_celsius": {(): 68.0},
        "nvidia_gpu_temperature_threshold_celsius": {("shutdown",): 92.0, ("slowdown",): 89.0, ("gpu_max",): 87.0,
                                                     ("memory_max",): 95.0},
        "nvidia_gpu_power_limit_watts": {(): 700.0},
        "nvidia_gpu_power_default_limit_watts": {(): 700.0},
        "nvidia_gpu_clock_event_active": {(r,): 1.0 if r == "sw_power_cap" else 0.0 for r in REASONS},
        "nvidia_gpu_ecc_errors_total": {("corrected", "volatile"): 3.0, ("uncorrected", "volatile"): 0.0,
                                        ("corrected", "aggregate"): 12.0, ("uncorrected", "aggregate"): 0.0},
        "nvidia_gpu_remapped_rows": {("correctable",): 1.0, ("uncorrectable",): 0.0},
        "nvidia_gpu_remapped_rows_pending": {(): 0.0},
        "nvidia_gpu_remapped_rows_failed": {(): 0.0},
        "nvidia_gpu_pcie_link_generation": {(): 5.0}, "nvidia_gpu_pcie_link_max_generation": {(): 5.0},
        "nvidia_gpu_pcie_link_width": {(): 16.0}, "nvidia_gpu_pcie_link_max_width": {(): 16.0},
        "nvidia_gpu_pcie_replay_errors_total": {(): 150.0},
        "nvidia_gpu_nvlink_links": {("up",): 18.0, ("down",): 0.0},
        "nvidia_gpu_nvlink_errors_total": {(t,): 0.0 for t in ("replay", "recovery", "crc_flit", "crc_data")},
        "nvidia_gpu_recovery_action": {(): 0.0},
    }


def gpu(values: Values | None = None, up: bool = True, stale: bool = False) -> GpuSnapshot:
    return GpuSnapshot(GpuIdentity(0, "GPU-0"), up=up, values=values if values is not None else healthy(),
                       stale=stale)


def changed(**changes: dict[tuple[str, ...], float]) -> Values:
    v = healthy()
    for metric, series in changes.items():
        v.setdefault(metric, {}).update(series)
    return v


def xids(*events: tuple[int, float]) -> list[XidEvent]:
    return [XidEvent("GPU-0", code, NOW - ago, "nvml") for code, ago in events]


CASES = [
    # (id, snapshot, xid history, previous snapshot values, check, status, action)
    ("lost", gpu(up=False, values={}), [], None, "availability", "critical", "reboot_node"),
    ("hung", gpu(stale=True), [], None, "availability", "warning", "reset_gpu"),
    ("dbe", gpu(changed(nvidia_gpu_ecc_errors_total={("uncorrected", "volatile"): 2.0})), [], None,
     "memory", "critical", "drain_and_reset"),
    ("remap-failed", gpu(changed(nvidia_gpu_remapped_rows_failed={(): 1.0})), [], None, "memory", "critical",
     "rma_eval"),
    ("remap-512", gpu(changed(nvidia_gpu_remapped_rows={("uncorrectable",): 512.0})), [], None, "memory",
     "critical", "rma_eval"),
    ("retired-60", gpu(changed(nvidia_gpu_retired_pages={("single_bit",): 40.0, ("double_bit",): 20.0})), [], None,
     "memory", "critical", "rma_eval"),
    ("remap-pending", gpu(changed(nvidia_gpu_remapped_rows_pending={(): 1.0})), [], None, "memory", "warning",
     "reset_gpu"),
    ("retire-pending", gpu(changed(nvidia_gpu_retired_pages_pending={(): 1.0})), [], None, "memory", "warning",
     "reset_gpu"),
    ("lifetime-uce", gpu(changed(nvidia_gpu_ecc_errors_total={("uncorrected", "aggregate"): 1.0})), [], None,
     "memory", "warning", "rma_eval"),
    ("hw-thermal", gpu(changed(nvidia_gpu_clock_event_active={("hw_thermal_slowdown",): 1.0})), [], None,
     "thermal", "critical", "check_cooling"),
    ("at-slowdown", gpu(changed(nvidia_gpu_temperature_celsius={(): 89.0})), [], None, "thermal", "critical",
     "check_cooling"),
    ("near-gpu-max", gpu(changed(nvidia_gpu_temperature_celsius={(): 84.0})), [], None, "thermal", "warning",
     "check_cooling"),
    ("hbm-hot", gpu(changed(nvidia_gpu_memory_temperature_celsius={(): 92.0})), [], None, "thermal", "warning",
     "check_cooling"),
    ("sw-thermal", gpu(changed(nvidia_gpu_clock_event_active={("sw_thermal_slowdown",): 1.0})), [], None,
     "thermal", "warning", "check_cooling"),
    ("power-brake", gpu(changed(nvidia_gpu_clock_event_active={("hw_power_brake_slowdown",): 1.0})), [], None,
     "power", "critical", "check_power"),
    ("hw-slowdown", gpu(changed(nvidia_gpu_clock_event_active={("hw_slowdown",): 1.0})), [], None, "power",
     "warning", "check_power"),
    ("limit-reduced", gpu(changed(nvidia_gpu_power_limit_watts={(): 500.0})), [], None, "power", "warning",
     "check_power"),
    ("pcie-width", gpu(changed(nvidia_gpu_pcie_link_width={(): 8.0})), [], None, "pcie", "warning", "rma_eval"),
    ("pcie-gen-busy", gpu(changed(nvidia_gpu_pcie_link_generation={(): 4.0})), [], None, "pcie", "warning",
     "rma_eval"),
    ("pcie-gen-idle", gpu(changed(nvidia_gpu_pcie_link_generation={(): 1.0},
                                  nvidia_gpu_clock_event_active={("gpu_idle",): 1.0})), [], None, "pcie", "ok",
     "none"),
    ("pcie-replays", gpu(changed(nvidia_gpu_pcie_replay_errors_total={(): 250.0})), [], healthy(), "pcie",
     "warning", "rma_eval"),
    ("pcie-few-replays", gpu(changed(nvidia_gpu_pcie_replay_errors_total={(): 160.0})), [], healthy(), "pcie",
     "ok", "none"),
    ("nvlink-down", gpu(changed(nvidia_gpu_nvlink_links={("up",): 17.0, ("down",): 1.0})), [], None, "nvlink",
     "critical",
     "check_nvlink"),
    ("nvlink-replays", gpu(changed(nvidia_gpu_nvlink_errors_total={("replay",): 2.0})), [], healthy(), "nvlink",
     "warning", "check_nvlink"),
    ("nvlink-crc", gpu(changed(nvidia_gpu_nvlink_errors_total={("crc_flit",): 12_000.0})), [], healthy(),
     "nvlink", "warning", "check_nvlink"),
    ("xid79", gpu(), xids((79, 10)), None, "xid", "critical", "reboot_node"),
    ("xid48", gpu(), xids((48, 10)), None, "xid", "critical", "drain_and_reset"),
    ("xid94", gpu(), xids((94, 10)), None, "xid", "warning", "restart_app"),
    ("xid79-old", gpu(), xids((79, 7200)), None, "xid", "ok", "none"),
    ("xid13-once", gpu(), xids((13, 10)), None, "xid", "ok", "none"),
    ("xid31-one-burst", gpu(), xids((31, 100), (31, 10)), None, "xid", "ok", "none"),
    ("xid31-two-bursts", gpu(), xids((31, 5000), (31, 10)), None, "xid", "warning", "rma_eval"),
    ("reset-recurring", gpu(), xids((119, 20000), (119, 10000), (119, 7200)), None, "xid", "critical", "rma_eval"),
    ("recovery-reboot", gpu(changed(nvidia_gpu_recovery_action={(): 2.0})), [], None, "recovery_action",
     "critical", "reboot_node"),
    ("recovery-drain-p2p", gpu(changed(nvidia_gpu_recovery_action={(): 3.0})), [], None, "recovery_action",
     "critical", "drain_p2p"),
]


@pytest.mark.parametrize(("snap", "history", "prev", "check", "status", "action"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check(snap: GpuSnapshot, history: list[XidEvent], prev: Values | None, check: str, status: str,
               action: str) -> None:
    previous = gpu(prev) if prev is not None else None
    d = diagnose(snap, history, previous, 60.0, NOW)
    result = {c.name: c for c in d.checks}[check]
    assert (result.status, result.action) == (status, action), result.reason
    assert result.reason
    others = [c for c in d.checks if c.name != check and c.status != "ok"]
    if check != "availability":  # one fault shows in its own check only
        assert not others, others


# What each check can say besides ok (PCIe problems degrade, they do not stop a job; the driver's
# recovery action is always a demand).
REACHABLE = {"availability": {"warning", "critical"}, "memory": {"warning", "critical"},
             "thermal": {"warning", "critical"}, "power": {"warning", "critical"}, "pcie": {"warning"},
             "nvlink": {"warning", "critical"}, "xid": {"warning", "critical"}, "recovery_action": {"critical"},
             "history": {"critical"}}


def test_every_check_has_a_case_at_each_severity() -> None:
    assert set(REACHABLE) == set(CHECKS)
    assert {(r[0], r[1]) for r in SNAPSHOT_RULES} <= {(c, s) for c, ss in REACHABLE.items() for s in ss}
    seen = {(c[4], c[5]) for c in CASES} | {("history", "critical")}  # test_an_escalation_is_its_own_check
    for check, severities in REACHABLE.items():
        for severity in severities | {"ok"}:
            assert (check, severity) in seen or severity == "ok", (check, severity)
    assert all(c.status == "ok" for c in diagnose(gpu(), [], gpu(), 60.0, NOW).checks)


def test_an_escalation_is_its_own_check_and_outranks_the_xid_it_came_from() -> None:
    escalation = Finding("history", "critical", "rma_eval", "Xid 79 came back after 2 GPU resets or reboots")
    d = diagnose(gpu(), xids((79, 10)), None, 0, NOW, [escalation])
    checks = {c.name: c for c in d.checks}
    assert (checks["history"].status, checks["history"].action, checks["history"].reason) == (
        "critical", "rma_eval", escalation.reason)
    assert (checks["xid"].status, checks["xid"].action) == ("critical", "reboot_node")
    assert d.action == "rma_eval"


def xid13(ago: float, where: str) -> XidEvent:
    return XidEvent("GPU-0", 13, NOW - ago, "journal",
                    f"pid=1, name=a, Graphics SM Warp Exception on ({where}, SM 0): Illegal Instruction Parameter")


def test_xid13_repeats_count_at_one_gpc_and_tpc() -> None:
    same = diagnose(gpu(), [xid13(5000, "GPC 7, TPC 3"), xid13(10, "GPC 7, TPC 3")], None, 0, NOW)
    check = {c.name: c for c in same.checks}["xid"]
    assert (check.status, check.action) == ("warning", "rma_eval")
    assert "(GPC 7, TPC 3)" in check.reason
    apart = diagnose(gpu(), [xid13(5000, "GPC 7, TPC 3"), xid13(10, "GPC 1, TPC 0")], None, 0, NOW)
    assert {c.name: c for c in apart.checks}["xid"].status == "ok"
    # an ESR line of each event names no location: it does not join the two events up
    esr = XidEvent("GPU-0", 13, 0, "journal", "Graphics Exception: ESR 0x57c730=0xc04000b")
    apart = diagnose(gpu(), [xid13(5000, "GPC 7, TPC 3"), esr, xid13(10, "GPC 1, TPC 0"), esr], None, 0, NOW)
    assert {c.name: c for c in apart.checks}["xid"].status == "ok"


def test_critical_outranks_warning_for_the_recommended_action() -> None:
    v = changed(nvidia_gpu_remapped_rows_pending={(): 1.0},
                nvidia_gpu_clock_event_active={("sw_thermal_slowdown",): 1.0})
    assert diagnose(gpu(v), [], None, 0, NOW).action == "reset_gpu"  # two warnings: the stronger action
    d = diagnose(gpu(v), xids((79, 5)), None, 0, NOW)
    assert (d.status, d.action) == ("critical", "reboot_node")
    assert diagnose(gpu(), [], None, 0, NOW).action == "none"


def test_healthy_eight_gpu_node_through_the_real_collector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with collector_over(FakeNvml(tmp_path / "nvml", h100_node(8)), monkeypatch) as collector:
        collector.collect(5.0)
        time.sleep(0.05)
        snap = collector.collect(5.0)  # a second collection, so the rate checks have history
    assert len(snap.gpus) == 8
    for g in snap.gpus:
        assert g.diagnosis is not None
        assert [(c.name, c.status) for c in g.diagnosis.checks if c.status != "ok"] == []
        assert g.diagnosis.action == "none"


def test_each_collection_reports_the_readings_that_failed_in_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    with collector_over(fake, monkeypatch) as collector:
        assert [g.errors for g in collector.collect(5.0).gpus] == [{}, {}]
        fake.set({"gpu.1.temp": "e:10"})  # a timeout: transient, so asked again next time
        snap = collector.collect(5.0)
        # (the margin below T.Limit is read from the same sensor: the fake fails it with the temperature)
        assert [g.errors for g in snap.gpus] == [{}, {"nvmlDeviceGetTemperature": "timeout",
                                                      "nvmlDeviceGetMarginTemperature": "timeout"}]
        assert snap.gpus[1].value("nvidia_gpu_temperature_celsius") is None
        fake.set({"gpu.1.temp": 55})
        snap = collector.collect(5.0)
        assert [g.errors for g in snap.gpus] == [{}, {}]
        assert snap.gpus[1].value("nvidia_gpu_temperature_celsius") == 55
        assert snap.state.nvml_errors[("nvmlDeviceGetTemperature", "timeout")] == 1


class _Recording(dict):  # type: ignore[type-arg]
    """Values that note every family a rule asks for."""

    def __init__(self, values: Values):
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        self.asked.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("values", [healthy(), {}], ids=["healthy", "empty"])
def test_snapshot_rules_read_only_their_declared_inputs(values: Values) -> None:
    """The rules' findings are reused while RULE_INPUTS compare equal: a rule reading anything else
    would go stale, so every family a rule reads must be listed."""
    recording = _Recording(values)
    g = gpu(recording)
    for *_, test in SNAPSHOT_RULES:
        test(g)
    assert recording.asked and recording.asked <= set(RULE_INPUTS)


def test_findings_follow_a_change_in_any_rule_input() -> None:
    assert diagnose(gpu(), [], None, 0, NOW).action == "none"
    hot = changed(nvidia_gpu_temperature_celsius={(): 90.0})
    assert diagnose(gpu(hot), [], None, 0, NOW).action == "check_cooling"
    assert diagnose(gpu(changed(nvidia_gpu_temperature_celsius={(): 90.0})), [], None, 0, NOW).action == "check_cooling"
    assert diagnose(gpu(), [], None, 0, NOW).action == "none"
