"""Writes the rule pack in this folder: `python rules/generate.py` (options: `--help`, docs/alerts.md).

The alerts, their thresholds and the recording rules are tables here; the Xid codes of each tier and
category come from the catalog (nvml_exporter/xidcatalog.py). Run with no options it writes the committed
files: rules/nvml-exporter-alerts.yml, rules/nvml-exporter-records.yml and the Thanos Ruler variant
rules/thanos/nvml-exporter-alerts.yml; tests check that they equal its output and that the pack keeps
the structural rules below for any option.

Structure, for rulers other than one Prometheus (Thanos, Mimir, VictoriaMetrics vmalert):
- the cluster label is in every `by` and `on`, so that rollups of two clusters never merge; series
  without it (one cluster) aggregate exactly as before;
- at most 20 rules a group (Mimir's default limit rejects a whole group above it), intervals ≤ 5m;
- no rule reads a series recorded in its own group: vmalert writes results asynchronously and the
  Thanos/Mimir rulers query remotely, so such a read sees the previous pass or nothing;
- cost at fleet scale: exact-match selectors on the families a rule needs (regexes only over the
  `xid` label, whose values are few), rates of per-GPU counters in 1-minute groups, alerts held 30
  minutes or more in 5-minute groups, windows over every GPU only over 5-minute records, windows of
  days only over recorded 5-minute slices.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nvml_exporter.xidcatalog import CATALOG, CATEGORIES, tier_codes

HERE = Path(__file__).resolve().parent
RUNBOOK_URL = "https://github.com/nvml-exporter/nvml-exporter/blob/main/docs/runbooks/{alertname}.md"
MAX_RULES_PER_GROUP = 20

# The reliability model's parameters (docs/alerts.md): GPUs in a job, job hours, checkpoint hours.
JOB_GPUS, JOB_HOURS, CHECKPOINT_HOURS = 1024, 24, 0.05
CRITICAL_TIERS = ("reset", "double_bit_ecc", "fell_off_bus", "nvlink", "mechanical")


@dataclass(frozen=True)
class Options:
    cluster: str = "cluster"
    selector: str = ""  # label matchers added to every selector of an exporter family
    runbook_url: str = RUNBOOK_URL
    thanos: bool = False
    test_timing: bool = False  # for end-to-end tests: every group interval 1-2 s, every `for` in seconds
    job_gpus: int = JOB_GPUS
    job_hours: float = JOB_HOURS
    checkpoint_hours: float = CHECKPOINT_HOURS

    def m(self, name: str, matchers: str = "") -> str:
        """A selector of an exporter family: the configured matchers, then the rule's own."""
        inner = ",".join(x for x in (self.selector, matchers) if x)
        return f"{name}{{{inner}}}" if inner else name

    def by(self, *labels: str) -> str:
        return f"({', '.join((self.cluster, *labels))})"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    severity: str
    action: str
    summary: str
    description: str
    for_: str = ""


@dataclass(frozen=True)
class Record:
    name: str
    expr: str


@dataclass
class Group:
    name: str
    interval: str
    rules: list[Alert | Record] = field(default_factory=list)


def codes(*tiers: str) -> str:
    return "|".join(str(c) for c in tier_codes(*tiers))


def on_gpu(text: str) -> str:
    return "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }} " + text


def xid_alert(o: Options, name: str, tiers: tuple[str, ...], severity: str, action: str, summary: str,
              text: str) -> Alert:
    expr = f'time() - {o.m("nvidia_gpu_xid_last_timestamp_seconds", f"xid=~{q(codes(*tiers))}")} < 600'
    return Alert(name, expr, severity, action, summary,
                 on_gpu("logged Xid {{ $labels.xid }} " + text + " (see docs/xid-catalog.md)."))


def q(s: str) -> str:
    return f'"{s}"'


def alert_groups(o: Options) -> list[Group]:
    drain_reset = "|".join(str(x) for x in tier_codes("reset") if CATALOG[x].action == "drain_and_reset")
    documented = "|".join(str(x) for x, v in sorted(CATALOG.items()) if v.tier != "unexpected")
    nvml_errors = "error!~" + q("not_supported|function_not_found|gpu_is_lost")  # not faults of the node
    rule_group = 'rule_group=~".*;nvml-exporter-.*"'
    vm_group = 'group=~"nvml-exporter-.*"'
    return [
        Group("nvml-exporter-gpu", "30s", [
            Alert("GpuRecoveryActionRequired", f"{o.m('nvidia_gpu_recovery_action')} > 0", "critical",
                  "{{ if eq $value 1.0 }}reset_gpu{{ else if eq $value 2.0 }}reboot_node{{ else if eq $value 3.0 }}"
                  "drain_p2p{{ else if eq $value 4.0 }}drain_and_reset{{ else }}contact_support{{ end }}",
                  "The driver demands a recovery action on a GPU.",
                  on_gpu("reports recovery action {{ $value }} (1 GPU reset, 2 node reboot, 3 drain P2P, "
                         "4 drain and reset).")),
            # a GPU the node agent had the exporter release for a reset is down on purpose (docs/remediation.md)
            Alert("GpuLost",
                  f"{o.m('nvidia_gpu_up')} == 0\n"
                  f"unless on {o.by('job', 'instance', 'gpu', 'uuid')} {o.m('nvidia_gpu_released')} == 1",
                  "critical", "reboot_node",
                  "A GPU stopped answering NVML.",
                  on_gpu("is lost (fell off the bus or failed); its metrics are gone until it returns."), "1m"),
            Alert("GpuReleasedTooLong", f"{o.m('nvidia_gpu_released')} == 1", "warning", "none",
                  "A GPU released for a reset has not been taken back.",
                  on_gpu("has been released by the exporter for a reset for 30 minutes ({{ $value }}): the node "
                         "agent's reset is stuck or the agent died; see its audit log, then reacquire."), "30m"),
        ]),
        Group("nvml-exporter-node", "1m", [
            Alert("GpuMissing",
                  f"instance:nvidia_gpus:count < on {o.by('job', 'instance')} "
                  "max_over_time(instance:nvidia_gpus:count[6h])",
                  "critical", "reboot_node", "A node reports fewer GPUs than it did in the last 6 hours.",
                  "{{ $labels.instance }} reports {{ $value }} GPUs, fewer than its maximum over the last 6 hours.",
                  "5m"),
            # `up` alone cannot tell the exporter's targets from others: a target is the exporter's if it
            # served the exporter's metrics in the last day (recorded per node, so the window is cheap).
            Alert("NvmlExporterDown",
                  f"{o.m('up')} == 0 and on {o.by('job', 'instance')} "
                  "max_over_time(instance:nvml_exporter_nvml_up:max[1d])",
                  "warning", "none", "The GPU exporter cannot be scraped.",
                  "nvml-exporter on {{ $labels.instance }} (job {{ $labels.job }}) cannot be scraped: "
                  "no GPU health is known for this node.", "5m"),
            Alert("NvmlDown",
                  f"{o.m('nvml_exporter_nvml_up')} == 0\n"
                  f"unless on {o.by('job', 'instance')} max by {o.by('job', 'instance')} "
                  f"({o.m('nvidia_gpu_released')})",
                  "critical", "reboot_node",
                  "NVML (the NVIDIA driver library) is not available.",
                  "nvml-exporter on {{ $labels.instance }} cannot initialise NVML: the driver is not loaded or "
                  "the library is missing; no GPU on this node is usable.", "5m"),
            Alert("NvmlCollectionTimeouts", f"increase({o.m('nvml_exporter_collect_timeouts_total')}[10m]) > 0",
                  "warning", "reset_gpu", "NVML calls on a GPU hang past the scrape deadline.",
                  "GPU {{ $labels.gpu }} on {{ $labels.instance }} missed the scrape deadline {{ $value }} times "
                  "in 10 minutes; a wedged driver call usually needs a GPU reset."),
            Alert("NvmlCallsFailing",
                  f"sum by {o.by('job', 'instance', 'function', 'error')} (increase("
                  f"{o.m('nvml_exporter_nvml_errors_total', nvml_errors)}"
                  "[15m])) > 0",
                  "warning", "none", "NVML calls fail on a node.",
                  "{{ $labels.function }} failed with {{ $labels.error }} {{ $value }} times in 15 minutes on "
                  "{{ $labels.instance }}.", "15m"),
        ]),
        Group("nvml-exporter-xid", "30s", [
            Alert("GpuXidResetRequired",
                  f"time() - {o.m('nvidia_gpu_xid_last_timestamp_seconds', 'xid=~' + q(codes('reset')))} < 600",
                  "critical",
                  f'{{{{ if match "^({drain_reset})$" $labels.xid }}}}drain_and_reset'
                  "{{ else }}reset_gpu{{ end }}",
                  "A GPU logged an Xid that requires a GPU reset.",
                  on_gpu("logged Xid {{ $labels.xid }}: the GPU must be reset before it runs work again "
                         "(see docs/xid-catalog.md).")),
            xid_alert(o, "GpuXidDoubleBitEcc", ("double_bit_ecc",), "critical", "drain_and_reset",
                      "A GPU logged an uncorrectable (double-bit) ECC Xid.",
                      "(uncorrectable memory error): drain the node and reset the GPU"),
            xid_alert(o, "GpuXidFellOffBus", ("fell_off_bus",), "critical", "reboot_node", "A GPU fell off the bus.",
                      "(fell off the PCIe bus): reboot the node; reseat and check power if it recurs"),
            xid_alert(o, "GpuXidNvlink", ("nvlink",), "critical", "check_nvlink", "A GPU logged an NVLink Xid.",
                      "(NVLink error): drain, reset the GPU, check the link and its peer"),
            xid_alert(o, "GpuXidMechanical", ("mechanical",), "critical", "check_power",
                      "A GPU runs with its auxiliary power missing.",
                      "(auxiliary power not connected): check the board's power connectors"),
            xid_alert(o, "GpuXidContained", ("contained",), "warning", "restart_app",
                      "A GPU contained an uncorrectable memory error.",
                      "(contained memory error): the application died, the GPU keeps working; reset it at the "
                      "next window"),
            Alert("GpuXidUnexpected",
                  f'time() - {o.m("nvidia_gpu_xid_last_timestamp_seconds", f"xid!~{q(documented)}")} < 600',
                  "warning", "contact_support", "A GPU logged an Xid not expected on current GPUs.",
                  on_gpu("logged Xid {{ $labels.xid }}, which NVIDIA does not expect on current products; open a "
                         "support case.")),
            Alert("GpuApplicationXidRepeating",
                  f'increase({o.m("nvidia_gpu_xid_errors_total", "xid=~" + q("13|31"))}[24h]) >= 2',
                  "warning", "rma_eval", "Application-class Xids repeat on one GPU.",
                  on_gpu("logged Xid {{ $labels.xid }} {{ $value }} times in 24 hours; repeats on one GPU point at "
                         "hardware: run DCGM diagnostics, then field diagnostics.")),
        ]),
        # The persistent incident history (docs/diagnosis.md): the exporter escalates when the cheaper remedy
        # did not help; these read its verdict, so a 10,000-GPU fleet costs two sparse selectors.
        Group("nvml-exporter-history", "1m", [
            Alert("GpuEscalatedToRma",
                  f'{o.m("nvidia_gpu_recommended_action", "action=" + q("rma_eval"))} == 1\n'
                  f'and on {o.by("job", "instance", "gpu", "uuid")} '
                  f'{o.m("nvidia_gpu_health", "check=" + q("history"))} == 2',
                  "critical", "rma_eval", "A fatal Xid keeps coming back after resets or reboots.",
                  on_gpu("had the same fatal Xid return after its resets or reboots (nvml-exporter history): stop "
                         "resetting it and evaluate an RMA."), "5m"),
            Alert("GpuNodeIncidentsContactSupport",
                  f'max by {o.by("job", "instance")} (\n'
                  f'  {o.m("nvidia_gpu_recommended_action", "action=" + q("contact_support"))} == 1\n'
                  f'  and on {o.by("job", "instance", "gpu", "uuid")} '
                  f'{o.m("nvidia_gpu_health", "check=" + q("history"))} == 2\n)',
                  "critical", "contact_support", "A node had five or more GPU incidents in 7 days.",
                  "{{ $labels.instance }} had five or more fatal GPU incidents in 7 days (nvml-exporter history): "
                  "take it out of service and open a support case.", "5m"),
            # recency, as the Xid alerts: a count the journal backfill finds at start is old news, and
            # increase() over a series that starts above 0 differs between Prometheus and VictoriaMetrics
            Alert("NvswitchSxidErrors",
                  f'time() - {o.m("nvidia_nvswitch_sxid_last_timestamp_seconds")} < 900',
                  "warning", "check_nvlink", "An NVSwitch logged SXid errors.",
                  "NVSwitch {{ $labels.pci }} on {{ $labels.instance }} logged SXid {{ $labels.sxid }} "
                  "{{ $value | humanizeDuration }} ago: check the fabric (nvidia-smi nvlink, fabric manager logs)."),
        ]),
        Group("nvml-exporter-memory", "1m", [
            Alert("GpuUncorrectableEccErrors",
                  f'{o.m("nvidia_gpu_ecc_errors_total", "type=" + q("uncorrected") + ",scope=" + q("volatile"))} > 0',
                  "critical", "drain_and_reset", "A GPU has uncorrectable ECC errors.",
                  on_gpu("has {{ $value }} uncorrectable ECC errors since the driver loaded: drain and reset it.")),
            Alert("GpuRowRemapFailed", f"{o.m('nvidia_gpu_remapped_rows_failed')} == 1", "critical", "rma_eval",
                  "A GPU's row remapping failed.",
                  on_gpu("could not remap a failing memory row: run field diagnostics and start an RMA.")),
            Alert("GpuRowRemapPending", f"{o.m('nvidia_gpu_remapped_rows_pending')} == 1", "warning", "reset_gpu",
                  "A GPU waits for a reset to remap memory rows.",
                  on_gpu("has a row remap pending: reset the GPU at the next window and keep new long jobs off it.")),
            Alert("GpuRetiredPagesPending", f"{o.m('nvidia_gpu_retired_pages_pending')} == 1", "warning",
                  "reset_gpu", "A GPU waits for a reset to retire memory pages.",
                  on_gpu("has a page retirement pending: reset the GPU at the next window.")),
            Alert("GpuRetiredPagesHigh", f"sum without (cause) ({o.m('nvidia_gpu_retired_pages')}) >= 60",
                  "critical", "rma_eval", "A GPU has retired too many memory pages.",
                  on_gpu("has retired {{ $value }} pages (DCGM's limit is 60-63): evaluate for RMA.")),
        ]),
        Group("nvml-exporter-thermal", "1m", [
            Alert("GpuHwThermalSlowdown",
                  f'{o.m("nvidia_gpu_clock_event_active", "reason=" + q("hw_thermal_slowdown"))} == 1',
                  "warning", "check_cooling", "A GPU is in hardware thermal slowdown.",
                  on_gpu("has been held down by hardware thermal slowdown for 5 minutes: check its cooling."), "5m"),
            Alert("GpuTemperatureNearSlowdown",
                  f"{o.m('nvidia_gpu_temperature_celsius')} > ignoring (threshold) "
                  f'{o.m("nvidia_gpu_temperature_threshold_celsius", "threshold=" + q("slowdown"))} - 3',
                  "warning", "check_cooling", "A GPU runs within 3 °C of its slowdown temperature.",
                  on_gpu("is at {{ $value }} °C, within 3 °C of its own slowdown threshold, for 10 minutes."), "10m"),
            Alert("GpuMemoryTemperatureHigh",
                  f"{o.m('nvidia_gpu_memory_temperature_celsius')} > ignoring (threshold) "
                  f'{o.m("nvidia_gpu_temperature_threshold_celsius", "threshold=" + q("memory_max"))} - 3',
                  "warning", "check_cooling", "A GPU's HBM runs within 3 °C of its limit.",
                  on_gpu("HBM is at {{ $value }} °C, within 3 °C of its memory limit, for 10 minutes."), "10m"),
        ]),
        Group("nvml-exporter-power", "1m", [
            Alert("GpuPowerBrake",
                  f'{o.m("nvidia_gpu_clock_event_active", "reason=" + q("hw_power_brake_slowdown"))} == 1',
                  "warning", "check_power", "A GPU is held down by the hardware power brake.",
                  on_gpu("has had its external power brake asserted for 5 minutes: check PSUs and rack power."), "5m"),
            Alert("GpuPowerLimitBelowDefault",
                  f"{o.m('nvidia_gpu_power_limit_watts')} < {o.m('nvidia_gpu_power_default_limit_watts')}",
                  "info", "check_power", "A GPU's power limit is below its default.",
                  on_gpu("enforces {{ $value }} W, below its default limit, for 30 minutes: check for configuration "
                         "drift."), "30m"),
        ]),
        Group("nvml-exporter-pcie", "1m", [
            Alert("GpuPcieLinkDegraded",
                  f"{o.m('nvidia_gpu_pcie_link_width')} < {o.m('nvidia_gpu_pcie_link_max_width')}\nor\n(\n"
                  f"  {o.m('nvidia_gpu_pcie_link_generation')} < {o.m('nvidia_gpu_pcie_link_max_generation')}\n"
                  f'  unless ignoring (reason) {o.m("nvidia_gpu_clock_event_active", "reason=" + q("gpu_idle"))} == 1\n'
                  ")\n",
                  "warning", "rma_eval", "A GPU's PCIe link runs below its capability.",
                  on_gpu("PCIe link runs below its maximum width or generation while busy ({{ $value }}): reseat the "
                         "board, check risers and retimers."), "15m"),
            Alert("GpuPcieReplayRateHigh",
                  f"rate({o.m('nvidia_gpu_pcie_replay_errors_total')}[5m]) * 60\n"
                  f"  > 0.06 * 2 ^ {o.m('nvidia_gpu_pcie_link_generation')} * {o.m('nvidia_gpu_pcie_link_width')}\n",
                  "warning", "rma_eval", "A GPU's PCIe link replays more than its bit-error rate allows.",
                  on_gpu('replays {{ $value | printf "%.1f" }} PCIe packets a minute, above DCGM\'s per-lane limit: '
                         "reseat the board and run PCIe diagnostics."), "10m"),
        ]),
        # Per GPU: link counts and error totals, one series each. Per link: only links that are down or
        # have counted an error, so the CRC rate reads a handful of series.
        Group("nvml-exporter-nvlink", "1m", [
            Alert("GpuNvlinkDown",
                  f'max without (state) ({o.m("nvidia_gpu_nvlink_links", "state=" + q("down"))} > 0)',
                  "critical", "check_nvlink", "NVLink links of a GPU are down.",
                  on_gpu("has {{ $value }} NVLink link(s) down: multi-GPU jobs on this node will fail or crawl; "
                         "nvidia_gpu_nvlink_link_up == 0 names them."), "5m"),
            Alert("GpuNvlinkErrors",
                  "sum without (type) (\n"
                  f'  increase({o.m("nvidia_gpu_nvlink_errors_total", "type=" + q("replay"))}[5m])\n'
                  f'  or increase({o.m("nvidia_gpu_nvlink_errors_total", "type=" + q("recovery"))}[5m])\n'
                  ") > 0\n",
                  "warning", "check_nvlink", "A GPU's NVLink links replay or retrain.",
                  on_gpu("NVLink replay/recovery errors grew by {{ $value }} in 5 minutes: check the link and its "
                         "peer.")),
            Alert("GpuNvlinkCrcErrorRate",
                  "sum without (type) (\n"
                  f'  rate({o.m("nvidia_gpu_nvlink_link_errors_total", "type=" + q("crc_flit"))}[5m])\n'
                  f'  or rate({o.m("nvidia_gpu_nvlink_link_errors_total", "type=" + q("crc_data"))}[5m])\n'
                  ") >= 100\n",
                  "warning", "check_nvlink", "An NVLink link sees 100 or more CRC errors a second.",
                  on_gpu("NVLink link {{ $labels.link }} has {{ $value }} CRC errors/s: check the link."), "5m"),
        ]),
        # The ruler's own health: Prometheus and Thanos Ruler (prometheus_rule_*) and vmalert (vmalert_*),
        # for this pack's groups only.
        Group("nvml-exporter-ruler", "1m", [
            Alert("NvmlRuleEvaluationFailures",
                  f"sum by {o.by('job', 'instance', 'rule_group')} (\n"
                  f"  increase(prometheus_rule_evaluation_failures_total{{{rule_group}}}[10m])\n"
                  f'  or label_join(max_over_time(vmalert_alerting_rules_error{{{vm_group}}}[10m]), "rule_group", '
                  '";", "file", "group")\n'
                  f'  or label_join(max_over_time(vmalert_recording_rules_error{{{vm_group}}}[10m]), "rule_group", '
                  '";", "file", "group")\n'
                  ") > 0\n",
                  "warning", "none", "The ruler fails to evaluate rules of the GPU pack.",
                  "The ruler {{ $labels.instance }} failed to evaluate group {{ $labels.rule_group }} in the last "
                  "10 minutes ({{ $value }}: failures on Prometheus, failing rules on vmalert): the GPU alerts of "
                  "that group may not fire."),
            Alert("NvmlRuleGroupSlow",
                  f"prometheus_rule_group_last_duration_seconds{{{rule_group}}}\n"
                  f"  > prometheus_rule_group_interval_seconds{{{rule_group}}}\n"
                  f"or\nlabel_join(increase(vmalert_iteration_missed_total{{{vm_group}}}[10m]), "
                  '"rule_group", ";", "file", "group") > 0\n',
                  "warning", "none", "A rule group of the GPU pack takes longer than its interval.",
                  "Group {{ $labels.rule_group }} on the ruler {{ $labels.instance }} overruns its interval "
                  "({{ $value }}): evaluations are skipped and GPU alerts arrive late.", "10m"),
        ]),
    ]


def only(record: str, matcher: str, by: str) -> str:
    """The sum of a count_values record's series with one value, 0 where none has it."""
    return f"sum by {by} ({record}{{{matcher}}})\nor\nsum by {by} ({record}) * 0\n"


def record_groups(o: Options) -> list[Group]:
    up, info = o.m("nvidia_gpu_up"), o.m("nvidia_gpu_info")
    xids = "nvidia_gpu_xid_errors_total"

    def by_category(cat: str) -> str:
        if cat == "hardware":  # undocumented codes count as hardware
            sel = "xid!~" + q("|".join(str(c) for c, x in sorted(CATALOG.items()) if x.category != "hardware"))
        else:
            sel = "xid=~" + q("|".join(str(c) for c, x in sorted(CATALOG.items()) if x.category == cat))
        return f'label_replace(increase({o.m(xids, sel)}[1h]), "category", "{cat}", "", "")'

    crit = o.m(xids, "xid=~" + q(codes(*CRITICAL_TIERS)))
    w = "[{}]"

    def sums(window: str) -> tuple[str, str]:
        return (f"sum_over_time(fleet:nvidia_gpu_critical_faults:increase5m{w.format(window)})",
                f"sum_over_time(fleet:nvidia_gpu_hours:5m{w.format(window)})")

    f7, h7 = sums("7d")
    f30, h30 = sums("30d")
    return [
        # Each per-GPU family is read once a pass (nvidia_gpu_up twice): count_values keeps the distribution
        # (GPUs up and lost per node and model, GPUs per check and level), the rollups below derive the rest.
        Group("nvml-exporter-fleet", "1m", [
            # GpuMissing compares this one series a node over 6 h: a count in one piece, which a sum over the
            # count_values series below is not while a new one is still being written (vmalert, remote rulers)
            Record("instance:nvidia_gpus:count", f"count by {o.by('job', 'instance')} ({up})"),
            Record("instance_up:nvidia_gpus:count", f'count_values by {o.by("job", "instance")} ("up", {up})'),
            Record("model_up:nvidia_gpus:count",
                   f'count_values by {o.by("name")} ("up", {up} * on {o.by("job", "instance", "gpu", "uuid")} '
                   f"group_left (name) {info})"),
            Record("check_level:nvidia_gpus:count",
                   f'count_values by {o.by("check")} ("level", {o.m("nvidia_gpu_health")})'),
            Record("action:nvidia_gpus:count", f"count by {o.by('action')} ({o.m('nvidia_gpu_recommended_action')})"),
        ]),
        # From the records of the group above only (a few series a node), never from its own.
        Group("nvml-exporter-fleet-rollups", "1m", [
            Record("instance:nvidia_gpus_up:sum",
                   only("instance_up:nvidia_gpus:count", 'up="1"', o.by("job", "instance"))),
            Record("instance:nvidia_gpus_lost:sum",
                   only("instance_up:nvidia_gpus:count", 'up="0"', o.by("job", "instance"))),
            Record("model:nvidia_gpus:count", f"sum by {o.by('name')} (model_up:nvidia_gpus:count)"),
            Record("model:nvidia_gpus_up:sum", only("model_up:nvidia_gpus:count", 'up="1"', o.by("name"))),
            Record("check:nvidia_gpus_warning:count",
                   only("check_level:nvidia_gpus:count", 'level="1"', o.by("check"))),
            Record("check:nvidia_gpus_critical:count",
                   only("check_level:nvidia_gpus:count", 'level="2"', o.by("check"))),
            Record("fleet:nvidia_gpus:count", f"sum by {o.by()} (instance:nvidia_gpus:count)"),
            Record("fleet:nvidia_gpus_up:sum", only("instance_up:nvidia_gpus:count", 'up="1"', o.by())),
        ]),
        # Slow rollups: the exporters seen, Xids of the last hour by catalog category, and the 5-minute
        # slices the reliability group sums.
        Group("nvml-exporter-fleet-5m", "5m", [
            # which targets are the exporter's (NvmlExporterDown reads a day of it: 288 samples a node)
            Record("instance:nvml_exporter_nvml_up:max",
                   f"max by {o.by('job', 'instance')} ({o.m('nvml_exporter_nvml_up')})"),
            # every GPU with readings, for GpuSeriesVanished's 30-minute look back
            Record("gpu:nvidia_gpu_temperature_celsius:count",
                   f"count by {o.by('job', 'instance', 'gpu', 'uuid')} ({o.m('nvidia_gpu_temperature_celsius')})"),
            Record("nvml_exporter:reliability_job_gpus:param", f"vector({o.job_gpus})"),
            Record("nvml_exporter:reliability_job_hours:param", f"vector({o.job_hours:g})"),
            Record("nvml_exporter:reliability_checkpoint_hours:param", f"vector({o.checkpoint_hours:g})"),
            Record("fleet:nvidia_gpu_critical_faults:increase5m",
                   f"sum by {o.by()} (increase({crit}[5m]))\n"
                   f"or\nsum by {o.by()} (instance:nvidia_gpus:count) * 0\n"),
            Record("fleet:nvidia_gpu_hours:5m", f"sum by {o.by()} (instance:nvidia_gpus:count) * 5 / 60"),
            # the incident history's measured figures (docs/diagnosis.md): incidents, not raw Xids, per model
            Record("model:nvidia_gpu_incidents:increase5m",
                   f"sum by {o.by('name')} (\n"
                   f"  increase({o.m('nvidia_gpu_incidents_total', 'kind=' + q('fatal_xid'))}[5m])\n"
                   f"  * on {o.by('job', 'instance', 'gpu', 'uuid')} group_left (name) {o.m('nvidia_gpu_info')}\n)\n"
                   # (incidents_total is sparse: a fleet without incidents has no series, and its rate is 0)
                   f"or\nsum by {o.by('name')} (model:nvidia_gpus:count) * 0\n"),
            Record("model:nvidia_gpu_hours:5m", f"sum by {o.by('name')} (model:nvidia_gpus:count) * 5 / 60"),
            Record("le:nvidia_gpu_incident_interval_seconds_bucket:increase5m",
                   f"sum by {o.by('le')} (increase({o.m('nvidia_gpu_incident_interval_seconds_bucket')}[5m]))"),
            Record("category:nvidia_gpu_xids:increase1h",
                   f"sum by {o.by('category')} (\n  "
                   + "\n  or ".join(by_category(cat) for cat in CATEGORIES) + "\n)\n"),
        ]),
        # Each figure from the slices of the group above, never from a record of its own group: windows of
        # days over one series per cluster, whatever the fleet's size.
        Group("nvml-exporter-reliability", "5m", [
            Record("fleet:nvidia_gpu_fault_rate_per_gpu_hour:7d", f"{f7} / {h7}"),
            Record("fleet:nvidia_gpu_fault_rate_per_gpu_hour:30d", f"{f30} / {h30}"),
            Record("fleet:nvidia_gpu_mtbf_hours:7d", f"{h7} / {f7}"),
            Record("fleet:nvidia_gpu_mtbf_hours:30d", f"{h30} / {f30}"),
            Record("fleet:nvidia_job_failure_probability:7d",
                   f"1 - exp(-({f7} / {h7}) * {o.job_gpus} * {o.job_hours:g})"),
            # measured, beside the model's lambda: incidents per GPU-hour of each model, and the median time
            # between a GPU's incidents
            Record("model:nvidia_gpu_incident_rate_per_gpu_hour:30d",
                   "sum_over_time(model:nvidia_gpu_incidents:increase5m[30d])\n"
                   "/ sum_over_time(model:nvidia_gpu_hours:5m[30d])"),
            Record("fleet:nvidia_gpu_incident_interval_seconds:median30d",
                   "histogram_quantile(0.5,\n"
                   "  sum_over_time(le:nvidia_gpu_incident_interval_seconds_bucket:increase5m[30d]))"),
            Record("fleet:nvidia_job_checkpoint_interval_hours:7d",
                   f"sqrt(2 * {o.checkpoint_hours:g} * {h7} / ({f7} * {o.job_gpus}))"),
        ]),
    ]


def early_warning_groups(o: Options) -> list[Group]:
    """Issue 19: the thermal margin, the thermal model's peer deviations, the early-warning score (all
    computed in the exporter: docs/early-warning.md) and GPU-gone."""
    gpu = o.by("job", "instance", "gpu", "uuid")
    node = o.by("job", "instance")
    gradient = f"{o.m('nvidia_gpu_memory_temperature_celsius')} - {o.m('nvidia_gpu_temperature_celsius')}"
    # GPUs the exporter knows, answering or not (a known GPU that stopped answering is GpuLost's): the
    # fleet group's per-node count, one series a node instead of every GPU's nvidia_gpu_up
    known = "instance:nvidia_gpus:count"
    return [
        Group("nvml-exporter-early-warning", "1m", [
            Alert("GpuThermalMarginLow",
                  f"{o.m('nvidia_gpu_temperature_margin_celsius')} <= ignoring (threshold) "
                  f'{o.m("nvidia_gpu_temperature_threshold_celsius", "threshold=" + q("slowdown_tlimit"))}',
                  "critical", "check_cooling", "A GPU's margin below T.Limit reached its slowdown offset.",
                  on_gpu("is {{ $value }} °C from its T.Limit, at or past the offset where hardware slowdown "
                         "starts (NVSentinel's rule)."), "1m"),
            Alert("GpuHwSlowdownFrequent",
                  # the share of the time, not of scrapes: the same at any scrape interval (gpud's 0.6 a
                  # minute is 6 of the 40 scrapes of 10 minutes at 15 s: 15 %)
                  f'avg_over_time({o.m("nvidia_gpu_clock_event_active", "reason=" + q("hw_slowdown"))}[10m]) '
                  ">= 0.15",
                  "warning", "check_cooling", "A GPU keeps entering hardware slowdown.",
                  on_gpu("was in hardware slowdown {{ $value | humanizePercentage }} of the last 10 minutes "
                         "(gpud: 0.6 a minute at a 15 s scrape, 15 %): inspect it.")),
        ]),
        # Alerts held for 30 minutes to an hour: a 5-minute look is enough, and their per-GPU reads then
        # cost a fifth of what they would every minute.
        Group("nvml-exporter-early-warning-5m", "5m", [
            Alert("GpuHbmGradientAbnormal",
                  f"abs(({gradient}) - on {node} group_left () quantile by {node} (0.5, {gradient})) > 8",
                  "warning", "check_cooling", "A GPU's core-to-HBM temperature gradient differs from its peers'.",
                  on_gpu("has a core-to-HBM gradient {{ $value }} °C away from its node's median for 30 "
                         "minutes: check its cold plate contact."), "30m"),
            Alert("GpuRunsHotterThanPeers", f"{o.m('nvidia_gpu_temperature_peer_deviation_celsius')} > 7",
                  "warning", "check_cooling", "A GPU runs hotter than its peers at the same power.",
                  on_gpu("runs {{ $value }} °C above its node's other GPUs of its model at the same power, for "
                         "an hour: its cooling is degrading."), "1h"),
            Alert("GpuClocksBelowPeers", f"{o.m('nvidia_gpu_clock_peer_deviation_ratio')} < -0.05",
                  "warning", "rma_eval", "A GPU clocks below its peers at the same temperature and power.",
                  on_gpu("clocks {{ $value | humanizePercentage }} against its peers at the same temperature, at "
                         "the power limit, for an hour (fail-slow)."), "1h"),
            Alert("GpuEarlyWarning",
                  f"({o.m('nvidia_gpu_risk_score')} >= 0.5) + on {gpu} group_left (reason) "
                  f"(0 * topk by {gpu} (1, {o.m('nvidia_gpu_risk_reason')}))",
                  "warning", "none", "A GPU's early-warning score is high.",
                  on_gpu("has an early-warning score of {{ $value }} for 30 minutes, mostly from "
                         "{{ $labels.reason }} (docs/early-warning.md)."), "30m"),
        ]),
        Group("nvml-exporter-gpu-gone", "1m", [
            Alert("GpuGoneFromNvml",
                  f"{o.m('nvidia_gpu_pci_devices')} > on {node} ({known} or on {node} "
                  f"0 * {o.m('nvidia_gpu_pci_devices')})",
                  "critical", "reboot_node", "The PCI bus lists more NVIDIA GPUs than NVML knows.",
                  "{{ $labels.instance }} lists {{ $value }} NVIDIA GPUs on the PCI bus, more than NVML enumerates: "
                  "a GPU has fallen off the bus or failed to initialise.", "2m"),
            Alert("GpuCountBelowExpected",
                  f"{o.m('nvidia_gpu_expected')} > on {node} ({known} or on {node} "
                  f"0 * {o.m('nvidia_gpu_expected')})",
                  "critical", "reboot_node", "A node has fewer GPUs than it should.",
                  "{{ $labels.instance }} should have {{ $value }} GPUs (--gpus.expected) but NVML enumerates fewer.",
                  "5m"),
            # 30 minutes back over the 5-minute record of the GPUs with readings (6 samples a GPU, not 120 of
            # its readings at a 15 s scrape); whether they report now, from the readings: as prompt as before
            Alert("GpuSeriesVanished",
                  f"max_over_time(gpu:nvidia_gpu_temperature_celsius:count[30m]) unless on {gpu} "
                  f"{o.m('nvidia_gpu_temperature_celsius')} and on {node} {o.m('nvml_exporter_nvml_up')} == 1\n"
                  # a GPU NVML reports lost (GpuLost) or the exporter released (a reset) is explained already
                  f"unless on {gpu} {o.m('nvidia_gpu_up')} == 0",
                  "warning", "none", "A GPU's readings stopped while its node still reports.",
                  on_gpu("stopped reporting its readings in the last 30 minutes while its node still reports "
                         "(value {{ $value }}): the telemetry's collapse that precedes a GPU falling off the bus."),
                  "2m"),
        ]),
    ]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    # block style for multi-line expressions; otherwise PyYAML quotes only where YAML needs it
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def scaled(duration: str, o: Options) -> str:
    """Test timing: minutes become seconds; group intervals shrink to 1 s (2 s for 5-minute groups)."""
    return re.sub(r"^(\d+)m$", r"\1s", duration) if o.test_timing else duration


def workloads_annotation(o: Options) -> str:
    """The jobs on the alert's GPU, comma-separated and sorted, from nvidia_gpu_workload_info (empty when
    no workload source is on). A template query: it runs only for an alert that fires, never per GPU; the
    remediator reads it into its drain reason and audit. A series without the cluster label matches the
    empty value, so one cluster needs nothing."""
    # the selector goes into a Go string literal that is also a printf format: escape it for both
    selector = o.selector.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    matchers = ",".join(x for x in (selector, f"{o.cluster}=%q", "instance=%q", "uuid=%q") if x)
    query = (f'printf "nvidia_gpu_workload_info{{{matchers}}}" (index $labels "{o.cluster}") '
             "$labels.instance $labels.uuid")
    return ("{{ range $i, $w := query (" + query + ') | sortByLabel "workload_id" }}'
            "{{ if $i }}, {{ end }}{{ $w.Labels.workload_id }}{{ end }}")


def render_group(g: Group, o: Options) -> dict:
    out: dict = {"name": g.name,
                 "interval": ("2s" if g.interval == "5m" else "1s") if o.test_timing else g.interval}
    alerting = any(isinstance(r, Alert) for r in g.rules)
    if o.thanos and alerting:
        out["partial_response_strategy"] = "abort"
    rules = []
    for r in g.rules:
        if isinstance(r, Record):
            rules.append({"record": r.name, "expr": r.expr})
            continue
        rule: dict = {"alert": r.name, "expr": r.expr}
        if r.for_:
            rule["for"] = scaled(r.for_, o)
        rule["labels"] = {"severity": r.severity, "action": r.action}
        rule["annotations"] = {"summary": r.summary, "description": r.description,
                               "runbook_url": o.runbook_url.format(alertname=r.name)}
        if r.description.startswith(on_gpu("")):  # about one GPU: name the jobs on it (docs/workloads.md)
            rule["annotations"]["workloads"] = workloads_annotation(o)
        rules.append(rule)
    out["rules"] = rules
    return out


def header(kind: str, o: Options) -> str:
    if kind == "alerts":
        return ("# nvml-exporter alerting rules. Every alert carries severity (critical|warning|info), action\n"
                "# (what to do, routable to the remediator) and a runbook (docs/runbooks/<alertname>.md).\n"
                "# Tests: rules/tests/.\n")
    return ("# nvml-exporter recording rules: fleet rollups and the reliability model (docs/alerts.md).\n"
            f"# Reliability: lambda = critical faults per GPU-hour (Xids of tiers {', '.join(CRITICAL_TIERS)});\n"
            f"# a job of N = {o.job_gpus} GPUs running T = {o.job_hours:g} h fails with P = 1 - exp(-lambda*N*T) and\n"
            f"# checkpoints best every sqrt(2*C*MTBF_job) h (Young/Daly), MTBF_job = 1/(lambda*N), C = "
            f"{o.checkpoint_hours:g} h.\n")


def render(o: Options) -> dict[str, str]:
    """File name -> YAML text of the pack for these options."""
    opts = (f"--cluster-label={o.cluster} --selector='{o.selector}'" + (" --thanos" if o.thanos else "")
            + (" --test-timing" if o.test_timing else "")
            + (f" --job-gpus={o.job_gpus} --job-hours={o.job_hours:g} --checkpoint-hours={o.checkpoint_hours:g}"
               if (o.job_gpus, o.job_hours, o.checkpoint_hours) != (JOB_GPUS, JOB_HOURS, CHECKPOINT_HOURS) else ""))
    out = {}
    for kind, groups in (("alerts", alert_groups(o) + early_warning_groups(o)), ("records", record_groups(o))):
        for g in groups:
            assert len(g.rules) <= MAX_RULES_PER_GROUP, g.name
        body = yaml.dump({"groups": [render_group(g, o) for g in groups]}, Dumper=_Dumper, sort_keys=False,
                         width=1 << 20, allow_unicode=True)
        out[f"nvml-exporter-{kind}.yml"] = (f"{header(kind, o)}# Written by rules/generate.py ({opts}); do not edit.\n"
                                            + body)
    return out


def committed() -> dict[Path, str]:
    """What `python rules/generate.py` writes: the default pack and the Thanos Ruler alerts."""
    files = {HERE / name: text for name, text in render(Options()).items()}
    files[HERE / "thanos" / "nvml-exporter-alerts.yml"] = render(Options(thanos=True))["nvml-exporter-alerts.yml"]
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the nvml-exporter rule pack. With no options: the committed "
                                "files under rules/ (default pack and rules/thanos/).")
    p.add_argument("--out", type=Path, help="write nvml-exporter-{alerts,records}.yml for the options below into "
                   "this folder (default: the committed files under rules/)")
    p.add_argument("--cluster-label", default="cluster",
                   help="label that tells clusters apart; in every `by` and `on` (default: cluster)")
    p.add_argument("--selector", default="",
                   help='label matchers added to every selector of the exporter\'s families and `up`, e.g. '
                        '\'job="nvml-exporter"\' (default: none; the metric names are the exporter\'s own)')
    p.add_argument("--runbook-url", default=RUNBOOK_URL, help="runbook URL pattern with {alertname} "
                   f"(default: {RUNBOOK_URL})")
    p.add_argument("--thanos", action="store_true",
                   help="Thanos Ruler: partial_response_strategy: abort on every alerting group")
    p.add_argument("--test-timing", action="store_true",
                   help="for end-to-end tests: group intervals 1 s (2 s for 5-minute groups), `for` minutes as "
                        "seconds; expressions unchanged")
    p.add_argument("--job-gpus", type=int, default=JOB_GPUS,
                   help=f"reliability model: GPUs in a job, N (default: {JOB_GPUS})")
    p.add_argument("--job-hours", type=float, default=JOB_HOURS,
                   help=f"reliability model: hours a job runs, T (default: {JOB_HOURS})")
    p.add_argument("--checkpoint-hours", type=float, default=CHECKPOINT_HOURS,
                   help=f"reliability model: hours one checkpoint takes, C (default: {CHECKPOINT_HOURS})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the committed files differ")
    a = p.parse_args(argv)
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", a.cluster_label):
        p.error(f"--cluster-label: not a label name: {a.cluster_label!r}")
    if "{alertname}" not in a.runbook_url:
        p.error("--runbook-url: the pattern must contain {alertname}")
    if a.selector and not re.fullmatch(r'\s*[a-zA-Z_]\w*\s*(=|!=|=~|!~)\s*"[^"]*"\s*'
                                       r'(,\s*[a-zA-Z_]\w*\s*(=|!=|=~|!~)\s*"[^"]*"\s*)*', a.selector):
        p.error(f'--selector: not a list of label matchers like job="nvml-exporter": {a.selector!r}')
    if a.job_gpus < 1 or a.job_hours <= 0 or a.checkpoint_hours <= 0:
        p.error("--job-gpus, --job-hours and --checkpoint-hours must be positive")
    o = Options(a.cluster_label, a.selector.strip(), a.runbook_url, a.thanos, a.test_timing, a.job_gpus, a.job_hours,
                a.checkpoint_hours)
    if a.out is None:
        if o != Options(thanos=a.thanos):
            p.error("options other than --check need --out: the committed files use the defaults")
        files = committed()
    else:
        files = {a.out / name: text for name, text in render(o).items()}
    if a.check:
        stale = [str(path) for path, text in files.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path}: differs from rules/generate.py's output; run it", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
