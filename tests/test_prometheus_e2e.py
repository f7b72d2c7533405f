"""The whole pack on two real rulers at once, over one exporter running on the fake driver:

- Debian's Prometheus scrapes the exporter, evaluates the pack and notifies an Alertmanager;
- Debian's VictoriaMetrics: vmagent scrapes the exporter and remote-writes to victoria-metrics, vmalert
  evaluates the pack against it (writing its records back) and notifies another Alertmanager.

One scenario table, steps applied in turn: after each, both Alertmanagers hold exactly the expected
alerts, with the same labels on both. Then every query of every dashboard panel returns data on both.

To keep the test short, the pack is generated with --test-timing (groups every 1-2 s, every `for:` in
seconds instead of minutes); expressions are unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests import promstack
from tests.conftest import wait_for
from tests.fakenvml.scenario import REPO, FakeNvml
from tests.journal import write_journal, xid_line
from tests.promstack import Api

VARIABLES = {"$instance": ".*", "$gpu": ".*", "$__rate_interval": "30s", "${datasource}": "", "$N": "1024",
             "$T": "24", "$C": "0.05"}


@dataclass(frozen=True)
class Step:
    name: str
    inject: Callable[[FakeNvml], None]
    fires: frozenset[tuple[str, str]]  # (alertname, gpu) of every alert active after this step
    labels: tuple[tuple[str, str, str, str], ...] = ()  # (alertname, gpu, label, value) checked beside


def lost_gpu_and_xid79(fake: FakeNvml) -> None:
    fake.xid(1, 79)
    fake.event(5, 0x2, 0)  # a double-bit ECC event: counted, no alert of its own
    fake.set({"gpu.4.lost": 1})


SCENARIO = [
    Step("healthy node", lambda fake: None, frozenset()),
    Step("lost GPU + Xid 79", lost_gpu_and_xid79, frozenset({("GpuXidFellOffBus", "1"), ("GpuLost", "4")}),
         (("GpuXidFellOffBus", "1", "action", "reboot_node"), ("GpuXidFellOffBus", "1", "xid", "79"),
          ("GpuLost", "4", "severity", "critical"))),
    Step("pending row remap", lambda fake: fake.set({"gpu.2.remap_pending": 1, "gpu.2.remap_cor": 1}),
         frozenset({("GpuRowRemapPending", "2")}), (("GpuRowRemapPending", "2", "severity", "warning"),)),
    Step("driver asks for a reboot", lambda fake: fake.set({"gpu.6.recovery_action": 2}),
         frozenset({("GpuRecoveryActionRequired", "6")}),
         (("GpuRecoveryActionRequired", "6", "action", "reboot_node"),)),
    Step("HW thermal slowdown",
         lambda fake: fake.set({"gpu.3.throttle": "0x40", "gpu.3.violation.thermal": "0+500000000/s"}),
         frozenset({("GpuHwThermalSlowdown", "3")}), (("GpuHwThermalSlowdown", "3", "action", "check_cooling"),)),
]


@dataclass
class Stack:
    name: str
    ruler: Api
    alertmanager: Api


@pytest.fixture
def stacks(tmp_path: Path, fake: FakeNvml, start_exporter) -> Iterator[list[Stack]]:
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
    prom_dir, vm_dir = tmp_path / "prometheus", tmp_path / "victoriametrics"
    prom_dir.mkdir()
    with promstack.alertmanager(prom_dir) as am1, promstack.alertmanager(vm_dir) as am2, \
            promstack.prometheus(prom_dir, exp.port, port_of(am1)) as prom, \
            promstack.victoriametrics(vm_dir, exp.port, port_of(am2)) as vm:
        yield [Stack("prometheus", prom, am1), Stack("victoriametrics", vm, am2)]


def port_of(api: Api) -> int:
    return int(api.url.rsplit(":", 1)[1])


GROUP_OF = {r["alert"]: g["name"] for g in yaml.safe_load((REPO / "rules" / "nvml-exporter-alerts.yml").read_text())[
    "groups"] for r in g["rules"]}


def received(stack: Stack) -> dict[tuple[str, str], dict[str, str]]:
    """(alertname, gpu) -> labels of every alert the stack's Alertmanager holds. vmalert adds one label of
    its own, alertgroup (the rule group's name): checked here, then set aside for the comparison."""
    out = {}
    for alert in stack.alertmanager.received():
        labels = dict(alert["labels"])
        key = (labels["alertname"], labels.get("gpu", ""))
        assert key not in out, f"{stack.name}: two alerts {key}"
        if stack.name == "victoriametrics":
            assert labels.pop("alertgroup") == GROUP_OF[labels["alertname"]], labels
        out[key] = labels
    return out


def annotations(stack: Stack) -> dict[tuple[str, str], dict[str, str]]:
    return {(a["labels"]["alertname"], a["labels"].get("gpu", "")): a["annotations"]
            for a in stack.alertmanager.received()}


def test_scenarios_fire_the_same_alerts_on_prometheus_and_victoriametrics(stacks: list[Stack],
                                                                          fake: FakeNvml) -> None:
    for stack in stacks:  # scraped, recorded (vmalert: written back and read again), evaluated many times
        wait_for(lambda s=stack: s.ruler.query("fleet:nvidia_gpus_up:sum == 8")
                 and s.ruler.query("fleet:nvidia_gpu_fault_rate_per_gpu_hour:7d"), timeout=60, interval=0.5)
    # the ruler alerts have their data: each ruler's own metrics for the pack's groups
    prom, vm = stacks[0].ruler, stacks[1].ruler
    wait_for(lambda: prom.query('prometheus_rule_group_interval_seconds{rule_group=~".*;nvml-exporter-gpu"} == 1')
             and prom.query('prometheus_rule_evaluation_failures_total{rule_group=~".*;nvml-exporter-fleet"}'),
             timeout=30, interval=0.5)
    wait_for(lambda: vm.query('vmalert_iteration_missed_total{group="nvml-exporter-gpu"}')
             and vm.query('vmalert_recording_rules_error{group="nvml-exporter-fleet"}'), timeout=30, interval=0.5)
    expected: frozenset[tuple[str, str]] = frozenset()
    for step in SCENARIO:
        step.inject(fake)
        expected |= step.fires
        for stack in stacks:
            wait_for(lambda s=stack, e=expected: set(received(s)) >= e, timeout=60, interval=0.5)
        if not step.fires:  # healthy: let both evaluate many times, then nothing is pending or firing anywhere
            time.sleep(8)
        seen = {stack.name: received(stack) for stack in stacks}
        for stack in stacks:
            assert set(seen[stack.name]) == expected, (step.name, stack.name, seen[stack.name])
            if not step.fires:
                assert stack.ruler.alerts() == [], (step.name, stack.name)
        assert seen["prometheus"] == seen["victoriametrics"], step.name
        assert annotations(stacks[0]) == annotations(stacks[1]), step.name  # the templates render alike
        for alertname, gpu, label, value in step.labels:
            assert seen["prometheus"][(alertname, gpu)][label] == value, (step.name, alertname, label)
        if ("GpuXidFellOffBus", "1") in step.fires:
            by_name = {a["labels"]["alertname"]: a for a in stacks[1].alertmanager.received()}
            assert fake.state["gpu.1.uuid"] in by_name["GpuXidFellOffBus"]["annotations"]["description"]

    # every dashboard panel's queries return data, on both, once the node also has what the sparse families
    # and the NVLink per-link detail serve only after a fault: a corrected ECC error, a link down, CRC errors
    fake.set({"gpu.5.ecc.sbe_vol": 3, "gpu.6.nvlink.2.up": 0, "gpu.5.nvlink.3.crc_flit": "0+1000/s"})
    queries = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                queries.append((path.name, panel["title"], expr))
    for stack in stacks:
        wait_for(lambda s=stack: s.ruler.query("category:nvidia_gpu_xids:increase1h"), timeout=30)
        last: list[tuple[str, str, str]] = []

        def answered(s: Stack = stack, missing: list[tuple[str, str, str]] = last) -> bool:
            missing[:] = [q for q in queries if not s.ruler.query(q[2])]
            return not missing

        try:
            wait_for(answered, timeout=30, interval=1)
        except AssertionError:
            raise AssertionError(stack.name + "\n" + "\n".join(map(str, last))) from None
