"""Fault isolation, each against the real exporter process and the fake driver library."""

from __future__ import annotations

import concurrent.futures
import http.client
import shutil
import time
from pathlib import Path

from tests.conftest import gpu_series, samples, wait_for
from tests.fakenvml.scenario import LIBRARY, FakeNvml, h100_node


def test_lost_gpu_goes_down_alone_and_comes_back_by_uuid(fake: FakeNvml, start_exporter) -> None:
    exp = start_exporter(fake, "--collect.min-interval=10ms")
    uuid3 = fake.state["gpu.3.uuid"]
    before = exp.metrics()
    assert len(gpu_series(before, 3)) > 40
    fake.gpu(3, lost=1)  # NVML 15 on every call and handle lookup of GPU 3
    page = wait_for(lambda: (p := exp.metrics()) and f'nvidia_gpu_up{{gpu="3",uuid="{uuid3}"}} 0' in p and p)
    lost = gpu_series(page, 3)
    # only up (0), identity and the diagnosis remain for the lost GPU
    assert set(k.split("{")[0] for k in lost) == {"nvidia_gpu_up", "nvidia_gpu_info", "nvidia_gpu_health",
                                                  "nvidia_gpu_recommended_action"}
    assert lost[f'nvidia_gpu_health{{gpu="3",uuid="{uuid3}",check="availability"}}'] == 2
    assert lost[f'nvidia_gpu_recommended_action{{gpu="3",uuid="{uuid3}",action="reboot_node"}}'] == 1
    for other in (0, 1, 2, 4, 5, 6, 7):  # the rest keep serving everything
        assert samples(page)[f'nvidia_gpu_up{{gpu="{other}",uuid="{fake.state[f"gpu.{other}.uuid"]}"}}'] == 1
        assert len(gpu_series(page, other)) == len(gpu_series(before, other))
    errors = 'nvml_exporter_nvml_errors_total{function="nvmlDeviceGetTemperature",error="gpu_is_lost"}'
    assert samples(page)[errors] >= 1
    fake.gpu(3, temp=70)
    fake.unset("gpu.3.lost")
    page = wait_for(lambda: (p := exp.metrics()) and f'nvidia_gpu_up{{gpu="3",uuid="{uuid3}"}} 1' in p and p)
    assert samples(page)[f'nvidia_gpu_temperature_celsius{{gpu="3",uuid="{uuid3}"}}'] == 70
    # every series it had, and the availability check its loss revealed, back at ok (a shown series stays)
    availability = f'nvidia_gpu_health{{gpu="3",uuid="{uuid3}",check="availability"}}'
    assert gpu_series(page, 3).keys() == gpu_series(before, 3).keys() | {availability}
    assert samples(page)[availability] == 0
    assert "GPU is back" in exp.log()


def test_not_supported_is_probed_once_and_omitted(fake: FakeNvml, start_exporter) -> None:
    fake.state = h100_node(1)
    del fake.state["gpu.0.power_mw"]  # the board does not report power
    del fake.state["gpu.0.mem_temp"]  # nor HBM temperature (a field value)
    fake.write()
    exp = start_exporter(fake, "--collect.min-interval=10ms")
    for _ in range(5):
        page = exp.metrics()
        time.sleep(0.02)
    series = gpu_series(page, 0)
    assert not any(k.startswith(("nvidia_gpu_power_watts{", "nvidia_gpu_memory_temperature_celsius{")) for k in series)
    assert any(k.startswith("nvidia_gpu_temperature_celsius{") for k in series)
    counts = fake.counts()
    assert counts["nvmlDeviceGetPowerUsage"] == 1
    assert counts["nvmlDeviceGetTemperature"] >= 5
    errors = 'nvml_exporter_nvml_errors_total{function="nvmlDeviceGetPowerUsage",error="not_supported"}'
    assert samples(page)[errors] == 1


def test_no_library_at_start_serves_nvml_down_and_retries(tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    lib = tmp_path / "driver" / "libnvidia-ml.so.1"
    env = {"FAKE_NVML_STATE": str(fake.state_path)}  # no LD_LIBRARY_PATH: nothing to load yet
    exp = start_exporter(None, f"--nvml.library={lib}", env=env)
    page = exp.metrics()
    assert samples(page)["nvml_exporter_nvml_up"] == 0
    assert "nvidia_gpu_up" not in page
    assert exp.get("/-/ready")[0] == 503
    lib.parent.mkdir()
    shutil.copy(LIBRARY, lib)  # the driver gets installed
    page = wait_for(lambda: (p := exp.metrics()) and samples(p)["nvml_exporter_nvml_up"] == 1 and p, timeout=30)
    assert page.count("nvidia_gpu_up{") == 8
    wait_for(lambda: exp.get("/-/ready")[0] == 200)  # once the Xid events are registered too


def test_driver_not_loaded_then_loaded(fake: FakeNvml, start_exporter) -> None:
    fake.set(init_error=9)
    exp = start_exporter(fake)
    failed = 'nvml_exporter_nvml_errors_total{function="nvmlInit",error="driver_not_loaded"}'
    wait_for(lambda: samples(exp.metrics()).get(failed, 0) >= 1)  # (the first init attempt may still run)
    page = exp.metrics()
    assert samples(page)["nvml_exporter_nvml_up"] == 0
    assert samples(page)[failed] >= 1
    fake.unset("init_error")
    wait_for(lambda: samples(exp.metrics())["nvml_exporter_nvml_up"] == 1, timeout=30)


def test_hung_call_never_holds_a_scrape_past_its_deadline(fake: FakeNvml, start_exporter) -> None:
    exp = start_exporter(fake, "--collect.min-interval=10ms", "--collect.timeout=1s")
    uuid2, uuid5 = fake.state["gpu.2.uuid"], fake.state["gpu.5.uuid"]
    assert samples(exp.metrics())[f'nvidia_gpu_temperature_celsius{{gpu="2",uuid="{uuid2}"}}'] == 62
    # GPU 2's temperature call now hangs for 30 s and its reading changes; GPU 5 changes too
    before = fake.counts()["nvmlDeviceGetTemperature"]
    fake.set({"gpu.2.latency_us.nvmlDeviceGetTemperature": 30_000_000, "gpu.2.temp": 80, "gpu.5.temp": 81})
    time.sleep(0.05)  # past --collect.min-interval, so the next scrape collects
    # the client's 20 s socket timeout is the bound: a scrape that waited for the 30 s hang would fail
    conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=20)  # kept alive, as Prometheus does
    conn.request("GET", "/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"})
    response = conn.getresponse()
    page = response.read().decode()
    # The hung call holds the thread that had this connection: the page closes it, so that the next
    # scrape comes on a new connection rather than wait behind the hang.
    assert (response.status, response.getheader("Connection")) == (200, "close")
    conn.close()
    s = samples(page)
    assert s[f'nvidia_gpu_temperature_celsius{{gpu="2",uuid="{uuid2}"}}'] == 62  # last good value
    assert s[f'nvidia_gpu_up{{gpu="2",uuid="{uuid2}"}}'] == 1
    assert s[f'nvidia_gpu_temperature_celsius{{gpu="5",uuid="{uuid5}"}}'] == 81  # others are fresh
    # a GPU's timeout counter appears with its first timeout, served at 0 first so that increase() counts it
    assert s['nvml_exporter_collect_timeouts_total{gpu="2"}'] == 0
    assert 'nvml_exporter_collect_timeouts_total{gpu="5"}' not in s
    # without the header, --collect.timeout bounds it; the hung worker is not asked again meanwhile
    time.sleep(1.0)  # (past the second the new counter is held at 0)
    # again a 20 s socket timeout, well inside the ~28 s the hang has left
    status, page = exp.get("/metrics", timeout=20)
    assert status == 200, page
    s = samples(page)
    assert s['nvml_exporter_collect_timeouts_total{gpu="2"}'] == 2
    # two collections: the 7 healthy GPUs twice, the hung one once (its worker is not asked again)
    assert fake.counts()["nvmlDeviceGetTemperature"] - before == 7 * 2 + 1


def test_sentinel_values_are_dropped_and_counted(fake: FakeNvml, start_exporter) -> None:
    fake.gpu(1, temp=0xFFFFFFFF, util_gpu=250)  # NVML's "not available" and an impossible 250 %
    page = start_exporter(fake, wait_ready=True).metrics()
    uuid1 = fake.state["gpu.1.uuid"]
    s = samples(page)
    assert f'nvidia_gpu_temperature_celsius{{gpu="1",uuid="{uuid1}"}}' not in s
    assert f'nvidia_gpu_utilization_ratio{{gpu="1",uuid="{uuid1}"}}' not in s
    assert s[f'nvidia_gpu_memory_utilization_ratio{{gpu="1",uuid="{uuid1}"}}'] == 0.61
    assert s['nvml_exporter_invalid_readings_total{metric="nvidia_gpu_temperature_celsius"}'] == 1
    assert s['nvml_exporter_invalid_readings_total{metric="nvidia_gpu_utilization_ratio"}'] == 1
    assert "4294967295" not in page


def test_concurrent_scrapes_share_one_collection(fake: FakeNvml, start_exporter) -> None:
    fake.set({"latency_us.nvmlDeviceGetTemperature": 300_000})  # make a collection last a while
    exp = start_exporter(fake, "--collect.min-interval=5s")
    exp.metrics()
    before = fake.counts()["nvmlDeviceGetTemperature"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        pages = list(pool.map(lambda _: exp.metrics(), range(20)))
    assert all("nvidia_gpu_up" in p for p in pages)
    # 20 scrapes within min-interval of the first collection: no further NVML reads at all
    assert fake.counts()["nvmlDeviceGetTemperature"] == before


def test_slow_data_is_cached_between_slow_refreshes(fake: FakeNvml, start_exporter) -> None:
    fake.state = h100_node(1)
    fake.write()
    exp = start_exporter(fake, "--collect.min-interval=10ms", "--collect.slow-interval=1h")
    for _ in range(4):
        exp.metrics()
        time.sleep(0.02)
    counts = fake.counts()
    assert counts["nvmlDeviceGetTemperature"] >= 4
    assert counts["nvmlDeviceGetTemperatureThreshold"] == 4  # 4 thresholds, read once
    assert counts["nvmlDeviceGetName"] == 1 and counts["nvmlDeviceGetMaxClockInfo"] == 2  # sm, memory
    assert counts["nvmlDeviceGetNvLinkState"] == 19  # 18 links + the probe past the last, once
