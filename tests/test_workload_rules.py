"""The `workloads` annotation of the per-GPU alerts (rules/generate.py, docs/workloads.md): promtool unit test
and Debian's real Prometheus over the real exporter, where an Xid 79 alert names the Slurm job on its GPU.
Every alert about one GPU carries the annotation (test_every_alert_about_one_gpu_names_its_jobs)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests import promstack
from tests.conftest import free_port, require_tool, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml

NODE_GROUPS = {"nvml-exporter-node"}  # alerts without a uuid label


def alert_rules() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "rules" / "nvml-exporter-alerts.yml").read_text()))


def test_every_alert_about_one_gpu_names_its_jobs() -> None:
    # An alert whose description names a GPU by its uuid is about that GPU: the people it pages need the
    # jobs it hurt, and the remediator reads them for its drain reason and audit.
    about_a_gpu = {r["alert"]: r["annotations"] for g in alert_rules()["groups"] for r in g["rules"]
                   if "alert" in r and "$labels.uuid" in r["annotations"].get("description", "")}
    assert len(about_a_gpu) >= 30 and {"GpuXidFellOffBus", "GpuLost", "GpuEarlyWarning"} <= set(about_a_gpu)
    # (a template query by the alert's own instance and uuid: tested for what it prints below)
    missing = sorted(name for name, a in about_a_gpu.items()
                     if not re.search(r'query \(printf "nvidia_gpu_workload_info\{[^"]*instance=%q,uuid=%q\}"',
                                      a.get("workloads", "")))
    assert not missing, f"alerts about one GPU without the workloads annotation: {missing}"
    node_level = [r["alert"] for g in alert_rules()["groups"] if g["name"] in NODE_GROUPS for r in g["rules"]]
    assert node_level and all(name not in about_a_gpu for name in node_level)
    # every other alert is about a node, a switch or the rule engine, by name: a new per-GPU alert whose
    # description forgot the uuid cannot slip past the check above
    others = {r["alert"] for g in alert_rules()["groups"] for r in g["rules"] if "alert" in r} - set(about_a_gpu)
    assert others == {"GpuMissing", "NvmlExporterDown", "NvmlDown", "NvmlCollectionTimeouts", "NvmlCallsFailing",
                      "GpuNodeIncidentsContactSupport", "NvswitchSxidErrors", "NvmlRuleEvaluationFailures",
                      "NvmlRuleGroupSlow", "GpuGoneFromNvml", "GpuCountBelowExpected"}


def test_promtool_the_xid79_alert_names_the_jobs_on_its_gpu(tmp_path: Path) -> None:
    rule = next(r for g in alert_rules()["groups"] for r in g["rules"] if r.get("alert") == "GpuXidFellOffBus")
    rule["annotations"] = {"workloads": rule["annotations"]["workloads"]}  # the one under test
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": [{"name": "t", "rules": [rule]}]}))
    node = 'job="nvml-exporter",instance="gpu-node-1:9400"'
    labels = {"job": "nvml-exporter", "instance": "gpu-node-1:9400", "xid": "79", "severity": "critical",
              "action": "reboot_node"}
    test = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f'nvidia_gpu_xid_last_timestamp_seconds{{{node},gpu="1",uuid="GPU-1",xid="79"}}',
             "values": "300x10"},
            {"series": f'nvidia_gpu_xid_last_timestamp_seconds{{{node},gpu="2",uuid="GPU-2",xid="79"}}',
             "values": "300x10"},
            {"series": f'nvidia_gpu_workload_info{{{node},gpu="1",uuid="GPU-1",workload_id="1004",source="slurm",'
                       'slurm_user="bob"}', "values": "1x10"},
            {"series": f'nvidia_gpu_workload_info{{{node},gpu="1",uuid="GPU-1",workload_id="1003",source="slurm"}}',
             "values": "1x10"},
            {"series": f'nvidia_gpu_workload_info{{{node},gpu="0",uuid="GPU-0",workload_id="999",source="slurm"}}',
             "values": "1x10"},
            # the same GPU uuid on another node is another GPU (uuids are unique; this checks the instance match)
            {"series": 'nvidia_gpu_workload_info{job="nvml-exporter",instance="gpu-node-2:9400",gpu="1",'
                       'uuid="GPU-1",workload_id="555",source="slurm"}', "values": "1x10"},
        ],
        "alert_rule_test": [{"eval_time": "10m", "alertname": "GpuXidFellOffBus", "exp_alerts": [
            {"exp_labels": {**labels, "gpu": "1", "uuid": "GPU-1"}, "exp_annotations": {"workloads": "1003, 1004"}},
            {"exp_labels": {**labels, "gpu": "2", "uuid": "GPU-2"}, "exp_annotations": {"workloads": ""}},
        ]}],
    }]}
    (tmp_path / "alerts.test.yml").write_text(yaml.safe_dump(test))
    r = subprocess.run([require_tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_xid79_alert_annotation_names_the_slurm_job(tmp_path: Path, fake: FakeNvml,
                                                               start_exporter) -> None:
    jobs = tmp_path / "slurm"
    jobs.mkdir()
    (jobs / fake.state["gpu.1.uuid"]).write_text("4242 user=alice account=physics partition=gpu\n")
    exp = start_exporter(fake, "--collect.min-interval=100ms", "--no-xid.journal",
                         f"--collect.workload.slurm-dir={jobs}", wait_ready=True)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alert_rules()))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms}\n"
        f"rule_files: {json.dumps([str(tmp_path / 'alerts.yml')])}\n"
        "scrape_configs:\n"
        "  - job_name: nvml-exporter\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exp.port}']}}]\n")
    port = free_port()
    argv = [require_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with promstack.running(argv, tmp_path / "prometheus.log", promstack.Api(port)) as prom:
        wait_for(lambda: prom.query("nvidia_gpu_workload_info"), timeout=30)
        fake.xid(1, 79)

        def fell_off_bus() -> dict[str, Any] | None:
            return next((a for a in prom.alerts() if a["labels"]["alertname"] == "GpuXidFellOffBus"), None)

        alert = wait_for(fell_off_bus, timeout=60, interval=0.5)
        assert isinstance(alert, dict)
        assert alert["labels"]["gpu"] == "1" and alert["labels"]["uuid"] == fake.state["gpu.1.uuid"]
        assert alert["annotations"]["workloads"] == "4242"
        # and the job with its user, through the join the docs give
        joined = prom.query('nvidia_gpu_xid_last_timestamp_seconds{xid="79"} * on (instance, uuid) '
                            "group_left (workload_id, slurm_user) "
                            "max by (instance, uuid, workload_id, slurm_user) (nvidia_gpu_workload_info)")
        assert [(s["metric"]["gpu"], s["metric"]["workload_id"], s["metric"]["slurm_user"]) for s in joined] == [
            ("1", "4242", "alice")]
