"""The collector: NVML -> a diagnosed `Snapshot`, on demand, within a deadline. A thin front over three
parts, each of which does one thing:

- `Node` (node.py, reading.py): the NVML lifecycle and the reads of each GPU;
- `Scheduler` (scheduling.py): single flight, deadlines, which thread reads which GPU;
- `Pipeline` (pipeline.py): raw snapshot + Xid history + previous snapshot -> the diagnosed snapshot.

The Xid sources (the XidStore the pipeline reads, the NVML event watcher and the journal follower that
fill it) are built by the caller (cli.build_collector) and handed in; the collector starts and stops them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .journal import JournalFollower
from .node import EventSource, Node, ReleaseError
from .pipeline import Pipeline
from .reading import Gpu
from .scheduling import Scheduler
from .snapshot import Deliver, ExporterState, Snapshot
from .workload import Tracker
from .xidstore import XidStore

log = logging.getLogger("nvml_exporter.collector")

__all__ = ["Collector", "ReleaseError"]


class Events(EventSource, Protocol):
    """The NVML event watcher (nvml.events.EventWatcher), started once the GPUs are attached."""

    @property
    def first_registration(self) -> threading.Event: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Collector:
    def __init__(self, node: Node, pipeline: Pipeline, *, events: Events | None = None,
                 journal: JournalFollower | None = None, min_interval: float = 1.0,
                 expected_gpus: int | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        """`events` and `journal` fill `pipeline.xids`; `expected_gpus`: --gpus.expected."""
        self._node = node
        self._pipeline = pipeline
        self._events = events
        self._journal = journal
        self.expected_gpus = expected_gpus
        self._clock = clock
        self._wall = wall
        self._scheduler: Scheduler[Gpu] = Scheduler(node.gpus, node.read, self._snapshot,
                                                    min_interval=min_interval, clock=clock)
        self.initialised = node.initialised  # NVML came up at least once, its GPUs attached (readiness)
        self.tried = node.tried  # the first init attempt finished, either way
        self.settled = node.settled  # start-up settled: a scrape before that waits for it

    @property
    def last_init_error(self) -> str:
        return self._node.last_init_error

    @property
    def xids(self) -> XidStore:
        return self._pipeline.xids

    @property
    def workloads(self) -> Tracker | None:
        return self._pipeline.workloads

    @workloads.setter
    def workloads(self, tracker: Tracker | None) -> None:  # (workload/wiring.py, before start)
        self._pipeline.workloads = tracker

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._node.start(self._came_up)
        self._scheduler.start()
        if self._journal is not None:
            self._journal.start()

    def _came_up(self) -> None:
        """NVML came up for the first time (the manager thread)."""
        self._scheduler.collect(5.0)  # attach every GPU, so identities and handles are known before anyone asks
        if self._events is not None:
            self._events.start()
            self._events.first_registration.wait(5.0)

    def stop(self) -> None:
        for source in (self._events, self._journal):
            if source is not None:
                source.stop()
        self._scheduler.stop()
        self._node.stop()

    # -- collections -----------------------------------------------------------------------------
    def collect(self, timeout: float) -> Snapshot:
        """A snapshot no older than min_interval, returned within `timeout` seconds whatever the driver
        does (Scheduler.collect)."""
        return self._scheduler.collect(self._settle(timeout))

    def collect_into(self, timeout: float, deliver: Deliver) -> bool:
        """A scrape's collection, delivered to deliver(snapshot, taken_over) (Scheduler.collect_into)."""
        return self._scheduler.collect_into(self._settle(timeout), deliver)

    def _settle(self, timeout: float) -> float:
        """Wait for start-up to settle, for at most half of `timeout`; what is left of `timeout`."""
        if self.settled.is_set():
            return timeout
        began = self._clock()
        self.settled.wait(timeout / 2)
        return max(0.0, timeout - (self._clock() - began))

    def _snapshot(self, stale: set[int]) -> Snapshot:
        """The scheduler's: the GPUs as last read, through the pipeline."""
        gpus, status = self._node.raw(stale)
        workloads = self._pipeline.workloads
        mono, timeouts = self._clock(), self._scheduler.timeouts()
        state = ExporterState(
            nvml_up=status.nvml_up,
            driver_version=status.driver_version,
            nvml_errors=status.nvml_errors,
            timeouts=timeouts,
            served_timeouts=self._pipeline.served_timeouts(timeouts, mono),
            invalid_readings=status.invalid_readings,
            last_collect_timestamp=self._wall(),
            journal_up=self._journal_up(),
            sxids=self.xids.sxids(),
            workloads_dropped=None if workloads is None else workloads.dropped,
            workload_errors={} if workloads is None else workloads.errors_total(),
            pci_devices=status.pci_devices,
            expected_gpus=self.expected_gpus,
        )
        return self._pipeline.run(Snapshot(gpus=tuple(gpus), state=state, taken_at=mono), state.last_collect_timestamp,
                                  mono)

    # -- release on the node agent's request (a GPU reset; control.py) ----------------------------
    def release(self, uuid: str | None, timeout: float = 10.0) -> str:
        """Let go of one GPU or, with uuid None, of NVML altogether (Node.release)."""
        return self._node.release(uuid, timeout, self._events, self._scheduler.forget)

    def reacquire(self, timeout: float = 10.0) -> str:
        """Take back what was released: initialise NVML again where it was shut down, attach by UUID."""
        try:
            was_all = self._node.reacquire()
        except ReleaseError:
            if self._events is not None:
                self._events.resume()
            raise
        self._scheduler.collect(timeout)  # attach every GPU first: the event thread registers the attached ones
        if was_all and self._events is not None and not self._events.resume(timeout):
            log.warning("NVML events not registered again yet after reacquire")
        log.warning("reacquired NVML on the node agent's request")
        return "reacquired"

    def released(self) -> list[str]:
        return self._node.released()

    # -- for the Xid sources, the workload sources and systemd ------------------------------------------
    def attached(self) -> dict[str, Any]:
        return self._node.attached()

    def health(self, max_hang: float) -> tuple[bool, str]:
        return self._node.health(max_hang)

    def wait_journal(self, timeout: float) -> bool:
        """Wait for the journal backfill; True if the journal could be read."""
        j = self._journal
        return j is not None and j.done_backfill.wait(timeout) and j.available

    def _journal_up(self) -> bool | None:
        j = self._journal
        if j is None:
            return False
        return j.available if j.done_backfill.is_set() else None
