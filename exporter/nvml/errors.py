"""What NVML's return codes mean to the exporter: their names, which ones end a GPU's handle or the
library's state, which ones say "never ask again", and the exceptions a failed call becomes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pynvml

NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
FUNCTION_NOT_FOUND: int = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
# Codes after which no call on this handle will succeed until the GPU comes back.
LOST_CODES: frozenset[int] = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, getattr(pynvml, "NVML_ERROR_GPU_NOT_FOUND", 28)})
# Codes after which no call will succeed until NVML is initialised again: the library's state went stale
# (a driver reload under us) or the driver is not loaded. The collector shuts NVML down and re-initialises.
STALE_CODES: frozenset[int] = frozenset({pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED})
# Codes that mean "this board/driver will never answer this", so the call is not repeated.
PERMANENT_CODES: frozenset[int] = frozenset({NOT_SUPPORTED, FUNCTION_NOT_FOUND})

_ERROR_NAMES: dict[int, str] = {
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

# What a call that failed returns in place of a value, once its error is counted (GpuReader's discipline).
FAILED: Final = object()
