"""The thermal/DVFS model and the risk score (issue 19): what they fit and flag on made-up node histories,
and what the exporter serves over the fake."""

from __future__ import annotations

import math

import pytest

from nvml_exporter.risk import REASON, SCORE, RiskInputs, RiskTracker
from nvml_exporter.thermal import CLOCK_DEVIATION, RESISTANCE, TEMP_DEVIATION, NodeModel, Sample
from tests.conftest import samples, wait_for
from tests.fakenvml.scenario import FakeNvml, h100_node

H100 = "NVIDIA H100 80GB HBM3"


def node_history(hours: float, *, hotter: dict[int, float] | None = None, slower: dict[int, float] | None = None,
                 step: float = 15.0) -> tuple[NodeModel, dict]:
    """8 GPUs cycling between idle and a power-capped load every 20 min; GPU i runs `hotter[i]` C above the
    others at the same power and clocks `slower[i]` below them at the same temperature."""
    model, out = NodeModel(), {}
    for k in range(int(hours * 3600 / step)):
        t = k * step
        busy = (t // 1200) % 2 == 0
        batch = []
        for i in range(8):
            power = 700.0 if busy else 90.0 + 5 * i
            temp = 27.0 + 0.08 * power + 1.5 * math.sin(t / 7200) + (hotter or {}).get(i, 0.0)
            clock = (2.4e9 - 1e7 * temp) * (1 - (slower or {}).get(i, 0.0)) if busy else 3.45e8
            batch.append(Sample(uuid=f"GPU-{i}", sku=H100, temperature=temp, power=power, power_limit=700.0,
                                sm_clock=clock, utilization=0.97 if busy else 0.0))
        out = model.update(t, batch)
    return model, out


def value(out: dict, gpu: int, metric: str, *labels: str) -> float:
    return out[f"GPU-{gpu}"][metric][tuple(labels)]


def test_the_fit_finds_the_thermal_resistance_and_a_hotter_gpu() -> None:
    _, out = node_history(6, hotter={3: 7.0})
    for i in range(8):
        assert value(out, i, RESISTANCE) == pytest.approx(0.08, abs=0.004)  # (not the prior, 0.06)
    assert value(out, 3, TEMP_DEVIATION) == pytest.approx(7.0, abs=0.3)  # "7 C above its peers at the same power"
    assert all(abs(value(out, i, TEMP_DEVIATION)) < 0.3 for i in range(8) if i != 3)


def test_the_dvfs_fit_finds_a_fail_slow_gpu() -> None:
    _, out = node_history(6, slower={5: 0.08})
    assert value(out, 5, CLOCK_DEVIATION) == pytest.approx(-0.08, abs=0.005)
    assert all(abs(value(out, i, CLOCK_DEVIATION)) < 0.005 for i in range(8) if i != 5)
    assert value(out, 5, REASON, "clocks") == 1 and value(out, 5, SCORE) == 1
    assert all(value(out, i, SCORE) == 0 for i in range(8) if i != 5)  # healthy GPUs score exactly 0


def test_a_healthy_node_scores_zero_everywhere() -> None:
    _, out = node_history(12)
    assert {value(out, i, SCORE) for i in range(8)} == {0.0}
    assert all(v == 0 for i in range(8) for v in out[f"GPU-{i}"][REASON].values())


def test_no_deviation_without_two_peers() -> None:
    model = NodeModel()
    out = model.update(0.0, [Sample("GPU-a", H100, 60.0, 650.0, 700.0, 1.8e9, 0.97),
                             Sample("GPU-b", H100, 61.0, 650.0, 700.0, 1.8e9, 0.97),
                             Sample("GPU-c", "NVIDIA H200", 61.0, 650.0, 700.0, 1.8e9, 0.97)])
    assert TEMP_DEVIATION not in out["GPU-a"] and CLOCK_DEVIATION not in out["GPU-c"]
    assert out["GPU-a"][RESISTANCE] == {(): 0.06}  # one sample: the prior


def risk_run(hours: float, per_gpu: dict[int, dict[str, float]], step: float = 60.0) -> dict:
    """Counters grow at per_gpu[i][name] per hour (xids: per hour, spread over codes 13/31/43)."""
    tracker, out = RiskTracker(), {}
    counts: dict[tuple[int, str], float] = {}
    for k in range(int(hours * 3600 / step)):
        batch = []
        for i in range(8):
            rates = per_gpu.get(i, {})
            for name in ("ecc", "pcie", "xid"):
                counts[(i, name)] = counts.get((i, name), 0.0) + rates.get(name, 0.0) * step / 3600
            batch.append(RiskInputs(uuid=f"GPU-{i}", sku=H100, ecc_corrected=math.floor(counts[(i, "ecc")]),
                                    pcie_replays=math.floor(counts[(i, "pcie")]),
                                    remap_pending=rates.get("remap_pending", 0.0),
                                    xids={31: math.floor(counts[(i, "xid")])}))
        out = tracker.update(k * step, batch)
    return out


def test_a_corrected_ecc_burst_on_one_gpu_is_flagged_but_not_one_on_every_gpu() -> None:
    out = risk_run(4, {i: {"pcie": 300.0, **({"ecc": 120.0} if i == 2 else {})} for i in range(8)})
    assert value(out, 2, REASON, "ecc") == 1 and value(out, 2, SCORE) == 1
    assert all(value(out, i, SCORE) == 0 for i in range(8) if i != 2)  # replays everywhere: the node, not a GPU


def test_repeated_mmu_faults_and_a_pending_remap() -> None:
    out = risk_run(6, {4: {"xid": 1.0}, 6: {"remap_pending": 1.0}})
    # about 4 MMU faults within the last 12 h-window, where its peers had none
    assert 0.5 < value(out, 4, REASON, "xid") < 1 and value(out, 4, SCORE) == value(out, 4, REASON, "xid")
    assert value(out, 6, REASON, "remap_pending") == 1 and value(out, 6, SCORE) == 1
    assert {value(out, i, SCORE) for i in (0, 1, 2, 3, 5, 7)} == {0.0}


def test_a_single_xid_is_not_a_signal() -> None:
    out = risk_run(3, {1: {"xid": 0.4}})
    assert value(out, 1, SCORE) == 0


def test_the_exporter_serves_the_model_and_the_risk_over_the_fake(fake: FakeNvml, start_exporter) -> None:
    fake.state = h100_node(4)
    for i in range(4):  # the same power and temperature everywhere, but GPU 1 runs 8 C hotter, GPU 2 slower
        fake.state.update({f"gpu.{i}.power_mw": "690000", f"gpu.{i}.temp": "62", f"gpu.{i}.clock.sm": "1900"})
    fake.state.update({"gpu.1.temp": "70", "gpu.2.clock.sm": "1748", "gpu.3.remap_pending": "1"})
    fake.write()
    exp = start_exporter(fake, "--no-xid.journal", wait_ready=True)
    s = samples(str(wait_for(lambda: (p := exp.metrics()) and "nvidia_gpu_risk_score{" in p and p)))

    def at(gpu: int, metric: str, extra: str = "") -> float:
        return s[f'{metric}{{gpu="{gpu}",uuid="{fake.state[f"gpu.{gpu}.uuid"]}"{extra}}}']

    assert at(1, TEMP_DEVIATION) == 8 and at(0, TEMP_DEVIATION) == 0
    assert at(2, CLOCK_DEVIATION) == pytest.approx(1748 / 1900 - 1, abs=1e-4)
    assert at(0, RESISTANCE) == 0.06
    assert at(3, SCORE) == 1 and at(3, REASON, ',reason="remap_pending"') == 1
    assert at(2, SCORE) == 1 and at(2, REASON, ',reason="clocks"') == 1
    # GPU 1's 8 C is a standing offset from the start, below the 10 C at which the offset alone counts:
    # it is charted, not scored (a rise over its own baseline would be). Healthy: sparse, not served.
    assert not any(k.startswith(SCORE) and ('gpu="0"' in k or 'gpu="1"' in k) for k in s)


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 2.0], [1.0, 1.0, 7.0, 2.0, 9.0, 0.0, 3.0, 3.0]])
def test_peer_medians_are_the_median_of_the_others(values: list[float]) -> None:
    import statistics

    from nvml_exporter.risk import peer_medians

    assert peer_medians(values) == [statistics.median(values[:i] + values[i + 1:]) for i in range(len(values))]
