"""DRAFT for the lead (issue 19): the alert groups of the early-warning work, written for rules/generate.py of
branch fleet-rules (its Options, Group, Alert, on_gpu and q). When fleet-rules is merged: paste
`early_warning_groups` into rules/generate.py, return `alert_groups(o) + early_warning_groups(o)` where
render() takes the alert groups, append the cases of rules/tests/early-warning-draft.test.yml to
rules/tests/alerts.test.yml (and the two group names to its group_eval_order), add the nine alerts to
docs/alerts.md and the per-GPU ones to GPU_ALERTS in tests/test_rules.py, then delete this file,
rules/early-warning-draft.yml and its test. rules/early-warning-draft.yml is this function's output with the
default options; it was checked inside the fleet-rules pack (b49bee3) with promtool check/test rules,
`vmalert -dryRun`, and the pack's structural rules with another cluster label and a selector.

No recording rule: the thermal model, the peer deviations and the risk score are computed in the exporter
(docs/early-warning.md), so every alert reads served series once.
"""

from __future__ import annotations

from rules_generate import Alert, Group, Options, on_gpu, q  # (rules/generate.py once merged)


def early_warning_groups(o: Options) -> list[Group]:
    """Issue 19: the thermal margin, the thermal model's peer deviations, the early-warning score (all
    computed in the exporter: docs/early-warning.md) and GPU-gone."""
    gpu = o.by("job", "instance", "gpu", "uuid")
    node = o.by("job", "instance")
    gradient = f"{o.m('nvidia_gpu_memory_temperature_celsius')} - {o.m('nvidia_gpu_temperature_celsius')}"
    answering = f"count by {node} ({o.m('nvidia_gpu_up')} == 1)"
    return [
        Group("nvml-exporter-early-warning", "1m", [
            Alert("GpuThermalMarginLow",
                  f"{o.m('nvidia_gpu_temperature_margin_celsius')} <= ignoring (threshold) "
                  f'{o.m("nvidia_gpu_temperature_threshold_celsius", "threshold=" + q("slowdown_tlimit"))}',
                  "critical", "check_cooling", "A GPU's margin below T.Limit reached its slowdown offset.",
                  on_gpu("is {{ $value }} °C from its T.Limit, at or past the offset where hardware slowdown "
                         "starts (NVSentinel's rule)."), "1m"),
            Alert("GpuHwSlowdownFrequent",
                  f'sum_over_time({o.m("nvidia_gpu_clock_event_active", "reason=" + q("hw_slowdown"))}[10m]) >= 6',
                  "warning", "check_cooling", "A GPU keeps entering hardware slowdown.",
                  on_gpu("was in hardware slowdown in {{ $value }} scrapes of the last 10 minutes (gpud: 0.6 a "
                         "minute at a 15 s scrape): inspect it.")),
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
                  f"{o.m('nvidia_gpu_pci_devices')} > on {node} ({answering} or on {node} "
                  f"0 * {o.m('nvidia_gpu_pci_devices')})",
                  "critical", "reboot_node", "The PCI bus lists more NVIDIA GPUs than NVML answers for.",
                  "{{ $labels.instance }} lists {{ $value }} NVIDIA GPUs on the PCI bus, more than answer NVML: "
                  "a GPU has fallen off the bus or failed to initialise.", "2m"),
            Alert("GpuCountBelowExpected",
                  f"{o.m('nvidia_gpu_expected')} > on {node} ({answering} or on {node} "
                  f"0 * {o.m('nvidia_gpu_expected')})",
                  "critical", "reboot_node", "A node has fewer working GPUs than it should.",
                  "{{ $labels.instance }} should have {{ $value }} GPUs (--gpus.expected) but fewer answer NVML.",
                  "5m"),
            Alert("GpuSeriesVanished",
                  f"present_over_time({o.m('nvidia_gpu_temperature_celsius')}[30m]) unless on {gpu} "
                  f"{o.m('nvidia_gpu_temperature_celsius')} and on {node} {o.m('nvml_exporter_nvml_up')} == 1",
                  "warning", "none", "A GPU's readings stopped while its node still reports.",
                  on_gpu("stopped reporting its readings in the last 30 minutes while its node still reports "
                         "(value {{ $value }}): the telemetry's collapse that precedes a GPU falling off the bus."),
                  "2m"),
        ]),
    ]
