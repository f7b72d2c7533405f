"""Xids through the real exporter: NVML events, journal backfill, bursts, and a GPU that comes back."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from nvml_exporter.nvml import events
from nvml_exporter.xidstore import XidStore
from tests.conftest import collector_over, samples, wait_for
from tests.fakenvml.scenario import FakeNvml, h100_node
from tests.journal import write_journal, xid_line

__all__ = ["journal_with_xids"]


def series(fake: FakeNvml, gpu: int, xid: int, metric: str = "nvidia_gpu_xid_errors_total") -> str:
    return f'{metric}{{gpu="{gpu}",uuid="{fake.state[f"gpu.{gpu}.uuid"]}",xid="{xid}"}}'


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_xid79_shows_while_a_scrape_is_in_flight(fake: FakeNvml, start_exporter) -> None:
    exp = start_exporter(fake, "--collect.min-interval=10ms", "--no-xid.journal", wait_ready=True)
    fake.set({"gpu.6.latency_us.nvmlDeviceGetPowerUsage": 6_000_000})  # GPU 6 answers slowly from now on
    time.sleep(0.05)
    slow = threading.Thread(target=lambda: exp.metrics(headers={"X-Prometheus-Scrape-Timeout-Seconds": "10"}))
    slow.start()
    time.sleep(0.2)
    assert slow.is_alive()  # a scrape is in flight, waiting on GPU 6
    xid_at = time.time()
    fake.xid(1, 79)
    # the series appears while that scrape is still in flight (it does not hold the watcher up); its count next
    wait_for(lambda: series(fake, 1, 79, "nvidia_gpu_xid_last_timestamp_seconds") in exp.get("/metrics", timeout=5)[1],
             timeout=10, interval=0.02)
    assert slow.is_alive()
    slow.join()
    fake.unset("gpu.6.latency_us.nvmlDeviceGetPowerUsage")
    s = samples(str(wait_for(lambda: (p := exp.metrics()) and samples(p).get(series(fake, 1, 79)) == 1 and p)))
    assert xid_at - 1 <= s[series(fake, 1, 79, "nvidia_gpu_xid_last_timestamp_seconds")] <= time.time()  # its own
    assert not any(k.startswith("nvidia_gpu_xid_errors_total") and 'gpu="1"' not in k for k in s)
    assert s[f'nvidia_gpu_health{{gpu="1",uuid="{fake.state["gpu.1.uuid"]}",check="xid"}}'] == 2
    assert s[f'nvidia_gpu_recommended_action{{gpu="1",uuid="{fake.state["gpu.1.uuid"]}",action="reboot_node"}}'] == 1


def test_a_burst_of_1000_xids_is_counted_in_full_with_bounded_memory(fake: FakeNvml, start_exporter) -> None:
    exp = start_exporter(fake, "--collect.min-interval=10ms", "--no-xid.journal", wait_ready=True)
    exp.metrics()
    before = rss_kib(exp.proc.pid)
    with open(fake.events_path, "a") as f:
        f.write("".join(f"{i % 8} 0x8 {(13, 31, 43, 94)[i % 4]}\n" for i in range(1000)))

    def total() -> float:
        return sum(v for k, v in samples(exp.metrics()).items() if k.startswith("nvidia_gpu_xid_errors_total"))

    wait_for(lambda: total() == 1000, timeout=60)
    assert rss_kib(exp.proc.pid) - before < 20 * 1024
    s = samples(exp.metrics())
    assert s[series(fake, 0, 13)] == 125 and s[series(fake, 3, 94)] == 125


def test_event_watcher_recovers_when_a_lost_gpu_returns(fake: FakeNvml, start_exporter) -> None:
    exp = start_exporter(fake, "--collect.min-interval=10ms", "--no-xid.journal", wait_ready=True)
    up2 = f'nvidia_gpu_up{{gpu="2",uuid="{fake.state["gpu.2.uuid"]}"}}'
    fake.gpu(2, lost=1)
    wait_for(lambda: samples(exp.metrics()).get(up2) == 0)
    time.sleep(1.0)  # the watcher notices the lost GPU and starts over without it
    fake.xid(5, 48)  # other GPUs' Xids still arrive while GPU 2 is gone
    wait_for(lambda: series(fake, 5, 48) in exp.metrics())
    fake.unset("gpu.2.lost")
    wait_for(lambda: samples(exp.metrics()).get(up2) == 1)
    time.sleep(2.5)  # re-registration runs every 2 s
    fake.xid(2, 74)
    wait_for(lambda: samples(exp.metrics()).get(series(fake, 2, 74)) == 1, timeout=10)
    assert "registered for NVML events" in exp.log()


def journal_with_xids(tmp_path: Path, now: float) -> Path:
    """Xid 63 on GPU 0 ten minutes ago (before the exporter started); Xid 48 on GPU 0 and 79 on GPU 1 just
    now, which the driver also reports through NVML."""
    return write_journal(tmp_path / "kernel.journal", [
        (now - 600, xid_line("0000:53:00", 63, "Row Remapper: New row marked for remapping, reset gpu to activate.")),
        (now, xid_line("0000:53:00", 48, "An uncorrectable double bit error (DBE) has been detected on GPU "
                                         "in the framebuffer at partition 6, subpartition 0.")),
        (now, xid_line("0000:64:00", 79, "GPU has fallen off the bus.")),
        (now, "NVRM: GPU 0000:64:00.0: GPU has fallen off the bus."),  # not an Xid line
    ])


def test_journal_backfill_counts_once_even_when_nvml_reports_the_same_xids(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    now = time.time()
    journal = journal_with_xids(tmp_path, now)
    exp = start_exporter(fake, "--collect.min-interval=10ms", f"--xid.journal-path={journal}", wait_ready=True)
    # the driver reports the fresh Xids through NVML as well
    fake.xid(0, 48)
    fake.xid(1, 79)
    expected = {series(fake, 0, 48): 1, series(fake, 0, 63): 1, series(fake, 1, 79): 1}
    wait_for(lambda: all(samples(exp.metrics()).get(k) == v for k, v in expected.items()))
    time.sleep(1.5)
    s = samples(exp.metrics())
    assert {k: s[k] for k in expected} == expected
    assert sum(1 for k in s if k.startswith("nvidia_gpu_xid_errors_total")) == 3
    assert s["nvml_exporter_journal_up"] == 1
    assert abs(s[series(fake, 0, 63, "nvidia_gpu_xid_last_timestamp_seconds")] - (now - 600)) < 0.01
    assert s[series(fake, 1, 79, "nvidia_gpu_xid_last_timestamp_seconds")] < time.time() - 1


def test_a_journal_line_written_while_it_runs_is_counted_promptly(tmp_path: Path, fake: FakeNvml,
                                                                   start_exporter) -> None:
    """The follower sleeps on the journal's inotify fd: a new journal file in the directory wakes it."""
    directory = tmp_path / "journal"
    directory.mkdir()
    write_journal(directory / "system.journal", [(time.time() - 60, "an unrelated kernel line")])
    exp = start_exporter(fake, "--collect.min-interval=10ms", f"--xid.journal-path={directory}", wait_ready=True)
    wait_for(lambda: samples(exp.metrics()).get("nvml_exporter_journal_up") == 1)
    time.sleep(1.0)  # the follower is past its backfill and asleep
    write_journal(directory / "system@2.journal", [(time.time(), xid_line("0000:53:00", 31, "MMU Fault"))])
    # asleep on a reliable inotify fd with no timer (get_timeout_ms -1): only the new file's event wakes it,
    # so a line counted at all was counted on that wake-up
    wait_for(lambda: samples(exp.metrics()).get(series(fake, 0, 31)) == 1, timeout=10, interval=0.05)


def test_sigterm_stops_an_idle_exporter_at_once(fake: FakeNvml, start_exporter) -> None:
    """serve_forever waits long between polls (an idle exporter wakes for nothing): the signal ends it."""
    exp = start_exporter(fake, wait_ready=True)
    time.sleep(0.5)
    exp.proc.send_signal(signal.SIGTERM)
    # serve_forever's poll is an hour long: exiting within the 20 s wait means the signal ended it
    assert exp.proc.wait(timeout=20) == 0
    assert "shutting down" in exp.log() and "Traceback" not in exp.log()


def test_without_a_journal_it_says_so_once_and_counts_nvml_events(tmp_path: Path, fake: FakeNvml,
                                                                 start_exporter) -> None:
    exp = start_exporter(fake, f"--xid.journal-path={tmp_path}/no-such-journal", wait_ready=True)
    wait_for(lambda: samples(exp.metrics()).get("nvml_exporter_journal_up") == 0)
    fake.xid(4, 119)
    wait_for(lambda: series(fake, 4, 119) in exp.metrics())
    assert exp.log().count("kernel journal not available") == 1


def test_events_waiting_in_the_set_when_the_watched_gpus_change_are_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher makes its event set anew when the attached GPUs change (one lost, one back): what the
    old set still holds is read first, not dropped with it."""
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    monkeypatch.setattr(events, "RECHECK_SECONDS", 0.0)  # compare the attached GPUs on every pass
    with collector_over(fake, monkeypatch) as collector:
        watched = collector.attached()
        uuid0, uuid1 = fake.state["gpu.0.uuid"], fake.state["gpu.1.uuid"]
        store = XidStore()
        watcher = events.EventWatcher(lambda: dict(watched), store, lambda function, code: None)
        watcher.start()
        try:
            assert watcher.first_registration.wait(5)
            # Each wait now takes 0.4 s after it finds an event, so the second Xid is still in the set
            # when the watcher, back with the first, finds that GPU 1 is gone.
            fake.set({"latency_us.nvmlEventSetWait_v2": 400_000, "latency_us.nvmlEventSetWait": 400_000})
            time.sleep(1.0)  # (a wait begun before that answers at once)
            fake.xid(0, 79)
            fake.xid(0, 48)
            del watched[uuid1]
            wait_for(lambda: set(watcher.registered) == {uuid0}, timeout=10)
            wait_for(lambda: sorted(store.series(uuid0)) == [48, 79], timeout=10)
        finally:
            watcher.stop()
