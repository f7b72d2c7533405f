"""Which thread reads and who answers: a scrape reads fast GPUs in its own thread, and where a driver call
hangs there, the collector's watchdog answers it by its deadline. The real collector, in this process,
over the fake library."""

from __future__ import annotations

import select
import threading
import time
from pathlib import Path

import pytest

from nvml_exporter.snapshot import Snapshot
from nvml_exporter.timer import ScrapeTimer
from tests.conftest import collector_over, wait_for
from tests.fakenvml.scenario import FakeNvml, h100_node

TEMP = "nvidia_gpu_temperature_celsius"


class Deliveries(list):  # type: ignore[type-arg]
    """(snapshot, taken_over, thread name, monotonic time) for each delivery."""

    def __call__(self, snap: Snapshot, taken_over: bool) -> None:
        self.append((snap, taken_over, threading.current_thread().name, time.monotonic()))


def test_a_scrape_reads_fast_gpus_in_its_own_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with collector_over(FakeNvml(tmp_path / "nvml", h100_node(4)), monkeypatch) as collector:
        collector.collect(5.0)  # the first reads learn that this driver answers in microseconds
        readers: list[str] = []
        scheduler = collector._scheduler
        read = scheduler._read
        monkeypatch.setattr(scheduler, "_read", lambda gpu: (readers.append(threading.current_thread().name),
                                                             read(gpu)))
        delivered = Deliveries()
        assert collector.collect_into(5.0, delivered)
        assert readers == ["MainThread"] * 4  # no hand-off to another thread, and back, per scrape
        [(snap, taken_over, thread, _)] = delivered
        assert (taken_over, thread) == (False, "MainThread")
        assert [g.up and not g.stale for g in snap.gpus] == [True] * 4
        # collect() (landing page, systemd watchdog, diagnose) keeps this thread free of driver calls
        readers.clear()
        collector.collect(5.0)
        assert readers == ["nvml-sweep"] * 4


def test_a_call_hung_in_the_scrapes_thread_is_answered_by_the_watchdog_in_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(4))
    with collector_over(fake, monkeypatch) as collector:
        before = collector.collect(5.0).gpus[1].value(TEMP)
        assert before is not None
        # GPU 1's temperature call now takes 2 s; GPUs 1 and 3 run hotter
        fake.set({"gpu.1.latency_us.nvmlDeviceGetTemperature": 2_000_000, "gpu.1.temp": 80, "gpu.3.temp": 81})
        delivered, returned = Deliveries(), []
        scrape = threading.Thread(target=lambda: returned.append(collector.collect_into(0.5, delivered)))
        scrape.start()
        wait_for(lambda: delivered, timeout=10)
        [(snap, taken_over, thread, _)] = delivered
        assert (taken_over, thread) == (True, "nvml-watchdog")
        assert returned == []  # the scrape's own thread still waits for the driver
        # delivered while the 2 s call still hung, not after it: GPU 1 is the last good value (a page made
        # once the call returned would show its new 80), and the GPUs after it are fresh
        assert [g.stale for g in snap.gpus] == [False, True, False, False]
        assert snap.gpus[1].value(TEMP) == before  # last good value
        assert snap.gpus[3].value(TEMP) == 81  # read on its own thread once the watchdog took it back
        assert snap.state.timeouts == {"1": 1}

        # Meanwhile another scrape collects without the hung GPU, in its own thread and in time.
        meanwhile = Deliveries()
        assert collector.collect_into(0.5, meanwhile)
        [(snap, taken_over, thread, _)] = meanwhile
        assert (taken_over, thread) == (False, "MainThread")
        assert [g.stale for g in snap.gpus] == [False, True, False, False]

        scrape.join(timeout=10)
        assert returned == [False] and len(delivered) == 1  # delivered once, by the watchdog
        # The call returned: the next scrape reads GPU 1 again, in its own thread.
        fake.set({"gpu.1.latency_us.nvmlDeviceGetTemperature": 0})
        after = Deliveries()
        assert collector.collect_into(5.0, after)
        [(snap, taken_over, thread, _)] = after
        assert (taken_over, thread, snap.gpus[1].stale, snap.gpus[1].value(TEMP)) == (False, "MainThread", False, 80)


def test_the_scrape_timer_fires_once_when_set_and_not_once_cancelled() -> None:
    timer = ScrapeTimer()
    try:
        timer.set(60)
        assert select.select([timer.fd], [], [], 0.2)[0] == []  # not before its time
        timer.set(0.05)  # set again: the new time replaces the old
        assert select.select([timer.fd], [], [], 5)[0] == [timer.fd]
        timer.wait()  # (fired: reads at once)
        assert select.select([timer.fd], [], [], 0.2)[0] == []  # once
        timer.set(0.05)
        timer.cancel()
        assert select.select([timer.fd], [], [], 0.2)[0] == []
        timer.set(0)  # "now" fires at once rather than cancelling it
        assert select.select([timer.fd], [], [], 5)[0] == [timer.fd]
    finally:
        timer.close()


def test_bindings_without_an_entry_point_lose_that_reading_only(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # nvidia-ml-py 12.535.108, the floor pyproject allows, has neither nvmlDeviceGetMarginTemperature nor
    # NVMLLibraryMismatchError: the GPUs are read all the same, without the margin.
    import pynvml

    monkeypatch.delattr(pynvml, "nvmlDeviceGetMarginTemperature")
    monkeypatch.delattr(pynvml, "NVMLLibraryMismatchError")
    from nvml_exporter.nvml import reader

    monkeypatch.setattr(reader, "_MISSING", (AttributeError, AttributeError), raising=False)  # (as computed there)
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    with collector_over(fake, monkeypatch) as collector:
        snap = collector.collect(5.0)
    assert [g.up for g in snap.gpus] == [True, True]
    for g in snap.gpus:
        assert g.value(TEMP) is not None and g.value("nvidia_gpu_memory_used_bytes") is not None
        assert "nvidia_gpu_temperature_margin_celsius" not in g.values
