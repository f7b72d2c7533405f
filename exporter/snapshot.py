"""Plain data produced by one collection: what every later stage (diagnosis, exposition) reads.

Nothing here talks to NVML or knows about HTTP. Values are already in base units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .diagnosis import Diagnosis

# metric name -> label values (in the order of Metric.labels) -> value
Values = dict[str, dict[tuple[str, ...], float]]


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str = ""
    pci_bus_id: str = ""
    serial: str = ""
    vbios_version: str = ""
    minor_number: str = ""


@dataclass(frozen=True)
class GpuSnapshot:
    identity: GpuIdentity
    up: bool
    values: Mapping[str, Mapping[tuple[str, ...], float]] = field(default_factory=dict)
    # reading or NVML function -> error name, for readings that failed this time
    errors: Mapping[str, str] = field(default_factory=dict)
    # True when the GPU missed the deadline and `values` are its last good ones
    stale: bool = False
    collect_seconds: float = 0.0
    diagnosis: Diagnosis | None = None

    def value(self, metric: str, *labels: str) -> float | None:
        return self.values.get(metric, {}).get(tuple(labels))


@dataclass(frozen=True)
class ExporterState:
    """The exporter's own health, exposed as nvml_exporter_* families."""

    nvml_up: bool
    driver_version: str = ""
    nvml_errors: Mapping[tuple[str, str], int] = field(default_factory=dict)
    timeouts: Mapping[str, int] = field(default_factory=dict)
    # What the page serves of them: a GPU from its first timeout on, at 0 first (None: timeouts as they are)
    served_timeouts: Mapping[str, int] | None = None
    invalid_readings: Mapping[str, int] = field(default_factory=dict)
    last_collect_timestamp: float = 0.0
    journal_up: bool | None = None  # None until the journal has been tried
    # (NVSwitch PCI address, SXid) -> (count this boot, Unix time of the last one)
    sxids: Mapping[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    workloads_dropped: int | None = None  # None while no workload source is configured
    workload_errors: Mapping[str, int] = field(default_factory=dict)  # source -> failed reads
    pci_devices: int | None = None  # NVIDIA GPUs on the PCI bus (None: not read)
    expected_gpus: int | None = None  # --gpus.expected


@dataclass(frozen=True)
class Snapshot:
    gpus: tuple[GpuSnapshot, ...]
    state: ExporterState
    taken_at: float = 0.0  # monotonic time the collection finished



# Takes a collection's snapshot, and whether it was taken over from a thread a driver call holds.
Deliver = Callable[[Snapshot, bool], None]
