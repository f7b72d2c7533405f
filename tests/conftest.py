"""Fixtures: the fake NVML library, scenarios on disk, and the real exporter process over them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nvml_exporter.cli import FREEZE_ENV, build_collector
from nvml_exporter.collector import Collector
from nvml_exporter.nvml import Library
from tests.fakenvml.scenario import LIBRARY, REPO, FakeNvml

EXPORTER = [sys.executable, "-m", "nvml_exporter"]


def pytest_sessionstart(session: pytest.Session) -> None:
    # The library is a build product; make sure it is current even when pytest runs on its own.
    subprocess.run(["make", "-s", "-C", str(REPO), "fakenvml"], check=True)


def require_tool(name: str) -> str:
    """Tests use real tools; a missing one is a failure (CI installs it via `make test`), never a skip."""
    path = shutil.which(name)
    assert path, f"{name} is not installed: run `make test`, which installs it"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def collector_over(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """The real collector, in this process, over the fake library, started and initialised, in the
    frozen-readings test mode (snapshot.py: a stage that changes a reading in place raises)."""
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.state_path))
    ctypes.CDLL(str(LIBRARY), mode=ctypes.RTLD_GLOBAL)
    collector = build_collector(Library(str(LIBRARY)), min_interval=0.0, journal=False, events=False, freeze=True)
    collector.start()
    try:
        assert collector.initialised.wait(10)
        yield collector
    finally:
        collector.stop()


@pytest.fixture
def fake(tmp_path: Path) -> FakeNvml:
    return FakeNvml(tmp_path / "nvml")


@dataclass
class Exporter:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    scheme: str = "http"
    opener: urllib.request.OpenerDirector = field(default_factory=urllib.request.build_opener)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with self.opener.open(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self, headers: dict[str, str] | None = None) -> str:
        status, body = self.get("/metrics", headers)
        assert status == 200, body
        return body

    def log(self) -> str:
        return self.log_path.read_text()


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.05) -> object:
    """Poll until predicate() is truthy; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    started: list[Exporter] = []

    def start(fake: FakeNvml | None, *args: str, env: dict[str, str] | None = None, wait_healthy: bool = True,
              scheme: str = "http", opener: urllib.request.OpenerDirector | None = None,
              wait_ready: bool = False) -> Exporter:
        port = free_port()
        log_path = tmp_path / f"exporter-{port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_NVML", "LD_LIBRARY_PATH"))}
        full_env[FREEZE_ENV] = "1"  # the frozen-readings test mode (snapshot.py)
        if fake is not None:
            full_env.update(fake.env())
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--log.level=debug", *args],
                env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        exp = Exporter(proc, port, log_path, scheme, opener or urllib.request.build_opener())
        started.append(exp)
        if wait_healthy:
            def healthy() -> bool:
                assert proc.poll() is None, f"exporter exited {proc.returncode}: {log_path.read_text()}"
                try:
                    return exp.get("/-/healthy", timeout=2)[0] == 200
                except OSError:
                    return False
            wait_for(healthy)
        if wait_ready:
            wait_for(lambda: exp.get("/-/ready", timeout=2)[0] == 200)
        return exp

    yield start
    for exp in started:
        if exp.proc.poll() is None:
            exp.proc.terminate()
            try:
                exp.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                exp.proc.kill()
                exp.proc.wait()


def samples(page: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line of an exposition page."""
    out = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def gpu_series(page: str, gpu: int) -> dict[str, float]:
    """The nvidia_gpu_* samples of one GPU."""
    return {k: v for k, v in samples(page).items() if k.startswith("nvidia_gpu_") and f'{{gpu="{gpu}",' in k}


# The remediator's tests (test_remediator*.py): a folder with stand-in commands, and the remediators a
# test started, stopped after it.
@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    from tests.remediator_helpers import make_standins

    make_standins(tmp_path)
    return tmp_path


@pytest.fixture
def remediators() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for r in started:
        r.stop()
