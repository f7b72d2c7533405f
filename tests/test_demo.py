"""`make demo`, as a newcomer runs it from the README: 8 simulated GPUs on /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request

from tests.conftest import free_port, samples, wait_for
from tests.fakenvml.scenario import REPO


def test_make_demo_serves_eight_gpus() -> None:
    port = free_port()
    proc = subprocess.Popen(["make", "-s", "demo", f"DEMO_ADDRESS=127.0.0.1:{port}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def page() -> str | None:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return None

        s = samples(str(wait_for(page, timeout=60)))
        assert sum(1 for k, v in s.items() if k.startswith("nvidia_gpu_up{") and v == 1) == 8
        assert sum(1 for k in s if k.startswith('nvidia_gpu_info{') and 'name="NVIDIA H100 80GB HBM3"' in k) == 8
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
