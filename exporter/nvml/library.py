"""NVML for the whole process: loading the library, init and shutdown, the driver's version and the
GPUs it enumerates."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml

from .calls import text
from .errors import NvmlError, lost_error


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
        return text(self._checked("nvmlSystemGetDriverVersion", pynvml.nvmlSystemGetDriverVersion))

    def device_count(self) -> int:
        return int(self._checked("nvmlDeviceGetCount_v2", pynvml.nvmlDeviceGetCount))

    def handle_by_index(self, index: int) -> Any:
        return self._checked("nvmlDeviceGetHandleByIndex_v2", pynvml.nvmlDeviceGetHandleByIndex, index)

    def handle_by_uuid(self, uuid: str) -> Any:
        return self._checked("nvmlDeviceGetHandleByUUID", pynvml.nvmlDeviceGetHandleByUUID, uuid)

    def index_of(self, handle: Any) -> int:
        return int(self._checked("nvmlDeviceGetIndex", pynvml.nvmlDeviceGetIndex, handle))

    def uuid_of(self, handle: Any) -> str:
        return text(self._checked("nvmlDeviceGetUUID", pynvml.nvmlDeviceGetUUID, handle))


def bindings_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:  # not installed as a distribution (vendored copy): say so rather than fail
        return "unknown"

