"""The one module that talks to NVML (through pynvml). Everything it returns is plain data.

A `GpuReader` reads one GPU in three tiers: static (once per handle), slow (thresholds, limits, ECC
aggregates, retirement, remapping) and fast (every collection). It remembers what the board answered
NOT_SUPPORTED for and never asks again, batches counters into one nvmlDeviceGetFieldValues call per
tier, and raises `GpuLost` the moment NVML says the GPU fell off the bus.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pynvml

from .snapshot import GpuIdentity, Values

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
# Codes after which no call on this handle will succeed until the GPU comes back.
LOST_CODES = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, getattr(pynvml, "NVML_ERROR_GPU_NOT_FOUND", 28)})
# Codes after which no call will succeed until NVML is initialised again: the library's state went stale
# (a driver reload under us) or the driver is not loaded. The collector shuts NVML down and re-initialises.
STALE_CODES = frozenset({pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED})
# Codes that mean "this board/driver will never answer this", so the call is not repeated.
PERMANENT_CODES = frozenset({NOT_SUPPORTED, FUNCTION_NOT_FOUND})

_ERROR_NAMES = {
    getattr(pynvml, n): n[len("NVML_ERROR_"):].lower()
    for n in dir(pynvml)
    if n.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, n), int)
}


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"code_{code}")


class NvmlError(Exception):
    def __init__(self, function: str, code: int):
        super().__init__(f"{function}: {error_name(code)} ({code})")
        self.function = function
        self.code = code


class GpuLost(NvmlError):
    """The GPU stopped answering (fell off the bus); its handle is useless until it returns."""


class NvmlStale(GpuLost):
    """NVML as a whole stopped answering (UNINITIALIZED, DRIVER_NOT_LOADED): every handle is useless until
    NVML is initialised again."""


def lost_error(function: str, code: int) -> NvmlError:
    """The exception for a failed call: NvmlStale, GpuLost or NvmlError."""
    if code in STALE_CODES:
        return NvmlStale(function, code)
    if code in LOST_CODES:
        return GpuLost(function, code)
    return NvmlError(function, code)


ErrorSink = Callable[[str, int], None]

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


@dataclass(frozen=True)
class Field:
    """One field-value id read into one series: value * scale -> metric{labels}."""

    field_id: int
    metric: str
    labels: tuple[str, ...] = ()
    scale: float = 1.0
    scope: int = 0
    link: bool = False  # a per-NVLink-port entry


# Field ids <= 250 only: their numbering never changed across bindings (nvml.md §4.3).
FAST_FIELDS: tuple[Field, ...] = (
    Field(82, "nvidia_gpu_memory_temperature_celsius"),
    Field(83, "nvidia_gpu_energy_joules_total", scale=1e-3),
    Field(94, "nvidia_gpu_pcie_replay_errors_total"),
    Field(3, "nvidia_gpu_ecc_errors_total", ("corrected", "volatile")),
    Field(4, "nvidia_gpu_ecc_errors_total", ("uncorrected", "volatile")),
    Field(74, "nvidia_gpu_clock_event_duration_seconds_total", ("power",), 1e-9),
    Field(75, "nvidia_gpu_clock_event_duration_seconds_total", ("thermal",), 1e-9),
    Field(76, "nvidia_gpu_clock_event_duration_seconds_total", ("sync_boost",), 1e-9),
    Field(77, "nvidia_gpu_clock_event_duration_seconds_total", ("board_limit",), 1e-9),
    Field(78, "nvidia_gpu_clock_event_duration_seconds_total", ("low_utilization",), 1e-9),
    Field(79, "nvidia_gpu_clock_event_duration_seconds_total", ("reliability",), 1e-9),
    Field(230, "nvidia_gpu_recovery_action"),
)
SLOW_FIELDS: tuple[Field, ...] = (
    Field(5, "nvidia_gpu_ecc_errors_total", ("corrected", "aggregate")),
    Field(6, "nvidia_gpu_ecc_errors_total", ("uncorrected", "aggregate")),
    Field(29, "nvidia_gpu_retired_pages", ("single_bit",)),
    Field(30, "nvidia_gpu_retired_pages", ("double_bit",)),
    Field(31, "nvidia_gpu_retired_pages_pending"),
    Field(142, "nvidia_gpu_remapped_rows", ("correctable",)),
    Field(143, "nvidia_gpu_remapped_rows", ("uncorrectable",)),
    Field(144, "nvidia_gpu_remapped_rows_pending"),
    Field(145, "nvidia_gpu_remapped_rows_failed"),
    # T.Limit offsets (signed int C relative to the GPU's T.Limit, Ada and later; nvml.h
    # NVML_FI_DEV_TEMPERATURE_{SHUTDOWN,SLOWDOWN}_TLIMIT): the margin at which HW slowdown and shutdown
    # happen, -2 and -8 C on every Hopper capture. Ids 195/196 (memory/GPU max-operating) are 0 there.
    Field(193, "nvidia_gpu_temperature_threshold_celsius", ("shutdown_tlimit",)),
    Field(194, "nvidia_gpu_temperature_threshold_celsius", ("slowdown_tlimit",)),
)
ECC_FIELD_IDS = frozenset({3, 4, 5, 6})


@functools.cache  # shared by every GPU: 64 GPUs x 18 links x 5 fields would otherwise be 6,000 objects
def nvlink_fields(link: int) -> tuple[Field, ...]:
    """Per-link fields. Link-scoped ids take the link in scopeId; CRC-data only has per-link ids for 0-11.
    The reader hands out every link; the collector sums them per GPU and keeps the detail of faulty links
    (exporter/sparse.py)."""
    lk = str(link)
    fields = [
        Field(165, "nvidia_gpu_nvlink_link_up", (lk,), scope=link, link=True),
        Field(163, "nvidia_gpu_nvlink_link_errors_total", (lk, "crc_flit"), scope=link, link=True),
        Field(161, "nvidia_gpu_nvlink_link_errors_total", (lk, "replay"), scope=link, link=True),
        Field(162, "nvidia_gpu_nvlink_link_errors_total", (lk, "recovery"), scope=link, link=True),
    ]
    if link < 6:
        fields.append(Field(39 + link, "nvidia_gpu_nvlink_link_errors_total", (lk, "crc_data"), link=True))
    elif link < 12:
        fields.append(Field(102 + link - 6, "nvidia_gpu_nvlink_link_errors_total", (lk, "crc_data"), link=True))
    return tuple(fields)


class FieldBatch:
    """A prebuilt nvmlFieldValue_t array, read with one call. Entries a board does not support are
    dropped for good once they have said so twice in a row, except per-link entries: an inactive NVLink
    port answers NOT_SUPPORTED too.

    Why twice: DataDog's agent saw spurious NOT_SUPPORTED from concurrent field-value calls
    (nvml.md §4.1) and serialised them process-wide. Here one thread reads a GPU at a time, calls on
    different GPUs run concurrently (a process-wide lock doubled an 8-GPU collection at 200 µs/call),
    and a one-off NOT_SUPPORTED costs one missing sample, not the series. On a real H200, 4 threads
    calling at once on one GPU got no spurious answers (docs/hardware/h200-580.159.04.md).

    Decoding is planned once per pattern of (value type, return code) across the entries, which stays
    the same from one collection to the next: a collection then costs one pass over the raw values."""

    def __init__(self, fields: Iterable[Field], keep_unsupported: Callable[[Field], bool] = lambda f: False):
        self._keep_unsupported = keep_unsupported
        self._set(list(fields))

    def _set(self, fields: list[Field]) -> None:
        assert all(f.scale <= 1 for f in fields), "field values are only ever scaled down"
        self.fields = fields
        self._array = (pynvml.c_nvmlFieldValue_t * len(fields))()
        for entry, f in zip(self._array, fields, strict=True):
            entry.fieldId = f.field_id
            entry.scopeId = f.scope
        # The array as unsigned 64-bit words, 5 per entry: word 3 is valueType | nvmlReturn << 32, word 4
        # the value's 8 bytes. Slicing it reads every entry's type and value in C.
        words = memoryview(self._array).cast("B").cast("Q")
        self._latencies, self._codes, self._raws = words[2::5], words[3::5], words[4::5]
        self.driver_us = 0  # what the driver says the last read took it (latencyUsec), in microseconds
        self._pattern: list[int] = []
        self._suspects: set[Field] = set()  # answered NOT_SUPPORTED once: dropped if they say it again
        self._plan: list[tuple[str, tuple[str, ...], int, int, int]] = []
        # (metric, labels, the entries' raw words, whether only the low 32 bits are the value, whether the
        # family is this group alone)
        self._whole: list[tuple[str, tuple[tuple[str, ...], ...], Callable[[list[int]], tuple[int, ...]], bool,
                                bool]] = []
        # A sole group's last words and the mapping made from them, handed out again while the words stay
        # the same (NVLink counters, mostly): no stage changes a reading's mapping once it is made.
        self._kept: dict[str, tuple[tuple[int, ...], dict[tuple[str, ...], float]]] = {}
        self._count = ctypes.c_int32(len(fields))
        self._ref = ctypes.byref(self._array)
        self._handle: Any = None  # the handle self._get was built for
        self._get: Callable[[], None] = lambda: None

    def read(self, handle: Any, call: Callable[..., Any], values: Values) -> None:
        if not self.fields:
            return
        if handle is not self._handle:
            self._handle, self._get = handle, self._getter(handle)
        if call("nvmlDeviceGetFieldValues", self._get) is _FAILED:
            return
        codes = self._codes.tolist()
        self.driver_us = sum(self._latencies.tolist())  # (a driver that does not say leaves 0)
        unsupported = self._replan(codes) if codes != self._pattern else []
        raws = self._raws.tolist()
        kept = self._kept
        for metric, labels, pick, low32, sole in self._whole:  # whole families of counters at a time, in C
            got = pick(raws)
            if sole:  # the family is this group alone: unchanged words give the mapping made last time
                last = kept.get(metric)
                if last is not None and last[0] == got:
                    values[metric] = last[1]
                    continue
                series = values[metric] = dict(zip(labels, map(float, map(_LOW32, got) if low32 else got),
                                                   strict=True))
                kept[metric] = (got, series)
            else:
                values.setdefault(metric, {}).update(zip(labels, map(float, map(_LOW32, got) if low32 else got),
                                                         strict=True))
        for metric, labels, kind, divisor, i in self._plan:
            v = float(raws[i]) if kind == _RAW else _decode(kind, raws[i])
            values.setdefault(metric, {})[labels] = v / divisor if divisor != 1 else v
        if unsupported:  # the next collection reads the smaller batch; the other suspects stay suspect
            suspects = self._suspects
            self._set([f for f in self.fields if f not in unsupported])
            self._suspects = suspects

    def _getter(self, handle: Any) -> Callable[[], None]:
        fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
        count, ref = self._count, self._ref

        def get() -> None:
            ret = fn(handle, count, ref)
            if ret != pynvml.NVML_SUCCESS:
                raise pynvml.NVMLError(ret)

        return get

    def _replan(self, codes: list[int]) -> list[Field]:
        """Plan the decoding for this pattern of types and return codes; return the entries the board
        does not support, to be dropped."""
        plan: list[tuple[str, tuple[str, ...], int, int, int]] = []
        whole: dict[tuple[str, bool], list[tuple[tuple[str, ...], int]]] = {}
        unsupported: list[Field] = []
        suspects: list[Field] = []
        for i, (code, f) in enumerate(zip(codes, self.fields, strict=True)):
            vtype, ret = code & 0xFFFFFFFF, code >> 32
            if ret != pynvml.NVML_SUCCESS:
                if ret in PERMANENT_CODES and not self._keep_unsupported(f):
                    (unsupported if f in self._suspects else suspects).append(f)
                continue
            # NVML may leave ECC fields typed DOUBLE though they hold an integer (DCGM's "WAR for bug 2032468").
            kind = _RAW if f.field_id in ECC_FIELD_IDS or vtype in _WHOLE_WORD_TYPES else vtype
            divisor = factors(f.scale)[1]  # (fields are only ever scaled down)
            if kind in (_RAW, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT) and divisor == 1:
                whole.setdefault((f.metric, kind != _RAW), []).append((f.labels, i))
            else:
                plan.append((f.metric, f.labels, kind, divisor, i))
        groups = Counter([metric for metric, _ in whole] + [metric for metric, *_ in plan])
        self._whole = [(metric, tuple(lab for lab, _ in group), _picker([i for _, i in group]), low32,
                        groups[metric] == 1) for (metric, low32), group in whole.items()]
        self._kept = {}
        self._plan = plan
        self._suspects = set(suspects)
        self._pattern = [] if suspects else codes  # plan again next time, to see whether they repeat it
        return unsupported


def _picker(indices: list[int]) -> Callable[[list[int]], tuple[int, ...]]:
    """A function taking these items of a list, as a tuple, in C (itemgetter returns a bare item for one)."""
    if len(indices) == 1:
        only = indices[0]
        return lambda raws: (raws[only],)
    return operator.itemgetter(*indices)


def factors(scale: float) -> tuple[float, int]:
    """(multiplier, divisor) for a unit conversion: scaling down divides by a whole number, which keeps
    decimal values exact (7014307013 ns -> 7014.307013 s, not ...0001)."""
    return (1, round(1 / scale)) if scale < 1 else (scale, 1)


def scaled(v: float, scale: float) -> float:
    mul, div = factors(scale)
    return v * mul / div


# nvmlFieldValue_t: fieldId u32, scopeId u32, timestamp i64, latencyUsec i64, valueType u32, nvmlReturn u32,
# value (a union of 8 bytes): five 64-bit words, which FieldBatch reads as such.
assert ctypes.sizeof(pynvml.c_nvmlFieldValue_t) == 40


_RAW = -1  # the 8 bytes are the value: unsigned long (long) types, ECC counters
_LOW32 = (0xFFFFFFFF).__and__  # an unsigned int's value: the union's low 4 bytes, whatever the others hold
_WHOLE_WORD_TYPES = frozenset({pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG})


def _decode(vtype: int, raw: int) -> float:
    """The union's value by its type (little-endian: narrower members are the low bytes)."""
    if vtype == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return float(struct.unpack("=d", struct.pack("=Q", raw))[0])
    if vtype == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return float(raw & 0xFFFFFFFF)
    if vtype == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return float(raw - (1 << 64) if raw >= 1 << 63 else raw)
    if vtype == getattr(pynvml, "NVML_VALUE_TYPE_SIGNED_INT", 5):
        low = raw & 0xFFFFFFFF
        return float(low - (1 << 32) if low >= 1 << 31 else low)
    if vtype == getattr(pynvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6):
        return float(raw & 0xFFFF)
    return float(raw)


_FAILED = object()


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
        """Call fn; on failure count the error, remember permanent ones and return _FAILED.
        `key` names the reading (function, plus the argument where one function serves several)."""
        if key in self._unsupported:
            return _FAILED
        started = time.perf_counter()
        try:
            result = fn(*args)
            took = time.perf_counter() - started
            if took < self._fastest:
                self._fastest = took
            return result
        except pynvml.NVMLError as e:
            return self._failed(key, e.value)
        except (pynvml.NVMLLibraryMismatchError, AttributeError):
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
        return _FAILED

    def _put(self, values: Values, metric: str, labels: tuple[str, ...], key: str,
             fn: Callable[..., Any], *args: Any, scale: float = 1.0) -> Any:
        v = self._call(key, fn, *args)
        if v is not _FAILED:
            values.setdefault(metric, {})[labels] = scaled(float(v), scale)
        return v

    # -- tiers -----------------------------------------------------------------------------------
    def read_identity(self) -> GpuIdentity:
        h = self.handle

        def text(key: str, fn: Callable[..., Any]) -> str:
            v = self._call(key, fn, h)
            return "" if v is _FAILED else _str(v)

        index = self._call("nvmlDeviceGetIndex", pynvml.nvmlDeviceGetIndex, h)
        uuid = text("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID)
        pci = self._call("nvmlDeviceGetPciInfo_v3", pynvml.nvmlDeviceGetPciInfo, h)
        minor = self._call("nvmlDeviceGetMinorNumber", pynvml.nvmlDeviceGetMinorNumber, h)
        return GpuIdentity(
            index=-1 if index is _FAILED else int(index),
            uuid=uuid,
            name=text("nvmlDeviceGetName", pynvml.nvmlDeviceGetName),
            pci_bus_id="" if pci is _FAILED else _str(pci.busId),
            serial=text("nvmlDeviceGetSerial", pynvml.nvmlDeviceGetSerial),
            vbios_version=text("nvmlDeviceGetVbiosVersion", pynvml.nvmlDeviceGetVbiosVersion),
            minor_number="" if minor is _FAILED else str(minor),
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
        self._fans = 0 if fans is _FAILED else int(fans)
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
        if ecc is not _FAILED:
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
        if util is not _FAILED:
            values["nvidia_gpu_utilization_ratio"] = {(): util.gpu / 100}
            values["nvidia_gpu_memory_utilization_ratio"] = {(): util.memory / 100}
        mem = call("nvmlDeviceGetMemoryInfo_v2", g.memory)
        if mem is not _FAILED:
            values["nvidia_gpu_memory_total_bytes"] = {(): float(mem.total)}
            values["nvidia_gpu_memory_used_bytes"] = {(): float(mem.used)}
            values["nvidia_gpu_memory_free_bytes"] = {(): float(mem.free)}
            values["nvidia_gpu_memory_reserved_bytes"] = {(): float(mem.reserved)}
        # The signed distance below T.Limit (nvmlDeviceGetMarginTemperature, nvmlMarginTemperature_v1_t)
        margin = call("nvmlDeviceGetMarginTemperature", pynvml.nvmlDeviceGetMarginTemperature, self.handle)
        if margin is not _FAILED:
            values["nvidia_gpu_temperature_margin_celsius"] = {(): float(margin)}
        mask = call("nvmlDeviceGetCurrentClocksEventReasons", g.clock_events)
        if mask is not _FAILED:
            values["nvidia_gpu_clock_event_active"] = _clock_events(mask)
        procs = call("nvmlDeviceGetComputeRunningProcesses_v3", g.processes)
        if procs is not _FAILED:
            values["nvidia_gpu_compute_processes"] = {(): float(procs)}
        self._fast.read(self.handle, call, values)
        self.field_seconds = self._fast.driver_us * 1e-6
        self.fastest_call = self._fastest
        return values


def _symbol(name: str) -> Any:
    """The library's entry point, or None where this driver lacks it."""
    try:
        return pynvml._nvmlGetFunctionPointer(name)
    except pynvml.NVMLError:
        return None


def _getter(symbol: str, handle: Any, *args: Any, out: Any = None) -> Callable[[], Any]:
    """fn(handle, *args, &out) with its arguments built once, returning out's value (or out itself, for a
    struct). Every collection pays the C call, not pynvml's wrapper: its lookups, ctypes objects, byref."""
    fn = _symbol(symbol)
    holder = ctypes.c_uint() if out is None else out
    argv = (handle, *args, ctypes.byref(holder))
    simple = isinstance(holder, ctypes._SimpleCData)

    def get() -> Any:
        if fn is None:
            raise pynvml.NVMLError(FUNCTION_NOT_FOUND)
        ret = fn(*argv)
        if ret != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(ret)
        return holder.value if simple else holder

    return get


class _Utilization(ctypes.Structure):
    """nvmlUtilization_t. pynvml's own structs route every field read through a Python __getattribute__."""

    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    """nvmlMemory_v2_t."""

    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


_MEMORY_V2 = ctypes.sizeof(_Memory) | 2 << 24  # NVML_STRUCT_VERSION(Memory, 2)
assert getattr(pynvml, "nvmlMemory_v2", _MEMORY_V2) == _MEMORY_V2


@functools.lru_cache(maxsize=256)
def _clock_events(mask: int) -> dict[tuple[str, ...], float]:
    """The clock-event flags of a reasons mask: one mapping per mask, the same object while it holds."""
    return {(name,): 1.0 if mask & bit else 0.0 for bit, name in CLOCK_EVENT_REASONS}


# (metric, labels, key, entry point or None, its arguments, the unsigned int it fills in, multiplier, divisor)
_Plain = tuple[str, tuple[str, ...], str, Any, tuple[Any, ...], ctypes.c_uint, float, int]


def _plain(metric: str, labels: tuple[str, ...], symbol: str, handle: Any, *args: int, scale: float = 1.0,
           after: tuple[Any, ...] = ()) -> _Plain:
    """A getter of one unsigned int, fn(handle, *args, &out, *after), prebuilt for GpuReader.read_fast: the
    value is out * multiplier / divisor (a divisor, not a factor below 1, keeps mW -> W exact)."""
    holder = ctypes.c_uint()
    key = ":".join([symbol, *map(str, args)])
    return (metric, labels, key, _symbol(symbol), (handle, *args, ctypes.byref(holder), *after), holder,
            *factors(scale))


class _FastGetters:
    """The fast tier's getters for one GPU handle, built on its first read."""

    def __init__(self, handle: Any, fans: int):
        plain = [
            _plain("nvidia_gpu_temperature_celsius", (), "nvmlDeviceGetTemperature", handle,
                   pynvml.NVML_TEMPERATURE_GPU),
            _plain("nvidia_gpu_power_watts", (), "nvmlDeviceGetPowerUsage", handle, scale=1e-3),
            _plain("nvidia_gpu_power_limit_watts", (), "nvmlDeviceGetEnforcedPowerLimit", handle, scale=1e-3),
        ]
        plain += [_plain("nvidia_gpu_fan_speed_ratio", (str(fan),), "nvmlDeviceGetFanSpeed_v2", handle, fan, scale=0.01)
                  for fan in range(fans)]
        plain += [_plain("nvidia_gpu_clock_hertz", (name,), "nvmlDeviceGetClockInfo", handle, clock, scale=1e6)
                  for clock, name in CLOCKS]
        # (utilisation, sampling period): the period is not used
        plain += [_plain(metric, (), symbol, handle, scale=0.01, after=(ctypes.byref(ctypes.c_uint()),))
                  for metric, symbol in (("nvidia_gpu_encoder_utilization_ratio", "nvmlDeviceGetEncoderUtilization"),
                                         ("nvidia_gpu_decoder_utilization_ratio", "nvmlDeviceGetDecoderUtilization"))]
        plain += [_plain(metric, (), symbol, handle) for metric, symbol in (
            ("nvidia_gpu_performance_state", "nvmlDeviceGetPerformanceState"),
            ("nvidia_gpu_pcie_link_generation", "nvmlDeviceGetCurrPcieLinkGeneration"),
            ("nvidia_gpu_pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth"),
        )]
        self.plain = plain
        self.utilization = _getter("nvmlDeviceGetUtilizationRates", handle, out=_Utilization())
        memory = _Memory()
        memory.version = _MEMORY_V2
        self.memory = _getter("nvmlDeviceGetMemoryInfo_v2", handle, out=memory)
        # The "event" name arrived in driver 535; older drivers only have the "throttle" one (same ABI).
        events = ("nvmlDeviceGetCurrentClocksEventReasons" if _symbol("nvmlDeviceGetCurrentClocksEventReasons")
                  else "nvmlDeviceGetCurrentClocksThrottleReasons")
        self.clock_events = _getter(events, handle, out=ctypes.c_ulonglong())
        self.processes = _process_count(handle)


def _process_count(handle: Any) -> Callable[[], int]:
    """How many compute processes: the first half of the driver's two-call protocol says so, without
    the process list that would need a second call."""
    fn = _symbol("nvmlDeviceGetComputeRunningProcesses_v3")
    count = ctypes.c_uint(0)
    argv = (handle, ctypes.byref(count), None)

    def get() -> int:
        if fn is None:
            raise pynvml.NVMLError(FUNCTION_NOT_FOUND)
        count.value = 0
        ret = fn(*argv)
        if ret == pynvml.NVML_SUCCESS:
            return 0
        if ret == pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
            return count.value
        raise pynvml.NVMLError(ret)

    return get


def _str(v: bytes | str) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


class Library:
    """Process-wide NVML: loading, init, enumeration. pynvml can never unload or swap the library."""

    def __init__(self, path: str | None = None):
        self.path = path
        self._preloaded = False
        self.initialised = False

    def init(self) -> None:
        if self.path and not self._preloaded:
            # Loading the file first makes pynvml's CDLL("libnvidia-ml.so.1") find it by its SONAME.
            try:
                ctypes.CDLL(self.path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                raise NvmlError("dlopen", pynvml.NVML_ERROR_LIBRARY_NOT_FOUND) from None
            self._preloaded = True
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlError("nvmlInit", e.value) from None
        self.initialised = True

    def shutdown(self) -> None:
        if self.initialised:
            self.initialised = False
            self._checked("nvmlShutdown", pynvml.nvmlShutdown)

    def _checked(self, function: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except pynvml.NVMLError as e:
            raise lost_error(function, e.value) from None

    def driver_version(self) -> str:
        return _str(self._checked("nvmlSystemGetDriverVersion", pynvml.nvmlSystemGetDriverVersion))

    def device_count(self) -> int:
        return int(self._checked("nvmlDeviceGetCount_v2", pynvml.nvmlDeviceGetCount))

    def handle_by_index(self, index: int) -> Any:
        return self._checked("nvmlDeviceGetHandleByIndex_v2", pynvml.nvmlDeviceGetHandleByIndex, index)

    def handle_by_uuid(self, uuid: str) -> Any:
        return self._checked("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)

    def index_of(self, handle: Any) -> int:
        return int(self._checked("nvmlDeviceGetIndex", pynvml.nvmlDeviceGetIndex, handle))

    def uuid_of(self, handle: Any) -> str:
        return _str(self._checked("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, handle))


def bindings_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:  # not installed as a distribution (vendored copy): say so rather than fail
        return "unknown"



# Event types (nvml.h nvmlEventType*): what the watcher asks for, where the board supports it.
EVENT_XID = 0x8
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_GPU_UNAVAILABLE = 0x4000
EVENT_RECOVERY_ACTION = 0x8000
EVENT_NAMES = {EVENT_XID: "xid", EVENT_DOUBLE_BIT_ECC: "double_bit_ecc", EVENT_GPU_UNAVAILABLE: "gpu_unavailable",
               EVENT_RECOVERY_ACTION: "recovery_action"}


@dataclass(frozen=True)
class Event:
    uuid: str
    type: int
    data: int


class EventSet:
    """An NVML event set. wait() blocks in the driver (the GIL is released), so it runs in its own thread."""

    def __init__(self) -> None:
        try:
            self._set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as e:
            raise NvmlError("nvmlEventSetCreate", e.value) from None

    def register(self, handle: Any, wanted: int) -> int:
        """Register for `wanted` event types as far as the board supports them; returns the mask registered."""
        try:
            mask = wanted & int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))
            if mask:
                pynvml.nvmlDeviceRegisterEvents(handle, mask, self._set)
            return mask
        except pynvml.NVMLError as e:
            raise lost_error("nvmlDeviceRegisterEvents", e.value) from None

    def wait(self, timeout_ms: int) -> Event | None:
        try:
            data = pynvml.nvmlEventSetWait(self._set, timeout_ms)
            return Event(_str(pynvml.nvmlDeviceGetUUID(data.device)), int(data.eventType), int(data.eventData))
        except pynvml.NVMLError as e:
            if e.value == pynvml.NVML_ERROR_TIMEOUT:
                return None
            raise lost_error("nvmlEventSetWait_v2", e.value) from None

    def free(self) -> None:
        try:
            pynvml.nvmlEventSetFree(self._set)
        except pynvml.NVMLError as e:
            raise NvmlError("nvmlEventSetFree", e.value) from None


def uuid_of(handle: Any) -> str:
    """The UUID behind a handle; raises GpuLost while the GPU is off the bus."""
    try:
        return _str(pynvml.nvmlDeviceGetUUID(handle))
    except pynvml.NVMLError as e:
        if e.value in LOST_CODES:
            raise GpuLost("nvmlDeviceGetUUID", e.value) from None
        raise NvmlError("nvmlDeviceGetUUID", e.value) from None


@dataclass(frozen=True)
class Process:
    pid: int
    used_memory_bytes: int | None  # None where the driver cannot say (MIG without privileges, Windows WDDM)


def compute_processes(handle: Any) -> list[Process]:
    """The compute processes on a GPU (for workload attribution, read off the scrape path)."""
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError as e:
        raise (GpuLost if e.value in LOST_CODES else NvmlError)("nvmlDeviceGetComputeRunningProcesses", e.value) \
            from None
    return [Process(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in procs]


def mig_uuids(handle: Any) -> list[str]:
    """The UUIDs of a GPU's MIG devices; empty where MIG is off or not supported."""
    try:
        count = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except pynvml.NVMLError as e:
        if e.value in PERMANENT_CODES:
            return []
        raise NvmlError("nvmlDeviceGetMaxMigDeviceCount", e.value) from None
    out = []
    for i in range(count):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
        except pynvml.NVMLError as e:
            if e.value == pynvml.NVML_ERROR_NOT_FOUND:  # an index without an instance
                continue
            raise NvmlError("nvmlDeviceGetMigDeviceHandleByIndex", e.value) from None
        out.append(uuid_of(mig))
    return out
