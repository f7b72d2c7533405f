"""The metric contract: one table that names every family, its type, unit, labels and help.

Exposition, the docs (docs/metrics.md) and the tests all read this table, so a metric is added here once.
Per-GPU families carry the labels `gpu` and `uuid` in addition to `labels`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .workload import LABELS as WORKLOAD_LABELS

GAUGE = "gauge"
COUNTER = "counter"
HISTOGRAM = "histogram"  # labels ("le",); its values are keyed by the bound, "sum" and "count"


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    help: str
    labels: tuple[str, ...] = ()
    source: str = ""
    per_gpu: bool = True
    # Values outside [low, high] are NVML sentinels or impossible readings: dropped and counted.
    valid: tuple[float, float] = (float("-inf"), float("inf"))
    # Sparse: a series whose value is 0 on a healthy GPU is served once it has been non-zero since the
    # exporter started (a counter that turns non-zero later is served at 0 first), then stays served.
    # exporter/sparse.py does it; docs/metrics.md says which families are sparse.
    sparse: bool = False
    # Series per GPU this family may serve on a healthy node (the `make demo` page); per node for the
    # families without a `gpu` label. tests/test_cardinality.py holds the demo page to these.
    budget: int = 1
    # Labels whose value is empty are left out of the series (the workload labels other sources fill).
    optional_labels: bool = False


RATIO = (0.0, 1.0)
CELSIUS = (-60.0, 250.0)
NON_NEGATIVE = (0.0, float("inf"))

GPU_METRICS: tuple[Metric, ...] = (
    Metric("nvidia_gpu_info", GAUGE, "GPU identity; always 1.",
           ("name", "pci_bus_id", "serial", "vbios_version", "minor_number", "driver_version"),
           "nvmlDeviceGetName/Serial/VbiosVersion/PciInfo/MinorNumber, nvmlSystemGetDriverVersion"),
    Metric("nvidia_gpu_up", GAUGE, "1 if the GPU answered this collection, 0 if it is lost or failing.",
           source="collection outcome", valid=RATIO),
    Metric("nvidia_gpu_released", GAUGE,
           "1 while the exporter has let go of this GPU (and NVML) on the node agent's request, for a GPU "
           "reset; nvidia_gpu_up is 0 meanwhile for that reason, not a fault. Absent otherwise.",
           source="control socket (release/reacquire)", valid=RATIO, budget=0),
    Metric("nvidia_gpu_temperature_celsius", GAUGE, "GPU core temperature.",
           source="nvmlDeviceGetTemperature", valid=CELSIUS),
    Metric("nvidia_gpu_memory_temperature_celsius", GAUGE, "HBM memory temperature.",
           source="field 82 MEMORY_TEMP", valid=CELSIUS),
    Metric("nvidia_gpu_temperature_threshold_celsius", GAUGE,
           "The GPU's own temperature thresholds: absolute (shutdown, slowdown, gpu_max, memory_max) and, where "
           "the driver reports them (Ada and later), the T.Limit offsets shutdown_tlimit and slowdown_tlimit: the "
           "margin (nvidia_gpu_temperature_margin_celsius) at which the GPU shuts down or slows down.",
           ("threshold",), "nvmlDeviceGetTemperatureThreshold; fields 193-194 TEMPERATURE_{SHUTDOWN,SLOWDOWN}_TLIMIT",
           valid=CELSIUS, budget=6),
    Metric("nvidia_gpu_temperature_margin_celsius", GAUGE,
           "How far the GPU temperature is below its T.Limit (max operating temperature); negative past it. "
           "HW slowdown starts at the slowdown_tlimit threshold (-2 C on Hopper).",
           source="nvmlDeviceGetMarginTemperature", valid=(-100.0, 250.0)),
    Metric("nvidia_gpu_power_watts", GAUGE, "Power draw (averaged over 1 s by the driver on Ampere and later).",
           source="nvmlDeviceGetPowerUsage", valid=(0.0, 10000.0)),
    Metric("nvidia_gpu_power_limit_watts", GAUGE, "Power limit the driver enforces now.",
           source="nvmlDeviceGetEnforcedPowerLimit", valid=(0.0, 10000.0)),
    Metric("nvidia_gpu_power_default_limit_watts", GAUGE, "Default power limit of the board.",
           source="nvmlDeviceGetPowerManagementDefaultLimit", valid=(0.0, 10000.0)),
    Metric("nvidia_gpu_energy_joules_total", COUNTER, "Energy used since the driver was loaded.",
           source="field 83 TOTAL_ENERGY_CONSUMPTION", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_fan_speed_ratio", GAUGE, "Fan speed as a fraction of its maximum (absent on passive boards).",
           ("fan",), "nvmlDeviceGetFanSpeed_v2", valid=(0.0, 1.0), budget=0),
    Metric("nvidia_gpu_clock_hertz", GAUGE, "Current clock frequency.",
           ("clock",), "nvmlDeviceGetClockInfo (sm, memory)", valid=(0.0, 1e11), budget=2),
    Metric("nvidia_gpu_clock_max_hertz", GAUGE, "Maximum clock frequency.",
           ("clock",), "nvmlDeviceGetMaxClockInfo (sm, memory)", valid=(0.0, 1e11), budget=2),
    Metric("nvidia_gpu_utilization_ratio", GAUGE, "Fraction of the last sample period a kernel was running.",
           source="nvmlDeviceGetUtilizationRates", valid=RATIO),
    Metric("nvidia_gpu_memory_utilization_ratio", GAUGE,
           "Fraction of the last sample period device memory was read or written.",
           source="nvmlDeviceGetUtilizationRates", valid=RATIO),
    Metric("nvidia_gpu_encoder_utilization_ratio", GAUGE, "Video encoder utilization.",
           source="nvmlDeviceGetEncoderUtilization", valid=RATIO, sparse=True, budget=0),
    Metric("nvidia_gpu_decoder_utilization_ratio", GAUGE, "Video decoder utilization.",
           source="nvmlDeviceGetDecoderUtilization", valid=RATIO, sparse=True, budget=0),
    Metric("nvidia_gpu_memory_total_bytes", GAUGE, "Total device memory.",
           source="nvmlDeviceGetMemoryInfo_v2", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_memory_used_bytes", GAUGE, "Device memory used by allocations.",
           source="nvmlDeviceGetMemoryInfo_v2", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_memory_free_bytes", GAUGE, "Device memory free.",
           source="nvmlDeviceGetMemoryInfo_v2", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_memory_reserved_bytes", GAUGE, "Device memory reserved by the driver and firmware.",
           source="nvmlDeviceGetMemoryInfo_v2", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_performance_state", GAUGE, "Performance state: 0 (P0, fastest) to 15; 32 unknown.",
           source="nvmlDeviceGetPerformanceState", valid=(0.0, 32.0)),
    Metric("nvidia_gpu_persistence_mode", GAUGE, "1 if persistence mode is enabled.",
           source="nvmlDeviceGetPersistenceMode", valid=RATIO),
    Metric("nvidia_gpu_pcie_link_generation", GAUGE, "Current PCIe link generation.",
           source="nvmlDeviceGetCurrPcieLinkGeneration", valid=(1.0, 16.0)),
    Metric("nvidia_gpu_pcie_link_max_generation", GAUGE, "Maximum PCIe link generation of the GPU.",
           source="nvmlDeviceGetMaxPcieLinkGeneration", valid=(1.0, 16.0)),
    Metric("nvidia_gpu_pcie_link_width", GAUGE, "Current PCIe link width (lanes).",
           source="nvmlDeviceGetCurrPcieLinkWidth", valid=(1.0, 64.0)),
    Metric("nvidia_gpu_pcie_link_max_width", GAUGE, "Maximum PCIe link width (lanes).",
           source="nvmlDeviceGetMaxPcieLinkWidth", valid=(1.0, 64.0)),
    Metric("nvidia_gpu_pcie_replay_errors_total", COUNTER, "PCIe replays since the driver was loaded.",
           source="field 94 PCIE_REPLAY_COUNTER", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_clock_event_active", GAUGE, "1 while a clock-event (throttle) reason holds clocks down.",
           ("reason",), "nvmlDeviceGetCurrentClocksEventReasons", valid=RATIO, sparse=True, budget=0),
    Metric("nvidia_gpu_clock_event_duration_seconds_total", COUNTER,
           "Time clocks were held down, by cause, since the driver was loaded.",
           ("reason",), "fields 74-79 PERF_POLICY_*", valid=NON_NEGATIVE, sparse=True),
    Metric("nvidia_gpu_ecc_enabled", GAUGE, "1 if ECC is enabled now.",
           source="nvmlDeviceGetEccMode", valid=RATIO),
    Metric("nvidia_gpu_ecc_errors_total", COUNTER,
           "ECC errors; volatile since the driver was loaded, aggregate over the board's life.",
           ("type", "scope"), "fields 3-6 ECC_{SBE,DBE}_{VOL,AGG}_TOTAL", valid=NON_NEGATIVE, sparse=True, budget=0),
    Metric("nvidia_gpu_retired_pages", GAUGE, "Pages retired, by cause (pre-Ampere boards).",
           ("cause",), "fields 29-30 RETIRED_SBE/DBE", valid=NON_NEGATIVE, sparse=True, budget=0),
    Metric("nvidia_gpu_retired_pages_pending", GAUGE, "1 if a page retirement waits for the next reset.",
           source="field 31 RETIRED_PENDING", valid=RATIO, budget=0),
    Metric("nvidia_gpu_remapped_rows", GAUGE, "Rows remapped, by cause (Ampere and later).",
           ("cause",), "fields 142-143 REMAPPED_COR/UNC", valid=NON_NEGATIVE, sparse=True, budget=0),
    Metric("nvidia_gpu_remapped_rows_pending", GAUGE, "1 if a row remap waits for a GPU reset.",
           source="field 144 REMAPPED_PENDING", valid=RATIO),
    Metric("nvidia_gpu_remapped_rows_failed", GAUGE, "1 if a row remap failed (the board needs service).",
           source="field 145 REMAPPED_FAILURE", valid=RATIO),
    Metric("nvidia_gpu_nvlink_links", GAUGE,
           "NVLink links of the GPU by state: up (active) or down (not active). Absent on a GPU without NVLink.",
           ("state",), "field 165 NVLINK_GET_STATE, per link", valid=NON_NEGATIVE, budget=2),
    Metric("nvidia_gpu_nvlink_errors_total", COUNTER,
           "NVLink data-link errors of the GPU, summed over its links, by type (replay, recovery, crc_flit, "
           "crc_data).",
           ("type",), "fields 161-163 NVLINK_ERROR_DL_*, 39-44/102-107 CRC_DATA, per link", valid=NON_NEGATIVE,
           budget=4),
    Metric("nvidia_gpu_nvlink_link_up", GAUGE,
           "1 if the NVLink link is active. Only for a link that is or was down or counted an error since the "
           "exporter started (every link with --collect.nvlink.per-link).",
           ("link",), "field 165 NVLINK_GET_STATE", valid=RATIO, budget=0),
    Metric("nvidia_gpu_nvlink_link_errors_total", COUNTER,
           "NVLink data-link errors of one link by type (crc_data only for links 0-11, which NVML has field ids "
           "for). Only for the links nvidia_gpu_nvlink_link_up is served for; served at 0 first.",
           ("link", "type"), "fields 161-163 NVLINK_ERROR_DL_*, 39-44/102-107 CRC_DATA", valid=NON_NEGATIVE,
           budget=0),
    Metric("nvidia_gpu_recovery_action", GAUGE,
           "Driver's recovery action: 0 none, 1 gpu_reset, 2 node_reboot, 3 drain_p2p, 4 drain_and_reset.",
           source="field 230 GET_GPU_RECOVERY_ACTION", valid=(0.0, 255.0)),
    Metric("nvidia_gpu_compute_processes", GAUGE, "Compute processes running on the GPU.",
           source="nvmlDeviceGetComputeRunningProcesses", valid=NON_NEGATIVE),
    Metric("nvidia_gpu_workload_info", GAUGE,
           "A workload (Slurm job, Kubernetes pod) on the GPU; always 1. Labels the source does not know are "
           "left out; join on uuid (docs/workloads.md).",
           WORKLOAD_LABELS, "--collect.workload.*: Slurm mapping files, kubelet pod-resources, NVML processes",
           valid=(1.0, 1.0), optional_labels=True, budget=0),
    Metric("nvidia_gpu_xid_errors_total", COUNTER,
           "Xid errors since boot, from NVML events and the kernel journal (a new series is served at 0 first).",
           ("xid",), "NVML XidCriticalError events; kernel journal NVRM: Xid lines", valid=NON_NEGATIVE, budget=0),
    Metric("nvidia_gpu_xid_last_timestamp_seconds", GAUGE, "Unix time of the last Xid of this code.",
           ("xid",), "NVML events; kernel journal", valid=NON_NEGATIVE, budget=0),
    Metric("nvidia_gpu_nvml_events_total", COUNTER,
           "Other NVML events: double_bit_ecc, gpu_unavailable, recovery_action.",
           ("type",), "NVML events", valid=NON_NEGATIVE, budget=0),
    Metric("nvidia_gpu_health", GAUGE,
           "Diagnosis per check: 0 ok, 1 warning, 2 critical (see docs/diagnosis.md).",
           ("check",), "diagnosis", valid=(0.0, 2.0), sparse=True, budget=0),
    Metric("nvidia_gpu_recommended_action", GAUGE, "1 for the strongest action the diagnosis recommends now.",
           ("action",), "diagnosis", valid=RATIO),
    Metric("nvidia_gpu_incidents_total", COUNTER,
           "Incidents in the GPU's persistent history, since its first record: fatal_xid (fatal Xids coalesced, 5 s), "
           "reset, remap.", ("kind",), "incident history (--history.path)", valid=NON_NEGATIVE, sparse=True,
           budget=0),
    Metric("nvidia_gpu_incident_interval_seconds", HISTOGRAM,
           "Time between consecutive fatal-Xid incidents of the GPU (its measured MTBI), since its first "
           "record; from the GPU's second incident on.", ("le",), "incident history (--history.path)",
           valid=NON_NEGATIVE, budget=0),
)

# The thermal model and early warning (exporter/thermal.py, exporter/risk.py; docs/early-warning.md)
GPU_METRICS += (
    Metric("nvidia_gpu_thermal_resistance_celsius_per_watt", GAUGE,
           "Fitted rise of the GPU temperature per watt of power over the last hours (temperature = intercept + "
           "R * power, exponentially weighted, shrunk toward 0.06 C/W while the power hardly varied).",
           source="model over nvmlDeviceGetTemperature and nvmlDeviceGetPowerUsage", valid=(-10.0, 10.0)),
    Metric("nvidia_gpu_temperature_peer_deviation_celsius", GAUGE,
           "How much hotter the GPU runs than the median of the node's other GPUs of its kind at the same power "
           "(fitted temperatures at its mean power). Needs two such peers.",
           source="thermal model", valid=(-200.0, 200.0)),
    Metric("nvidia_gpu_clock_peer_deviation_ratio", GAUGE,
           "SM clock at the power limit relative to the median of the node's other GPUs of its kind at the same "
           "temperature, minus 1 (-0.08: 8 % slower; fail-slow). Needs two such peers and busy time.",
           source="DVFS model over nvmlDeviceGetClockInfo(SM) at the power limit", valid=(-1.0, 10.0)),
    Metric("nvidia_gpu_risk_score", GAUGE,
           "Early-warning risk 0..1 from deviation against the node's peers and leading indicators; 0 on a "
           "healthy GPU (docs/early-warning.md).", source="risk model", valid=RATIO, sparse=True, budget=0),
    Metric("nvidia_gpu_risk_reason", GAUGE,
           "Each contribution to nvidia_gpu_risk_score, 0..1, by reason: temperature, clocks, ecc, pcie, xid, "
           "remap_pending.", ("reason",), "risk model", valid=RATIO, sparse=True, budget=0),
)

EXPORTER_METRICS: tuple[Metric, ...] = (
    Metric("nvml_exporter_build_info", GAUGE, "Build of the exporter; always 1.",
           ("version", "pynvml_version", "python_version"), per_gpu=False),
    Metric("nvml_exporter_nvml_up", GAUGE, "1 once NVML is initialised, 0 while the library or driver is missing.",
           per_gpu=False),
    Metric("nvml_exporter_collect_duration_seconds", GAUGE, "Time the last collection of each GPU took.",
           ("gpu",), per_gpu=False),
    Metric("nvml_exporter_collect_timeouts_total", COUNTER,
           "Collections of a GPU that missed the scrape deadline; the scrape served its last good values. "
           "A GPU has a series from its first timeout on (served at 0 first).",
           ("gpu",), per_gpu=False, sparse=True, budget=0),
    Metric("nvml_exporter_nvml_errors_total", COUNTER, "NVML calls that failed, by function and error.",
           ("function", "error"), per_gpu=False, budget=0),
    Metric("nvml_exporter_invalid_readings_total", COUNTER,
           "Readings dropped because NVML returned a sentinel or impossible value.",
           ("metric",), per_gpu=False, budget=0),
    Metric("nvml_exporter_journal_up", GAUGE,
           "1 if the kernel journal is readable for Xid backfill, 0 if only NVML events are counted.",
           per_gpu=False),
    Metric("nvml_exporter_workloads_dropped_total", COUNTER,
           "Workloads not exported because their GPU already had 16 (each counted once while it lasts).",
           per_gpu=False, budget=0),
    Metric("nvml_exporter_workload_refresh_errors_total", COUNTER,
           "Reads of a workload source that failed (the scrape is served with the last good reading).",
           ("source",), per_gpu=False, budget=0),
    Metric("nvml_exporter_last_collect_timestamp_seconds", GAUGE,
           "Unix time of the last finished collection.", per_gpu=False),
    Metric("nvidia_gpu_pci_devices", GAUGE,
           "NVIDIA GPUs (PCI display/3D functions, vendor 0x10de) the kernel lists on the PCI bus; more than NVML "
           "answers for means a GPU is gone from the driver.",
           source="sysfs /sys/bus/pci/devices/*/{vendor,class}, rescanned every 30 s", per_gpu=False),
    Metric("nvidia_gpu_expected", GAUGE, "GPUs this node should have (--gpus.expected); absent without the flag.",
           source="--gpus.expected", per_gpu=False, budget=0),
    Metric("nvidia_nvswitch_sxid_errors_total", COUNTER,
           "NVSwitch SXid errors this boot, per NVSwitch (its PCI address), from the kernel journal.",
           ("pci", "sxid"), "kernel journal nvidia-nvswitchN: SXid lines", per_gpu=False, budget=0),
    Metric("nvidia_nvswitch_sxid_last_timestamp_seconds", GAUGE,
           "Unix time of the last SXid of this code on this NVSwitch (from the journal line's time).",
           ("pci", "sxid"), "kernel journal nvidia-nvswitchN: SXid lines", per_gpu=False, valid=NON_NEGATIVE, budget=0),
)

ALL_METRICS: tuple[Metric, ...] = GPU_METRICS + EXPORTER_METRICS
# nvidia_gpu_* families of the node rather than of one GPU (the names issue 19 gives them)
NODE_GPU_FAMILIES = frozenset({"nvidia_gpu_pci_devices", "nvidia_gpu_expected"})
BUDGET_LIMIT = 50  # series per GPU on a healthy node (issue 14: ~10,000 GPUs on one Prometheus)
DEMO_GPUS = 8
BY_NAME: dict[str, Metric] = {m.name: m for m in ALL_METRICS}


def budget_per_gpu(gpus: int = DEMO_GPUS) -> float:
    """Series per GPU the budgets add up to on a node of `gpus` GPUs (node-wide families shared out)."""
    per_gpu = sum(m.budget for m in ALL_METRICS if m.per_gpu or "gpu" in m.labels)
    per_node = sum(m.budget for m in ALL_METRICS if not (m.per_gpu or "gpu" in m.labels))
    return per_gpu + per_node / gpus


def render_markdown() -> str:
    """docs/metrics.md, generated from the table above (`python -m nvml_exporter.metrics`)."""
    lines = [
        "# Metrics reference",
        "",
        "Generated from `exporter/metrics.py` by `python -m nvml_exporter.metrics`; do not edit by hand.",
        "",
        "Every `nvidia_gpu_*` series also carries `gpu` (the NVML index) and `uuid`. A metric the GPU's",
        "NVML answers NOT_SUPPORTED for is omitted for that GPU, never exported as 0. A lost GPU keeps",
        "`nvidia_gpu_up 0`, `nvidia_gpu_info` (so you know which board it is), its Xid counters and its",
        "diagnosis, and drops everything else.",
        "",
        "## Cardinality budget",
        "",
        f"A healthy node serves at most {BUDGET_LIMIT} series per GPU, every family and the exporter's own",
        "included. The budget column below is what each family serves per GPU on the `make demo` page (8",
        "H100 SXM5 under load, `tests/fakenvml/scenarios/h100x8.conf`; per node for a family without a `gpu`",
        f"label); they add up to **{budget_per_gpu():g} series per GPU**, which is what that page measures:",
        "`tests/test_cardinality.py` fails when the page and these budgets part, or the page passes",
        f"{BUDGET_LIMIT} per GPU, and prints the count of every family. A board without something (fans,",
        "page retirement, NVLink) serves less; a fan adds one series. (Before the budget the same page",
        "served 156 series per GPU, 84 of them per-link NVLink series.)",
        "",
        "Health signal is not given up for it:",
        "",
        "- **NVLink**: every GPU always serves its links by state (`nvidia_gpu_nvlink_links{state=\"up\"|\"down\"}`)",
        "  and its errors summed over its links by type (`nvidia_gpu_nvlink_errors_total{type}`). A link's",
        "  detail (`nvidia_gpu_nvlink_link_up{link}`, `nvidia_gpu_nvlink_link_errors_total{link,type}`) is",
        "  served once the link has been down or counted an error since the exporter started (a link with",
        "  errors already at start included), and from then on, so that the technician sees which link. A",
        "  link that turns faulty after start has its counters served at 0 first, for one second, then",
        "  with their count: `increase()` and `rate()` see its first errors. `--collect.nvlink.per-link`",
        "  serves every link's detail. The per-GPU total never drops because a link went down (its",
        "  counters stop answering): a link counts with its last reading, and a link whose counter goes",
        "  back keeps what it had counted in the total. A GPU without NVLink serves no NVLink family.",
        "- **Sparse families** (marked below): a series whose value is 0 on a healthy GPU (an error",
        "  counter, a throttle reason, a diagnosis check that is ok, an idle video engine) is served",
        "  once it has been non-zero since the exporter started, and from then on (it never comes and",
        "  goes). A counter that turns non-zero after start is served at 0 first, for one second, as new",
        "  Xid series are. So an absent series of a sparse family reads as 0; `nvidia_gpu_ecc_enabled`",
        "  says whether the ECC counters are read at all, and `nvidia_gpu_recommended_action{action=\"none\"}`",
        "  is every GPU's verdict when no check is off. `nvml_exporter_collect_timeouts_total{gpu}` is",
        "  served the same way, from a GPU's first timeout on.",
        "- Xid and other NVML event counters appear with the first event (at 0 first for a live one).",
        "",
        "| metric | type | labels | budget per GPU | sparse | help | NVML source |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in ALL_METRICS:
        labels = ", ".join((("gpu", "uuid") if m.per_gpu else ()) + m.labels) or "—"
        where = "" if m.per_gpu or "gpu" in m.labels else " per node"
        lines.append(f"| `{m.name}` | {m.type} | {labels} | {m.budget}{where} | {'sparse' if m.sparse else ''} "
                     f"| {m.help} | {m.source or '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
