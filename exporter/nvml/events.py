"""NVML events: `EventSet` (pynvml's event API) and `EventWatcher`, the background thread that records
Xids (and, where the board supports them, double-bit ECC, GPU-unavailable and recovery-action events)
into the XidStore. It never blocks a scrape: it runs in its own thread and the scrape only reads the
store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from ..logs import RateLimited
from ..xidstore import XidEvent, XidStore
from .calls import text
from .devices import uuid_of
from .errors import GpuLost, NvmlError, lost_error

# Event types (nvml.h nvmlEventType*): what the watcher asks for, where the board supports it.
EVENT_XID = 0x8
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_GPU_UNAVAILABLE = 0x4000
EVENT_RECOVERY_ACTION = 0x8000
EVENT_NAMES = {EVENT_XID: "xid", EVENT_DOUBLE_BIT_ECC: "double_bit_ecc", EVENT_GPU_UNAVAILABLE: "gpu_unavailable",
               EVENT_RECOVERY_ACTION: "recovery_action"}


@dataclass(frozen=True)
class Event:
    uuid: str
    type: int
    data: int


class EventSet:
    """An NVML event set. wait() blocks in the driver (the GIL is released), so it runs in its own thread."""

    def __init__(self) -> None:
        try:
            self._set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as e:
            raise NvmlError("nvmlEventSetCreate", e.value) from None

    def register(self, handle: Any, wanted: int) -> int:
        """Register for `wanted` event types as far as the board supports them; returns the mask registered."""
        try:
            mask = wanted & int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))
            if mask:
                pynvml.nvmlDeviceRegisterEvents(handle, mask, self._set)
            return mask
        except pynvml.NVMLError as e:
            raise lost_error("nvmlDeviceRegisterEvents", e.value) from None

    def wait(self, timeout_ms: int) -> Event | None:
        try:
            data = pynvml.nvmlEventSetWait(self._set, timeout_ms)
            return Event(text(pynvml.nvmlDeviceGetUUID(data.device)), int(data.eventType), int(data.eventData))
        except pynvml.NVMLError as e:
            if e.value == pynvml.NVML_ERROR_TIMEOUT:
                return None
            raise lost_error("nvmlEventSetWait_v2", e.value) from None

    def free(self) -> None:
        try:
            pynvml.nvmlEventSetFree(self._set)
        except pynvml.NVMLError as e:
            raise NvmlError("nvmlEventSetFree", e.value) from None


# Named as before the watcher moved into nvml/: the journal's LOGGER field, which filters match.
log = logging.getLogger("nvml_exporter.events")

WANTED = sum(EVENT_NAMES)
RECHECK_SECONDS = 2.0  # how often the set of attached GPUs is compared with the registered one
# A wait lasts until the next comparison: the driver wakes the thread when an event arrives, so a
# shorter wait only costs wake-ups (0.5 s slices were most of the idle exporter's CPU: make bench-idle).
MIN_WAIT_MS = 50
DRAIN_MAX = 10_000  # events read from a set before it is replaced
XID_LOG_INTERVAL = 10.0  # seconds between log lines for one GPU's one Xid code (all are counted anyway)


class EventWatcher:
    def __init__(self, attached: Callable[[], dict[str, Any]], store: XidStore,
                 on_error: Callable[[str, int], None], clock: Callable[[], float] = time.time):
        """`attached()` gives uuid -> NVML handle for the GPUs that answer now."""
        self._attached = attached
        self._store = store
        self._on_error = on_error
        self._clock = clock
        self._xid_log = RateLimited(log, XID_LOG_INTERVAL)  # an Xid storm must not flood the journal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)
        self.registered: dict[str, int] = {}  # uuid -> event mask, for tests and the landing page
        self.first_registration = threading.Event()
        self._pause = threading.Event()  # the collector lets go of NVML (a GPU reset): hold no event set
        self._idle = threading.Event()  # set by the thread once paused, its set freed
        self._registered = threading.Event()  # set by each registration

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def pause(self, timeout: float) -> bool:
        """Free the event set and make no NVML call until resume(); True once the thread has let go (a
        wait in the driver ends within RECHECK_SECONDS)."""
        self._pause.set()
        if not self._thread.is_alive():
            return True
        return self._idle.wait(timeout)

    def resume(self, timeout: float = 5.0) -> bool:
        """Register again; True once registered (events before that are the journal's to count)."""
        self._registered.clear()
        self._idle.clear()
        self._pause.clear()
        return not self._thread.is_alive() or self._registered.wait(timeout)

    def _register(self) -> EventSet | None:
        try:
            es = EventSet()
        except NvmlError as e:
            self._on_error(e.function, e.code)
            return None
        registered = {}
        for uuid, handle in self._attached().items():
            try:
                uuid_of(handle)  # a lost GPU would make every wait fail: leave it out until it is back
                registered[uuid] = es.register(handle, WANTED)
            except NvmlError as e:  # GpuLost included
                self._on_error(e.function, e.code)
        if registered != self.registered:
            log.info("registered for NVML events", extra={"gpus": len(registered)})
        self.registered = registered
        self.first_registration.set()
        self._registered.set()
        return es

    def _run(self) -> None:
        es: EventSet | None = None
        checked = 0.0
        while not self._stop.is_set():
            if self._pause.is_set():
                if es is not None:
                    self._free(es)
                    es = None
                    self.registered = {}
                self._idle.set()
                self._stop.wait(0.1)
                continue
            now = time.monotonic()
            due = now - checked >= RECHECK_SECONDS
            if due:
                checked = now
            if es is None or (due and set(self._attached()) != set(self.registered)):
                if es is not None:
                    self._drain(es)  # a new set sees only later events: read what this one still holds
                    self._free(es)
                es = self._register()
                if es is None:
                    self._stop.wait(1.0)
                    continue
            wait_ms = int((checked + RECHECK_SECONDS - time.monotonic()) * 1000)
            try:
                event = es.wait(max(MIN_WAIT_MS, wait_ms))
            except GpuLost as e:
                # A registered GPU fell off the bus: start over without it (it rejoins when it is back).
                self._on_error(e.function, e.code)
                self._free(es)
                es = None
                self._stop.wait(0.2)
                continue
            except NvmlError as e:
                self._on_error(e.function, e.code)
                self._stop.wait(1.0)
                continue
            if event is not None:
                self._record(event)
        if es is not None:
            self._free(es)

    def _record(self, event: Event) -> None:
        if event.type == EVENT_XID:
            self._store.record(XidEvent(event.uuid, event.data, self._clock(), "nvml"))
            self._xid_log.log(logging.ERROR, "Xid", key=(event.uuid, event.data),
                              extra={"uuid": event.uuid, "xid": event.data})
        else:
            self._store.record_event(event.uuid, EVENT_NAMES.get(event.type, hex(event.type)))

    def _drain(self, es: EventSet) -> None:
        """Record the events the set holds, without waiting for more (at most DRAIN_MAX: a storm must
        not keep the watcher from the new set)."""
        for _ in range(DRAIN_MAX):
            try:
                event = es.wait(0)
            except NvmlError as e:  # GpuLost included: what is left cannot be read
                self._on_error(e.function, e.code)
                return
            if event is None:
                return
            self._record(event)

    def _free(self, es: EventSet) -> None:
        try:
            es.free()
        except NvmlError as e:
            self._on_error(e.function, e.code)
