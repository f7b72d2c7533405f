"""A `GpuReader` reads one GPU in three tiers: static (once per handle), slow (thresholds, limits, ECC
aggregates, retirement, remapping) and fast (every collection). It remembers what the board answered
NOT_SUPPORTED for and never asks again, batches counters into one nvmlDeviceGetFieldValues call per
tier, and raises `GpuLost` the moment NVML says the GPU fell off the bus.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable
from typing import Any

import pynvml

from ..snapshot import GpuIdentity, Values
from .calls import MEMORY_V2, Memory, Plain, Utilization, entry_point, getter, plain, process_count, text
from .errors import (
    FAILED,
    FUNCTION_NOT_FOUND,
    LOST_CODES,
    PERMANENT_CODES,
    STALE_CODES,
    ErrorSink,
    GpuLost,
    NvmlStale,
)
from .fields import FAST_FIELDS, SLOW_FIELDS, FieldBatch, nvlink_fields, scaled

# Clock-event reason bits (nvml.h nvmlClocksEventReason*), in bit order.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"), (0x2, "applications_clocks_setting"), (0x4, "sw_power_cap"), (0x8, "hw_slowdown"),
    (0x10, "sync_boost"), (0x20, "sw_thermal_slowdown"), (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"), (0x100, "display_clock_setting"),
)
# SM and memory only, as dcgm-exporter (SM_CLOCK, MEM_CLOCK): the graphics clock equals the SM clock on
# the datacenter boards (H200: 1485/1485 MHz busy) and the video clock says nothing about health; their 4
# series per GPU paid for the thermal margin and T.Limit offsets within the 50-series budget (issue 19).
CLOCKS: tuple[tuple[int, str], ...] = ((pynvml.NVML_CLOCK_SM, "sm"), (pynvml.NVML_CLOCK_MEM, "memory"))
THRESHOLDS: tuple[tuple[int, str], ...] = (
    (pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN, "shutdown"),
    (pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, "slowdown"),
    (pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX, "gpu_max"),
    (pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX, "memory_max"),
)
MAX_NVLINKS = 36  # NVML_NVLINK_MAX_LINKS in API 13; older boards stop answering earlier


# The bindings or the driver lack an entry point. nvidia-ml-py 12.535.108 (pyproject's floor) has neither
# nvmlDeviceGetMarginTemperature nor NVMLLibraryMismatchError: looked up only when called, both count as
# FUNCTION_NOT_FOUND (not supported, never asked again) instead of failing the GPU's read.
_MISSING = (getattr(pynvml, "NVMLLibraryMismatchError", AttributeError), AttributeError)


def _margin_temperature(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetMarginTemperature(handle))


class GpuReader:
    """Reads one GPU through its NVML handle. Not thread-safe: one collection at a time per GPU."""

    def __init__(self, handle: Any, on_error: ErrorSink):
        self.handle = handle
        self._on_error = on_error
        self._unsupported: set[str] = set()
        self._fast = FieldBatch(FAST_FIELDS)
        self._slow = FieldBatch(SLOW_FIELDS)
        self._fans = 0
        self._getters: _FastGetters | None = None
        # The quickest single NVML call of the last fast read: what the driver costs, free of waits for
        # the GIL (the quickest of ~20 calls is rarely one that waited). The collector reads GPUs whose
        # driver answers in microseconds one after another, and overlaps the slow ones.
        self.fastest_call = float("inf")
        self._fastest = float("inf")
        # What the driver reports the fast tier's field values cost it: on a real H200 the energy
        # counter alone takes ~3 ms, though every other call answers in microseconds.
        self.field_seconds = 0.0

    # -- call discipline -------------------------------------------------------------------------
    def _call(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call fn; on failure count the error, remember permanent ones and return FAILED.
        `key` names the reading (function, plus the argument where one function serves several)."""
        if key in self._unsupported:
            return FAILED
        started = time.perf_counter()
        try:
            result = fn(*args)
            took = time.perf_counter() - started
            if took < self._fastest:
                self._fastest = took
            return result
        except pynvml.NVMLError as e:
            return self._failed(key, e.value)
        except _MISSING:
            return self._failed(key, FUNCTION_NOT_FOUND)  # the bindings or the driver lack this entry point

    def _failed(self, key: str, code: int) -> Any:
        function = key.split(":", 1)[0]
        self._on_error(function, code)
        if code in STALE_CODES:
            raise NvmlStale(function, code)
        if code in LOST_CODES:
            raise GpuLost(function, code)
        if code in PERMANENT_CODES:
            self._unsupported.add(key)
        return FAILED

    def _put(self, values: Values, metric: str, labels: tuple[str, ...], key: str,
             fn: Callable[..., Any], *args: Any, scale: float = 1.0) -> Any:
        v = self._call(key, fn, *args)
        if v is not FAILED:
            values.setdefault(metric, {})[labels] = scaled(float(v), scale)
        return v

    # -- tiers -----------------------------------------------------------------------------------
    def read_identity(self) -> GpuIdentity:
        h = self.handle

        def string(key: str, fn: Callable[..., Any]) -> str:
            v = self._call(key, fn, h)
            return "" if v is FAILED else text(v)

        index = self._call("nvmlDeviceGetIndex", pynvml.nvmlDeviceGetIndex, h)
        uuid = string("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID)
        pci = self._call("nvmlDeviceGetPciInfo_v3", pynvml.nvmlDeviceGetPciInfo, h)
        minor = self._call("nvmlDeviceGetMinorNumber", pynvml.nvmlDeviceGetMinorNumber, h)
        return GpuIdentity(
            index=-1 if index is FAILED else int(index),
            uuid=uuid,
            name=string("nvmlDeviceGetName", pynvml.nvmlDeviceGetName),
            pci_bus_id="" if pci is FAILED else text(pci.busId),
            serial=string("nvmlDeviceGetSerial", pynvml.nvmlDeviceGetSerial),
            vbios_version=string("nvmlDeviceGetVbiosVersion", pynvml.nvmlDeviceGetVbiosVersion),
            minor_number="" if minor is FAILED else str(minor),
        )

    def read_static(self) -> Values:
        """Facts that only change with the hardware: max clocks, max PCIe link, fans, NVLink ports."""
        h = self.handle
        values: Values = {}
        for clock, name in CLOCKS:
            self._put(values, "nvidia_gpu_clock_max_hertz", (name,), f"nvmlDeviceGetMaxClockInfo:{clock}",
                      pynvml.nvmlDeviceGetMaxClockInfo, h, clock, scale=1e6)
        self._put(values, "nvidia_gpu_pcie_link_max_generation", (), "nvmlDeviceGetMaxPcieLinkGeneration",
                  pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h)
        self._put(values, "nvidia_gpu_pcie_link_max_width", (), "nvmlDeviceGetMaxPcieLinkWidth",
                  pynvml.nvmlDeviceGetMaxPcieLinkWidth, h)
        fans = self._call("nvmlDeviceGetNumFans", pynvml.nvmlDeviceGetNumFans, h)
        self._fans = 0 if fans is FAILED else int(fans)
        # One field-value call per collection for the fast counters and every NVLink port (an inactive
        # port answers NOT_SUPPORTED too, so its entries are kept).
        links = [f for link in self._nvlink_ports() for f in nvlink_fields(link)]
        self._fast = FieldBatch([*self._fast.fields, *links], keep_unsupported=lambda f: f.link)
        self._getters = None
        return values

    def _nvlink_ports(self) -> list[int]:
        """Links that exist: NVML answers for each port up to the board's count, then errors."""
        links = []
        for link in range(MAX_NVLINKS):
            try:
                pynvml.nvmlDeviceGetNvLinkState(self.handle, link)
            except pynvml.NVMLError as e:
                if e.value in LOST_CODES:
                    self._on_error("nvmlDeviceGetNvLinkState", e.value)
                    raise GpuLost("nvmlDeviceGetNvLinkState", e.value) from None
                if link == 0 and e.value not in PERMANENT_CODES:
                    self._on_error("nvmlDeviceGetNvLinkState", e.value)
                break
            links.append(link)
        return links

    def read_slow(self) -> Values:
        """Readings that change rarely: thresholds, limits, persistence and ECC mode, aggregates, retirement,
        remapping."""
        h = self.handle
        values: Values = {}
        for kind, name in THRESHOLDS:
            self._put(values, "nvidia_gpu_temperature_threshold_celsius", (name,),
                      f"nvmlDeviceGetTemperatureThreshold:{kind}", pynvml.nvmlDeviceGetTemperatureThreshold, h, kind)
        self._put(values, "nvidia_gpu_power_default_limit_watts", (), "nvmlDeviceGetPowerManagementDefaultLimit",
                  pynvml.nvmlDeviceGetPowerManagementDefaultLimit, h, scale=1e-3)
        self._put(values, "nvidia_gpu_persistence_mode", (), "nvmlDeviceGetPersistenceMode",
                  pynvml.nvmlDeviceGetPersistenceMode, h)
        ecc = self._call("nvmlDeviceGetEccMode", pynvml.nvmlDeviceGetEccMode, h)
        if ecc is not FAILED:
            values["nvidia_gpu_ecc_enabled"] = {(): float(ecc[0])}
        self._slow.read(h, self._call, values)
        return values

    def read_fast(self) -> Values:
        if self._getters is None:
            self._getters = _FastGetters(self.handle, self._fans)
        g = self._getters
        values: Values = {}
        # The one-number getters, called here rather than through _call: ~10 per GPU and scrape, where
        # two Python frames per call cost more than the driver's answer.
        unsupported, now, fastest = self._unsupported, time.perf_counter, float("inf")
        for metric, labels, key, fn, argv, holder, mul, div in g.plain:
            if key in unsupported:
                continue
            if fn is None:
                self._failed(key, FUNCTION_NOT_FOUND)
                continue
            started = now()
            ret = fn(*argv)
            took = now() - started
            if ret:
                self._failed(key, ret)
                continue
            if took < fastest:
                fastest = took
            series = values.get(metric)
            if series is None:
                values[metric] = {labels: holder.value * mul / div}
            else:
                series[labels] = holder.value * mul / div
        self._fastest = fastest
        call = self._call
        util = call("nvmlDeviceGetUtilizationRates", g.utilization)
        if util is not FAILED:
            values["nvidia_gpu_utilization_ratio"] = {(): util.gpu / 100}
            values["nvidia_gpu_memory_utilization_ratio"] = {(): util.memory / 100}
        mem = call("nvmlDeviceGetMemoryInfo_v2", g.memory)
        if mem is not FAILED:
            values["nvidia_gpu_memory_total_bytes"] = {(): float(mem.total)}
            values["nvidia_gpu_memory_used_bytes"] = {(): float(mem.used)}
            values["nvidia_gpu_memory_free_bytes"] = {(): float(mem.free)}
            values["nvidia_gpu_memory_reserved_bytes"] = {(): float(mem.reserved)}
        # The signed distance below T.Limit (nvmlDeviceGetMarginTemperature, nvmlMarginTemperature_v1_t)
        margin = call("nvmlDeviceGetMarginTemperature", _margin_temperature, self.handle)
        if margin is not FAILED:
            values["nvidia_gpu_temperature_margin_celsius"] = {(): float(margin)}
        mask = call("nvmlDeviceGetCurrentClocksEventReasons", g.clock_events)
        if mask is not FAILED:
            values["nvidia_gpu_clock_event_active"] = _clock_events(mask)
        procs = call("nvmlDeviceGetComputeRunningProcesses_v3", g.processes)
        if procs is not FAILED:
            values["nvidia_gpu_compute_processes"] = {(): float(procs)}
        self._fast.read(self.handle, call, values)
        self.field_seconds = self._fast.driver_us * 1e-6
        self.fastest_call = self._fastest
        return values


@functools.lru_cache(maxsize=256)
def _clock_events(mask: int) -> dict[tuple[str, ...], float]:
    """The clock-event flags of a reasons mask: one mapping per mask, the same object while it holds."""
    return {(name,): 1.0 if mask & bit else 0.0 for bit, name in CLOCK_EVENT_REASONS}


class _FastGetters:
    """The fast tier's getters for one GPU handle, built on its first read."""

    def __init__(self, handle: Any, fans: int):
        calls = [
            plain("nvidia_gpu_temperature_celsius", (), "nvmlDeviceGetTemperature", handle,
                  pynvml.NVML_TEMPERATURE_GPU),
            plain("nvidia_gpu_power_watts", (), "nvmlDeviceGetPowerUsage", handle, scale=1e-3),
            plain("nvidia_gpu_power_limit_watts", (), "nvmlDeviceGetEnforcedPowerLimit", handle, scale=1e-3),
        ]
        calls += [plain("nvidia_gpu_fan_speed_ratio", (str(fan),), "nvmlDeviceGetFanSpeed_v2", handle, fan, scale=0.01)
                  for fan in range(fans)]
        calls += [plain("nvidia_gpu_clock_hertz", (name,), "nvmlDeviceGetClockInfo", handle, clock, scale=1e6)
                  for clock, name in CLOCKS]
        # (utilisation, sampling period): the period is not used
        calls += [plain(metric, (), symbol, handle, scale=0.01, after=(ctypes.byref(ctypes.c_uint()),))
                  for metric, symbol in (("nvidia_gpu_encoder_utilization_ratio", "nvmlDeviceGetEncoderUtilization"),
                                         ("nvidia_gpu_decoder_utilization_ratio", "nvmlDeviceGetDecoderUtilization"))]
        calls += [plain(metric, (), symbol, handle) for metric, symbol in (
            ("nvidia_gpu_performance_state", "nvmlDeviceGetPerformanceState"),
            ("nvidia_gpu_pcie_link_generation", "nvmlDeviceGetCurrPcieLinkGeneration"),
            ("nvidia_gpu_pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth"),
        )]
        self.plain: list[Plain] = calls
        self.utilization = getter("nvmlDeviceGetUtilizationRates", handle, out=Utilization())
        memory = Memory()
        memory.version = MEMORY_V2
        self.memory = getter("nvmlDeviceGetMemoryInfo_v2", handle, out=memory)
        # The "event" name arrived in driver 535; older drivers only have the "throttle" one (same ABI).
        events = ("nvmlDeviceGetCurrentClocksEventReasons" if entry_point("nvmlDeviceGetCurrentClocksEventReasons")
                  else "nvmlDeviceGetCurrentClocksThrottleReasons")
        self.clock_events = getter(events, handle, out=ctypes.c_ulonglong())
        self.processes = process_count(handle)

