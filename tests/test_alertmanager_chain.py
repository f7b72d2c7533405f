"""The remediator behind Debian's real Alertmanager: an alert posted with amtool drains a node through a
real webhook receiver with a bearer token, and the full chain from a fake Xid 79 to a planned drain."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests import promstack
from tests.conftest import require_tool, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml
from tests.remediator_helpers import UUID1, Remediator, calls, make_standins, policy, start_remediator

LABELS = ["alertname=GpuXidFellOffBus", "severity=critical", "action=reboot_node", "instance=gpu-node-7:9400",
          "gpu=1", f"uuid={UUID1}", "xid=79"]


@pytest.fixture
def remediator_dir(tmp_path: Path) -> Iterator[Path]:
    make_standins(tmp_path)
    yield tmp_path


def amtool(am: promstack.Api, *args: str) -> None:
    subprocess.run([require_tool("amtool"), f"--alertmanager.url={am.url}", "alert", "add", *args], check=True,
                   capture_output=True, timeout=30)


def test_amtool_alert_drains_through_alertmanager_and_resolved_runs_nothing(remediator_dir: Path) -> None:
    d = remediator_dir
    policy(d, """\
        - name: fell-off-bus
          match: ['alertname="GpuXidFellOffBus"', 'severity="critical"']
          steps: [drain_node]
        """)
    rem: Remediator = start_remediator(d, "--execute")
    try:
        with promstack.alertmanager(d, f"{rem.url}/webhook", d / "token") as am:
            start = datetime.now(timezone.utc) - timedelta(seconds=5)
            amtool(am, *LABELS, f"--start={start.isoformat()}")
            wait_for(lambda: rem.events("done"), timeout=30)
            drains = [c for c in calls(d, "scontrol") if c[1] == "update"]
            assert drains == [["scontrol", "update", "NodeName=gpu-node-7", "State=DRAIN",
                               f"Reason=nvml-remediator: GpuXidFellOffBus gpu=1 uuid={UUID1} "
                               f"fp={rem.events('queued')[0]['key'].split('|')[0]}"]]
            # resolve it: Alertmanager sends the resolved notification, which runs nothing
            amtool(am, *LABELS, f"--start={start.isoformat()}",
                   f"--end={(datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()}")
            wait_for(lambda: [e for e in rem.events("skipped") if "resolved" in e["reason"]], timeout=30)
            assert len([c for c in calls(d, "scontrol") if c[1] == "update"]) == 1
            assert rem.events("request_refused") == []  # Alertmanager's bearer token was accepted
    finally:
        rem.stop()


def test_full_chain_from_a_fake_xid79_to_a_planned_checkpoint_and_drain(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    d = tmp_path / "remediator"
    d.mkdir()
    make_standins(d)
    example = (REPO / "examples" / "remediator.example.yml").read_text()
    (d / "policy.yml").write_text(example.replace("/usr/bin/scontrol", str(d / "bin" / "scontrol"))
                                  .replace("/usr/bin/nvidia-smi", str(d / "bin" / "nvidia-smi")))
    rem = start_remediator(d)  # dry run
    try:
        exp = start_exporter(fake, "--collect.min-interval=100ms", "--no-xid.journal", wait_ready=True)
        with promstack.alertmanager(d, f"{rem.url}/webhook", d / "token") as am, \
                promstack.prometheus(tmp_path, exp.port, am_port(am)):
            fake.xid(1, 79)
            planned = wait_for(lambda: rem.events("done"), timeout=90)
        ran = {e["step"]: e for e in rem.events("ran")}
        assert set(ran) == {"checkpoint_signal", "drain_node"}
        assert all(e["result"] == "dry_run" for e in ran.values())
        assert ran["drain_node"]["node"] == "127.0.0.1" and ran["drain_node"]["alertname"] == "GpuXidFellOffBus"
        assert ran["drain_node"]["argv"][0][1:4] == ["update", "NodeName=127.0.0.1", "State=DRAIN"]
        assert fake.state["gpu.1.uuid"] in ran["checkpoint_signal"]["reason"]
        assert planned and calls(d) == []  # dry run: nothing ran
    finally:
        rem.stop()


def am_port(am: promstack.Api) -> int:
    return int(am.url.rsplit(":", 1)[1])
