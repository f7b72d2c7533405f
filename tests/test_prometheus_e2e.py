"""The whole pack on Debian's real Prometheus: it scrapes the exporter running over the fake driver,
evaluates the rules, and (a) a healthy node raises no alert, (b) injected faults fire the intended
alerts, (c) every query of every dashboard panel returns data.

To keep the test short, the rule files are loaded with every `for:` scaled from minutes to seconds and
the 5-minute reliability group run every 2 seconds; expressions are unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import promstack
from tests.conftest import wait_for
from tests.fakenvml.scenario import REPO, FakeNvml
from tests.journal import write_journal, xid_line
from tests.promstack import Api

VARIABLES = {"$instance": ".*", "$gpu": ".*", "$__rate_interval": "30s", "${datasource}": "", "$N": "1024",
             "$T": "24", "$C": "0.05"}


@pytest.fixture
def prometheus(tmp_path: Path, fake: FakeNvml, start_exporter) -> Iterator[Api]:
    jobs = tmp_path / "slurm"  # a Slurm job on GPU 1, for the dashboard's workload table
    jobs.mkdir()
    (jobs / fake.state["gpu.1.uuid"]).write_text("4242 user=alice\n")
    # The kernel journal holds an Xid 79 of GPU 1 from two hours ago (so the one injected below is that
    # GPU's second incident, for the time-between-incidents panels) and an NVSwitch SXid.
    journal = write_journal(tmp_path / "kernel.journal", [
        (time.time() - 7200, xid_line("0000:64:00", 79, "GPU has fallen off the bus.")),
        (time.time() - 7200, "nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 20009, Non-fatal, Link 28 RX Short Error"),
    ])
    exp = start_exporter(fake, "--collect.min-interval=100ms", f"--xid.journal-path={journal}",
                         f"--history.path={tmp_path / 'history.sqlite'}",
                         f"--collect.workload.slurm-dir={jobs}", "--gpus.expected=8", wait_ready=True)
    with promstack.prometheus(tmp_path, exp.port) as prom:
        yield prom


def firing(prom: Api) -> set[tuple[str, str]]:
    return {(a["labels"]["alertname"], a["labels"].get("gpu", "")) for a in prom.alerts() if a["state"] == "firing"}


def test_healthy_node_then_injected_faults_then_every_dashboard_query(prometheus: Api,
                                                                      fake: FakeNvml) -> None:
    prom = prometheus
    # (a) healthy: all 8 GPUs scraped, rules evaluated many times, nothing pending or firing
    wait_for(lambda: prom.query("count(nvidia_gpu_up == 1)") and
             prom.query("count(nvidia_gpu_up == 1)")[0]["value"][1] == "8", timeout=30)
    wait_for(lambda: prom.query("fleet:nvidia_gpu_fault_rate_per_gpu_hour:7d"), timeout=30)
    time.sleep(8)
    assert prom.alerts() == []

    # (b) faults: Xid 79 on GPU 1, a pending row remap on GPU 2, HW thermal slowdown on GPU 3, GPU 4 lost
    fake.xid(1, 79)
    fake.event(5, 0x2, 0)  # a double-bit ECC event: counted, no alert of its own
    fake.set({"gpu.2.remap_pending": 1, "gpu.2.remap_cor": 1, "gpu.3.throttle": "0x40",
              "gpu.3.violation.thermal": "0+500000000/s", "gpu.4.lost": 1})
    expected = {("GpuXidFellOffBus", "1"), ("GpuRowRemapPending", "2"), ("GpuHwThermalSlowdown", "3"),
                ("GpuLost", "4")}
    wait_for(lambda: expected <= firing(prom), timeout=60, interval=0.5)
    assert firing(prom) == expected
    by_name = {a["labels"]["alertname"]: a for a in prom.alerts()}
    assert by_name["GpuXidFellOffBus"]["labels"]["action"] == "reboot_node"
    assert by_name["GpuXidFellOffBus"]["labels"]["xid"] == "79"
    assert by_name["GpuRowRemapPending"]["labels"]["severity"] == "warning"
    assert fake.state["gpu.1.uuid"] in by_name["GpuXidFellOffBus"]["annotations"]["description"]

    # (c) every dashboard panel's queries return data, once the node also has what the sparse families and
    # the NVLink per-link detail serve only after a fault: a corrected ECC error, a link down, CRC errors
    fake.set({"gpu.5.ecc.sbe_vol": 3, "gpu.6.nvlink.2.up": 0, "gpu.5.nvlink.3.crc_flit": "0+1000/s"})
    wait_for(lambda: prom.query("category:nvidia_gpu_xids:increase1h"), timeout=30)
    queries = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                queries.append((path.name, panel["title"], expr))

    def empty() -> list[tuple[str, str, str]]:
        return [q for q in queries if not prom.query(q[2])]

    last: list[tuple[str, str, str]] = []

    def answered() -> bool:
        last[:] = empty()
        return not last

    try:
        wait_for(answered, timeout=30, interval=1)
    except AssertionError:
        raise AssertionError("\n".join(map(str, last))) from None
