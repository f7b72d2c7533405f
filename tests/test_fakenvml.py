"""The fake libnvidia-ml.so.1 itself, driven through the real pynvml bindings in this process.

pynvml can load one library per process and never unloads it, so the fake is loaded once here and
scenarios are switched through FAKE_NVML_STATE, which the fake reads on every call.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
import time
from pathlib import Path

import pynvml
import pytest

from tests.conftest import require_tool
from tests.fakenvml.scenario import LIBRARY, FakeNvml, h100_node


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(LIBRARY), mode=ctypes.RTLD_GLOBAL)
    handle.fakeNvmlCallCount.restype = ctypes.c_ulonglong
    handle.fakeNvmlCallCount.argtypes = [ctypes.c_char_p]
    return handle


@pytest.fixture
def nvml(lib: ctypes.CDLL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    monkeypatch.delenv("FAKE_NVML_EVENTS", raising=False)
    pynvml.nvmlInit()
    yield fake
    pynvml.nvmlShutdown()


def fields(handle: object, *ids: int | tuple[int, int]) -> list[tuple[int, float]]:
    out = []
    for v in pynvml.nvmlDeviceGetFieldValues(handle, list(ids)):
        value = v.value.uiVal if v.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT else v.value.ullVal
        out.append((v.nvmlReturn, value))
    return out


def test_library_has_the_driver_soname() -> None:
    dynamic = subprocess.run([require_tool("readelf"), "-d", str(LIBRARY)], capture_output=True, text=True,
                             check=True).stdout
    assert "Library soname: [libnvidia-ml.so.1]" in dynamic


def test_identity_and_enumeration(nvml: FakeNvml) -> None:
    assert pynvml.nvmlDeviceGetCount() == 2
    assert pynvml.nvmlSystemGetDriverVersion() == "580.105.08"
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    assert pynvml.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"
    assert pynvml.nvmlDeviceGetIndex(h) == 1
    uuid = pynvml.nvmlDeviceGetUUID(h)
    assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)) == 1
    pci = pynvml.nvmlDeviceGetPciInfo(h)
    assert pci.busId == "00000000:64:00.0" and pci.bus == 0x64 and pci.pciDeviceId == 0x233010DE
    assert pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByPciBusId("0000:64:00.0")) == 1
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-does-not-exist")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(2)


def test_getters_and_field_values_report_one_state(nvml: FakeNvml) -> None:
    nvml.gpu(0, energy_mj=123456789, pcie_replay=42, mem_temp=71, **{
        "ecc.sbe_vol": 5, "ecc.dbe_vol": 1, "ecc.dbe_agg": 3, "remap_cor": 2, "remap_unc": 1, "remap_pending": 1,
        "violation.power": 5_000_000_000, "nvlink.3.crc_flit": 7, "nvlink.3.crc_data": 8, "nvlink.3.replay": 9,
        "nvlink.3.recovery": 10, "nvlink.4.up": 0})
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(h) == 123456789
    assert pynvml.nvmlDeviceGetPcieReplayCounter(h) == 42
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, 0, 0) == 5
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, 1, 0) == 1
    assert pynvml.nvmlDeviceGetTotalEccErrors(h, 1, 1) == 3
    assert pynvml.nvmlDeviceGetRemappedRows(h) == (2, 1, 1, 0)
    assert pynvml.nvmlDeviceGetViolationStatus(h, 0).violationTime == 5_000_000_000
    assert pynvml.nvmlDeviceGetNvLinkErrorCounter(h, 3, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT) == 7
    assert pynvml.nvmlDeviceGetNvLinkErrorCounter(h, 3, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA) == 8
    assert pynvml.nvmlDeviceGetNvLinkState(h, 4) == 0
    assert fields(h, 83, 94, 82, 3, 4, 6, 142, 143, 144, 145, 74) == [
        (0, 123456789), (0, 42), (0, 71), (0, 5), (0, 1), (0, 3), (0, 2), (0, 1), (0, 1), (0, 0), (0, 5_000_000_000)]
    # link-scoped ids, the per-link CRC-data id, totals, and an inactive link's NOT_SUPPORTED
    assert fields(h, (163, 3), (161, 3), (162, 3), 42, 38, (165, 3), (165, 4), (163, 4)) == [
        (0, 7), (0, 9), (0, 10), (0, 8), (0, 7), (0, 1), (0, 0), (3, 0)]
    # an id the fake does not model is NOT_SUPPORTED per entry while the call succeeds
    assert fields(h, 999)[0][0] == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_absent_key_is_not_supported_and_injected_errors(nvml: FakeNvml) -> None:
    h0, h1 = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    # H100 SXM: passive, no fans: the count is 0 (as a real H200 answered) and a fan speed is N/A
    assert pynvml.nvmlDeviceGetNumFans(h0) == 0
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetFanSpeed(h0)
    nvml.unset("gpu.0.num_fans")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetNumFans(h0)  # an absent key is NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h0)  # Hopper retires rows, not pages
    nvml.set({"gpu.1.err.nvmlDeviceGetPowerUsage": 3, "gpu.0.temp": "e:999", "err.nvmlDeviceGetPerformanceState": 4})
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetPowerUsage(h1)
    assert pynvml.nvmlDeviceGetPowerUsage(h0) == 640_000
    with pytest.raises(pynvml.NVMLError_Unknown):
        pynvml.nvmlDeviceGetTemperature(h0, 0)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceGetPerformanceState(h1)
    # codes pynvml has no text for are named by the library's nvmlErrorString
    nvml.set({"gpu.1.temp": "e:27"})
    with pytest.raises(pynvml.NVMLError) as e:
        pynvml.nvmlDeviceGetTemperature(h1, 0)
    assert str(e.value) == "Not ready"


def test_state_file_replaced_under_a_running_process(nvml: FakeNvml) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetTemperature(h, 0) == 60
    nvml.gpu(0, temp=77)
    assert pynvml.nvmlDeviceGetTemperature(h, 0) == 77
    nvml.set(gpu_count=3)
    assert pynvml.nvmlDeviceGetCount() == 3


def test_lost_gpu_fails_every_call_and_handle_lookup_until_cleared(nvml: FakeNvml) -> None:
    h1 = pynvml.nvmlDeviceGetHandleByIndex(1)
    uuid = pynvml.nvmlDeviceGetUUID(h1)
    nvml.gpu(1, lost=1)
    for call in (lambda: pynvml.nvmlDeviceGetTemperature(h1, 0), lambda: pynvml.nvmlDeviceGetHandleByIndex(1),
                 lambda: pynvml.nvmlDeviceGetHandleByUUID(uuid), lambda: pynvml.nvmlDeviceGetFieldValues(h1, [83])):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert pynvml.nvmlDeviceGetCount() == 2  # still enumerated, as the driver does
    assert pynvml.nvmlDeviceGetTemperature(pynvml.nvmlDeviceGetHandleByIndex(0), 0) == 60
    nvml.unset("gpu.1.lost")
    assert pynvml.nvmlDeviceGetTemperature(h1, 0) == 61


def test_struct_versions_two_call_protocols_and_rates(nvml: FakeNvml) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    mem = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert (mem.total, mem.reserved, mem.used) == (81559 << 20, 480 << 20, 71500 << 20)
    assert mem.free == mem.total - mem.reserved - mem.used
    assert pynvml.nvmlDeviceGetTemperatureV(h, 0) == 60
    nvml.gpu(0, procs="100:1048576,200:2097152,300:1")
    assert [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)] == [
        (100, 1048576), (200, 2097152), (300, 1)]
    nvml.gpu(0, procs="")
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(h) == []
    nvml.gpu(0, retired_sbe=2, retired_dbe=1)
    assert len(pynvml.nvmlDeviceGetRetiredPages(h, 0)) == 2
    nvml.gpu(0, energy_mj="1000+1000000/s")  # grows 1000 J per second
    first = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    time.sleep(0.05)
    assert pynvml.nvmlDeviceGetTotalEnergyConsumption(h) > first >= 1000


def test_injected_latency_blocks_only_the_caller(nvml: FakeNvml) -> None:
    h0, h1 = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    nvml.set({"gpu.1.latency_us.nvmlDeviceGetTemperature": 400_000})
    slow_done = threading.Event()
    t = threading.Thread(target=lambda: (pynvml.nvmlDeviceGetTemperature(h1, 0), slow_done.set()))
    t.start()
    time.sleep(0.05)
    assert pynvml.nvmlDeviceGetTemperature(h0, 0) == 60  # other GPU answers while GPU 1's call sleeps
    assert not slow_done.is_set()
    t.join()
    assert slow_done.is_set()


def test_events_delivered_once_and_only_when_registered(nvml: FakeNvml) -> None:
    h0, h1 = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlDeviceGetHandleByIndex(1)
    nvml.xid(0, 13)  # before the set exists: never delivered
    es = pynvml.nvmlEventSetCreate()
    supported = pynvml.nvmlDeviceGetSupportedEventTypes(h0)
    assert supported & pynvml.nvmlEventTypeXidCriticalError
    pynvml.nvmlDeviceRegisterEvents(h0, pynvml.nvmlEventTypeXidCriticalError, es)
    pynvml.nvmlDeviceRegisterEvents(h1, pynvml.nvmlEventTypeXidCriticalError, es)
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait(es, 20)
    nvml.event(0, pynvml.nvmlEventTypeDoubleBitEccError, 0)  # not registered for this type
    threading.Timer(0.1, nvml.xid, args=(1, 79)).start()
    data = pynvml.nvmlEventSetWait(es, 2000)
    assert (data.eventType, data.eventData, pynvml.nvmlDeviceGetIndex(data.device)) == (0x8, 79, 1)
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait(es, 20)  # delivered once
    nvml.gpu(1, lost=1)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlEventSetWait(es, 20)
    pynvml.nvmlEventSetFree(es)


def test_call_counters(nvml: FakeNvml, lib: ctypes.CDLL) -> None:
    lib.fakeNvmlResetCallCounts()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    for _ in range(3):
        pynvml.nvmlDeviceGetTemperature(h, 0)
    assert lib.fakeNvmlCallCount(b"nvmlDeviceGetTemperature") == 3
    assert lib.fakeNvmlCallCount(b"nvmlDeviceGetHandleByIndex_v2") == 1
    assert lib.fakeNvmlCallCount(b"nvmlDeviceGetPowerUsage") == 0


def test_init_error_and_calls_before_init(lib: ctypes.CDLL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(tmp_path / "nvml", {"gpu_count": "1", "init_error": "9"})
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    count = ctypes.c_uint()
    assert lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == pynvml.NVML_ERROR_UNINITIALIZED
    fake.unset("init_error")
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 1
    pynvml.nvmlShutdown()
