"""Prebuilt C calls into libnvidia-ml for the fast tier: the entry point looked up and the arguments
built once, so that every collection pays the C call and not pynvml's wrapper around it."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml

from .errors import FUNCTION_NOT_FOUND
from .fields import factors


def entry_point(name: str) -> Any:
    """The library's entry point, or None where this driver lacks it."""
    try:
        return pynvml._nvmlGetFunctionPointer(name)
    except pynvml.NVMLError:
        return None


def getter(symbol: str, handle: Any, *args: Any, out: Any = None) -> Callable[[], Any]:
    """fn(handle, *args, &out) with its arguments built once, returning out's value (or out itself, for a
    struct). Every collection pays the C call, not pynvml's wrapper: its lookups, ctypes objects, byref."""
    fn = entry_point(symbol)
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


class Utilization(ctypes.Structure):
    """nvmlUtilization_t. pynvml's own structs route every field read through a Python __getattribute__."""

    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class Memory(ctypes.Structure):
    """nvmlMemory_v2_t."""

    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


MEMORY_V2 = ctypes.sizeof(Memory) | 2 << 24  # NVML_STRUCT_VERSION(Memory, 2)
assert getattr(pynvml, "nvmlMemory_v2", MEMORY_V2) == MEMORY_V2

# (metric, labels, key, entry point or None, its arguments, the unsigned int it fills in, multiplier, divisor)
Plain = tuple[str, tuple[str, ...], str, Any, tuple[Any, ...], ctypes.c_uint, float, int]


def plain(metric: str, labels: tuple[str, ...], symbol: str, handle: Any, *args: int, scale: float = 1.0,
          after: tuple[Any, ...] = ()) -> Plain:
    """A getter of one unsigned int, fn(handle, *args, &out, *after), prebuilt for GpuReader.read_fast: the
    value is out * multiplier / divisor (a divisor, not a factor below 1, keeps mW -> W exact)."""
    holder = ctypes.c_uint()
    key = ":".join([symbol, *map(str, args)])
    return (metric, labels, key, entry_point(symbol), (handle, *args, ctypes.byref(holder), *after), holder,
            *factors(scale))


def process_count(handle: Any) -> Callable[[], int]:
    """How many compute processes: the first half of the driver's two-call protocol says so, without
    the process list that would need a second call."""
    fn = entry_point("nvmlDeviceGetComputeRunningProcesses_v3")
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


def text(v: bytes | str) -> str:
    """A string NVML answered (bytes from older bindings)."""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
