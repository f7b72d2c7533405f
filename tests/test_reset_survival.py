"""The exporter survives what a GPU reset and a driver reload do (issue 17, item 3): a GPU absent for a
while (unbound, so the count drops and the GPUs after it move down an index), back with its counters at
zero, back at another index; the driver unloaded and reloaded. The page stays consistent throughout: the
other GPUs keep serving, a GPU that is gone has no value series, a returning GPU keeps its uuid series."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from tests.conftest import EXPORTER, samples, wait_for
from tests.fakenvml.scenario import FakeNvml, h100_node
from tests.journal import write_journal

SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ")


def series_of(page: str) -> list[str]:
    return [m.group(1) + (m.group(2) or "") for line in page.splitlines()
            if line and not line.startswith("#") and (m := SERIES.match(line))]


def assert_consistent(page: str) -> None:
    """No series twice on a page (two GPUs claiming one index would do that to the gpu-only families)."""
    twice = [s for s, n in Counter(series_of(page)).items() if n > 1]
    assert not twice, twice


def families_of(page: str, uuid: str) -> set[str]:
    return {s.split("{")[0] for s in series_of(page) if f'uuid="{uuid}"' in s}


def up(page: str, uuid: str) -> dict[str, float]:
    """gpu index label -> nvidia_gpu_up for the GPU with this uuid."""
    return {re.search(r'gpu="(\d+)"', k).group(1): v for k, v in samples(page).items()  # type: ignore[union-attr]
            if k.startswith("nvidia_gpu_up{") and f'uuid="{uuid}"' in k}


def value(page: str, name: str, uuid: str, extra: str = "") -> float | None:
    for k, v in samples(page).items():
        if k.startswith(name + "{") and f'uuid="{uuid}"' in k and extra in k:
            return v
    return None


# What a GPU that is gone serves: up 0, which board it is, the diagnosis, and what is history rather than a
# reading (its incidents and Xids, which the lost GPU is about).
GONE_FAMILIES = {"nvidia_gpu_up", "nvidia_gpu_info", "nvidia_gpu_health", "nvidia_gpu_recommended_action",
                 "nvidia_gpu_incidents_total", "nvidia_gpu_incident_interval_seconds",
                 "nvidia_gpu_xid_errors_total", "nvidia_gpu_xid_last_timestamp_seconds"}


def test_one_gpu_reset_others_serve_counters_restart(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(4))
    fake.gpu(2, **{"nvlink.3.crc_flit": 40, "ecc.sbe_vol": 7, "recovery_action": 2})
    history = tmp_path / "history.sqlite"
    exp = start_exporter(fake, "--collect.min-interval=10ms", f"--history.path={history}", wait_ready=True)
    uuids = [fake.state[f"gpu.{i}.uuid"] for i in range(4)]
    before = exp.metrics()
    assert_consistent(before)
    energy_before = value(before, "nvidia_gpu_energy_joules_total", uuids[2])
    nvlink_before = value(before, "nvidia_gpu_nvlink_errors_total", uuids[2], 'type="crc_flit"')
    assert energy_before and nvlink_before == 40
    assert value(before, "nvidia_gpu_recovery_action", uuids[2]) == 2
    full = {u: families_of(before, u) for u in uuids}

    fake.unbind(2)  # the reset begins: count 3, GPU 3 is index 2 now
    page = wait_for(lambda: (p := exp.metrics()) and up(p, uuids[2]) == {"2": 0} and up(p, uuids[3]) == {"2": 1}
                    and p)
    assert_consistent(page)
    assert families_of(page, uuids[2]) <= GONE_FAMILIES  # nothing of its last readings is served as current
    for u in (uuids[0], uuids[1], uuids[3]):
        assert families_of(page, u) == full[u]
    assert up(page, uuids[0]) == {"0": 1} and up(page, uuids[1]) == {"1": 1}

    fake.rebind(2)  # reset done: counters at zero, recovery action cleared
    page = wait_for(lambda: (p := exp.metrics()) and up(p, uuids[2]) == {"2": 1} and up(p, uuids[3]) == {"3": 1}
                    and p)
    assert_consistent(page)
    assert families_of(page, uuids[2]) >= full[uuids[2]]
    assert value(page, "nvidia_gpu_recovery_action", uuids[2]) == 0
    assert value(page, "nvidia_gpu_energy_joules_total", uuids[2]) < energy_before  # a counter reset, as it is
    # NVLink totals keep what the links had counted (the per-GPU counter must not drop)
    assert value(page, "nvidia_gpu_nvlink_errors_total", uuids[2], 'type="crc_flit"') == 40
    fake.gpu(2, **{"nvlink.3.crc_flit": 3})
    wait_for(lambda: value(exp.metrics(), "nvidia_gpu_nvlink_errors_total", uuids[2], 'type="crc_flit"') == 43)

    # the history recorded the reset, seen in the counters going back to zero
    def resets() -> list[dict[str, object]]:
        out = subprocess.run([*EXPORTER, "history", f"--history.path={history}", "--gpu", uuids[2], "--json"],
                             capture_output=True, text=True, check=True).stdout
        return [e for e in json.loads(out)["gpus"][0]["events"] if e["kind"] == "reset"]
    assert wait_for(resets)


def test_uuid_returning_at_another_index_keeps_its_series(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(3))
    exp = start_exporter(fake, "--collect.min-interval=10ms", wait_ready=True)
    uuids = [fake.state[f"gpu.{i}.uuid"] for i in range(3)]
    before = exp.metrics()
    full = families_of(before, uuids[0])
    fake.move(0, 3)  # GPU 0 leaves and comes back in another slot: GPUs 1, 2 are 0, 1 and it is 2
    page = wait_for(lambda: (p := exp.metrics()) and up(p, uuids[0]) == {"2": 1} and up(p, uuids[2]) == {"1": 1}
                    and p)
    assert_consistent(page)
    assert up(page, uuids[1]) == {"0": 1}
    assert families_of(page, uuids[0]) >= full  # (and the availability check its absence revealed)
    for u in uuids:  # one gpu label per uuid: no series left behind at the old index
        assert len({re.search(r'gpu="(\d+)"', s).group(1) for s in series_of(page)  # type: ignore[union-attr]
                    if f'uuid="{u}"' in s}) == 1


def test_driver_reload_page_keeps_serving_and_everything_returns(tmp_path: Path, start_exporter) -> None:
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    exp = start_exporter(fake, "--collect.min-interval=10ms", wait_ready=True)
    uuids = [fake.state[f"gpu.{i}.uuid"] for i in range(2)]
    before = exp.metrics()
    full = {u: families_of(before, u) for u in uuids}
    fake.unload_driver()
    page = wait_for(lambda: (p := exp.metrics()) and samples(p).get("nvml_exporter_nvml_up") == 0 and p)
    assert_consistent(page)
    for u in uuids:
        assert families_of(page, u) <= GONE_FAMILIES
        assert list(up(page, u).values()) == [0]
    assert exp.get("/-/healthy")[0] == 200
    fake.load_driver()
    page = wait_for(lambda: (p := exp.metrics()) and samples(p).get("nvml_exporter_nvml_up") == 1
                    and all(list(up(p, u).values()) == [1] for u in uuids) and p)
    assert_consistent(page)
    for u in uuids:
        assert families_of(page, u) >= full[u]


def test_agent_acknowledgements_reach_the_incident_history(tmp_path: Path, start_exporter) -> None:
    """The node agent logs `GPU reset executed: UUID, success: …` (logger -t nvml-remediator); the exporter,
    the history's only writer, records a reset that worked as a remedy and one that failed apart."""
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    u0, u1 = fake.state["gpu.0.uuid"], fake.state["gpu.1.uuid"]
    history = tmp_path / "history.sqlite"
    now = time.time()
    journal = write_journal(tmp_path / "ack.journal", [(now, f"GPU reset executed: {u0}, success: true"),
                                                       (now, f"GPU reset executed: {u1}, success: false")],
                            identifier="nvml-remediator")
    exp = start_exporter(fake, f"--history.path={history}", f"--xid.journal-path={journal}")
    wait_for(lambda: value(exp.metrics(), "nvidia_gpu_incidents_total", u0, 'kind="reset"') == 1)
    assert not value(exp.metrics(), "nvidia_gpu_incidents_total", u1, 'kind="reset"')  # not a remedy (sparse: absent)

    def kinds(uuid: str) -> list[str]:
        out = subprocess.run([*EXPORTER, "history", f"--history.path={history}", "--gpu", uuid, "--json"],
                             capture_output=True, text=True, check=True).stdout
        return [e["kind"] for e in json.loads(out)["gpus"][0]["events"]]
    assert "reset" in kinds(u0)
    assert wait_for(lambda: "reset_failed" in kinds(u1))
