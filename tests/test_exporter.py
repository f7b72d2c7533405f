"""The real exporter process over an 8-GPU fake node: every metric, with the value the scenario implies."""

from __future__ import annotations

import functools
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from nvml_exporter.metrics import ALL_METRICS, GPU_METRICS
from tests.conftest import gpu_series, require_tool, samples, wait_for
from tests.fakenvml.scenario import FakeNvml, h100_node

MIB = 1 << 20
REASONS = ("gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
           "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting")


def mixed_node() -> dict[str, str]:
    """8 H100s, where GPU 3 is throttling and GPU 7 is an older, actively cooled board that still
    retires pages instead of remapping rows, so every family in the contract has a source."""
    state = h100_node(8)
    state.update({
        "gpu.3.throttle": "0x44",  # sw_power_cap + hw_thermal_slowdown
        "gpu.3.violation.thermal": "2500000000",
        "gpu.3.recovery_action": "1",
        "gpu.3.nvlink.5.up": "0",
        "gpu.3.nvlink.2.crc_flit": "11", "gpu.3.nvlink.2.replay": "3", "gpu.3.nvlink.2.recovery": "1",
        "gpu.3.nvlink.2.crc_data": "5",
        "gpu.3.ecc.sbe_vol": "17", "gpu.3.ecc.dbe_agg": "2",
        "gpu.3.remap_cor": "4", "gpu.3.remap_pending": "1",
        "gpu.3.procs": "100:1,200:2,300:3",
        "gpu.3.util_enc": "5", "gpu.3.util_dec": "12",  # a GPU that also codes video
        "gpu.7.name": "Tesla V100-PCIE-32GB",
        "gpu.7.num_fans": "2", "gpu.7.fan.0": "45", "gpu.7.fan.1": "47",
        "gpu.7.retired_sbe": "2", "gpu.7.retired_dbe": "1", "gpu.7.retired_pending": "1",
        "gpu.7.nvlink_count": "0",
        "gpu.7.pcie_gen": "3",
    })
    for key in ("remap_cor", "remap_unc", "remap_pending", "remap_failure", "mem_temp", "recovery_action"):
        del state[f"gpu.7.{key}"]
    return state


def sparse_value(s: dict[str, float], key: str, value: float) -> None:
    """A sparse family's series: served with its value once non-zero, absent while it has only been 0."""
    if value:
        assert s[key] == value, key
    else:
        assert key not in s, key


def lbl(gpu: int, uuid: str, **extra: str) -> str:
    inner = f'gpu="{gpu}",uuid="{uuid}"' + "".join(f',{k}="{v}"' for k, v in extra.items())
    return "{" + inner + "}"


def test_every_metric_with_the_value_the_scenario_implies(fake: FakeNvml, start_exporter) -> None:
    state = mixed_node()
    fake.state = state
    fake.write()
    t0 = time.time()
    exp = start_exporter(fake, "--collect.min-interval=10ms", "--no-xid.journal", wait_ready=True)
    fake.xid(0, 13)
    fake.event(1, 0x2, 0)  # a double-bit ECC event
    uuid0, uuid1 = state["gpu.0.uuid"], state["gpu.1.uuid"]
    xid13 = f'nvidia_gpu_xid_errors_total{{gpu="0",uuid="{uuid0}",xid="13"}}'
    page = str(wait_for(lambda: (p := exp.metrics()) and "nvidia_gpu_nvml_events_total{" in p
                        and samples(p).get(xid13) == 1 and p))
    elapsed = time.time() - t0 + 1
    s = samples(page)
    assert s[f'nvidia_gpu_xid_errors_total{{gpu="0",uuid="{uuid0}",xid="13"}}'] == 1
    assert t0 <= s[f'nvidia_gpu_xid_last_timestamp_seconds{{gpu="0",uuid="{uuid0}",xid="13"}}'] <= time.time()
    assert s[f'nvidia_gpu_nvml_events_total{{gpu="1",uuid="{uuid1}",type="double_bit_ecc"}}'] == 1
    assert s["nvml_exporter_journal_up"] == 0  # journal off: NVML events only

    def g(i: int, key: str) -> float:
        return float(int(state[f"gpu.{i}.{key}"], 0))

    for i in range(8):
        uuid = state[f"gpu.{i}.uuid"]
        L = functools.partial(lbl, i, uuid)
        info = L(name=state[f"gpu.{i}.name"], pci_bus_id=state[f"gpu.{i}.bus_id"], serial=state[f"gpu.{i}.serial"],
                 vbios_version="96.00.99.00.01", minor_number=str(i), driver_version="580.105.08")
        assert s[f"nvidia_gpu_info{info}"] == 1
        assert s[f"nvidia_gpu_up{L()}"] == 1
        assert s[f"nvidia_gpu_temperature_celsius{L()}"] == g(i, "temp")
        for t, key in (("shutdown", "shutdown"), ("slowdown", "slowdown"), ("gpu_max", "gpu_max"),
                       ("memory_max", "mem_max")):
            assert s[f"nvidia_gpu_temperature_threshold_celsius{L(threshold=t)}"] == g(i, f"threshold.{key}")
        assert s[f"nvidia_gpu_power_watts{L()}"] == g(i, "power_mw") / 1000  # mW -> W
        assert s[f"nvidia_gpu_power_limit_watts{L()}"] == 700
        assert s[f"nvidia_gpu_power_default_limit_watts{L()}"] == 700
        base, rate = state[f"gpu.{i}.energy_mj"].rstrip("/s").split("+")
        energy = s[f"nvidia_gpu_energy_joules_total{L()}"]  # mJ -> J, growing at the scenario's rate
        assert int(base) / 1000 <= energy <= (int(base) + int(rate) * elapsed) / 1000
        for clock, key in (("sm", "sm"), ("memory", "mem")):
            assert s[f"nvidia_gpu_clock_hertz{L(clock=clock)}"] == g(i, f"clock.{key}") * 1e6  # MHz -> Hz
            assert s[f"nvidia_gpu_clock_max_hertz{L(clock=clock)}"] == g(i, f"clock_max.{key}") * 1e6
        for clock in ("graphics", "video"):  # left out for the budget (exporter/nvml/reader.py CLOCKS)
            assert f"nvidia_gpu_clock_hertz{L(clock=clock)}" not in s
        # T.Limit: the margin follows the temperature; the offsets come from fields 193/194 (signed)
        assert s[f"nvidia_gpu_temperature_margin_celsius{L()}"] == g(i, "threshold.gpu_max") - g(i, "temp")
        assert s[f"nvidia_gpu_temperature_threshold_celsius{L(threshold='slowdown_tlimit')}"] == -2
        assert s[f"nvidia_gpu_temperature_threshold_celsius{L(threshold='shutdown_tlimit')}"] == -8
        assert s[f"nvidia_gpu_utilization_ratio{L()}"] == g(i, "util_gpu") / 100  # % -> ratio
        assert s[f"nvidia_gpu_memory_utilization_ratio{L()}"] == g(i, "util_mem") / 100
        # sparse families (docs/metrics.md): a series that has only ever been 0 is not served
        sparse = functools.partial(sparse_value, s)
        sparse(f"nvidia_gpu_encoder_utilization_ratio{L()}", g(i, "util_enc") / 100)
        sparse(f"nvidia_gpu_decoder_utilization_ratio{L()}", g(i, "util_dec") / 100)
        assert s[f"nvidia_gpu_memory_total_bytes{L()}"] == 81559 * MIB
        assert s[f"nvidia_gpu_memory_used_bytes{L()}"] == g(i, "mem_used")
        assert s[f"nvidia_gpu_memory_reserved_bytes{L()}"] == 480 * MIB
        assert s[f"nvidia_gpu_memory_free_bytes{L()}"] == 81559 * MIB - 480 * MIB - g(i, "mem_used")
        assert s[f"nvidia_gpu_performance_state{L()}"] == 0
        assert s[f"nvidia_gpu_persistence_mode{L()}"] == 1
        assert s[f"nvidia_gpu_pcie_link_generation{L()}"] == g(i, "pcie_gen")
        assert s[f"nvidia_gpu_pcie_link_max_generation{L()}"] == 5
        assert s[f"nvidia_gpu_pcie_link_width{L()}"] == 16
        assert s[f"nvidia_gpu_pcie_link_max_width{L()}"] == 16
        assert s[f"nvidia_gpu_pcie_replay_errors_total{L()}"] == g(i, "pcie_replay")
        mask = int(state[f"gpu.{i}.throttle"], 16)
        for bit, reason in enumerate(REASONS):  # bitmask -> one 0/1 series per reason
            sparse(f"nvidia_gpu_clock_event_active{L(reason=reason)}", (mask >> bit) & 1)
        for reason, key in (("power", "power"), ("thermal", "thermal"), ("sync_boost", "sync_boost"),
                            ("board_limit", "board_limit"), ("low_utilization", "low_util"),
                            ("reliability", "reliability")):  # ns -> s
            sparse(f"nvidia_gpu_clock_event_duration_seconds_total{L(reason=reason)}", g(i, f"violation.{key}") / 1e9)
        assert s[f"nvidia_gpu_ecc_enabled{L()}"] == 1
        for typ, key in (("corrected", "sbe"), ("uncorrected", "dbe")):
            for scope, short in (("volatile", "vol"), ("aggregate", "agg")):
                sparse(f"nvidia_gpu_ecc_errors_total{L(type=typ, scope=scope)}", g(i, f"ecc.{key}_{short}"))
        assert s[f"nvidia_gpu_compute_processes{L()}"] == len([p for p in state[f"gpu.{i}.procs"].split(",") if p])
        if i == 7:  # older board: fans, page retirement, no remapping, no memory temperature, no NVLink
            assert s[f"nvidia_gpu_fan_speed_ratio{L(fan='0')}"] == 0.45
            assert s[f"nvidia_gpu_fan_speed_ratio{L(fan='1')}"] == 0.47
            assert s[f"nvidia_gpu_retired_pages{L(cause='single_bit')}"] == 2
            assert s[f"nvidia_gpu_retired_pages{L(cause='double_bit')}"] == 1
            assert s[f"nvidia_gpu_retired_pages_pending{L()}"] == 1
            series = gpu_series(page, 7)
            for absent in ("nvidia_gpu_remapped_rows", "nvidia_gpu_memory_temperature_celsius",
                           "nvidia_gpu_nvlink_links", "nvidia_gpu_nvlink_errors_total", "nvidia_gpu_nvlink_link_up",
                           "nvidia_gpu_recovery_action"):
                assert not any(k.startswith(absent + "{") for k in series), absent
            continue
        # H100: passive (no fan series), rows remapped instead of pages retired
        assert not any(k.startswith(("nvidia_gpu_fan_speed_ratio{", "nvidia_gpu_retired_pages"))
                       for k in gpu_series(page, i))
        assert s[f"nvidia_gpu_memory_temperature_celsius{L()}"] == g(i, "mem_temp")
        sparse(f"nvidia_gpu_remapped_rows{L(cause='correctable')}", g(i, "remap_cor"))
        sparse(f"nvidia_gpu_remapped_rows{L(cause='uncorrectable')}", g(i, "remap_unc"))
        assert s[f"nvidia_gpu_remapped_rows_pending{L()}"] == g(i, "remap_pending")
        assert s[f"nvidia_gpu_remapped_rows_failed{L()}"] == g(i, "remap_failure")
        assert s[f"nvidia_gpu_recovery_action{L()}"] == g(i, "recovery_action")
        # NVLink: per-GPU totals always; a link's detail only where it is down (3/5) or counted errors (3/2)
        down = 1 if i == 3 else 0
        assert s[f"nvidia_gpu_nvlink_links{L(state='up')}"] == 18 - down
        assert s[f"nvidia_gpu_nvlink_links{L(state='down')}"] == down
        for typ in ("replay", "recovery", "crc_flit", "crc_data"):
            total = sum(float(state.get(f"gpu.{i}.nvlink.{link}.{typ}", 0)) for link in range(18))
            assert s[f"nvidia_gpu_nvlink_errors_total{L(type=typ)}"] == total
        detail = {k for k in gpu_series(page, i) if k.startswith("nvidia_gpu_nvlink_link_")}
        if i != 3:
            assert detail == set()
            continue
        # (link 5 has no counters: an inactive port answers NOT_SUPPORTED for them)
        assert detail == {f"nvidia_gpu_nvlink_link_up{L(link='5')}", f"nvidia_gpu_nvlink_link_up{L(link='2')}",
                          *(f"nvidia_gpu_nvlink_link_errors_total{L(link='2', type=t)}"
                            for t in ("crc_flit", "replay", "recovery", "crc_data"))}
        assert s[f"nvidia_gpu_nvlink_link_up{L(link='5')}"] == 0
        assert s[f"nvidia_gpu_nvlink_link_up{L(link='2')}"] == 1
        for typ in ("crc_flit", "replay", "recovery", "crc_data"):
            assert s[f"nvidia_gpu_nvlink_link_errors_total{L(link='2', type=typ)}"] == g(3, f"nvlink.2.{typ}")
    assert s["nvml_exporter_nvml_up"] == 1
    assert not any(k.startswith("nvml_exporter_collect_timeouts_total") for k in s)  # from a first timeout on
    assert s["nvml_exporter_last_collect_timestamp_seconds"] >= t0 - 1
    assert any(k.startswith("nvml_exporter_build_info{") for k in s)
    # every family of the contract is on the page
    families = {line.split()[2] for line in page.splitlines() if line.startswith("# TYPE ")}
    # (error and invalid-reading counters appear with their first count: nothing fails in this scenario,
    # not even NumFans, which a real Hopper board answers with 0)
    missing = {m.name for m in ALL_METRICS} - families
    # (and the incident history's, and NVSwitch SXids from the journal: tests/test_history.py; and the
    # released marker, only while the node agent has the exporter let go: tests/test_control.py)
    assert missing == {"nvml_exporter_invalid_readings_total", "nvml_exporter_nvml_errors_total",
                       "nvml_exporter_collect_timeouts_total", "nvidia_gpu_released",
                       "nvidia_gpu_incidents_total", "nvidia_gpu_incident_interval_seconds",
                       "nvidia_nvswitch_sxid_errors_total", "nvidia_nvswitch_sxid_last_timestamp_seconds",
                       # only with a --collect.workload.* source (tests/test_workload_exporter.py)
                       "nvidia_gpu_workload_info", "nvml_exporter_workloads_dropped_total",
                       "nvml_exporter_workload_refresh_errors_total",
                       # only with --gpus.expected (tests/test_pcibus.py)
                       "nvidia_gpu_expected"}
    # GPU 3's throttling and pending remap show in its diagnosis
    uuid3 = state["gpu.3.uuid"]
    assert s[f'nvidia_gpu_health{{gpu="3",uuid="{uuid3}",check="thermal"}}'] == 2
    assert s[f'nvidia_gpu_health{{gpu="3",uuid="{uuid3}",check="memory"}}'] == 1
    assert s[f'nvidia_gpu_recommended_action{{gpu="3",uuid="{uuid3}",action="reset_gpu"}}'] == 1
    assert s[f'nvidia_gpu_recommended_action{{gpu="5",uuid="{state["gpu.5.uuid"]}",action="none"}}'] == 1


def test_page_passes_promtool_and_prometheus_client_parser(fake: FakeNvml, start_exporter) -> None:
    fake.state = mixed_node()
    fake.write()
    page = start_exporter(fake, wait_ready=True).metrics()
    result = subprocess.run([require_tool("promtool"), "check", "metrics"], input=page, capture_output=True,
                            text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert families["nvidia_gpu_energy_joules"].type == "counter"
    assert families["nvidia_gpu_temperature_celsius"].type == "gauge"
    assert len(families["nvidia_gpu_up"].samples) == 8
    for m in GPU_METRICS:
        if m.name in ("nvidia_gpu_xid_errors_total", "nvidia_gpu_xid_last_timestamp_seconds",
                      "nvidia_gpu_nvml_events_total", "nvidia_gpu_incidents_total",
                      "nvidia_gpu_incident_interval_seconds", "nvidia_gpu_workload_info",
                      "nvidia_gpu_released"):
            continue  # only once an event arrived, with the incident history or a workload source on, or
            # while released; covered elsewhere
        family = families.get(m.name.removesuffix("_total"))
        assert family is not None, m.name
        for sample in family.samples:
            assert {"gpu", "uuid"} <= sample.labels.keys(), sample


def test_landing_health_and_ready_pages(fake: FakeNvml, start_exporter) -> None:
    # ready comes once NVML is up and Xid events are registered, a moment after the first page is served
    exp = start_exporter(fake, wait_ready=True)
    status, body = exp.get("/")
    assert status == 200
    assert body.count("NVIDIA H100 80GB HBM3") == 8 and "00000000:CA:00.0" in body and 'href="/metrics"' in body
    assert exp.get("/-/healthy") == (200, "OK\n")
    assert exp.get("/-/ready") == (200, "OK\n")
    assert exp.get("/nope")[0] == 404


def test_first_page_waits_for_start_up_and_names_every_gpu(fake: FakeNvml, start_exporter) -> None:
    # A driver slow to initialise (1.5 s here) must not make the first page one with no GPUs: the scrape
    # waits for start-up, bounded by its deadline, and then serves all eight.
    fake.set({"latency_us.nvmlInit_v2": 1_500_000, "latency_us.nvmlInitWithFlags": 1_500_000})
    exp = start_exporter(fake, "--no-xid.journal")
    s = samples(exp.metrics())
    assert s["nvml_exporter_nvml_up"] == 1
    assert sum(1 for k, v in s.items() if k.startswith("nvidia_gpu_up{") and v == 1) == 8


def test_custom_telemetry_path_and_gzip(fake: FakeNvml, start_exporter) -> None:
    import gzip
    import urllib.request

    exp = start_exporter(fake, "--web.telemetry-path=/gpu-metrics", wait_ready=True)  # a page big enough to gzip
    assert exp.get("/metrics")[0] == 404
    req = urllib.request.Request(exp.url + "/gpu-metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "nvidia_gpu_up" in gzip.decompress(r.read()).decode()
