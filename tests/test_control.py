"""The exporter's control socket (issue 17, item 2): the node agent has the exporter release NVML before a
GPU reset and reacquire it after; while released the exporter makes no NVML call and serves `up 0` with
the reason (nvidia_gpu_released), not a fault."""

from __future__ import annotations

import ctypes
import os
import stat
import time
from pathlib import Path

import pytest

from nvml_exporter import control
from tests.conftest import samples, wait_for
from tests.fakenvml.scenario import LIBRARY, FakeNvml, h100_node


def nvml_calls(fake: FakeNvml) -> int:
    return sum(n for name, n in fake.counts().items() if name != "nvmlErrorString")


def test_release_all_shuts_nvml_down_and_reacquire_brings_it_back(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    sock = tmp_path / "run" / "control.sock"
    sock.parent.mkdir()
    exp = start_exporter(fake, "--collect.min-interval=10ms", f"--control.socket={sock}", wait_ready=True)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    uuids = [fake.state[f"gpu.{i}.uuid"] for i in range(2)]
    assert control.request(str(sock), "status") == "released=none"

    assert control.request(str(sock), "release all") == "released all (NVML shut down)"
    assert fake.counts()["nvmlShutdown"] >= 1
    page = exp.metrics()
    s = samples(page)
    assert s["nvml_exporter_nvml_up"] == 0
    for i, u in enumerate(uuids):
        assert s[f'nvidia_gpu_up{{gpu="{i}",uuid="{u}"}}'] == 0
        assert s[f'nvidia_gpu_released{{gpu="{i}",uuid="{u}"}}'] == 1
        assert f'nvidia_gpu_temperature_celsius{{gpu="{i}"' not in page
        # let go on purpose: not a lost GPU, so no reboot recommended to whoever acts on the page
        assert s.get(f'nvidia_gpu_recommended_action{{gpu="{i}",uuid="{u}",action="reboot_node"}}', 0) == 0
    assert control.request(str(sock), "status") == "released=all"
    calls = nvml_calls(fake)
    for _ in range(5):
        exp.metrics()
        time.sleep(0.05)
    time.sleep(2.5)  # the event thread's re-check interval: it must stay off NVML too
    assert nvml_calls(fake) == calls  # released: not one driver call

    assert control.request(str(sock), "reacquire") == "reacquired"
    page = exp.metrics()
    s = samples(page)
    assert s["nvml_exporter_nvml_up"] == 1
    for i, u in enumerate(uuids):
        assert s[f'nvidia_gpu_up{{gpu="{i}",uuid="{u}"}}'] == 1
    assert "nvidia_gpu_released{" not in page
    fake.xid(1, 79)  # the event thread registered again
    wait_for(lambda: 'nvidia_gpu_xid_errors_total{gpu="1"' in exp.metrics() and "xid=\"79\"" in exp.metrics())


def test_release_one_gpu_others_keep_serving(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    sock = tmp_path / "control.sock"
    exp = start_exporter(fake, "--collect.min-interval=10ms", f"--control.socket={sock}", wait_ready=True)
    uuids = [fake.state[f"gpu.{i}.uuid"] for i in range(2)]
    assert control.request(str(sock), f"release {uuids[1]}") == f"released {uuids[1]}"
    s = samples(exp.metrics())
    assert s[f'nvidia_gpu_up{{gpu="0",uuid="{uuids[0]}"}}'] == 1
    assert s[f'nvidia_gpu_temperature_celsius{{gpu="0",uuid="{uuids[0]}"}}'] > 0
    assert s[f'nvidia_gpu_up{{gpu="1",uuid="{uuids[1]}"}}'] == 0
    assert s[f'nvidia_gpu_released{{gpu="1",uuid="{uuids[1]}"}}'] == 1
    assert s["nvml_exporter_nvml_up"] == 1
    control.request(str(sock), "reacquire")
    wait_for(lambda: samples(exp.metrics()).get(f'nvidia_gpu_up{{gpu="1",uuid="{uuids[1]}"}}') == 1)


def test_bad_requests_are_refused_and_the_exporter_keeps_serving(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(1))
    sock = tmp_path / "control.sock"
    exp = start_exporter(fake, f"--control.socket={sock}", wait_ready=True)
    for bad, why in (("reboot", "usage"), ("release GPU-00000000-0000-0000-0000-000000000000", "no GPU with uuid"),
                     ("release ../../etc", "usage"), ("", "usage")):
        with pytest.raises(control.ControlError, match=why):
            control.request(str(sock), bad)
    assert samples(exp.metrics())["nvml_exporter_nvml_up"] == 1


def test_peer_credentials_are_checked(tmp_path: Path) -> None:
    """Only root, the exporter's own user and named users are served: SO_PEERCRED, whatever the file mode."""
    calls: list[str | None] = []
    server = control.ControlServer(str(tmp_path / "c.sock"), lambda u: calls.append(u) or "released",
                                   lambda: "reacquired", lambda: [])
    server._allowed = {os.geteuid() + 4242}  # this test's user is not among them
    server.start()
    try:
        with pytest.raises(control.ControlError, match="not allowed"):
            control.request(str(tmp_path / "c.sock"), "release all")
        assert calls == []
    finally:
        server.stop()
    assert not (tmp_path / "c.sock").exists()


def test_control_socket_flag_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(control.ControlError, match="not a socket"):
        control.ControlServer(str(tmp_path / "file"), lambda u: "", lambda: "", lambda: [])
    with pytest.raises(control.ControlError, match="no such user"):
        control.resolve_users(["no-such-user-nvml-test"])
    assert control.default_path() == "" or os.environ.get("RUNTIME_DIRECTORY")


def test_release_refused_while_a_driver_call_hangs_leaves_everything_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that does not return: the release says so and nothing is let go (a reset must not run)."""
    from nvml_exporter.collector import ReleaseError
    from tests.conftest import collector_over

    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    with collector_over(fake, monkeypatch) as collector:
        lib = ctypes.CDLL(str(LIBRARY))  # the same library the collector loaded: its in-process counters
        lib.fakeNvmlCallCount.restype = ctypes.c_ulonglong
        shutdowns = lib.fakeNvmlCallCount(b"nvmlShutdown")  # (other tests of this process called it)
        fake.gpu(1, **{"latency_us.nvmlDeviceGetTemperature": 3_000_000})  # GPU 1 hangs for 3 s per read
        collector.collect(0.3)  # leaves GPU 1's read running
        with pytest.raises(ReleaseError, match="has not returned"):
            collector.release(None, timeout=0.5)
        assert collector.released() == []
        fake.unset("gpu.1.latency_us.nvmlDeviceGetTemperature")
        time.sleep(3)
        snap = collector.collect(5.0)
        assert snap.state.nvml_up and all(g.up for g in snap.gpus)
        assert lib.fakeNvmlCallCount(b"nvmlShutdown") == shutdowns
