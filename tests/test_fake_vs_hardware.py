"""The fake against what a real board answered: docs/hardware/h200-580.159.04.raw.json is what the
exporter's own reader got from an NVIDIA H200 on driver 580.159.04 (tests/gpu/run.sh on the device
machine). The fake's `h200_vm()` profile must answer the same calls the same way: the same readings
present, the same ones NOT_SUPPORTED, the same value types and, for an idle board, the same values."""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import pynvml
import pytest

from nvml_exporter import nvml as nv
from tests.fakenvml.scenario import LIBRARY, REPO, FakeNvml, h200_vm

BOARD = REPO / "docs" / "hardware" / "h200-580.159.04"  # .md, .raw.json
RAW = json.loads(Path(f"{BOARD}.raw.json").read_text())
# Counters that grow with time since the driver (or the fake) loaded: present, but not equal.
GROWING = {"nvidia_gpu_energy_joules_total"}
# Readings the exporter took up after the capture (issue 19): held to the board's nvidia-smi -q XML instead
# (gpu_temp_tlimit, gpu_temp_{max,slow}_tlimit_threshold), below.
AFTER_CAPTURE = {("nvidia_gpu_temperature_margin_celsius", ""),
                 ("nvidia_gpu_temperature_threshold_celsius", "shutdown_tlimit"),
                 ("nvidia_gpu_temperature_threshold_celsius", "slowdown_tlimit")}
DROPPED = {"graphics", "video"}  # clocks the exporter no longer reads (exporter/nvml/reader.py CLOCKS)


@pytest.fixture
def h200(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    ctypes.CDLL(str(LIBRARY), mode=ctypes.RTLD_GLOBAL)
    fake = FakeNvml(tmp_path / "nvml", h200_vm(latency=False))
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    pynvml.nvmlInit()
    yield pynvml.nvmlDeviceGetHandleByIndex(0)
    pynvml.nvmlShutdown()


def flat(values: nv.Values) -> dict[str, dict[str, float]]:
    return {metric: {",".join(labels): v for labels, v in series.items()} for metric, series in values.items()}


def test_every_field_value_entry_answers_as_on_the_board(h200: object) -> None:
    wanted = RAW["field_values"]
    got = [e for i in range(0, len(wanted), 64)
           for e in pynvml.nvmlDeviceGetFieldValues(h200, [(w["field"], w["scope"]) for w in wanted[i:i + 64]])]
    mismatches = [
        (w["field"], w["scope"], w["return"], nv.error_name(g.nvmlReturn) if g.nvmlReturn else "success")
        for w, g in zip(wanted, got, strict=True)
        if (nv.error_name(g.nvmlReturn) if g.nvmlReturn else "success") != w["return"]
        or (w["return"] == "success" and g.valueType != w["value_type"])
    ]
    assert mismatches == []
    assert sum(w["return"] == "not_supported" for w in wanted) == 159  # retired pages and every NVLink entry


def test_the_exporter_reads_the_fake_as_it_read_the_board(h200: object) -> None:
    errors: dict[str, str] = {}
    reader = nv.GpuReader(h200, lambda f, c: errors.setdefault(f, nv.error_name(c)))
    identity = reader.read_identity()
    static, slow, fast = flat(reader.read_static()), flat(reader.read_slow()), flat(reader.read_fast())
    assert identity.__dict__ == RAW["identity"]
    assert errors == RAW["errors"] == {}  # GetNumFans answers 0, not NOT_SUPPORTED; no NVLink port errors
    assert reader._nvlink_ports() == RAW["nvlink_ports"] == []
    board_static = {m: {k: v for k, v in series.items() if not (m.startswith("nvidia_gpu_clock") and k in DROPPED)}
                    for m, series in RAW["values"]["static"].items()}
    assert static == board_static
    # compared across the slow and fast tiers: a reading may move between them (persistence mode did)
    ours, board = {**slow, **fast}, {**RAW["values"]["slow"], **RAW["values"]["fast"]}
    board = {m: {k: v for k, v in series.items() if not (m.startswith("nvidia_gpu_clock") and k in DROPPED)}
             for m, series in board.items()}
    xml = Path(f"{BOARD}.nvidia-smi-q.xml").read_text()

    def smi(tag: str) -> float:
        return float(re.search(rf"<{tag}>(-?\d+) C</{tag}>", xml).group(1))

    later = {(m, k): ours[m].pop(k) for m, k in AFTER_CAPTURE}
    ours = {m: v for m, v in ours.items() if v}
    assert later == {("nvidia_gpu_temperature_margin_celsius", ""): smi("gpu_temp_tlimit"),
                     ("nvidia_gpu_temperature_threshold_celsius", "shutdown_tlimit"):
                         smi("gpu_temp_max_tlimit_threshold"),
                     ("nvidia_gpu_temperature_threshold_celsius", "slowdown_tlimit"):
                         smi("gpu_temp_slow_tlimit_threshold")}
    assert smi("gpu_temp") == fast["nvidia_gpu_temperature_celsius"][""]  # the XML is of the same idle board
    assert ours.keys() == board.keys()
    assert {m: v for m, v in ours.items() if m not in GROWING} == {m: v for m, v in board.items() if m not in GROWING}


def test_event_types_are_the_boards(h200: object) -> None:
    summary = Path(f"{BOARD}.md").read_text()
    supported = int(re.search(r"supported event types (0x[0-9a-f]+)", summary).group(1), 16)
    assert pynvml.nvmlDeviceGetSupportedEventTypes(h200) == supported


def test_the_fake_reports_the_boards_field_costs(h200: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(tmp_path / "timed", h200_vm())
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    entries = pynvml.nvmlDeviceGetFieldValues(h200, [82, 83, 75, 94])
    # latencyUsec as the driver fills it in: the energy counter is the expensive one
    assert [e.latencyUsec for e in entries] == [0, 2800, 610, 145]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetNvLinkState(h200, 0)  # no NVLink: NOT_SUPPORTED, not INVALID_ARGUMENT
