"""Reading one GPU: attach (a handle, by UUID once known, and what does not change), the slow tier every
`slow_interval`, the fast tier every time, impossible readings dropped and counted, the NVLink totals. A
driver error is recorded, never raised: the GPU is down, lost, or a reading is missing. Which GPU is read
when, and on which thread, is the scheduler's (scheduling.py); the NVML lifecycle around the reads, the
node's (node.py)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .metrics import BY_NAME
from .nvml import GpuLost, GpuReader, Library, NvmlError, NvmlStale, error_name
from .snapshot import Freezer, GpuIdentity, Values
from .sparse import NvlinkTotals

log = logging.getLogger("nvml_exporter.reading")

_VALID = {name: metric.valid for name, metric in BY_NAME.items()}


@dataclass
class Gpu:
    """One GPU as the node tracks it. "lock": guarded by the node's lock (which GpuReads shares). "read": the
    read's own, touched only by the thread reading this GPU (the scheduler runs one read of a GPU at a time)."""

    index: int  # its slot in the list: stable for the process's life, unlike identity.index
    identity: GpuIdentity  # lock (replaced whole: by an attach, or a re-enumeration that saw it move)
    reader: GpuReader | None = None  # lock (set by an attach; cleared by a loss, a release, a re-init)
    static: Values = field(default_factory=dict)  # lock (set by an attach)
    slow: Values = field(default_factory=dict)  # read
    slow_at: float = float("-inf")  # read; reset under lock by an attach
    base: Values = field(default_factory=dict)  # read: static and slow values, merged when the slow tier is read
    last: Values | None = None  # lock: last good values; None while lost
    up: bool = False  # lock
    errors: dict[str, str] = field(default_factory=dict)  # lock: readings that failed in the last read
    failed: dict[str, str] = field(default_factory=dict)  # read: those of the read in progress
    passed: dict[str, Mapping[tuple[str, ...], float]] = field(default_factory=dict)  # read: passed _sanitize
    duration: float = 0.0  # lock
    nvlink: NvlinkTotals = field(default_factory=NvlinkTotals)  # read; kept across a GPU's loss and return
    read_started: float | None = None  # lock: monotonic start of the read in progress
    frozen: Freezer = field(default_factory=Freezer)  # read (the frozen-readings test mode)


class GpuReads:
    """Reads GPUs, one read of a GPU at a time (the scheduler's promise)."""

    def __init__(self, library: Library, lock: threading.Lock, *, slow_interval: float, clock: Callable[[], float],
                 freeze: bool, let_go: Callable[[Gpu], bool], went_stale: Callable[[], None],
                 changed: Callable[[], None], count_error: Callable[[str, int], None]):
        """`lock`: the node's, which guards the GPUs' "lock" fields. `let_go(gpu)`, asked holding `lock`:
        whether to make no driver call for it (NVML down, or the GPU released). `went_stale()`: NVML
        answered as after a driver reload. `changed()`: a GPU went or came back (indices may have moved).
        `freeze`: the frozen-readings test mode (snapshot.py)."""
        self._lib = library
        self._lock = lock
        self._slow_interval = slow_interval
        self._clock = clock
        self._freeze = freeze
        self._let_go = let_go
        self._went_stale = went_stale
        self._changed = changed
        self._count_error = count_error
        self._invalid: Counter[str] = Counter()  # lock: readings dropped, by family

    def invalid(self) -> dict[str, int]:
        """Readings dropped, by family (the caller holds the lock)."""
        return dict(self._invalid)

    def read(self, gpu: Gpu) -> None:
        """Read one GPU; a driver error is recorded (the GPU is down, lost or its reading missing), never
        raised."""
        started = self._clock()
        with self._lock:  # (release() sets its flag under this lock, then waits for read_started to clear)
            gpu.read_started = started
            let_go = self._let_go(gpu)
        gpu.failed = {}  # filled by _reading_failed during this read
        try:
            if let_go:  # NVML is down, or released on the agent's request: no driver call at all
                with self._lock:
                    gpu.reader, gpu.last, gpu.up = None, None, False
                return
            if gpu.reader is None:
                self._attach(gpu)
            reader = gpu.reader
            assert reader is not None
            if started - gpu.slow_at >= self._slow_interval:
                gpu.slow = self._sanitize(reader.read_slow())
                gpu.slow_at = started
                gpu.base = {**gpu.static, **gpu.slow}
            fast = self._sanitize(reader.read_fast(), gpu.passed)
            values: Values = {**gpu.base, **fast}
            for name in gpu.slow.keys() & fast.keys():  # a family read in two tiers (ECC: volatile, aggregate)
                values[name] = {**gpu.slow[name], **fast[name]}
            gpu.nvlink.apply(values)
            if self._freeze:
                values = gpu.frozen.freeze(values)
            with self._lock:
                gpu.last, gpu.up = values, True
        except NvmlStale:
            with self._lock:
                gpu.reader, gpu.last, gpu.up = None, None, False
            self._went_stale()
        except GpuLost as e:
            if gpu.up or gpu.reader is not None:
                log.error("GPU lost", extra={"gpu": gpu.index, "uuid": gpu.identity.uuid, "error": str(e)})
                self._changed()  # re-enumerate: the GPUs after it may have moved down an index
            with self._lock:
                gpu.reader, gpu.last, gpu.up = None, None, False
        except NvmlError as e:
            # The handle could not be had at all (not found, no permission): the GPU is down, not lost.
            self._reading_failed(gpu, e.function, e.code)
            with self._lock:
                gpu.reader, gpu.last, gpu.up = None, None, False
        finally:
            with self._lock:
                gpu.errors = gpu.failed
                gpu.duration = self._clock() - started
                gpu.read_started = None

    def _reading_failed(self, gpu: Gpu, function: str, code: int) -> None:
        gpu.failed[function] = error_name(code)
        self._count_error(function, code)

    def _attach(self, gpu: Gpu) -> None:
        """Get a handle (by UUID once we know it, so a GPU that returns is the same board) and read
        what does not change."""
        uuid = gpu.identity.uuid
        handle = self._lib.handle_by_uuid(uuid) if uuid else self._lib.handle_by_index(gpu.index)
        reader = GpuReader(handle, functools.partial(self._reading_failed, gpu))
        identity = reader.read_identity()
        if identity.index < 0:
            identity = dataclasses.replace(identity, index=gpu.index)
        static = self._sanitize(reader.read_static())
        with self._lock:
            was_lost = bool(gpu.identity.uuid)
            gpu.identity, gpu.static, gpu.reader, gpu.slow_at = identity, static, reader, float("-inf")
        if was_lost:
            log.warning("GPU is back", extra={"gpu": identity.index, "uuid": identity.uuid})
            self._changed()  # re-enumerate: the GPUs after it may have moved up an index

    def _sanitize(self, values: Values, passed: dict[str, Mapping[tuple[str, ...], float]] | None = None,
                  ) -> Values:
        """Drop sentinel and impossible readings (0xFFFFFFFF °C and the like) and count them. `passed`
        remembers the mappings that passed, by family: the reader hands out the same mapping again
        while its raw values stay the same (NVLink counters, clock-event flags), and it passes again."""
        for name, series in values.items():
            if passed is not None and passed.get(name) is series:
                continue
            low, high = _VALID[name]
            readings = series.values()
            if len(series) == 1:
                (v,) = readings
                if low <= v <= high:  # (NaN fails both comparisons)
                    continue
            else:
                total = sum(readings)  # NaN if any reading is NaN, which min() and max() can miss
                if not series or (total == total and low <= min(readings) and max(readings) <= high):
                    if passed is not None:
                        passed[name] = series
                    continue  # the usual case, checked in C
            bad = [labels for labels, v in series.items() if not low <= v <= high]
            for labels in bad:
                with self._lock:
                    self._invalid[name] += 1
                log.warning("dropped impossible reading", extra={"metric": name, "labels": labels})
            # a new mapping: the reader may hand out the same one again while its raw values stay the same
            values[name] = {labels: v for labels, v in series.items() if low <= v <= high}
        return {k: v for k, v in values.items() if v}
