"""`nvml-exporter diagnose` over fake scenarios: report and Node Health Check exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from tests.fakenvml.scenario import REPO, FakeNvml
from tests.journal import write_journal, xid_line

SCHEMA = json.loads((REPO / "docs" / "diagnose.schema.json").read_text())


def diagnose(fake: FakeNvml, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}
    env.update(fake.env())
    return subprocess.run([sys.executable, "-m", "nvml_exporter", "diagnose", "--timeout=5", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def scenario(fake: FakeNvml, tmp_path: Path, name: str) -> list[str]:
    """Set up a named scenario; returns extra flags."""
    if name == "remap_pending":
        fake.gpu(2, remap_pending=1)
    elif name == "xid79":
        fake.gpu(1, lost=1)
        journal = write_journal(tmp_path / "kernel.journal",
                                [(time.time() - 30, xid_line("0000:64:00", 79, "GPU has fallen off the bus."))])
        return [f"--xid.journal-path={journal}"]
    elif name == "no_driver":
        fake.set(init_error=9)
    return ["--no-xid.journal"]


@pytest.mark.parametrize(("name", "code", "status"), [
    ("healthy", 0, "ok"), ("remap_pending", 1, "warning"), ("xid79", 2, "critical"), ("no_driver", 3, "unknown")])
def test_report_and_exit_code(tmp_path: Path, fake: FakeNvml, name: str, code: int, status: str) -> None:
    flags = scenario(fake, tmp_path, name)
    text = diagnose(fake, *flags)
    assert text.returncode == code, text.stdout + text.stderr
    first = text.stdout.splitlines()[0]
    assert f": {status.upper()} (action:" in first
    doc_run = diagnose(fake, "--json", *flags)
    assert doc_run.returncode == code
    doc = json.loads(doc_run.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["status"] == status
    if name == "healthy":
        assert len(doc["gpus"]) == 8 and all(g["status"] == "ok" for g in doc["gpus"])
        assert text.stdout.count("verdict       OK -> none") == 8
        assert "18/18 links up" in text.stdout and "remapped rows 0/0 pending no failed no" in text.stdout
    elif name == "remap_pending":
        g2 = doc["gpus"][2]
        assert (g2["status"], g2["action"]) == ("warning", "reset_gpu")
        assert "memory          warning  a row remap waits for the next GPU reset -> reset_gpu" in text.stdout
        assert [g["index"] for g in doc["gpus"] if g["status"] != "ok"] == [2]
    elif name == "xid79":
        g1 = doc["gpus"][1]
        assert (g1["up"], g1["status"], g1["action"]) == (False, "critical", "reboot_node")
        assert doc["action"] == "reboot_node"
        orphan = doc["unattributed_xids"][0]
        assert (orphan["pci_bus_id"], orphan["code"], orphan["name"]) == ("00000000:64:00.0", 79,
                                                                          "GPU_HAS_FALLEN_OFF_THE_BUS")
        assert "GPU has fallen off the bus." in text.stdout and "LOST" in text.stdout
    else:
        assert doc["gpus"] == [] and "driver_not_loaded" in doc["error"]
        assert "cannot inspect: NVML: nvmlInit: driver_not_loaded (9)" in text.stdout


def test_xids_of_this_boot_with_their_meaning(tmp_path: Path, fake: FakeNvml) -> None:
    journal = write_journal(tmp_path / "k.journal", [
        (time.time() - 7200, xid_line("0000:53:00", 13, "Graphics SM Warp Exception on (GPC 1, TPC 2, SM 0)")),
        (time.time() - 5, xid_line("0000:75:00", 94, "Contained: SM (0x1). RST: No, D-RST: No")),
    ])
    result = diagnose(fake, "--json", f"--xid.journal-path={journal}")
    doc = json.loads(result.stdout)
    assert result.returncode == 1  # the contained error is recent: restart the app
    x13 = doc["gpus"][0]["xids"][0]
    assert (x13["code"], x13["category"], x13["severity"], x13["source"]) == (13, "application", "info", "journal")
    assert "GPC 1, TPC 2" in x13["message"]
    assert doc["gpus"][2]["action"] == "restart_app"
