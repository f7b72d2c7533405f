"""Workloads from the GPUs' compute processes (`--collect.workload.processes`), a fallback source.

NVML lists each GPU's compute processes (pid, memory used); where /proc/<pid> is readable the process
names its Slurm job (its cgroup `…/job_<id>/…`, or SLURM_JOB_ID in its environment, which also gives
user, account and partition) or its Kubernetes pod (the pod UID in its cgroup `…kubepods…pod<uid>…`).
Processes that name neither are not exported (a pid label would make a new series per process), but
`nvml-exporter diagnose` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..nvml import GpuLost, NvmlError, Process, compute_processes
from . import Reading, SourceError, Workload, merge

_SLURM_CGROUP = re.compile(r"/job_(\d+)(?:/|$)")
_POD_CGROUP = re.compile(r"kubepods.*?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_ENV = {b"SLURM_JOB_USER": "slurm_user", b"SLURM_JOB_ACCOUNT": "slurm_account",
        b"SLURM_JOB_PARTITION": "slurm_partition"}


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None
    workload: Workload | None  # None where /proc does not tell


def attribute(pid: int, proc: str = "/proc") -> Workload | None:
    """The Slurm job or pod of a process, from /proc; None if it names neither or is not readable."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            cgroup = f.read()
    except OSError:
        cgroup = ""  # gone, or hidden by hidepid: the environment may still tell
    env: dict[bytes, bytes] = {}
    try:
        with open(f"{proc}/{pid}/environ", "rb") as f:
            env = dict(kv.partition(b"=")[::2] for kv in f.read().split(b"\0") if kv)
    except OSError:
        pass  # another user's process without CAP_SYS_PTRACE: the cgroup alone tells the job
    job = env.get(b"SLURM_JOB_ID", b"").decode(errors="replace")
    if not job and (m := _SLURM_CGROUP.search(cgroup)) is not None:
        job = m[1]
    if job:
        labels = tuple(sorted((name, env[key].decode(errors="replace")) for key, name in _ENV.items() if env.get(key)))
        return Workload(job, "process", labels)
    if (m := _POD_CGROUP.search(cgroup)) is not None:
        return Workload(m[1].replace("_", "-"), "process")
    return None


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
