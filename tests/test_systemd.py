"""systemd integration without systemd: readiness, status and watchdog through a NOTIFY_SOCKET datagram
socket, socket activation through systemd-socket-activate, and journal fields."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nvml_exporter.logs import journal_fields
from tests.conftest import free_port, require_tool, samples, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml


def receive_until(sock: socket.socket, predicate, timeout: float = 20.0) -> list[str]:  # type: ignore[no-untyped-def]
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if predicate(got[-1]):
            return got
    raise AssertionError(f"no matching notification; got {got}")


def test_ready_status_watchdog_and_stopping(tmp_path: Path, fake: FakeNvml) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        env = {**os.environ, **fake.env(), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}",
                                 "--no-xid.journal", "--collect.timeout=500ms", "--collect.min-interval=10ms"],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = receive_until(srv, lambda m: m.startswith("READY=1"))[-1]
            assert ready == "READY=1\nSTATUS=8 GPUs"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # listening by now
                assert samples(r.read().decode())["nvml_exporter_nvml_up"] == 1
            assert receive_until(srv, lambda m: m.startswith("WATCHDOG=1"))[-1] == "WATCHDOG=1\nSTATUS=8 GPUs"
            fake.gpu(4, lost=1)
            receive_until(srv, lambda m: m == "WATCHDOG=1\nSTATUS=8 GPUs, 1 lost")
            # a driver call that hangs past twice the ping interval stops the pings
            fake.set({"gpu.2.latency_us.nvmlDeviceGetPowerUsage": 60_000_000})
            unhealthy = receive_until(srv, lambda m: m.startswith("STATUS=unhealthy"))[-1]
            assert "NVML calls on GPU 2 hung" in unhealthy
            srv.settimeout(1.5)
            later = []
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                try:
                    later.append(srv.recv(4096).decode())
                except TimeoutError:
                    break
            assert later and not any(m.startswith("WATCHDOG=1") for m in later)
            proc.send_signal(signal.SIGTERM)
            receive_until(srv, lambda m: m == "STOPPING=1")
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_socket_activation(fake: FakeNvml) -> None:
    port = free_port()
    env = {**os.environ, **fake.env()}
    passed = [arg for name in fake.env() for arg in ("-E", name)]  # it hands on only what it is told to
    proc = subprocess.Popen([require_tool("systemd-socket-activate"), "-l", f"127.0.0.1:{port}", *passed,
                             sys.executable,
                             "-m", "nvml_exporter", "--web.listen-address=127.0.0.1:1", "--no-xid.journal"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def gpus() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return "nvidia_gpu_up{" in r.read().decode()
            except OSError:
                return False

        # the exporter serves on the socket it was handed, not on its (unusable) --web.listen-address
        wait_for(gpus, timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_journal_fields_carry_gpu_uuid_and_xid() -> None:
    record = logging.LogRecord("nvml_exporter.events", logging.ERROR, __file__, 1, "Xid", None, None)
    record.__dict__.update({"uuid": "GPU-abc", "xid": 79, "gpu": 3})
    fields = journal_fields(record, "nvml-exporter")
    assert fields == {"MESSAGE": "Xid", "PRIORITY": "3", "SYSLOG_IDENTIFIER": "nvml-exporter",
                      "LOGGER": "nvml_exporter.events", "UUID": "GPU-abc", "XID": "79", "GPU": "3"}
