"""The Slurm job or Kubernetes pod of a process, from /proc. No NVML here: the remediator uses it too."""

from __future__ import annotations

import re

from . import Workload

_SLURM_CGROUP = re.compile(r"/job_(\d+)(?:/|$)")
_POD_CGROUP = re.compile(r"kubepods.*?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_ENV = {b"SLURM_JOB_USER": "slurm_user", b"SLURM_JOB_ACCOUNT": "slurm_account",
        b"SLURM_JOB_PARTITION": "slurm_partition"}


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
