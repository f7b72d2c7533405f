"""Field values: which counters are read through nvmlDeviceGetFieldValues, and `FieldBatch`, the
prebuilt array that reads a tier's counters (and every NVLink port's) in one call."""

from __future__ import annotations

import ctypes
import functools
import operator
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pynvml

from ..snapshot import Values
from .errors import FAILED, PERMANENT_CODES


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
        if call("nvmlDeviceGetFieldValues", self._get) is FAILED:
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
        for metric, series_labels, kind, divisor, i in self._plan:
            v = float(raws[i]) if kind == _RAW else _decode(kind, raws[i])
            values.setdefault(metric, {})[series_labels] = v / divisor if divisor != 1 else v
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

