"""The workload sources the flags ask for, wired to the collector's GPUs."""

from __future__ import annotations

from ..collector import Collector
from ..nvml import mig_uuids
from . import Source, Tracker
from .kubelet import Kubelet
from .processes import Processes
from .slurm import SlurmDir


def build(collector: Collector, *, slurm_dir: str | None, kubelet_socket: str | None, processes: bool,
          interval: float) -> Tracker | None:
    """A tracker over the sources asked for, set on the collector; None (and nothing set) if none is."""
    sources: list[Source] = []
    if slurm_dir:
        sources.append(SlurmDir(slurm_dir, interval=min(1.0, interval)))
    if kubelet_socket:
        sources.append(Kubelet(kubelet_socket, interval=interval, timeout=min(2.0, interval)))
    if processes:
        sources.append(Processes(collector.attached, interval=interval))
    if not sources:
        return None

    def mig_parents() -> dict[str, str]:
        return {mig: uuid for uuid, handle in collector.attached().items() for mig in mig_uuids(handle)}

    tracker = Tracker(sources, mig_parents=mig_parents)
    collector.workloads = tracker
    return tracker
