"""Workload attribution: which Slurm job, pod or process runs on each GPU (docs/workloads.md).

Sources (Slurm mapping files, the kubelet's pod-resources API, NVML's process list) are read by their
own threads, never on the scrape path. A scrape asks the `Tracker` for each GPU's
`nvidia_gpu_workload_info` series, a dict that stays the same object until a source reports a change,
so the exposition keeps reusing its rendered block.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..snapshot import GpuIdentity

log = logging.getLogger("nvml_exporter.workload")

# Label names of nvidia_gpu_workload_info. The extra ones are prefixed by their source so that they cannot
# collide with the target labels service discovery sets (`namespace`, `pod`, `container`, `job`, ...).
EXTRA_LABELS = ("slurm_user", "slurm_account", "slurm_partition", "k8s_namespace", "k8s_pod", "k8s_container")
LABELS = ("workload_id", "source", *EXTRA_LABELS)
CAP = 16  # workloads per GPU; more (a shared GPU gone wild) are dropped and counted
SOURCES = ("slurm", "kubelet", "process")  # in order of preference when two name the same workload


@dataclass(frozen=True)
class Workload:
    workload_id: str
    source: str
    labels: tuple[tuple[str, str], ...] = ()  # (name in EXTRA_LABELS, value)

    def label_values(self) -> tuple[str, ...]:
        extra = dict(self.labels)
        return (self.workload_id, self.source, *(extra.get(n, "") for n in EXTRA_LABELS))


# Keys by which a source names a GPU: "uuid:GPU-…" or "uuid:MIG-…", "index:N" (NVML index), "minor:N" (/dev/nvidiaN).
Reading = dict[str, list[Workload]]


class SourceError(Exception):
    """A source could not be read this time: counted and logged. The last good reading is kept, unless
    the source could read part of it (`reading`), which is then used."""

    def __init__(self, message: str, reading: Reading | None = None):
        super().__init__(message)
        self.reading = reading



class Source(Protocol):
    name: str
    interval: float

    def read(self) -> Reading | None:
        """The workloads by GPU key, or None when nothing changed since the last read. Raises SourceError."""


_OLD_MIG = re.compile(r"^MIG-(GPU-[0-9a-fA-F-]+)/\d+/\d+$")  # drivers before R470: the parent is in the name


def device_key(device_id: str) -> str | None:
    """The GPU key of a device id as device plugins and Slurm name them; None for ids that are not GPUs."""
    if device_id.startswith(("GPU-", "MIG-")):
        return f"uuid:{device_id}"
    if (m := re.fullmatch(r"nvidia(\d+)", device_id)) is not None:
        return f"minor:{int(m[1])}"
    if (m := re.fullmatch(r"(\d+)(?:[:.]\d+)?", device_id)) is not None:  # index, or index:mig / index.gi
        return f"index:{int(m[1])}"
    return None


class Tracker:
    """Runs the sources, and turns their readings into each GPU's series (capped at `cap`)."""

    def __init__(self, sources: Sequence[Source], *, cap: int = CAP,
                 mig_parents: Callable[[], Mapping[str, str]] | None = None):
        self.sources = tuple(sources)
        self._cap = cap
        self._mig_parents = mig_parents or dict  # MIG device UUID -> its GPU's UUID
        self._lock = threading.Lock()
        self._readings: dict[str, Reading] = {}
        self._parents: dict[str, str] = {}
        self._generation = 0
        self._cache: dict[tuple[str, int, str], tuple[int, dict[tuple[str, ...], float], tuple[Workload, ...]]] = {}
        self._dropped_now: dict[str, frozenset[Workload]] = {}
        self.dropped = 0
        self.errors: Counter[str] = Counter({s.name: 0 for s in self.sources})
        self._last_error: dict[str, str] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the sources' threads ------------------------------------------------------------------------
    def start(self) -> None:
        for source in self.sources:
            t = threading.Thread(target=self._loop, args=(source,), name=f"workload-{source.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:  # a read in flight (a slow kubelet) ends within its own timeout
            t.join(timeout=5.0)

    def _loop(self, source: Source) -> None:
        while not self._stop.is_set():
            self.refresh(source)
            self._stop.wait(source.interval)

    def refresh(self, source: Source) -> bool:
        """Read one source once; True if it read (changed or not), False if it failed (and was counted)."""
        ok = True
        try:
            reading = source.read()
        except SourceError as e:
            self._failed(source, str(e))
            reading, ok = e.reading, False
        except Exception as e:  # a bug in a source must not end its thread: counted and logged with its trace
            self._failed(source, f"{type(e).__name__}: {e}", trace=True)
            return False
        if ok:
            with self._lock:
                self._last_error.pop(source.name, None)
        if reading is not None and any(k.startswith("uuid:MIG-") and not _OLD_MIG.match(k[5:]) for k in reading):
            try:
                parents = dict(self._mig_parents())  # NVML calls: here in the source's thread, not the scrape's
            except Exception as e:  # NvmlError and the like: the MIG devices stay unmatched until next time
                self._failed(source, f"cannot list MIG devices: {e}")
                ok = False
            else:
                with self._lock:
                    if parents != self._parents:
                        self._parents = parents
                        self._generation += 1
        if reading is not None:
            with self._lock:
                if self._readings.get(source.name) != reading:
                    self._readings[source.name] = reading
                    self._generation += 1
        return ok

    def _failed(self, source: Source, error: str, trace: bool = False) -> None:
        with self._lock:
            self.errors[source.name] += 1
            repeated = self._last_error.get(source.name) == error
            self._last_error[source.name] = error
        # Once per new error, not once a second while a file stays unreadable or the kubelet is down.
        log.log(logging.DEBUG if repeated else logging.WARNING, "workload source failed",
                extra={"source": source.name, "error": error}, exc_info=trace and not repeated)

    def refresh_all(self) -> None:
        """Read every source once, in this thread (for `nvml-exporter diagnose`)."""
        for source in self.sources:
            self.refresh(source)

    # -- the scrape's side ---------------------------------------------------------------------------
    def series(self, identity: GpuIdentity) -> dict[tuple[str, ...], float]:
        """nvidia_gpu_workload_info of this GPU: label values (in LABELS order) -> 1. The same dict
        object while nothing changed."""
        return self._resolved(identity)[0]

    def workloads(self, identity: GpuIdentity) -> tuple[Workload, ...]:
        return self._resolved(identity)[1]

    def _resolved(self, identity: GpuIdentity) -> tuple[dict[tuple[str, ...], float], tuple[Workload, ...]]:
        gpu = (identity.uuid, identity.index, identity.minor_number)  # (a GPU re-enumerated may change index)
        with self._lock:
            kept = self._cache.get(gpu)
            if kept is not None and kept[0] == self._generation:
                return kept[1], kept[2]
            generation, readings, parents = self._generation, dict(self._readings), self._parents
        keys = {f"uuid:{identity.uuid}", f"index:{identity.index}"}
        if identity.minor_number:
            keys.add(f"minor:{identity.minor_number}")
        found: dict[str, Workload] = {}  # workload id -> the workload from the most trusted source
        for name in sorted(readings, key=lambda n: SOURCES.index(n) if n in SOURCES else len(SOURCES)):
            for key, workloads in readings[name].items():
                if key not in keys and not _mig_of(key, identity.uuid, parents):
                    continue
                for w in workloads:
                    found.setdefault(_identity_key(w), w)
        ordered = sorted(found.values(), key=lambda w: (SOURCES.index(w.source) if w.source in SOURCES
                                                        else len(SOURCES), w.workload_id, w.labels))
        kept_w, dropped = tuple(ordered[:self._cap]), frozenset(ordered[self._cap:])
        series = {w.label_values(): 1.0 for w in kept_w}
        with self._lock:
            new = dropped - self._dropped_now.get(identity.uuid, frozenset())
            if new:
                self.dropped += len(new)
                log.warning("too many workloads on a GPU; some are not exported",
                            extra={"uuid": identity.uuid, "cap": self._cap,
                                   "dropped": sorted(w.workload_id for w in new)})
            self._dropped_now[identity.uuid] = dropped
            self._cache[gpu] = (generation, series, kept_w)
        return series, kept_w

    def errors_total(self) -> dict[str, int]:
        with self._lock:
            return dict(self.errors)


def _identity_key(w: Workload) -> str:
    """Two sources naming the same job (Slurm's file and the process's cgroup) make one series; two
    containers of one pod on the same GPU stay two."""
    container = dict(w.labels).get("k8s_container", "")
    return f"{w.workload_id}\0{container}"


def _mig_of(key: str, uuid: str, parents: Mapping[str, str]) -> bool:
    if not key.startswith("uuid:MIG-"):
        return False
    mig = key[5:]
    if (m := _OLD_MIG.match(mig)) is not None:
        return m[1] == uuid
    return parents.get(mig) == uuid


def merge(readings: Iterable[tuple[str, Workload]]) -> Reading:
    """(GPU key, workload) pairs -> a Reading, each GPU's workloads in a stable order, without repeats."""
    out: dict[str, list[Workload]] = {}
    for key, w in readings:
        lst = out.setdefault(key, [])
        if w not in lst:
            lst.append(w)
    for lst in out.values():
        lst.sort(key=lambda w: (w.workload_id, w.labels))
    return out
