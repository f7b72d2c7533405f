"""Exposition is a pure function of a snapshot: exact text, escaping, and what a lost GPU shows."""

from __future__ import annotations

from nvml_exporter.exposition import BuildInfo, format_value, render
from nvml_exporter.snapshot import ExporterState, GpuIdentity, GpuSnapshot, Snapshot

BUILD = BuildInfo(version="1.2.3", pynvml_version="13.0", python_version="3.11.2")


def gpu(index: int, up: bool = True, **values: dict[tuple[str, ...], float]) -> GpuSnapshot:
    ident = GpuIdentity(index=index, uuid=f"GPU-{index}", name='A "quoted"\\name', pci_bus_id="00000000:18:00.0",
                        serial="", vbios_version="1", minor_number=str(index))
    return GpuSnapshot(identity=ident, up=up, values=values)


def test_exact_page_for_a_small_snapshot() -> None:
    snap = Snapshot(
        gpus=(gpu(0, nvidia_gpu_temperature_celsius={(): 41.0},
                  nvidia_gpu_clock_hertz={("sm",): 1.98e9, ("memory",): 2.619e9}),
              gpu(1, up=False)),
        state=ExporterState(nvml_up=True, driver_version="580.1", nvml_errors={("nvmlDeviceGetName", "gpu_is_lost"): 2},
                            timeouts={"1": 3}, last_collect_timestamp=1700000000.5),
    )
    page = render(snap, BUILD).decode()
    info = 'name="A \\"quoted\\"\\\\name",pci_bus_id="00000000:18:00.0",serial="",vbios_version="1"'
    assert page == f"""# HELP nvidia_gpu_info GPU identity; always 1.
# TYPE nvidia_gpu_info gauge
nvidia_gpu_info{{gpu="0",uuid="GPU-0",{info},minor_number="0",driver_version="580.1"}} 1
nvidia_gpu_info{{gpu="1",uuid="GPU-1",{info},minor_number="1",driver_version="580.1"}} 1
# HELP nvidia_gpu_up 1 if the GPU answered this collection, 0 if it is lost or failing.
# TYPE nvidia_gpu_up gauge
nvidia_gpu_up{{gpu="0",uuid="GPU-0"}} 1
nvidia_gpu_up{{gpu="1",uuid="GPU-1"}} 0
# HELP nvidia_gpu_temperature_celsius GPU core temperature.
# TYPE nvidia_gpu_temperature_celsius gauge
nvidia_gpu_temperature_celsius{{gpu="0",uuid="GPU-0"}} 41
# HELP nvidia_gpu_clock_hertz Current clock frequency.
# TYPE nvidia_gpu_clock_hertz gauge
nvidia_gpu_clock_hertz{{gpu="0",uuid="GPU-0",clock="sm"}} 1980000000
nvidia_gpu_clock_hertz{{gpu="0",uuid="GPU-0",clock="memory"}} 2619000000
# HELP nvml_exporter_build_info Build of the exporter; always 1.
# TYPE nvml_exporter_build_info gauge
nvml_exporter_build_info{{version="1.2.3",pynvml_version="13.0",python_version="3.11.2"}} 1
# HELP nvml_exporter_nvml_up 1 once NVML is initialised, 0 while the library or driver is missing.
# TYPE nvml_exporter_nvml_up gauge
nvml_exporter_nvml_up 1
# HELP nvml_exporter_collect_duration_seconds Time the last collection of each GPU took.
# TYPE nvml_exporter_collect_duration_seconds gauge
nvml_exporter_collect_duration_seconds{{gpu="0"}} 0
nvml_exporter_collect_duration_seconds{{gpu="1"}} 0
# HELP nvml_exporter_collect_timeouts_total Collections of a GPU that missed the scrape deadline; the scrape served its last good values. A GPU has a series from its first timeout on (served at 0 first).
# TYPE nvml_exporter_collect_timeouts_total counter
nvml_exporter_collect_timeouts_total{{gpu="1"}} 3
# HELP nvml_exporter_nvml_errors_total NVML calls that failed, by function and error.
# TYPE nvml_exporter_nvml_errors_total counter
nvml_exporter_nvml_errors_total{{function="nvmlDeviceGetName",error="gpu_is_lost"}} 2
# HELP nvml_exporter_last_collect_timestamp_seconds Unix time of the last finished collection.
# TYPE nvml_exporter_last_collect_timestamp_seconds gauge
nvml_exporter_last_collect_timestamp_seconds 1700000000.5
"""


def test_no_nvml_no_gpus() -> None:
    page = render(Snapshot(gpus=(), state=ExporterState(nvml_up=False)), BUILD).decode()
    assert "nvml_exporter_nvml_up 0\n" in page
    assert "nvidia_gpu" not in page
    assert "last_collect" not in page  # never collected: no fake timestamp


def test_value_formatting() -> None:
    assert [format_value(v) for v in (0.0, 3.0, 0.61, 1e-9, 2.0**60, float("inf"), float("-inf"))] == [
        "0", "3", "0.61", "1e-09", "1.152921504606847e+18", "+Inf", "-Inf"]
    assert format_value(float("nan")) == "NaN"
