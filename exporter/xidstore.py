"""Xid counts and recent history per GPU, fed by NVML events and the kernel journal.

- The same Xid reaches us twice (NVML event and kernel log line): a record from one source that
  matches an unmatched record of the other (same GPU, same code, within DEDUPE_SECONDS) is merged,
  not counted again, and the journal's message text is kept.
- A live Xid that opens a new (gpu, xid) series is first served at 0 and from the next scrape on
  with its count, so `increase()` sees the first Xid too. Xids from before the exporter started
  (journal backfill) are served with their count at once: they are history, not news.
- A GPU falls off the bus once per event, whichever way it is told (NVML, the Xid 79 line, the
  driver's "has fallen off the bus" line without an Xid): Xid 79s on one GPU within DEDUPE_SECONDS
  are one.
- Memory is bounded: counters are per (gpu, code) and the history keeps the last HISTORY_MAX
  events of the last day per GPU.
- `sink`, where given, sees every Xid counted (the persistent incident history).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .xidcatalog import DAY

DEDUPE_SECONDS = 30.0
HISTORY_MAX = 512
ZERO_HOLD_SECONDS = 1.0


@dataclass(frozen=True)
class XidEvent:
    uuid: str
    code: int
    timestamp: float  # Unix time the Xid happened
    source: str  # "nvml" or "journal"
    message: str = ""
    gpu_instance: str = ""  # the MIG GPU instance the kernel line named


@dataclass
class _Entry:
    event: XidEvent
    matched: bool = False


@dataclass
class _Series:
    count: int = 0
    last: float = 0.0
    revealed: bool = True
    zero_served_at: float | None = None


@dataclass
class _Gpu:
    series: dict[int, _Series] = field(default_factory=dict)
    history: deque[_Entry] = field(default_factory=lambda: deque(maxlen=HISTORY_MAX))
    events: dict[str, int] = field(default_factory=dict)  # other NVML event types by name


class XidStore:
    def __init__(self, started_at: float | None = None, clock: Callable[[], float] = time.time,
                 sink: Callable[[XidEvent], None] | None = None):
        self._clock = clock
        self._sink = sink
        self.started_at = clock() if started_at is None else started_at
        self._lock = threading.Lock()
        self._gpus: dict[str, _Gpu] = {}
        # Xids for PCI addresses no GPU of ours answers for (a GPU lost before we could identify it)
        self._unresolved: deque[tuple[str, XidEvent]] = deque(maxlen=HISTORY_MAX)
        # (NVSwitch PCI address, SXid) -> (count this boot, Unix time of the last one)
        self._sxids: dict[tuple[str, str], tuple[int, float]] = {}

    def record_sxid(self, pci: str, code: int, timestamp: float = 0.0) -> None:
        with self._lock:
            key = (pci, str(code))
            count, last = self._sxids.get(key, (0, 0.0))
            self._sxids[key] = (count + 1, max(last, timestamp))

    def sxids(self) -> dict[tuple[str, str], tuple[int, float]]:
        with self._lock:
            return dict(self._sxids)

    def record_unresolved(self, pci: str, event: XidEvent) -> None:
        with self._lock:
            self._unresolved.append((pci, event))

    def unresolved(self) -> tuple[tuple[str, XidEvent], ...]:
        with self._lock:
            return tuple(self._unresolved)

    def record(self, event: XidEvent) -> bool:
        """Count an Xid; False when it is the other source's report of one already counted."""
        counted = self._count(event)
        if counted and self._sink is not None:
            self._sink(event)
        return counted

    def _count(self, event: XidEvent) -> bool:
        with self._lock:
            gpu = self._gpus.setdefault(event.uuid, _Gpu())
            for entry in reversed(gpu.history):
                e = entry.event
                if (e.code == event.code and abs(e.timestamp - event.timestamp) <= DEDUPE_SECONDS
                        and (event.code == 79 or (not entry.matched and e.source != event.source))):
                    entry.matched = True
                    if event.message and not e.message:
                        entry.event = XidEvent(e.uuid, e.code, e.timestamp, e.source, event.message,
                                               event.gpu_instance)
                    return False
            gpu.history.append(_Entry(event))
            self._prune(gpu)
            series = gpu.series.get(event.code)
            if series is None:
                live = event.timestamp >= self.started_at - DEDUPE_SECONDS
                series = gpu.series[event.code] = _Series(revealed=not live)
            series.count += 1
            series.last = max(series.last, event.timestamp)
            return True

    def record_event(self, uuid: str, name: str) -> None:
        with self._lock:
            gpu = self._gpus.setdefault(uuid, _Gpu())
            gpu.events[name] = gpu.events.get(name, 0) + 1

    def _prune(self, gpu: _Gpu) -> None:
        horizon = self._clock() - DAY
        while gpu.history and gpu.history[0].event.timestamp < horizon:
            gpu.history.popleft()

    def series(self, uuid: str) -> dict[int, tuple[float, float]]:
        """code -> (count as served now, last timestamp). Call once per collection: it advances the
        zero-first reveal of new series."""
        now = self._clock()
        out: dict[int, tuple[float, float]] = {}
        with self._lock:
            gpu = self._gpus.get(uuid)
            if gpu is None:
                return out
            for code, s in gpu.series.items():
                if not s.revealed:
                    if s.zero_served_at is None:
                        s.zero_served_at = now
                    elif now - s.zero_served_at >= ZERO_HOLD_SECONDS:
                        s.revealed = True
                out[code] = (float(s.count) if s.revealed else 0.0, s.last)
        return out

    def events(self, uuid: str) -> dict[str, int]:
        with self._lock:
            gpu = self._gpus.get(uuid)
            return dict(gpu.events) if gpu else {}

    def history(self, uuid: str) -> tuple[XidEvent, ...]:
        with self._lock:
            gpu = self._gpus.get(uuid)
            if gpu is None:
                return ()
            self._prune(gpu)
            return tuple(e.event for e in gpu.history)
