"""The node: its GPUs through NVML, one GPU's failure at a time. A GPU's read is reading.py's; when each
read happens, and on which thread, the scheduler's (scheduling.py); what the readings mean, the pipeline's.

- The NVML lifecycle, on the manager thread ("nvml-manager"): initialise (retrying with backoff while
  the library or driver is missing), re-enumerate now and then and when a GPU went or came back (GPUs
  are followed by UUID: indices move), initialise again when NVML went stale (a driver reload), and the
  PCI bus scan that says how many GPUs the node has whatever NVML says.
- Release and reacquire on the node agent's request (a GPU reset; control.py).
- What others ask of the GPUs: the attached handles (event watcher, workloads), a PCI address's UUID
  (journal), the raw snapshot (collector), health (systemd).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from .journal import pci_key
from .nvml import Library, NvmlError, NvmlStale, error_name
from .pcibus import PciBusError, count_nvidia_gpus
from .reading import Gpu, GpuReads
from .snapshot import GpuIdentity, GpuSnapshot, Values

log = logging.getLogger("nvml_exporter.node")

# What a GPU the agent asked the exporter to let go of serves besides `up 0` (one series: the reason).
RELEASED: Values = {"nvidia_gpu_released": {(): 1.0}}
MAX_GPUS = 4096  # tracked at most: GPUs that come and go by new UUIDs for a long time must not grow it


class ReleaseError(Exception):
    """A release or reacquire that could not be done (safely): the control socket answers it as an error."""


class EventSource(Protocol):
    """The NVML event watcher, as a release needs it (nvml.events.EventWatcher)."""

    def pause(self, timeout: float) -> bool: ...

    def resume(self, timeout: float = ...) -> bool: ...


class NodeStatus(NamedTuple):
    """The node's part of the exporter's state (snapshot.ExporterState)."""

    nvml_up: bool
    driver_version: str
    nvml_errors: dict[tuple[str, str], int]
    invalid_readings: dict[str, int]
    pci_devices: int | None


class Node:
    def __init__(self, library: Library, *, slow_interval: float = 30.0, rediscover_interval: float = 30.0,
                 init_backoff: tuple[float, float] = (0.5, 10.0), clock: Callable[[], float] = time.monotonic,
                 pci_root: str | None = None, freeze: bool = False):
        """`pci_root`: where the PCI bus is scanned (None: not read). `freeze`: the frozen-readings test
        mode (snapshot.py): every reading a read-only view, so that a stage that changes one raises."""
        self._lib = library
        self._rediscover_interval = rediscover_interval
        self._init_backoff = init_backoff
        self._clock = clock
        self._pci_root = pci_root
        self._lock = threading.Lock()  # shared with the reads (GpuReads), which guard the GPUs' fields with it
        self._gpus: list[Gpu] = []  # _lock (appended to; a GPU is never removed)
        self._nvml_up = False  # _lock
        self._driver_version = ""  # written by whoever holds _nvml_lock
        self._errors: Counter[tuple[str, str]] = Counter()  # _lock
        self._pci_devices: int | None = None  # _lock: NVIDIA GPUs on the PCI bus
        self._pci_error = ""  # the manager's (logged once until it changes)
        self._stale = False  # _lock: NVML must be shut down and initialised again (a driver reload)
        self._released: set[str] = set()  # _lock: GPUs (uuid) the node agent asked the exporter to let go of
        self._released_all = False  # _lock: ... all of them: NVML is shut down
        self._nvml_lock = threading.RLock()  # init, shutdown and enumeration: one at a time
        self._stop = threading.Event()
        # Wakes the manager before its interval: a GPU went or came back (re-enumerate: indices move), or
        # NVML went stale (re-initialise).
        self._wake = threading.Event()
        self._manager: threading.Thread | None = None
        self.initialised = threading.Event()  # NVML came up at least once (readiness)
        self.tried = threading.Event()  # the first init attempt finished, either way
        # Set once start-up has settled: the first init failed (nothing to wait for), or NVML came up
        # and every GPU was attached. A scrape before that waits for it, bounded by its deadline, so
        # that the exporter's first page is not a page with no GPUs on a node that has eight.
        self.settled = threading.Event()
        self.last_init_error = ""
        self._reads = GpuReads(library, self._lock, slow_interval=slow_interval, clock=clock, freeze=freeze,
                               let_go=self._let_go, went_stale=self._went_stale, changed=self._wake.set,
                               count_error=self.count_error)
        self.read = self._reads.read  # one GPU's read (the scheduler's, on whichever thread it picks)

    # -- the NVML lifecycle ----------------------------------------------------------------------
    def start(self, came_up: Callable[[], None]) -> None:
        """Start the manager; it calls came_up() once NVML first came up and the GPUs are enumerated
        (the collector attaches them and starts the event watcher), then sets `initialised`."""
        self._manager = threading.Thread(target=self._manage, args=(came_up,), name="nvml-manager", daemon=True)
        self._manager.start()

    def stop(self) -> None:
        """Stop the manager and shut NVML down (after the scheduler stopped its readers)."""
        self._stop.set()
        self._wake.set()
        try:
            self._lib.shutdown()
        except NvmlError as e:
            log.warning("NVML shutdown failed", extra={"error": str(e)})

    def _manage(self, came_up: Callable[[], None]) -> None:
        delay, max_delay = self._init_backoff
        self._scan_pci()  # (also while NVML is missing: then the bus is all that says GPUs are there)
        while not self._stop.is_set():
            try:
                self._lib.init()
                self._driver_version = self._lib.driver_version()
                break
            except NvmlError as e:
                self.count_error(e.function, e.code)
                self.last_init_error = str(e)
                log.warning("NVML not available, retrying", extra={"error": str(e), "retry_in_s": delay})
            finally:
                self.tried.set()
            self.settled.set()  # (nothing to wait for: the page says nvml_up 0 until NVML comes)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, max_delay)
        log.info("NVML initialised", extra={"driver_version": self._driver_version})
        self._rediscover()
        with self._lock:
            self._nvml_up = True
        came_up()
        self.initialised.set()
        self.settled.set()
        while not self._stop.is_set():
            self._wake.wait(self._rediscover_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._stale and not self._released_all:
                self._reinitialise()
            with self._nvml_lock:
                if not self._released_all and not self._stale:  # (released: shut down until reacquire)
                    self._rediscover()

    def _reinitialise(self) -> None:
        """NVML answered UNINITIALIZED or DRIVER_NOT_LOADED (a driver reload): every handle is stale. Shut
        down and initialise again, with backoff, then attach every GPU anew by its UUID. The NVML lock is
        held for each attempt, not across the waits: a release or reacquire is answered meanwhile."""
        with self._nvml_lock:
            with self._lock:
                self._nvml_up = False
                for g in self._gpus:
                    g.reader, g.last, g.up = None, None, False
            try:
                self._lib.shutdown()
            except NvmlError as e:  # the state it would free is gone already
                self.count_error(e.function, e.code)
        delay, max_delay = self._init_backoff
        while True:
            with self._nvml_lock:
                if self._stop.is_set() or self._released_all or not self._stale:
                    return  # (released, or a reacquire initialised it)
                try:
                    self._lib.init()
                    self._driver_version = self._lib.driver_version()
                    with self._lock:
                        self._stale, self._nvml_up = False, True
                    log.info("NVML initialised again", extra={"driver_version": self._driver_version})
                    return
                except NvmlError as e:
                    self.count_error(e.function, e.code)
                    self.last_init_error = str(e)
                    log.warning("NVML went away (driver reload?); re-initialising",
                                extra={"error": str(e), "retry_in_s": delay})
                    try:
                        self._lib.shutdown()  # (where init worked and the driver version did not)
                    except NvmlError as e2:
                        self.count_error(e2.function, e2.code)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, max_delay)

    def _went_stale(self) -> None:
        with self._lock:
            if not self._nvml_up:
                return
            self._nvml_up, self._stale = False, True
        log.error("NVML went stale (driver reloaded or unloaded); re-initialising")
        self._wake.set()

    def _scan_pci(self) -> None:
        if self._pci_root is None:
            return
        try:
            count: int | None = count_nvidia_gpus(self._pci_root)
            error = ""
        except PciBusError as e:
            count, error = None, str(e)
        if error != self._pci_error:  # (logged once until it changes)
            if error:
                log.warning("PCI bus not readable: nvidia_gpu_pci_devices is not served", extra={"error": error})
            self._pci_error = error
        with self._lock:
            self._pci_devices = count

    def _rediscover(self) -> None:
        """Add GPUs that enumeration shows and we do not track yet, and follow the ones that moved to
        another index (a GPU unbound or reset before them: indices shift). GPUs that vanish are kept:
        they stay `up 0` (with no readings) until the exporter restarts, which is what an operator must
        see; one that returns, at any index, is the same board by its UUID."""
        self._scan_pci()
        try:
            count = self._lib.device_count()
            at: dict[int, str | None] = {}
            for index in range(count):
                try:
                    at[index] = self._lib.uuid_of(self._lib.handle_by_index(index))
                except NvmlStale:
                    raise
                except NvmlError as e:  # (a lost GPU: it is attached by its UUID once it answers)
                    self.count_error(e.function, e.code)
                    at[index] = None
        except NvmlStale as e:
            self.count_error(e.function, e.code)
            self._went_stale()
            return
        except NvmlError as e:
            self.count_error(e.function, e.code)
            return
        moved = []
        with self._lock:
            known = len(self._gpus)
            by_uuid = {g.identity.uuid: g for g in self._gpus if g.identity.uuid}
            for index, uuid in at.items():
                g = by_uuid.get(uuid) if uuid else None
                if g is not None and g.identity.index != index:
                    g.identity = dataclasses.replace(g.identity, index=index)
                    moved.append((uuid, index))
            if known == 0:  # the first enumeration: by index (a GPU lost at start has no UUID yet)
                self._gpus.extend(Gpu(index=i, identity=GpuIdentity(index=i, uuid="")) for i in range(count))
            else:
                for index, uuid in at.items():
                    if uuid and uuid not in by_uuid and len(self._gpus) < MAX_GPUS:
                        self._gpus.append(Gpu(index=len(self._gpus), identity=GpuIdentity(index=index, uuid=uuid)))
        if moved:
            log.warning("GPUs moved to another index", extra={"moved": moved})
        if count != known:
            log.info("GPUs enumerated", extra={"count": count, "tracked": len(self._gpus)})

    # -- release on the node agent's request (a GPU reset; control.py) ----------------------------
    def release(self, uuid: str | None, timeout: float, events: EventSource | None,
                forget: Callable[[], None]) -> str:
        """Let go of one GPU (its handle and event registration) or, with uuid None, of NVML altogether
        (nvmlShutdown: the process then holds no device file, which a GPU reset requires). `forget()` drops
        the scheduler's last snapshot once the GPUs are let go of. Returns what was done; raises
        ReleaseError where it cannot be done safely (a driver call hangs)."""
        with self._nvml_lock:
            with self._lock:
                known = {g.identity.uuid for g in self._gpus}
                if uuid is not None and uuid not in known:
                    raise ReleaseError(f"no GPU with uuid {uuid} on this node")
                if uuid is None:
                    self._released_all = True
                else:
                    self._released.add(uuid)
                gpus = [g for g in self._gpus if uuid is None or g.identity.uuid == uuid]
            try:
                self._let_go_of(gpus, events if uuid is None else None, self._clock() + timeout)
            except ReleaseError:  # nothing was released: back to reading, as before the request
                with self._lock:
                    if uuid is None:
                        self._released_all = False
                    else:
                        self._released.discard(uuid)
                if uuid is None and events is not None:
                    events.resume(0)
                raise
            with self._lock:
                for g in gpus:
                    g.reader, g.last, g.up = None, None, False
            forget()  # the next scrape says released, not a page from before
            if uuid is None:
                with self._lock:
                    self._nvml_up = False
                try:
                    self._lib.shutdown()
                except NvmlError as e:
                    self.count_error(e.function, e.code)
                log.warning("released NVML on the node agent's request")
                return "released all (NVML shut down)"
            log.warning("released a GPU on the node agent's request", extra={"uuid": uuid})
            return f"released {uuid}"

    def _let_go_of(self, gpus: list[Gpu], events: EventSource | None, deadline: float) -> None:
        """Wait until no NVML call is in flight for these GPUs (and the event thread, where given)."""
        if events is not None and not events.pause(max(0.0, deadline - self._clock())):
            raise ReleaseError("the NVML event thread did not let go in time")
        while any(g.read_started is not None for g in gpus):  # a read in flight finishes first
            if self._clock() > deadline:
                hung = [g.index for g in gpus if g.read_started is not None]
                raise ReleaseError(f"a driver call on GPU {hung} has not returned; not released")
            time.sleep(0.01)

    def reacquire(self) -> bool:
        """Take back what was released: initialise NVML again where it was shut down (True then). The
        GPUs are attached by UUID on their next read. Raises ReleaseError where NVML does not come up
        (the manager keeps trying, with backoff)."""
        with self._nvml_lock:
            was_all = self._released_all
            with self._lock:
                self._released.clear()
                self._released_all = False
            if was_all:
                try:
                    self._lib.init()
                    self._driver_version = self._lib.driver_version()
                except NvmlError as e:
                    self.count_error(e.function, e.code)
                    with self._lock:
                        self._stale = True
                    self._wake.set()
                    raise ReleaseError(f"NVML did not initialise again yet ({e}); retrying in the background"
                                       ) from None
                with self._lock:
                    self._stale, self._nvml_up = False, True
                self._rediscover()
        return was_all

    def released(self) -> list[str]:
        """What is released now: "all", or the uuids."""
        with self._lock:
            return ["all"] if self._released_all else sorted(self._released)

    # -- what others ask of the GPUs ---------------------------------------------------------------
    def gpus(self) -> list[Gpu]:
        with self._lock:
            return list(self._gpus)

    def attached(self) -> dict[str, Any]:
        """uuid -> NVML handle of every GPU that answered its last read (the event watcher's, the
        workload sources')."""
        with self._lock:
            if self._released_all:
                return {}
            return {g.identity.uuid: g.reader.handle for g in self._gpus
                    if g.up and g.reader is not None and g.identity.uuid not in self._released}

    def resolve_pci(self, key: tuple[int, int, int]) -> str | None:
        """The UUID of the GPU at this PCI address (the journal follower's)."""
        with self._lock:
            for g in self._gpus:
                if g.identity.uuid and pci_key(g.identity.pci_bus_id) == key:
                    return g.identity.uuid
        return None

    def raw(self, stale: set[int]) -> tuple[list[GpuSnapshot], NodeStatus]:
        """Every GPU as last read (the slots in `stale` missed this collection's deadline), and the status."""
        with self._lock:
            gpus = [
                GpuSnapshot(
                    identity=g.identity,
                    up=g.up,
                    values=g.last or (RELEASED if self._released_all or g.identity.uuid in self._released else {}),
                    errors=dict(g.errors),
                    stale=g.index in stale,
                    collect_seconds=g.duration,
                )
                for g in self._gpus
            ]
            status = NodeStatus(self._nvml_up, self._driver_version, dict(self._errors), self._reads.invalid(),
                                self._pci_devices)
        return gpus, status

    def health(self, max_hang: float) -> tuple[bool, str]:
        """(healthy, status line for systemd): unhealthy while a driver call has hung over max_hang."""
        now = self._clock()
        with self._lock:
            if self._released_all:
                return True, "NVML released on the node agent's request (a GPU reset)"
            if not self._nvml_up:
                return True, f"waiting for NVML ({self.last_init_error or 'not tried yet'})"
            hung = [g.index for g in self._gpus if g.read_started is not None and now - g.read_started > max_hang]
            lost = sum(1 for g in self._gpus if not g.up)
            total = len(self._gpus)
        status = f"{total} GPUs" + (f", {lost} lost" if lost else "")
        if hung:
            return False, f"{status}; NVML calls on GPU {', '.join(map(str, hung))} hung for over {max_hang:g}s"
        return True, status

    def count_error(self, function: str, code: int) -> None:
        with self._lock:
            self._errors[(function, error_name(code))] += 1

    # -- reads -----------------------------------------------------------------------------------
    def _let_go(self, gpu: Gpu) -> bool:
        """No driver call for this GPU: NVML is down, or released on the agent's request (under _lock)."""
        return not self._nvml_up or self._released_all or gpu.identity.uuid in self._released

