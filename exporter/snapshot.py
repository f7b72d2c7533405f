"""Plain data produced by one collection: what every later stage (diagnosis, exposition) reads.

Nothing here talks to NVML or knows about HTTP. Values are already in base units.

The no-mutation invariant: a mapping, once in a snapshot (a GPU's values, each family's series), is never
changed in place, by any stage, ever. A stage that needs other values makes a new mapping. The caches
that keep a scrape cheap rely on it: they reuse what they made from a mapping while they are handed the
same mapping again (the reader's unchanged readings, the diagnoser's verdicts, the renderer's blocks),
so a mapping changed in place would be served as it was before, e.g. a GPU that turned critical would
keep reading healthy. The frozen-readings test mode (`Freezer`; GpuReads and Pipeline `freeze=True`,
the exporter with NVML_EXPORTER_FREEZE_READINGS=1) hands out read-only views, so that a change raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

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


class Freezer:
    """The frozen-readings test mode of the no-mutation invariant (module doc) for one GPU: read-only
    views (MappingProxyType) of its values' series, where a change raises TypeError. A series that is the
    same mapping as last time gets the same view, so the caches' identity checks go as they would without
    the views. The holder serialises calls (one GPU's read, or the pipeline's lock)."""

    def __init__(self) -> None:
        self._views: dict[str, tuple[Mapping[tuple[str, ...], float], Mapping[tuple[str, ...], float]]] = {}

    def freeze(self, values: Mapping[str, Mapping[tuple[str, ...], float]]) -> Values:
        """A new dict of read-only views of `values`' series (typed as Values: they read as the dicts they
        wrap, and a write, the only difference, is what this mode is for)."""
        out: dict[str, Mapping[tuple[str, ...], float]] = {}
        views = self._views
        for name, series in values.items():
            kept = views.get(name)
            if kept is None or kept[0] is not series:
                kept = views[name] = (series, series if isinstance(series, MappingProxyType)
                                      else MappingProxyType(series))
            out[name] = kept[1]
        return cast(Values, out)


# Takes a collection's snapshot, and whether it was taken over from a thread a driver call holds.
Deliver = Callable[[Snapshot, bool], None]
