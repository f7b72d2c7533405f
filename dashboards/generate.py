"""Writes the Grafana dashboards (classic JSON model) in this folder: `python dashboards/generate.py`.

The panels are data here so that ids, grid positions and the datasource reference stay consistent;
tests check the written JSON (valid, unique ids, every query answers on a real Prometheus) and that
it equals what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance",gpu=~"$gpu"'
NODE = 'instance=~"$instance"'


def datasource_var() -> dict:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1}


def query_var(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "query": {"query": query, "refId": name},
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 3, "hide": 0}


def textbox(name: str, value: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "textbox", "query": value,
            "current": {"text": value, "value": value}, "hide": 0}


def panel(kind: str, title: str, targets: list[tuple[str, str]], unit: str = "short", w: int = 12, h: int = 8,
          description: str = "", **extra: object) -> dict:
    p = {"type": kind, "title": title, "datasource": DS, "description": description,
         "gridPos": {"w": w, "h": h},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": expr, "legendFormat": legend,
                      **({"instant": True, "format": "table"} if kind == "table" else {})}
                     for i, (expr, legend) in enumerate(targets)]}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    p.update(extra)
    return p


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def layout(panels: list[dict]) -> list[dict]:
    """Ids in order, and grid positions flowing left to right, top to bottom."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24 or p["type"] == "row":
            x, y, line_h = 0, y + line_h, 0
        p["gridPos"].update(x=x, y=y)
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return panels


def dashboard(uid: str, title: str, panels: list[dict], variables: list[dict], description: str) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["nvml-exporter", "gpu"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "timezone": "",
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": variables},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "nvml-exporter dashboards", "type": "dashboards", "tags": ["nvml-exporter"],
                   "asDropdown": True}],
        "panels": layout(panels),
    }


def fleet() -> dict:
    panels = [
        panel("stat", "GPUs", [("fleet:nvidia_gpus:count", "GPUs")], w=4, h=4),
        panel("stat", "GPUs up", [("fleet:nvidia_gpus_up:sum", "up")], w=4, h=4),
        panel("stat", "GPUs lost", [("sum(instance:nvidia_gpus_lost:sum)", "lost")], w=4, h=4),
        panel("stat", "Nodes without NVML", [("count(nvml_exporter_nvml_up == 0) or vector(0)", "nodes")], w=4, h=4),
        panel("stat", "GPUs critical", [("count(max by (instance, uuid) (nvidia_gpu_health) == 2) or vector(0)",
                                         "critical")], w=4, h=4),
        panel("stat", "GPUs warning", [("count(max by (instance, uuid) (nvidia_gpu_health) == 1) or vector(0)",
                                        "warning")], w=4, h=4),
        panel("timeseries", "GPUs by health check", [("check:nvidia_gpus_critical:count", "{{check}} critical"),
                                                     ("check:nvidia_gpus_warning:count", "{{check}} warning")]),
        panel("timeseries", "GPUs by recommended action", [('action:nvidia_gpus:count{action!="none"}', "{{action}}"),
                                                           ("action:nvidia_gpus:count", "{{action}}")]),
        panel("table", "Active alerts by action", [('count by (action, severity, alertname) '
                                                    '(ALERTS{alertstate="firing", action!=""})', "")], w=12),
        panel("table", "Lost GPUs", [("nvidia_gpu_up * on (job, instance, gpu, uuid) group_left (name, pci_bus_id) "
                                      "nvidia_gpu_info == 0", "")], w=12),
        panel("bargauge", "Hottest GPUs (distance to slowdown)",
              [("topk(10, nvidia_gpu_temperature_celsius - ignoring (threshold) "
                "nvidia_gpu_temperature_threshold_celsius{threshold=\"slowdown\"})", "{{instance}} GPU {{gpu}}")],
              unit="celsius"),
        panel("bargauge", "Most throttled GPUs (hardware and thermal reasons)",
              [("topk(10, sum without (reason) (rate(nvidia_gpu_clock_event_duration_seconds_total"
                "{reason=~\"thermal|reliability|board_limit\"}[$__rate_interval])))", "{{instance}} GPU {{gpu}}")],
              unit="percentunit"),
        panel("timeseries", "Xids by category (per hour)", [("category:nvidia_gpu_xids:increase1h", "{{category}}")],
              w=24),
        panel("table", "GPUs per model", [("model:nvidia_gpus:count", ""), ("model:nvidia_gpus_up:sum", "")], w=12),
        panel("table", "GPUs per node", [("instance:nvidia_gpus:count", ""), ("instance:nvidia_gpus_lost:sum", "")],
              w=12),
    ]
    return dashboard("nvml-exporter-fleet", "GPU fleet (nvml-exporter)", panels, [datasource_var()],
                     "Every GPU of the fleet: health, lost GPUs, alerts by action, hot and throttled GPUs, Xids.")


def node() -> dict:
    s = SEL
    panels = [
        row("Health"),
        panel("table", "GPUs", [(f"nvidia_gpu_info{{{s}}}", "")], w=24, h=6),
        panel("table", "Workloads on each GPU", [(f"nvidia_gpu_workload_info{{{s}}}", "")], w=24, h=6,
              description="Slurm jobs and pods on each GPU, with --collect.workload.* (docs/workloads.md); "
                          "empty without a workload source."),
        # -1 while the exporter let go of the GPU for a reset (nvidia_gpu_released), which is not a fault
        panel("timeseries", "Up (1 up, 0 down, -1 released for a GPU reset)",
              [(f"nvidia_gpu_up{{{s}}} - (nvidia_gpu_released{{{s}}} or 0 * nvidia_gpu_up{{{s}}})", "GPU {{gpu}}")],
              w=8),
        panel("timeseries", "Health by check (0 ok, 1 warning, 2 critical)",
              [(f"nvidia_gpu_health{{{s}}}", "GPU {{gpu}} {{check}}")], w=8),
        panel("table", "Recommended action", [(f"nvidia_gpu_recommended_action{{{s}}} == 1", "")], w=8),
        panel("timeseries", "Driver recovery action", [(f"nvidia_gpu_recovery_action{{{s}}}", "GPU {{gpu}}")], w=12),
        panel("timeseries", "Compute processes", [(f"nvidia_gpu_compute_processes{{{s}}}", "GPU {{gpu}}")], w=12),
        panel("timeseries", "Early-warning risk (0 healthy; docs/early-warning.md)",
              [(f"nvidia_gpu_risk_score{{{s}}}", "GPU {{gpu}}"),
               (f"nvidia_gpu_risk_reason{{{s}}} > 0", "GPU {{gpu}} {{reason}}")], unit="percentunit", w=12,
              description="Sparse: a GPU shows a line once it has scored above 0 since the exporter started."),
        panel("stat", "GPUs: on the PCI bus, answering NVML, expected",
              [(f"nvidia_gpu_pci_devices{{{NODE}}}", "{{instance}} PCI"),
               (f"count by (instance) (nvidia_gpu_up{{{NODE}}} == 1)", "{{instance}} NVML"),
               (f"nvidia_gpu_expected{{{NODE}}}", "{{instance}} expected")], w=12),
        row("Thermal"),
        panel("timeseries", "GPU temperature", [(f"nvidia_gpu_temperature_celsius{{{s}}}", "GPU {{gpu}}"),
                                                (f'nvidia_gpu_temperature_threshold_celsius{{{s},threshold="slowdown"}}',
                                                 "GPU {{gpu}} slowdown")], unit="celsius", w=8),
        panel("timeseries", "HBM temperature", [(f"nvidia_gpu_memory_temperature_celsius{{{s}}}", "GPU {{gpu}}"),
                                                (f'nvidia_gpu_temperature_threshold_celsius{{{s},threshold="memory_max"}}',
                                                 "GPU {{gpu}} memory max")], unit="celsius", w=8),
        panel("timeseries", "Margin below T.Limit (HW slowdown at the slowdown_tlimit line)",
              [(f"nvidia_gpu_temperature_margin_celsius{{{s}}}", "GPU {{gpu}}"),
               (f'nvidia_gpu_temperature_threshold_celsius{{{s},threshold="slowdown_tlimit"}}',
                "GPU {{gpu}} slowdown")], unit="celsius", w=8),
        panel("timeseries", "Thermal resistance (fitted)",
              [(f"nvidia_gpu_thermal_resistance_celsius_per_watt{{{s}}}", "GPU {{gpu}}")], w=8),
        panel("timeseries", "Temperature above peers at the same power",
              [(f"nvidia_gpu_temperature_peer_deviation_celsius{{{s}}}", "GPU {{gpu}}")], unit="celsius", w=8),
        panel("timeseries", "SM clock vs peers at the same temperature, at the power limit",
              [(f"nvidia_gpu_clock_peer_deviation_ratio{{{s}}}", "GPU {{gpu}}")], unit="percentunit", w=8),
        panel("timeseries", "Fan speed", [(f"nvidia_gpu_fan_speed_ratio{{{s}}} or "
                                           f"0 * nvidia_gpu_temperature_celsius{{{s}}}", "GPU {{gpu}} fan {{fan}}")],
              unit="percentunit", w=8, description="Passive (SXM) boards have no fans; they show 0."),
        row("Power"),
        panel("timeseries", "Power draw and limits", [(f"nvidia_gpu_power_watts{{{s}}}", "GPU {{gpu}}"),
                                                      (f"nvidia_gpu_power_limit_watts{{{s}}}", "GPU {{gpu}} limit"),
                                                      (f"nvidia_gpu_power_default_limit_watts{{{s}}}",
                                                       "GPU {{gpu}} default limit")], unit="watt"),
        panel("timeseries", "Energy (average power from the counter)",
              [(f"rate(nvidia_gpu_energy_joules_total{{{s}}}[$__rate_interval])", "GPU {{gpu}}")], unit="watt"),
        row("Clocks and throttling"),
        panel("timeseries", "Clocks", [(f"nvidia_gpu_clock_hertz{{{s}}}", "GPU {{gpu}} {{clock}}"),
                                       (f'nvidia_gpu_clock_max_hertz{{{s},clock="sm"}}', "GPU {{gpu}} sm max")],
              unit="hertz", w=8),
        panel("timeseries", "Clock-event reasons active", [(f"nvidia_gpu_clock_event_active{{{s}}} == 1",
                                                            "GPU {{gpu}} {{reason}}")], w=8),
        panel("timeseries", "Time held down, by cause", [(f"rate(nvidia_gpu_clock_event_duration_seconds_total{{{s}}}"
                                                          "[$__rate_interval])", "GPU {{gpu}} {{reason}}")],
              unit="percentunit", w=8),
        panel("timeseries", "Performance state and persistence", [(f"nvidia_gpu_performance_state{{{s}}}",
                                                                   "GPU {{gpu}} P-state"),
                                                                  (f"nvidia_gpu_persistence_mode{{{s}}}",
                                                                   "GPU {{gpu}} persistence")], w=12),
        panel("timeseries", "Utilization", [(f"nvidia_gpu_utilization_ratio{{{s}}}", "GPU {{gpu}}"),
                                            (f"nvidia_gpu_memory_utilization_ratio{{{s}}}", "GPU {{gpu}} memory"),
                                            (f"nvidia_gpu_encoder_utilization_ratio{{{s}}} or "
                                             f"0 * nvidia_gpu_utilization_ratio{{{s}}}", "GPU {{gpu}} encoder"),
                                            (f"nvidia_gpu_decoder_utilization_ratio{{{s}}} or "
                                             f"0 * nvidia_gpu_utilization_ratio{{{s}}}", "GPU {{gpu}} decoder")],
              unit="percentunit", w=12,
              description="Video engines are served once used since the exporter started; until then they show 0."),
        row("Memory and ECC"),
        panel("timeseries", "Device memory", [(f"nvidia_gpu_memory_used_bytes{{{s}}}", "GPU {{gpu}} used"),
                                              (f"nvidia_gpu_memory_free_bytes{{{s}}}", "GPU {{gpu}} free"),
                                              (f"nvidia_gpu_memory_reserved_bytes{{{s}}}", "GPU {{gpu}} reserved"),
                                              (f"nvidia_gpu_memory_total_bytes{{{s}}}", "GPU {{gpu}} total")],
              unit="bytes", w=8),
        panel("timeseries", "ECC errors", [(f"nvidia_gpu_ecc_errors_total{{{s}}}", "GPU {{gpu}} {{type}} {{scope}}"),
                                           (f"nvidia_gpu_ecc_enabled{{{s}}}", "GPU {{gpu}} ECC enabled")], w=8),
        panel("timeseries", "Remapped rows and retired pages",
              [(f"nvidia_gpu_remapped_rows{{{s}}} or nvidia_gpu_retired_pages{{{s}}}", "GPU {{gpu}} {{cause}}"),
               (f"nvidia_gpu_remapped_rows_pending{{{s}}} or nvidia_gpu_retired_pages_pending{{{s}}}",
                "GPU {{gpu}} pending"),
               (f"nvidia_gpu_remapped_rows_failed{{{s}}}", "GPU {{gpu}} remap failed")], w=8),
        row("PCIe"),
        panel("timeseries", "PCIe link", [(f"nvidia_gpu_pcie_link_generation{{{s}}}", "GPU {{gpu}} gen"),
                                          (f"nvidia_gpu_pcie_link_max_generation{{{s}}}", "GPU {{gpu}} max gen"),
                                          (f"nvidia_gpu_pcie_link_width{{{s}}}", "GPU {{gpu}} width"),
                                          (f"nvidia_gpu_pcie_link_max_width{{{s}}}", "GPU {{gpu}} max width")]),
        panel("timeseries", "PCIe replays per minute",
              [(f"rate(nvidia_gpu_pcie_replay_errors_total{{{s}}}[$__rate_interval]) * 60", "GPU {{gpu}}")]),
        row("NVLink"),
        panel("timeseries", "NVLink links by state", [(f"nvidia_gpu_nvlink_links{{{s}}}", "GPU {{gpu}} {{state}}")],
              w=6),
        panel("timeseries", "NVLink errors per second",
              [(f"rate(nvidia_gpu_nvlink_errors_total{{{s}}}[$__rate_interval])", "GPU {{gpu}} {{type}}")], w=6),
        panel("table", "NVLink links down", [(f"nvidia_gpu_nvlink_link_up{{{s}}} == 0", "")], w=6,
              description="Per-link detail is served for links that are or were down or counted errors since the "
                          "exporter started (every link with --collect.nvlink.per-link)."),
        panel("timeseries", "NVLink errors per second, by link",
              [(f"sum without (type) (rate(nvidia_gpu_nvlink_link_errors_total{{{s}}}[$__rate_interval]))",
                "GPU {{gpu}} link {{link}}")], w=6,
              description="Only links that counted errors (or every link with --collect.nvlink.per-link)."),
        row("Xids and events"),
        panel("timeseries", "Xid timeline (count per code)", [(f"nvidia_gpu_xid_errors_total{{{s}}}",
                                                               "GPU {{gpu}} Xid {{xid}}")], w=8),
        panel("table", "Last Xid of each code", [(f"nvidia_gpu_xid_last_timestamp_seconds{{{s}}} * 1000", "")],
              unit="dateTimeAsIso", w=8),
        panel("timeseries", "Other NVML events", [(f"nvidia_gpu_nvml_events_total{{{s}}}", "GPU {{gpu}} {{type}}")],
              w=8),
        panel("timeseries", "Incident history (across restarts and reboots)",
              [(f"nvidia_gpu_incidents_total{{{s}}}", "GPU {{gpu}} {{kind}}")], w=8,
              description="Fatal Xids coalesced into incidents, GPU resets and row remaps, as the exporter's "
                          "persistent history counts them (--history.path)."),
        panel("timeseries", "Measured time between incidents (median)",
              [(f"histogram_quantile(0.5, sum by (gpu, le) (nvidia_gpu_incident_interval_seconds_bucket{{{s}}}))",
                "GPU {{gpu}}")], unit="s", w=8),
        panel("timeseries", "NVSwitch SXids",
              [(f"nvidia_nvswitch_sxid_errors_total{{{NODE}}}", "{{instance}} {{pci}} SXid {{sxid}}")], w=8),
        panel("timeseries", "Time since the last SXid",
              [(f"time() - nvidia_nvswitch_sxid_last_timestamp_seconds{{{NODE}}}",
                "{{instance}} {{pci}} SXid {{sxid}}")],
              unit="s", w=8),
        row("Exporter"),
        panel("timeseries", "Collection time per GPU", [(f"nvml_exporter_collect_duration_seconds{{{NODE}}}",
                                                         "{{instance}} GPU {{gpu}}")], unit="s", w=6),
        panel("timeseries", "Collections past the deadline",
              [(f"increase(nvml_exporter_collect_timeouts_total{{{NODE}}}[$__rate_interval]) or "
                f"0 * nvml_exporter_collect_duration_seconds{{{NODE}}}", "{{instance}} GPU {{gpu}}")],
              w=6, description="A GPU's counter appears with its first timeout; until then it shows 0."),
        panel("timeseries", "NVML errors", [(f"nvml_exporter_nvml_errors_total{{{NODE}}}", "{{function}} {{error}}")],
              w=6),
        panel("stat", "NVML, journal, last collection",
              [(f"nvml_exporter_nvml_up{{{NODE}}}", "NVML up"), (f"nvml_exporter_journal_up{{{NODE}}}", "journal"),
               (f"time() - nvml_exporter_last_collect_timestamp_seconds{{{NODE}}}", "seconds since collection"),
               (f"nvml_exporter_build_info{{{NODE}}}", "{{version}}"),
               (f"sum(nvml_exporter_invalid_readings_total{{{NODE}}}) or vector(0)", "invalid readings")], w=6),
        panel("timeseries", "Workload sources: failed reads and dropped workloads",
              [(f"increase(nvml_exporter_workload_refresh_errors_total{{{NODE}}}[$__rate_interval])",
                "{{instance}} {{source}} failed"),
               (f"increase(nvml_exporter_workloads_dropped_total{{{NODE}}}[$__rate_interval])",
                "{{instance}} dropped (over 16 on a GPU)")], w=12),
    ]
    variables = [datasource_var(), query_var("instance", "label_values(nvidia_gpu_up, instance)", "Node"),
                 query_var("gpu", 'label_values(nvidia_gpu_up{instance=~"$instance"}, gpu)', "GPU")]
    return dashboard("nvml-exporter-node", "GPU node (nvml-exporter)", panels, variables,
                     "Every metric family of the exporter for the chosen nodes and GPUs, grouped as a person "
                     "reads them.")


def reliability() -> dict:
    lam = "fleet:nvidia_gpu_fault_rate_per_gpu_hour:7d"
    panels = [
        panel("stat", "Critical faults per GPU-hour (7d)", [(lam, "lambda 7d")], w=6, h=5),
        panel("stat", "Critical faults per GPU-hour (30d)", [("fleet:nvidia_gpu_fault_rate_per_gpu_hour:30d",
                                                              "lambda 30d")], w=6, h=5),
        panel("stat", "MTBF per GPU (7d / 30d)", [("fleet:nvidia_gpu_mtbf_hours:7d", "7d"),
                                                  ("fleet:nvidia_gpu_mtbf_hours:30d", "30d")], unit="h", w=6, h=5),
        panel("stat", "Job MTBF for $N GPUs (7d)", [(f"1 / ({lam} * $N)", "hours")], unit="h", w=6, h=5),
        panel("gauge", "Failure probability of a $N-GPU job running $T hours",
              [(f"1 - exp(-{lam} * $N * $T)", "P(failure)")], unit="percentunit", w=8,
              description="P = 1 - exp(-lambda * N * T), lambda the fleet's critical-fault rate per GPU-hour."),
        panel("stat", "Checkpoint interval (Young/Daly) for C = $C h",
              [(f"sqrt(2 * $C / ({lam} * $N))", "hours")], unit="h", w=8,
              description="sqrt(2 * C * MTBF_job), MTBF_job = 1 / (lambda * N)."),
        panel("stat", "Defaults recorded in Prometheus (N, T, C)",
              [("nvml_exporter:reliability_job_gpus:param", "N"), ("nvml_exporter:reliability_job_hours:param", "T"),
               ("nvml_exporter:reliability_checkpoint_hours:param", "C"),
               ("fleet:nvidia_job_failure_probability:7d", "P at defaults"),
               ("fleet:nvidia_job_checkpoint_interval_hours:7d", "interval at defaults")], w=8),
        panel("timeseries", "Critical faults per 5 minutes", [("fleet:nvidia_gpu_critical_faults:increase5m",
                                                               "faults")], w=12),
        panel("timeseries", "Faults by category (per hour)", [("category:nvidia_gpu_xids:increase1h", "{{category}}")],
              w=12),
        panel("timeseries", "GPUs in the fleet", [("fleet:nvidia_gpus:count", "GPUs"),
                                                  ("fleet:nvidia_gpus_up:sum", "up")], w=12),
        panel("stat", "Measured time between incidents (fleet)",
              [("histogram_quantile(0.5, sum by (le) (nvidia_gpu_incident_interval_seconds_bucket))", "median"),
               ("histogram_quantile(0.1, sum by (le) (nvidia_gpu_incident_interval_seconds_bucket))", "p10")],
              unit="s", w=12,
              description="From the GPUs' incident histories (fatal Xids coalesced into incidents, across reboots): "
                          "the measured time between incidents of one GPU, beside the model's lambda above."),
        panel("timeseries", "Measured incidents per GPU-hour, by model (30d)",
              [("model:nvidia_gpu_incident_rate_per_gpu_hour:30d", "{{name}}")], w=12,
              description="Recorded from the incident histories: incidents (not raw Xids) per GPU-hour of each "
                          "GPU model; compare with lambda, which counts critical Xids."),
        panel("stat", "Median time between a GPU's incidents (30d, recorded)",
              [("fleet:nvidia_gpu_incident_interval_seconds:median30d", "median")], unit="s", w=12),
        panel("table", "At risk now (early warning, docs/early-warning.md)",
              [("topk(20, nvidia_gpu_risk_score > 0)", "")], w=12),
        panel("timeseries", "Cooling and fail-slow: worst deviation from node peers",
              [("topk(5, nvidia_gpu_temperature_peer_deviation_celsius)", "{{instance}} GPU {{gpu}} C hotter"),
               ("bottomk(5, nvidia_gpu_clock_peer_deviation_ratio) * 100", "{{instance}} GPU {{gpu}} % clock")],
              w=12),
    ]
    variables = [datasource_var(), textbox("N", "1024", "Job GPUs (N)"), textbox("T", "24", "Job hours (T)"),
                 textbox("C", "0.05", "Checkpoint hours (C)")]
    return dashboard("nvml-exporter-reliability", "GPU reliability (nvml-exporter)", panels, variables,
                     "Critical-fault rate, MTBF, the chance an N-GPU job of T hours fails, and how often to "
                     "checkpoint.")


DASHBOARDS = {"nvml-exporter-fleet.json": fleet, "nvml-exporter-node.json": node,
              "nvml-exporter-reliability.json": reliability}


def render(build) -> str:  # type: ignore[no-untyped-def]
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))
    sys.exit(0)
