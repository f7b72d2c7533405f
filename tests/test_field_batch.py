"""FieldBatch, the exporter's one nvmlDeviceGetFieldValues call per GPU and tier, against the fake in this
process: decoding by plan, and dropping an entry only once the board has said NOT_SUPPORTED twice."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from nvml_exporter.nvml import FAST_FIELDS, FieldBatch, nvlink_fields
from nvml_exporter.snapshot import Values
from tests.fakenvml.scenario import LIBRARY, FakeNvml, h100_node


@pytest.fixture
def gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeNvml, object]]:
    ctypes.CDLL(str(LIBRARY), mode=ctypes.RTLD_GLOBAL)
    fake = FakeNvml(tmp_path / "nvml", h100_node(1))
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    pynvml.nvmlInit()
    yield fake, pynvml.nvmlDeviceGetHandleByIndex(0)
    pynvml.nvmlShutdown()


def read(batch: FieldBatch, handle: object) -> Values:
    values: Values = {}
    batch.read(handle, lambda key, fn: fn(), values)
    return values


def test_values_by_type_and_scale(gpu: tuple[FakeNvml, object]) -> None:
    fake, h = gpu
    fake.gpu(0, mem_temp=71, pcie_replay=150, **{"violation.power": 7_014_307_013, "nvlink.2.replay": 5})
    batch = FieldBatch([*FAST_FIELDS, *nvlink_fields(2)], keep_unsupported=lambda f: f.link)
    for _ in range(2):  # planned on the first read, the plan reused on the second
        v = read(batch, h)
        assert v["nvidia_gpu_memory_temperature_celsius"] == {(): 71.0}  # unsigned int
        assert v["nvidia_gpu_pcie_replay_errors_total"] == {(): 150.0}
        assert v["nvidia_gpu_clock_event_duration_seconds_total"][("power",)] == 7.014307013  # ns -> s, exact
        assert v["nvidia_gpu_nvlink_link_errors_total"][("2", "replay")] == 5.0  # unsigned long long
        assert v["nvidia_gpu_nvlink_link_up"] == {("2",): 1.0}
        assert all(isinstance(x, float) for series in v.values() for x in series.values())


def test_an_entry_is_dropped_only_after_saying_not_supported_twice(gpu: tuple[FakeNvml, object]) -> None:
    fake, h = gpu
    batch = FieldBatch(FAST_FIELDS)
    fake.gpu(0, mem_temp="e:3")  # one spurious NOT_SUPPORTED
    assert "nvidia_gpu_memory_temperature_celsius" not in read(batch, h)
    fake.gpu(0, mem_temp=70)
    assert read(batch, h)["nvidia_gpu_memory_temperature_celsius"] == {(): 70.0}
    assert len(batch.fields) == len(FAST_FIELDS)  # still asked for
    fake.gpu(0, mem_temp="e:3")  # the board really does not support it: said twice, dropped
    read(batch, h)
    read(batch, h)
    assert 82 not in [f.field_id for f in batch.fields]
    fake.gpu(0, mem_temp=70)
    assert "nvidia_gpu_memory_temperature_celsius" not in read(batch, h)


def test_inactive_nvlink_ports_are_kept(gpu: tuple[FakeNvml, object]) -> None:
    fake, h = gpu
    fake.gpu(0, **{"nvlink.4.up": 0})  # an inactive port answers NOT_SUPPORTED for its counters
    batch = FieldBatch(nvlink_fields(4), keep_unsupported=lambda f: f.link)
    for _ in range(3):
        v = read(batch, h)
    assert v == {"nvidia_gpu_nvlink_link_up": {("4",): 0.0}}
    fake.gpu(0, **{"nvlink.4.up": 1, "nvlink.4.crc_flit": 9})  # it comes up: its counters are there
    assert read(batch, h)["nvidia_gpu_nvlink_link_errors_total"][("4", "crc_flit")] == 9.0


def test_what_the_driver_says_a_read_cost(gpu: tuple[FakeNvml, object]) -> None:
    fake, h = gpu
    batch = FieldBatch(FAST_FIELDS)
    read(batch, h)
    assert batch.driver_us == 0
    # a real H200's energy counter and thermal-violation time (the collector then reads such GPUs on
    # their own threads, so that the slow calls overlap)
    fake.set({"latency_us.field.83": 2800, "latency_us.field.75": 610})
    read(batch, h)
    assert batch.driver_us == 3410


def test_unchanged_counters_come_back_as_the_same_mapping_and_changes_show(gpu: tuple[FakeNvml, object]) -> None:
    fake, h = gpu
    batch = FieldBatch([*FAST_FIELDS, *nvlink_fields(0), *nvlink_fields(1)], keep_unsupported=lambda f: f.link)
    first, second = read(batch, h), read(batch, h)
    assert second["nvidia_gpu_nvlink_link_errors_total"] is first["nvidia_gpu_nvlink_link_errors_total"]
    assert second["nvidia_gpu_nvlink_link_up"] is first["nvidia_gpu_nvlink_link_up"]
    fake.gpu(0, **{"nvlink.1.crc_flit": 12, "nvlink.0.up": 0})
    third = read(batch, h)
    assert third["nvidia_gpu_nvlink_link_errors_total"] is not first["nvidia_gpu_nvlink_link_errors_total"]
    assert third["nvidia_gpu_nvlink_link_errors_total"][("1", "crc_flit")] == 12.0
    assert first["nvidia_gpu_nvlink_link_errors_total"][("1", "crc_flit")] == 0.0  # what was handed out stays
    assert third["nvidia_gpu_nvlink_link_up"] == {("0",): 0.0, ("1",): 1.0}
