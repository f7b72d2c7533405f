"""State in objects: the caches of the diagnosis and of exposition belong to their owners (two owners in
one process share none), and the no-mutation invariant they rely on (snapshot.py) holds: in the frozen-
readings test mode a change to a reading raises, and a GPU that turns critical is never served the
verdict cached while it was healthy."""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType

import pytest

from nvml_exporter import diagnosis, exposition
from nvml_exporter.diagnosis import Diagnoser
from nvml_exporter.exposition import BuildInfo, Renderer
from nvml_exporter.snapshot import ExporterState, Freezer, GpuIdentity, GpuSnapshot, Snapshot, Values
from tests.conftest import collector_over
from tests.fakenvml.scenario import FakeNvml, h100_node

TEMP = "nvidia_gpu_temperature_celsius"
ECC = "nvidia_gpu_ecc_errors_total"
BUILD = BuildInfo(version="1.2.3", pynvml_version="13.0", python_version="3.11.2")
IDENTITY = GpuIdentity(index=0, uuid="GPU-0", name="H100")


def gpu(values: Values) -> GpuSnapshot:
    return GpuSnapshot(identity=IDENTITY, up=True, values=values)


def healthy() -> Values:
    return {TEMP: {(): 60.0}, ECC: {("uncorrected", "volatile"): 0.0}}


def critical() -> Values:
    return {TEMP: {(): 60.0}, ECC: {("uncorrected", "volatile"): 2.0}}


class Counting:
    """Wraps a module function and counts its calls."""

    def __init__(self, fn):  # type: ignore[no-untyped-def]
        self.fn, self.calls = fn, 0

    def __call__(self, *args):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.fn(*args)


def test_two_diagnosers_share_no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Counting(diagnosis._snapshot_findings)
    monkeypatch.setattr(diagnosis, "_snapshot_findings", rules)
    a, b = Diagnoser(), Diagnoser()
    fine, bad = gpu(healthy()), gpu(critical())
    assert a.diagnose(fine).status == "ok" and rules.calls == 1
    assert b.diagnose(fine).status == "ok" and rules.calls == 2  # b knew nothing of a's verdict
    assert a.diagnose(fine).status == "ok" and rules.calls == 2  # a's own, kept
    assert b.diagnose(bad).status == "critical" and rules.calls == 3
    assert a.diagnose(fine).status == "ok" and rules.calls == 3  # b's verdict on the same GPU is not a's


def test_two_renderers_share_no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = Counting(exposition._render_block)
    monkeypatch.setattr(exposition, "_render_block", blocks)
    state = ExporterState(nvml_up=True, driver_version="580.1")
    cool = Snapshot(gpus=(gpu({TEMP: {(): 41.0}}),), state=state)
    hot = Snapshot(gpus=(gpu({TEMP: {(): 90.0}}),), state=state)
    a, b = Renderer(), Renderer()
    page = a.render(cool, BUILD)
    assert blocks.calls == 1
    assert b.render(cool, BUILD) == page and blocks.calls == 2  # b rendered its own block
    assert b'nvidia_gpu_temperature_celsius{gpu="0",uuid="GPU-0"} 90' in b.render(hot, BUILD)
    assert a.render(cool, BUILD) == page and blocks.calls == 3  # a's block, kept: b's page is not a's
    # render(): a renderer of its own each time, so nothing is kept from one call to the next
    exposition.render(cool, BUILD)
    exposition.render(cool, BUILD)
    assert blocks.calls == 5


def test_a_gpu_turning_critical_is_not_served_its_cached_healthy_verdict() -> None:
    diagnoser, freezer = Diagnoser(), Freezer()
    values = freezer.freeze(healthy())
    for _ in range(3):  # the verdict is cached while the inputs are the same mappings
        assert diagnoser.diagnose(gpu(values)).status == "ok"
    with pytest.raises(TypeError):  # changing the cached reading in place is what the mode refuses
        values[ECC][("uncorrected", "volatile")] = 2.0
    turned = freezer.freeze({**values, ECC: {("uncorrected", "volatile"): 2.0}})  # a new mapping, as the reader makes
    d = diagnoser.diagnose(gpu(turned))
    assert (d.status, d.action) == ("critical", "drain_and_reset")


def test_the_freezer_hands_out_the_same_read_only_view_of_the_same_mapping() -> None:
    freezer = Freezer()
    temps = {(): 60.0}
    first, second = freezer.freeze({TEMP: temps}), freezer.freeze({TEMP: temps})
    assert isinstance(first[TEMP], MappingProxyType) and first[TEMP] is second[TEMP]  # identity caches still hit
    assert freezer.freeze({TEMP: {(): 60.0}})[TEMP] is not first[TEMP]  # a new mapping, a new view
    with pytest.raises(TypeError):
        first[TEMP][()] = 61.0


def test_readings_through_the_collector_are_frozen_and_a_gpu_that_turns_critical_reads_critical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    with collector_over(fake, monkeypatch) as collector:  # (in the frozen-readings test mode)
        collector.collect(5.0)
        time.sleep(0.05)
        snap = collector.collect(5.0)
        g = snap.gpus[0]
        assert g.diagnosis is not None and g.diagnosis.status == "ok"
        with pytest.raises(TypeError):
            g.values[TEMP][()] = 99.0  # type: ignore[index]
        with pytest.raises(TypeError):
            g.values[TEMP] = {(): 99.0}  # type: ignore[index]
        fake.set({"gpu.0.ecc.dbe_vol": 2})
        snap = collector.collect(5.0)
        checks = {c.name: c.status for c in snap.gpus[0].diagnosis.checks}  # type: ignore[union-attr]
        assert checks["memory"] == "critical"
        assert snap.gpus[1].diagnosis is not None and snap.gpus[1].diagnosis.status == "ok"
