"""Workloads from the GPUs' compute processes (`--collect.workload.processes`), a fallback source.

NVML lists each GPU's compute processes (pid, memory used); where /proc/<pid> is readable the process
names its Slurm job (its cgroup `…/job_<id>/…`, or SLURM_JOB_ID in its environment, which also gives
user, account and partition) or its Kubernetes pod (the pod UID in its cgroup `…kubepods…pod<uid>…`).
Processes that name neither are not exported (a pid label would make a new series per process), but
`nvml-exporter diagnose` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..nvml import GpuLost, NvmlError, Process, compute_processes
from . import Reading, SourceError, Workload, merge
from .procfs import attribute


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None
    workload: Workload | None  # None where /proc does not tell


class Processes:
    name = "process"

    def __init__(self, attached: Callable[[], dict[str, Any]], interval: float = 5.0, proc: str = "/proc",
                 list_processes: Callable[[Any], list[Process]] = compute_processes):
        self._attached = attached  # uuid -> NVML handle of the GPUs that answered
        self.interval = interval
        self._proc = proc
        self._list = list_processes
        self.processes: dict[str, tuple[GpuProcess, ...]] = {}  # uuid -> its processes, for diagnose

    def read(self) -> Reading:
        pairs: list[tuple[str, Workload]] = []
        problems: list[str] = []
        found: dict[str, tuple[GpuProcess, ...]] = {}
        for uuid, handle in sorted(self._attached().items()):
            try:
                procs = self._list(handle)
            except (GpuLost, NvmlError) as e:
                problems.append(f"{uuid}: {e}")
                continue
            listed = tuple(GpuProcess(p.pid, p.used_memory_bytes, attribute(p.pid, self._proc)) for p in procs)
            found[uuid] = listed
            pairs.extend((f"uuid:{uuid}", p.workload) for p in listed if p.workload is not None)
        self.processes = found
        if problems:
            raise SourceError("; ".join(problems), merge(pairs))
        return merge(pairs)
