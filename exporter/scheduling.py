"""Scheduling of collections: which thread reads which GPU, and until when. No NVML here: the reads are
the reader's (reading.py), the snapshot is assembled by the collector (collector.py).

- Single flight: concurrent scrapes share one collection, and a scrape within `min_interval` of the last
  collection is served from it. One that waits on another scrape's collection past FOLLOWER_WAIT is
  served the last good values instead.
- Deadlines: a collection ends by its deadline whatever the driver does. A GPU whose read missed it is
  served stale (its last good values) and counted in `timeouts`; a read still running (hung) is not
  started again until it returns.
- Per-GPU workers: where calls are slow, each GPU is read by its own daemon thread, so the calls overlap.
- The fast path, for drivers that answer in microseconds (`sweepable`): the GPUs are read one after
  another by one thread, a sweep; the work is Python, and threads reading in parallel would only hand
  the GIL to each other. For a scrape (`collect_into`) the sweep runs in the scrape's own thread, watched
  by the hung-call watchdog (thread "nvml-watchdog", on a ScrapeTimer): where a driver call holds that
  thread past SWEEP_PATIENCE, the watchdog takes the collection over and answers the scrape in its place.
  For other callers (`collect`) the sweep runs on the sweep thread, so theirs never makes a driver call.
  GPUs the sweep has not started within SWEEP_PATIENCE go to their own workers.

The fast path pays only where the driver answers in microseconds (the fake library; make bench's 0 µs
cases): a real H200's energy counter takes ~2.8 ms, so its GPUs are read by their workers and the sweep
and the watchdog stay idle. It is kept (docs/performance.md) because tests/test_collector.py holds the
exporter to it: a scrape over fast GPUs makes no thread switch, and a call hung in it is answered in time.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .snapshot import Deliver, Snapshot
from .timer import ScrapeTimer

log = logging.getLogger("nvml_exporter.scheduling")

FAST_CALL = 50e-6  # seconds: a GPU whose quickest call is faster than this is read by the sweep,
SLOW_FIELDS = 1e-3  # unless the driver says its field values took longer than this (the energy counter)
SWEEP_PATIENCE = 0.05  # seconds: GPUs the sweep has not started by then are read by their own threads
FOLLOWER_WAIT = 1.0  # seconds a scrape waits for another scrape's collection before serving what is known


class Timed(Protocol):
    """What the driver costs, as a GPU's reader measured it on its last read (nvml.GpuReader)."""

    @property
    def fastest_call(self) -> float: ...

    @property
    def field_seconds(self) -> float: ...


class Readable(Protocol):
    """A GPU as the scheduler sees it (reading.Gpu)."""

    @property
    def index(self) -> int: ...  # its slot: stable for the process's life, unlike the NVML index

    @property
    def read_started(self) -> float | None: ...  # not None while a read of it runs

    @property
    def reader(self) -> Timed | None: ...


G = TypeVar("G", bound=Readable)


def sweepable(reader: Timed | None) -> bool:
    """Whether the sweep reads this GPU: its driver answers in microseconds, field values included."""
    return reader is not None and reader.fastest_call < FAST_CALL and reader.field_seconds < SLOW_FIELDS


class _Worker:
    """One daemon thread. Daemon, unlike ThreadPoolExecutor's: a driver call that never returns must not
    keep the process from exiting on SIGTERM."""

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
class _Slot:
    """A GPU's scheduling state, touched only by whoever runs the collection (single flight: the thread
    that started it, or the watchdog once it took it over)."""

    worker: _Worker | None = None  # started the first time this GPU is read on its own
    inflight: Future[None] | None = None  # its read queued or running on the worker


class _Sweep(Generic[G]):
    """One pass over the fast GPUs, in order, by the sweep thread or a scrape's own thread. The collection
    (or the watchdog) can take back the GPUs it has not started yet; `finished` is held until the pass
    ends (a plain lock: a Future per GPU cost more than reading a GPU)."""

    def __init__(self, gpus: list[G]):
        self._lock = threading.Lock()
        self._todo = gpus[::-1]  # popped from the end; _lock
        self.current: G | None = None  # the GPU being read; written by the sweeping thread only
        self.error: BaseException | None = None  # set once, before `finished` is released
        self.done = False  # set once, before `finished` is released
        self.finished = threading.Lock()
        self.finished.acquire()

    def run(self, read: Callable[[G], None]) -> None:
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

    def take_back(self) -> list[G]:
        with self._lock:
            rest, self._todo = self._todo[::-1], []
        return rest

    def wait(self, timeout: float) -> bool:
        if self.finished.acquire(timeout=max(0.0, timeout)):
            self.finished.release()
        return self.done


@dataclass
class _Work(Generic[G]):
    """A collection's reads once started: what the one who finishes it waits for."""

    gpus: list[G]
    sweep: _Sweep[G] | None
    pending: dict[int, Future[None]]  # GPUs read on their own threads, by slot
    deadline: float


class _Flight:
    """One collection in progress: its result for the scrapes that share it, and who finishes it (the
    thread that started it, or the watchdog where a driver call holds that thread)."""

    def __init__(self) -> None:
        self.future: Future[Snapshot] = Future()
        self.delivered = threading.Event()  # set once the watchdog has delivered it, where it took it over
        self._claim = threading.Lock()
        self._claimed = False  # _claim

    def claim(self, unless_done: _Sweep[G] | None = None) -> bool:
        """True for the first to ask (the watchdog passes the sweep: only while it is still reading)."""
        with self._claim:
            if self._claimed or (unless_done is not None and unless_done.done):
                return False
            self._claimed = True
            return True


class Scheduler(Generic[G]):
    """Runs collections: `gpus()` lists the GPUs, `read(gpu)` reads one (never raising for a driver error:
    it records it), `snapshot(stale)` makes the collection's snapshot, with the slots in `stale` served
    from their last good values."""

    def __init__(self, gpus: Callable[[], list[G]], read: Callable[[G], None],
                 snapshot: Callable[[set[int]], Snapshot], *, min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._gpus = gpus
        self._read = read
        self._snapshot = snapshot
        self._min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Snapshot | None = None  # _lock
        self._inflight: _Flight | None = None  # _lock
        self._timeouts: Counter[str] = Counter()  # by slot; _lock
        # the collection whose sweep runs in a scrape's thread, with what the watchdog needs to finish it; _lock
        self._watched: tuple[_Flight, _Work[G], Deliver] | None = None
        self._timer = ScrapeTimer.create()  # _lock (the watchdog closes it on stop)
        self._slots: dict[int, _Slot] = {}  # created under _lock; each slot: see _Slot
        self._sweep: _Sweep[G] | None = None  # the last sweep; written by the collection's leader
        self._sweeper = _Worker("nvml-sweep")
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._timer is not None:
            self._watchdog = threading.Thread(target=self._watchdog_loop, name="nvml-watchdog", daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        self._sweeper.shutdown()
        with self._lock:
            self._watched = None
            if self._watchdog is not None and self._timer is not None:
                self._timer.set(0)  # wakes the watchdog, which sees the stop and closes the timer
            slots = list(self._slots.values())
        for slot in slots:
            if slot.worker is not None:
                slot.worker.shutdown()

    def forget(self) -> None:
        """The next collection reads afresh, however recent the last one (a release: say so at once)."""
        with self._lock:
            self._last = None

    def timeouts(self) -> dict[str, int]:
        """Collections each GPU (by slot) missed the deadline of."""
        with self._lock:
            return dict(self._timeouts)

    # -- collections -----------------------------------------------------------------------------
    def collect(self, timeout: float) -> Snapshot:
        """A snapshot no older than min_interval, within `timeout` seconds whatever the driver does: fast
        GPUs are read on the sweep thread, not this one."""
        got: list[Snapshot] = []
        self._run(timeout, lambda snap, _taken_over: got.append(snap), inline=False)
        return got[0]

    def collect_into(self, timeout: float, deliver: Deliver) -> bool:
        """Collect as collect() does, but hand the snapshot to deliver(snapshot, taken_over), exactly once
        and within `timeout` seconds, reading the fast GPUs in this thread: a scrape then costs no thread
        switches. Where a driver call holds this thread past SWEEP_PATIENCE, the watchdog takes the
        collection over and delivers it (taken_over=True) by the deadline, while this thread waits for
        the call; it returns False then, once that delivery is done."""
        return self._run(timeout, deliver, inline=self._watchdog is not None)

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

    def _slot(self, gpu: G) -> _Slot:
        slot = self._slots.get(gpu.index)
        if slot is None:
            with self._lock:
                slot = self._slots.setdefault(gpu.index, _Slot())
        return slot

    def _on_worker(self, gpu: G, slot: _Slot) -> Future[None]:
        if slot.worker is None:
            slot.worker = _Worker(f"gpu{gpu.index}")
        slot.inflight = slot.worker.submit(functools.partial(self._read, gpu))
        return slot.inflight

    def _start(self, flight: _Flight, deadline: float, deliver: Deliver, inline: bool) -> _Work[G]:
        """Start every GPU's read; read the fast ones (here, or on the sweep thread) for up to
        SWEEP_PATIENCE."""
        gpus = self._gpus()
        last_sweep = self._sweep
        sweep_free = last_sweep is None or last_sweep.done  # a sweep still running is stuck in a hung call
        swept: list[G] = []
        work: _Work[G] = _Work(gpus, None, {}, deadline)
        for gpu in gpus:
            if gpu.read_started is not None:
                continue  # a read still running (hung) is left alone; the GPU is served stale
            slot = self._slot(gpu)
            # A read still queued on the GPU's own thread is taken back and queued anew.
            if slot.inflight is not None and not slot.inflight.done() and not slot.inflight.cancel():
                continue
            slot.inflight = None
            if sweep_free and sweepable(gpu.reader):
                swept.append(gpu)
            else:
                work.pending[gpu.index] = self._on_worker(gpu, slot)
        if not swept:
            return work
        sweep = work.sweep = self._sweep = _Sweep(swept)
        patience = min(SWEEP_PATIENCE, deadline - self._clock())
        if inline and self._watch((flight, work, deliver), patience):
            sweep.run(self._read)
            self._unwatch(flight)
        else:
            self._sweeper.post(functools.partial(sweep.run, self._read))
            sweep.wait(patience)
        return work

    def _finish(self, flight: _Flight, work: _Work[G], deliver: Deliver, taken_over: bool) -> None:
        try:
            snap = self._complete(work)
        except BaseException as e:
            self._end(flight, None, e)
            raise
        self._end(flight, snap, None)
        deliver(snap, taken_over)

    def _complete(self, work: _Work[G]) -> Snapshot:
        """Wait for the reads until the deadline; a snapshot with the GPUs that missed it served stale."""
        deadline, pending, sweep = work.deadline, work.pending, work.sweep
        if sweep is not None and not sweep.done:
            for gpu in sweep.take_back():  # not started by the sweep yet: each on its own thread now
                pending[gpu.index] = self._on_worker(gpu, self._slot(gpu))
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
        if snap is not None:
            flight.future.set_result(snap)
        else:
            flight.future.set_exception(error)
        with self._lock:
            if snap is not None:
                self._last = snap
            self._inflight = None

    # -- the hung-call watchdog over a sweep read in the scrape's own thread ------------------------
    def _watch(self, watched: tuple[_Flight, _Work[G], Deliver], patience: float) -> bool:
        """Set the timer for this collection; False once the scheduler is stopping (the timer closes)."""
        with self._lock:
            if self._stop.is_set() or self._timer is None:
                return False
            self._watched = watched
            self._timer.set(patience)
            return True

    def _unwatch(self, flight: _Flight) -> None:
        """Cancel the timer, unless a newer collection set it (this thread may come back from a hung
        call long after its collection was taken over)."""
        with self._lock:
            if self._watched is not None and self._watched[0] is flight:
                self._watched = None
                assert self._timer is not None
                self._timer.cancel()

    def _watchdog_loop(self) -> None:
        timer = self._timer
        assert timer is not None
        try:
            while True:
                timer.wait()
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
            with self._lock:  # (_watch sees the stop under this lock, and sets the timer no more)
                self._timer = None
                timer.close()
