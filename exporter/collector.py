"""Collection: turns NVML into a `Snapshot`, on demand, within a deadline, one GPU's failure at a time.

- A manager thread initialises NVML (retrying with backoff while the library or driver is missing)
  and re-enumerates GPUs now and then.
- Where the driver answers in microseconds, the GPUs are read one after another by one thread: the
  work is Python, and threads reading in parallel would only hand the GIL to each other. For a scrape
  (`collect_into`) that is the scrape's own thread, watched by a kernel timer: a hand-off to another
  thread and back cost more than reading a GPU. For other callers (`collect`) it is the sweep thread,
  so that theirs never makes a driver call. Where calls are slow, each GPU is read by its own worker
  thread, so the calls overlap.
- A GPU the sweep has not started within SWEEP_PATIENCE gets its own thread, so a call that hangs
  holds up only its own GPU. Where it hangs in a scrape's thread, the watchdog takes the collection
  over and answers the scrape in its place. A scrape waits until its deadline, then serves that GPU's
  last good values and counts the timeout; the hung read is not repeated until it returns.
- Single-flight: concurrent scrapes share one collection, and a scrape within `min_interval` of the
  last collection is served from it.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from .alarm import Alarm
from .diagnosis import Finding, diagnose
from .history import History, HistoryError
from .journal import JournalFollower, pci_key
from .metrics import BY_NAME
from .nvml import GpuLost, GpuReader, Library, NvmlError, NvmlStale, error_name
from .nvml.events import EventWatcher
from .pcibus import PciBusError, count_nvidia_gpus
from .snapshot import Deliver, ExporterState, GpuIdentity, GpuSnapshot, Snapshot, Values
from .sparse import NvlinkTotals, Reveal, ZeroFirst
from .thermal import NodeModel, sample_of
from .workload import Tracker
from .xid import DAY
from .xidstore import XidEvent, XidStore

log = logging.getLogger("nvml_exporter.collector")

_VALID = {name: metric.valid for name, metric in BY_NAME.items()}
FAST_CALL = 50e-6  # seconds: a GPU whose quickest call is faster than this is read by the sweep,
SLOW_FIELDS = 1e-3  # unless the driver says its field values took longer than this (the energy counter)
SWEEP_PATIENCE = 0.05  # seconds: GPUs the sweep has not started by then are read by their own threads
FOLLOWER_WAIT = 1.0  # seconds a scrape waits for another scrape's collection before serving what is known


class _Worker:
    """One daemon thread per GPU. Daemon, unlike ThreadPoolExecutor's: a driver call that never
    returns must not keep the process from exiting on SIGTERM."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue[tuple[Future[None] | None, Callable[[], None]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        future: Future[None] = Future()
        self._queue.put((future, fn))
        return future

    def post(self, fn: Callable[[], None]) -> None:
        """Run fn with nothing to wait on: fn says itself when it is done (and catches its errors)."""
        self._queue.put((None, fn))

    def shutdown(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn = item
            if future is None:
                fn()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                fn()
                future.set_result(None)
            except BaseException as e:  # handed to the collection, which re-raises it
                future.set_exception(e)


@dataclass
class _Gpu:
    index: int
    identity: GpuIdentity
    _worker: _Worker | None = None  # started the first time this GPU is read on its own
    reader: GpuReader | None = None
    static: Values = field(default_factory=dict)
    slow: Values = field(default_factory=dict)
    slow_at: float = float("-inf")
    base: Values = field(default_factory=dict)  # static and slow values, merged when the slow tier is read
    last: Values | None = None  # last good values; None while lost
    up: bool = False
    errors: dict[str, str] = field(default_factory=dict)  # readings that failed in the last read
    failed: dict[str, str] = field(default_factory=dict)  # those of the read in progress
    passed: dict[str, Mapping[tuple[str, ...], float]] = field(default_factory=dict)  # that passed _sanitize
    duration: float = 0.0
    nvlink: NvlinkTotals = field(default_factory=NvlinkTotals)  # kept across a GPU's loss and return
    inflight: Future[None] | None = None
    read_started: float | None = None  # monotonic start of the read in progress

    @property
    def worker(self) -> _Worker:
        if self._worker is None:
            self._worker = _Worker(f"gpu{self.index}")
        return self._worker


def sweepable(reader: GpuReader | None) -> bool:
    """Whether the sweep reads this GPU: its driver answers in microseconds, field values included."""
    return reader is not None and reader.fastest_call < FAST_CALL and reader.field_seconds < SLOW_FIELDS


class _Sweep:
    """One pass over the fast GPUs, in order, by the sweep thread or a scrape's own thread. The collection
    (or the watchdog) can take back the GPUs it has not started yet; `finished` is held until the pass
    ends (a plain lock: a Future per GPU cost more than reading a GPU)."""

    def __init__(self, gpus: list[_Gpu]):
        self._todo = gpus[::-1]  # popped from the end
        self._lock = threading.Lock()
        self.current: _Gpu | None = None
        self.error: BaseException | None = None
        self.done = False
        self.finished = threading.Lock()
        self.finished.acquire()

    def run(self, read: Callable[[_Gpu], None]) -> None:
        try:
            while True:
                with self._lock:
                    if not self._todo:
                        break
                    self.current = self._todo.pop()
                read(self.current)
        except BaseException as e:  # handed to the collection, which re-raises it
            self.error = e
        finally:
            self.current = None
            self.done = True
            self.finished.release()

    def take_back(self) -> list[_Gpu]:
        with self._lock:
            rest, self._todo = self._todo[::-1], []
        return rest

    def wait(self, timeout: float) -> bool:
        if self.finished.acquire(timeout=max(0.0, timeout)):
            self.finished.release()
        return self.done


@dataclass
class _Work:
    """A collection's reads once started: what the one who finishes it waits for."""

    gpus: list[_Gpu]
    sweep: _Sweep | None
    pending: dict[int, Future[None]]  # GPUs read on their own threads
    deadline: float


class _Flight:
    """One collection in progress: its result for the scrapes that share it, and who finishes it (the
    thread that started it, or the watchdog where a driver call holds that thread)."""

    def __init__(self) -> None:
        self.future: Future[Snapshot] = Future()
        self.delivered = threading.Event()  # set once the watchdog has delivered it, where it took it over
        self._claim = threading.Lock()
        self._claimed = False

    def claim(self, unless_done: _Sweep | None = None) -> bool:
        """True for the first to ask (the watchdog passes the sweep: only while it is still reading)."""
        with self._claim:
            if self._claimed or (unless_done is not None and unless_done.done):
                return False
            self._claimed = True
            return True


class Collector:
    def __init__(
        self,
        library: Library,
        *,
        min_interval: float = 1.0,
        slow_interval: float = 30.0,
        rediscover_interval: float = 30.0,
        init_backoff: tuple[float, float] = (0.5, 10.0),
        journal: bool = True,
        journal_path: str | None = None,
        events: bool = True,
        sparse: bool = True,
        nvlink_per_link: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        history: History | None = None,
        workloads: Tracker | None = None,
        pci_root: str | None = None,
        expected_gpus: int | None = None,
        peers: NodeModel | None = None,
    ):
        self._lib = library
        # GPU-gone (pcibus.py): NVIDIA GPUs on the PCI bus, rescanned with each re-enumeration; None: not read
        self._pci_root = pci_root
        self._pci_devices: int | None = None
        self._pci_error = ""
        self.expected_gpus = expected_gpus
        # The thermal model, peer deviations and risk score of the node's GPUs (thermal.py, risk.py)
        self._peers = peers
        self.workloads = workloads  # nvidia_gpu_workload_info, read by its own threads (exporter/workload)
        self._min_interval = min_interval
        self._slow_interval = slow_interval
        self._rediscover_interval = rediscover_interval
        self._init_backoff = init_backoff
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._gpus: list[_Gpu] = []
        self._nvml_up = False
        self._driver_version = ""
        self._errors: Counter[tuple[str, str]] = Counter()
        self._timeouts: Counter[str] = Counter()
        self._invalid: Counter[str] = Counter()
        self._last: Snapshot | None = None
        self._inflight: _Flight | None = None
        self._sweeper = _Worker("nvml-sweep")
        self._sweep: _Sweep | None = None
        self._alarm = Alarm.create()
        # the collection whose sweep runs in a scrape's thread, with what the watchdog needs to finish it
        self._watched: tuple[_Flight, _Work, Deliver] | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._manager: threading.Thread | None = None
        # Wakes the manager before its interval: a GPU went or came back (re-enumerate: indices move), NVML
        # went stale (re-initialise), or the node agent asked the exporter to let go of NVML (release).
        self._wake = threading.Event()
        self._stale = False  # NVML must be shut down and initialised again (a driver reload)
        self._nvml_lock = threading.RLock()  # init, shutdown and enumeration: one at a time
        self._released: set[str] = set()  # GPUs (uuid) the node agent asked the exporter to let go of
        self._released_all = False  # ... all of them: NVML is shut down
        self.initialised = threading.Event()  # NVML came up at least once (readiness)
        self.tried = threading.Event()  # the first init attempt finished, either way
        # Set once start-up has settled: the first init failed (nothing to wait for), or NVML came up
        # and every GPU was attached. A scrape before that waits for it, bounded by its deadline, so
        # that the exporter's first page is not a page with no GPUs on a node that has eight.
        self.settled = threading.Event()
        self.last_init_error = ""
        self.history = history
        self._views: dict[str, tuple[tuple[int, int], _HistoryView]] = {}
        self._remaps: dict[str, tuple[object, ...]] = {}
        self._refreshed_at = float("-inf")
        self.xids = XidStore(clock=wall, sink=self._to_history if history else None)
        self._prev: dict[str, tuple[GpuSnapshot, float]] = {}
        # Sparse families and NVLink per-link detail (sparse.py), per GPU UUID; off for a one-shot diagnosis.
        self._sparse = sparse
        self._nvlink_per_link = nvlink_per_link
        self._reveals: dict[str, Reveal] = {}
        self._timeouts_served = ZeroFirst()
        self._events = EventWatcher(self.attached, self.xids, self._count_error, clock=wall) if events else None
        self._journal = (JournalFollower(self.xids, self.resolve_pci, journal_path, ready=self.initialised,
                                         on_reset=self._reset_acknowledged if history else None)
                         if journal else None)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._manager = threading.Thread(target=self._manage, name="nvml-manager", daemon=True)
        self._manager.start()
        if self._alarm is not None:
            self._watchdog = threading.Thread(target=self._watchdog_loop, name="nvml-watchdog", daemon=True)
            self._watchdog.start()
        if self._journal is not None:
            self._journal.start()

    def stop(self) -> None:
        self._stop.set()
        for watcher in (self._events, self._journal):
            if watcher is not None:
                watcher.stop()
        with self._lock:
            gpus = list(self._gpus)
        self._sweeper.shutdown()
        with self._lock:
            self._watched = None
            if self._watchdog is not None and self._alarm is not None:
                self._alarm.set(0)  # wakes the watchdog, which sees the stop and closes the alarm
        for g in gpus:
            if g._worker is not None:
                g._worker.shutdown()
        try:
            self._lib.shutdown()
        except NvmlError as e:
            log.warning("NVML shutdown failed", extra={"error": str(e)})

    def _manage(self) -> None:
        delay, max_delay = self._init_backoff
        self._scan_pci()  # (also while NVML is missing: then the bus is all that says GPUs are there)
        while not self._stop.is_set():
            try:
                self._lib.init()
                self._driver_version = self._lib.driver_version()
                break
            except NvmlError as e:
                self._count_error(e.function, e.code)
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
        self._collect(5.0)  # attach every GPU, so identities and handles are known before anyone asks
        if self._events is not None:
            self._events.start()
            self._events.first_registration.wait(5.0)
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
                self._count_error(e.function, e.code)
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
                    self._count_error(e.function, e.code)
                    self.last_init_error = str(e)
                    log.warning("NVML went away (driver reload?); re-initialising",
                                extra={"error": str(e), "retry_in_s": delay})
                    try:
                        self._lib.shutdown()  # (where init worked and the driver version did not)
                    except NvmlError as e2:
                        self._count_error(e2.function, e2.code)
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

    # -- release on the node agent's request (a GPU reset; control.py) ----------------------------
    def release(self, uuid: str | None, timeout: float = 10.0) -> str:
        """Let go of one GPU (its handle and event registration) or, with uuid None, of NVML altogether
        (nvmlShutdown: the process then holds no device file, which a GPU reset requires). Returns what
        was done; raises ReleaseError where it cannot be done safely (a driver call hangs)."""
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
                self._let_go_of(gpus, uuid is None, self._clock() + timeout)
            except ReleaseError:  # nothing was released: back to reading, as before the request
                with self._lock:
                    if uuid is None:
                        self._released_all = False
                    else:
                        self._released.discard(uuid)
                if uuid is None and self._events is not None:
                    self._events.resume(0)
                raise
            with self._lock:
                for g in gpus:
                    g.reader, g.last, g.up = None, None, False
                self._last = None  # the next scrape says released, not a page from before
            if uuid is None:
                with self._lock:
                    self._nvml_up = False
                try:
                    self._lib.shutdown()
                except NvmlError as e:
                    self._count_error(e.function, e.code)
                log.warning("released NVML on the node agent's request")
                return "released all (NVML shut down)"
            log.warning("released a GPU on the node agent's request", extra={"uuid": uuid})
            return f"released {uuid}"

    def _let_go_of(self, gpus: list[_Gpu], everything: bool, deadline: float) -> None:
        """Wait until no NVML call is in flight for these GPUs (and the event thread, for everything)."""
        if everything and self._events is not None and not self._events.pause(max(0.0, deadline - self._clock())):
            raise ReleaseError("the NVML event thread did not let go in time")
        while any(g.read_started is not None for g in gpus):  # a read in flight finishes first
            if self._clock() > deadline:
                hung = [g.index for g in gpus if g.read_started is not None]
                raise ReleaseError(f"a driver call on GPU {hung} has not returned; not released")
            time.sleep(0.01)

    def reacquire(self, timeout: float = 10.0) -> str:
        """Take back what was released: initialise NVML again where it was shut down, attach by UUID."""
        with self._nvml_lock:
            was_all = self._released_all
            with self._lock:
                self._released.clear()
                self._released_all = False
            if was_all:
                try:
                    self._lib.init()
                    self._driver_version = self._lib.driver_version()
                except NvmlError as e:  # the manager keeps trying, with backoff
                    self._count_error(e.function, e.code)
                    with self._lock:
                        self._stale = True
                    self._wake.set()
                    if self._events is not None:
                        self._events.resume()
                    raise ReleaseError(f"NVML did not initialise again yet ({e}); retrying in the background"
                                       ) from None
                with self._lock:
                    self._stale, self._nvml_up = False, True
                self._rediscover()
        self._collect(timeout)  # attach every GPU first: the event thread registers the attached ones
        if was_all and self._events is not None and not self._events.resume(timeout):
            log.warning("NVML events not registered again yet after reacquire")
        log.warning("reacquired NVML on the node agent's request")
        return "reacquired"

    def released(self) -> list[str]:
        """What is released now: "all", or the uuids."""
        with self._lock:
            return ["all"] if self._released_all else sorted(self._released)

    # -- for the event watcher and the journal follower --------------------------------------------
    def attached(self) -> dict[str, Any]:
        """uuid -> NVML handle of every GPU that answered its last collection."""
        with self._lock:
            if self._released_all:
                return {}
            return {g.identity.uuid: g.reader.handle for g in self._gpus
                    if g.up and g.reader is not None and g.identity.uuid not in self._released}

    def resolve_pci(self, key: tuple[int, int, int]) -> str | None:
        with self._lock:
            for g in self._gpus:
                if g.identity.uuid and pci_key(g.identity.pci_bus_id) == key:
                    return g.identity.uuid
        return None

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
                    self._count_error(e.function, e.code)
                    at[index] = None
        except NvmlStale as e:
            self._count_error(e.function, e.code)
            self._went_stale()
            return
        except NvmlError as e:
            self._count_error(e.function, e.code)
            return
        moved = []
        with self._lock:
            known = len(self._gpus)
            by_uuid = {g.identity.uuid: g for g in self._gpus if g.identity.uuid}
            for index, uuid in at.items():
                g = by_uuid.get(uuid) if uuid else None
                if g is not None and g.identity.index != index:
                    g.identity = GpuIdentity(**{**g.identity.__dict__, "index": index})
                    moved.append((uuid, index))
            if known == 0:  # the first enumeration: by index (a GPU lost at start has no UUID yet)
                self._gpus.extend(_Gpu(index=i, identity=GpuIdentity(index=i, uuid="")) for i in range(count))
            else:
                for index, uuid in at.items():
                    if uuid and uuid not in by_uuid and len(self._gpus) < 4096:
                        self._gpus.append(_Gpu(index=len(self._gpus), identity=GpuIdentity(index=index, uuid=uuid)))
        if moved:
            log.warning("GPUs moved to another index", extra={"moved": moved})
        if count != known:
            log.info("GPUs enumerated", extra={"count": count, "tracked": len(self._gpus)})

    # -- errors ----------------------------------------------------------------------------------
    def _count_error(self, function: str, code: int) -> None:
        with self._lock:
            self._errors[(function, error_name(code))] += 1

    # -- one GPU ---------------------------------------------------------------------------------
    def _read_gpu(self, gpu: _Gpu) -> None:
        started = self._clock()
        with self._lock:  # (release() sets its flag under this lock, then waits for read_started to clear)
            gpu.read_started = started
            let_go = not self._nvml_up or self._released_all or gpu.identity.uuid in self._released
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
            with self._lock:
                gpu.last, gpu.up = values, True
        except NvmlStale:
            with self._lock:
                gpu.reader, gpu.last, gpu.up = None, None, False
            self._went_stale()
        except GpuLost as e:
            if gpu.up or gpu.reader is not None:
                log.error("GPU lost", extra={"gpu": gpu.index, "uuid": gpu.identity.uuid, "error": str(e)})
                self._wake.set()  # re-enumerate: the GPUs after it may have moved down an index
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

    def _reading_failed(self, gpu: _Gpu, function: str, code: int) -> None:
        gpu.failed[function] = error_name(code)
        self._count_error(function, code)

    def _attach(self, gpu: _Gpu) -> None:
        """Get a handle (by UUID once we know it, so a GPU that returns is the same board) and read
        what does not change."""
        uuid = gpu.identity.uuid
        handle = self._lib.handle_by_uuid(uuid) if uuid else self._lib.handle_by_index(gpu.index)
        reader = GpuReader(handle, functools.partial(self._reading_failed, gpu))
        identity = reader.read_identity()
        if identity.index < 0:
            identity = GpuIdentity(**{**identity.__dict__, "index": gpu.index})
        static = self._sanitize(reader.read_static())
        with self._lock:
            was_lost = bool(gpu.identity.uuid)
            gpu.identity, gpu.static, gpu.reader, gpu.slow_at = identity, static, reader, float("-inf")
        if was_lost:
            log.warning("GPU is back", extra={"gpu": identity.index, "uuid": identity.uuid})
            self._wake.set()  # re-enumerate: the GPUs after it may have moved up an index

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

    # -- collections -----------------------------------------------------------------------------
    def collect(self, timeout: float) -> Snapshot:
        """A snapshot no older than min_interval, returned within `timeout` seconds whatever the driver
        does: fast GPUs are read on the sweep thread, not this one."""
        return self._collect(self._settle(timeout))

    def _collect(self, timeout: float) -> Snapshot:
        got: list[Snapshot] = []
        self._run(timeout, lambda snap, _taken_over: got.append(snap), inline=False)
        return got[0]

    def _settle(self, timeout: float) -> float:
        """Wait for start-up to settle, for at most half of `timeout`; what is left of `timeout`."""
        if self.settled.is_set():
            return timeout
        began = self._clock()
        self.settled.wait(timeout / 2)
        return max(0.0, timeout - (self._clock() - began))

    def collect_into(self, timeout: float, deliver: Deliver) -> bool:
        """Collect as collect() does, but hand the snapshot to deliver(snapshot, taken_over), exactly once
        and within `timeout` seconds, reading the fast GPUs in this thread: a scrape then costs no
        thread switches. Where a driver call holds this thread past SWEEP_PATIENCE, the watchdog takes
        the collection over and delivers it (taken_over=True) by the deadline, while this thread waits
        for the call; it returns False then, once that delivery is done."""
        return self._run(self._settle(timeout), deliver, inline=self._watchdog is not None)

    def _run(self, timeout: float, deliver: Deliver, inline: bool) -> bool:
        deadline = self._clock() + timeout
        with self._lock:
            last, flight = self._last, self._inflight
            fresh = last is not None and self._clock() - last.taken_at < self._min_interval
            leader = not fresh and flight is None
            if leader:
                flight = self._inflight = _Flight()
        if fresh:
            assert last is not None
            deliver(last, False)
            return True
        assert flight is not None
        if not leader:
            # Share the collection in flight, but not for long: past FOLLOWER_WAIT, serve the last good
            # GPU values with fresh Xids rather than hold this scrape on the GPU that keeps the leader.
            try:
                snap = flight.future.result(timeout=max(0.0, min(deadline - self._clock(), FOLLOWER_WAIT)))
            except FutureTimeout:
                snap = self._snapshot(set())
            deliver(snap, False)
            return True
        try:
            work = self._start(flight, deadline, deliver, inline)
        except BaseException as e:
            self._end(flight, None, e)
            raise
        if not flight.claim():  # the watchdog took it over while a driver call held this thread
            flight.delivered.wait()
            if (error := flight.future.exception(timeout=0)) is not None:
                raise error
            return False
        self._finish(flight, work, deliver, taken_over=False)
        return True

    def _start(self, flight: _Flight, deadline: float, deliver: Deliver, inline: bool) -> _Work:
        """Start every GPU's read; read the fast ones (here, or on the sweep thread) for up to
        SWEEP_PATIENCE."""
        with self._lock:
            gpus = list(self._gpus)
        last_sweep = self._sweep
        sweep_free = last_sweep is None or last_sweep.done  # a sweep still running is stuck in a hung call
        swept: list[_Gpu] = []
        work = _Work(gpus, None, {}, deadline)  # pending: GPUs read on their own threads
        for gpu in gpus:
            if gpu.read_started is not None:
                continue  # a read still running (hung) is left alone; the GPU is served stale
            # A read still queued on the GPU's own thread is taken back and queued anew.
            if gpu.inflight is not None and not gpu.inflight.done() and not gpu.inflight.cancel():
                continue
            gpu.inflight = None
            if sweep_free and sweepable(gpu.reader):
                swept.append(gpu)
            else:
                gpu.inflight = work.pending[gpu.index] = gpu.worker.submit(functools.partial(self._read_gpu, gpu))
        if not swept:
            return work
        sweep = work.sweep = self._sweep = _Sweep(swept)
        patience = min(SWEEP_PATIENCE, deadline - self._clock())
        if inline and self._watch((flight, work, deliver), patience):
            sweep.run(self._read_gpu)
            self._unwatch(flight)
        else:
            self._sweeper.post(functools.partial(sweep.run, self._read_gpu))
            sweep.wait(patience)
        return work

    def _finish(self, flight: _Flight, work: _Work, deliver: Deliver, taken_over: bool) -> None:
        try:
            snap = self._complete(work)
        except BaseException as e:
            self._end(flight, None, e)
            raise
        self._end(flight, snap, None)
        deliver(snap, taken_over)

    def _complete(self, work: _Work) -> Snapshot:
        """Wait for the reads until the deadline; a snapshot with the GPUs that missed it served stale."""
        deadline, pending, sweep = work.deadline, work.pending, work.sweep
        if sweep is not None and not sweep.done:
            for gpu in sweep.take_back():  # not started by the sweep yet: each on its own thread now
                gpu.inflight = pending[gpu.index] = gpu.worker.submit(functools.partial(self._read_gpu, gpu))
            sweep.wait(deadline - self._clock())
        done, _ = wait(pending.values(), timeout=max(0.0, deadline - self._clock())) if pending else (set(), set())
        stale = {index for index, f in pending.items() if f not in done}
        stale |= {g.index for g in work.gpus if g.read_started is not None and g.index not in pending}
        if sweep is not None and (stuck := sweep.current) is not None:
            stale.add(stuck.index)  # (taken by the sweep a moment ago, its read_started not yet set)
        if sweep is not None and sweep.error is not None:
            raise sweep.error  # surface a bug in a reader rather than serve silently wrong data
        for f in done:
            f.result()
        with self._lock:
            for index in stale:
                self._timeouts[str(index)] += 1
        if stale:
            log.warning("GPU collection missed the deadline; serving last good values",
                        extra={"gpus": sorted(stale)})
        return self._snapshot(stale)

    def _end(self, flight: _Flight, snap: Snapshot | None, error: BaseException | None) -> None:
        if error is None:
            flight.future.set_result(snap)
        else:
            flight.future.set_exception(error)
        with self._lock:
            if snap is not None:
                self._last = snap
            self._inflight = None

    # -- the watchdog over a sweep read in the scrape's own thread --------------------------------
    def _watch(self, watched: tuple[_Flight, _Work, Deliver], patience: float) -> bool:
        """Set the alarm for this collection; False once the collector is stopping (the alarm closes)."""
        with self._lock:
            if self._stop.is_set() or self._alarm is None:
                return False
            self._watched = watched
            self._alarm.set(patience)
            return True

    def _unwatch(self, flight: _Flight) -> None:
        """Cancel the alarm, unless a newer collection set it (this thread may come back from a hung
        call long after its collection was taken over)."""
        with self._lock:
            if self._watched is not None and self._watched[0] is flight:
                self._watched = None
                assert self._alarm is not None
                self._alarm.cancel()

    def _watchdog_loop(self) -> None:
        alarm = self._alarm
        assert alarm is not None
        try:
            while True:
                alarm.wait()
                if self._stop.is_set():
                    break
                with self._lock:
                    watched = self._watched
                if watched is None:
                    continue
                flight, work, deliver = watched
                if not flight.claim(unless_done=work.sweep):
                    continue  # the sweep ended in time: its own thread finishes the collection
                # (a hung call, or a thread the machine held up: a hung one also shows as a missed deadline)
                log.info("reading fast GPUs took the scrape's thread past SWEEP_PATIENCE; collection taken over")
                try:
                    self._finish(flight, work, deliver, taken_over=True)
                except OSError as e:
                    log.warning("could not deliver a taken-over collection", extra={"error": str(e)})
                except Exception:
                    log.exception("a taken-over collection failed")
                finally:
                    flight.delivered.set()
        finally:
            with self._lock:  # (_watch sees the stop under this lock, and sets the alarm no more)
                self._alarm = None
                alarm.close()

    def _snapshot(self, stale: set[int]) -> Snapshot:
        with self._lock:
            released = self._released_all, self._released
            base = [
                GpuSnapshot(
                    identity=g.identity,
                    up=g.up,
                    values=g.last or (_RELEASED if released[0] or g.identity.uuid in released[1] else {}),
                    errors=dict(g.errors),
                    stale=g.index in stale,
                    collect_seconds=g.duration,
                )
                for g in self._gpus
            ]
        now, mono = self._wall(), self._clock()
        extra = self._model(base, mono)
        gpus = tuple(self._diagnosed(g, now, mono, extra.get(g.identity.uuid)) for g in base)
        with self._lock:
            state = ExporterState(
                nvml_up=self._nvml_up,
                driver_version=self._driver_version,
                nvml_errors=dict(self._errors),
                timeouts=dict(self._timeouts),
                served_timeouts=self._timeouts_served.served(self._timeouts, mono),
                invalid_readings=dict(self._invalid),
                last_collect_timestamp=self._wall(),
                journal_up=self._journal_up(),
                sxids=self.xids.sxids(),
                workloads_dropped=None if self.workloads is None else self.workloads.dropped,
                workload_errors={} if self.workloads is None else self.workloads.errors_total(),
                pci_devices=self._pci_devices,
                expected_gpus=self.expected_gpus,
            )
        return Snapshot(gpus=gpus, state=state, taken_at=self._clock())

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

    def wait_journal(self, timeout: float) -> bool:
        """Wait for the journal backfill; True if the journal could be read."""
        j = self._journal
        return j is not None and j.done_backfill.wait(timeout) and j.available

    def _journal_up(self) -> bool | None:
        j = self._journal
        if j is None:
            return False
        return j.available if j.done_backfill.is_set() else None

    def _model(self, base: list[GpuSnapshot], mono: float) -> dict[str, Values]:
        """The thermal model and risk series of the GPUs that answered (thermal.py)."""
        if self._peers is None:
            return {}
        samples = []
        for g in base:  # (a stale GPU's last good values count again: its series do not come and go)
            if g.up and g.identity.uuid:
                xids = {code: count for code, (count, _) in self.xids.series(g.identity.uuid).items()}
                samples.append(sample_of(g.identity.uuid, g.identity.name, g.values, xids))
        return self._peers.update(mono, samples)

    def _diagnosed(self, g: GpuSnapshot, now: float, mono: float, extra: Values | None = None) -> GpuSnapshot:
        """Add Xid series and the diagnosis; these stay on the page while the GPU is lost."""
        uuid = g.identity.uuid
        if not uuid:
            return g
        prev, prev_at = self._prev.get(uuid, (None, 0.0))  # (by UUID: indices move after a reset)
        if g.up and not g.stale:
            self._prev[uuid] = (g, mono)
        history = self.xids.history(uuid)
        view = self._history_view(g, prev, now, mono) if self.history is not None else None
        if view is not None:
            history = history + view.past  # the repeat rules see earlier boots' Xids too
        d = diagnose(g, history, prev if g.up else None, mono - prev_at, now,
                     view.findings if view is not None else ())
        values: Values = dict(g.values)  # the series below are new dicts; the GPU's own are not changed
        if view is not None:
            values["nvidia_gpu_incidents_total"] = view.incidents
            if view.intervals:  # (from a GPU's second incident on: few series on healthy GPUs)
                values["nvidia_gpu_incident_interval_seconds"] = view.intervals
        for code, (count, last) in sorted(self.xids.series(uuid).items()):
            values.setdefault("nvidia_gpu_xid_errors_total", {})[(str(code),)] = count
            values.setdefault("nvidia_gpu_xid_last_timestamp_seconds", {})[(str(code),)] = last
        for name, count in sorted(self.xids.events(uuid).items()):
            values.setdefault("nvidia_gpu_nvml_events_total", {})[(name,)] = float(count)
        values.update(d.series)
        if extra and g.up:
            values.update(extra)
        if self.workloads is not None and (workloads := self.workloads.series(g.identity)):
            values["nvidia_gpu_workload_info"] = workloads
        if self._sparse:
            reveal = self._reveals.get(uuid)
            if reveal is None:
                reveal = self._reveals[uuid] = Reveal(per_link=self._nvlink_per_link)
            reveal.apply(values, mono, g.up)
        return GpuSnapshot(identity=g.identity, up=g.up, values=values, errors=g.errors, stale=g.stale,
                           collect_seconds=g.collect_seconds, diagnosis=d)

    # -- the persistent incident history ------------------------------------------------------------
    def _to_history(self, event: XidEvent) -> None:
        assert self.history is not None
        try:
            self.history.record_xid(event.uuid, event.code, event.timestamp, event.message)
        except HistoryError as e:
            log.error("could not record an Xid in the incident history", extra={"error": str(e)})

    def _reset_acknowledged(self, uuid: str, ts: float, line: str, ok: bool = True) -> None:
        assert self.history is not None
        try:
            if ok:
                self.history.record_reset(uuid, ts, f"acknowledged: {line}")
            else:
                self.history.record_reset_failed(uuid, ts, line)
        except HistoryError as e:
            log.error("could not record a GPU reset in the incident history", extra={"error": str(e)})

    def _history_view(self, g: GpuSnapshot, prev: GpuSnapshot | None, now: float, mono: float) -> _HistoryView:
        """What the history says of this GPU: its escalations, its counts, and its Xids from before this
        process started. Remade when the history changed, and each minute (windows move); a GPU reset
        seen in the counters and remap counters that went up are recorded first."""
        history = self.history
        assert history is not None
        uuid = g.identity.uuid
        try:
            if mono - self._refreshed_at >= HISTORY_REFRESH_SECONDS:
                self._refreshed_at = mono
                history.refresh()  # e.g. `nvml-exporter history clear` from another process
            if g.up and prev is not None and prev.identity.uuid == uuid:
                energy, before = g.value(_ENERGY), prev.value(_ENERGY)
                if energy is not None and before is not None and energy < before:
                    history.record_reset(uuid, now, "counters went back to zero (energy counter)")
            remap = tuple(g.values.get(name) for name in _REMAP)
            if g.up and remap[0] is not None and self._remaps.get(uuid) != remap:
                self._remaps[uuid] = remap
                counts = {f"rows_{k[0]}": v for k, v in (remap[0] or {}).items()}
                counts.update({name[len("nvidia_gpu_remapped_rows_"):]: next(iter(m.values()))
                               for name, m in zip(_REMAP[1:], remap[1:], strict=True) if m})
                history.observe_remap(uuid, counts, now)
        except HistoryError as e:
            log.error("could not record in the incident history", extra={"error": str(e)})
        key = (history.version, int(now // 60))
        kept = self._views.get(uuid)
        if kept is not None and kept[0] == key:
            return kept[1]
        findings = tuple(Finding("history", f.status, f.action, f.reason) for f in history.assess(uuid, now))
        past = tuple(XidEvent(uuid, code, ts, "history", message)
                     for code, ts, message in history.xid_events(uuid, self.xids.started_at, now - DAY))
        incidents, intervals = history.counts(uuid)
        view = _HistoryView(findings, past, {(k,): v for k, v in incidents.items()},
                            {(k,): v for k, v in intervals.items()} if intervals["count"] else {})
        self._views[uuid] = (key, view)
        return view


HISTORY_REFRESH_SECONDS = 5.0
# What a GPU the agent asked the exporter to let go of serves besides `up 0` (one series: the reason).
_RELEASED: Values = {"nvidia_gpu_released": {(): 1.0}}


class ReleaseError(Exception):
    """A release or reacquire that could not be done (safely): the control socket answers it as an error."""
_ENERGY = "nvidia_gpu_energy_joules_total"
_REMAP = ("nvidia_gpu_remapped_rows", "nvidia_gpu_remapped_rows_pending", "nvidia_gpu_remapped_rows_failed")


@dataclass(frozen=True)
class _HistoryView:
    findings: tuple[Finding, ...]
    past: tuple[XidEvent, ...]
    incidents: dict[tuple[str, ...], float]
    intervals: dict[tuple[str, ...], float]
