"""Questions about one GPU asked off the scrape path: whose processes run on it, its MIG devices, and
whether its handle still answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pynvml

from .calls import text
from .errors import LOST_CODES, PERMANENT_CODES, GpuLost, NvmlError


def uuid_of(handle: Any) -> str:
    """The UUID behind a handle; raises GpuLost while the GPU is off the bus."""
    try:
        return text(pynvml.nvmlDeviceGetUUID(handle))
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
