"""nvml-remediator: security, safety rails, crash recovery and the actions, against stand-in scontrol and
nvidia-smi that record their argv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import samples, wait_for
from tests.remediator_helpers import (
    DRAIN_RULES,
    UUID1,
    Remediator,
    alert,
    calls,
    payload,
    policy,
    start_remediator,
)


def run(workdir: Path, remediators: list[Remediator], *args: str, **kw: object) -> Remediator:
    r = start_remediator(workdir, *args, **kw)  # type: ignore[arg-type]
    remediators.append(r)
    return r


def drains(workdir: Path) -> list[list[str]]:
    return [c for c in calls(workdir, "scontrol") if c[1] == "update"]


def test_drain_argv_audit_and_metrics(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--execute")
    assert r.post(payload(alert())) == (200, {"queued": 1, "skipped": {}})
    wait_for(lambda: r.events("done"))
    assert drains(workdir) == [["scontrol", "update", "NodeName=gpu-node-1", "State=DRAIN",
                                f"Reason=nvml-remediator: GpuXidFellOffBus gpu=1 uuid={UUID1} fp=9385457bd1cc4094"]]
    ran = r.events("ran")[0]
    assert (ran["step"], ran["rc"], ran["dry_run"]) == ("drain_node", 0, False)
    assert ran["duration_seconds"] >= 0 and "output_tail" in ran
    for event in ("received", "matched", "queued"):
        assert r.events(event), event
    assert samples(r.metrics())['nvml_remediator_actions_total{action="drain_node",result="ok"}'] == 1


def test_drain_reason_and_audit_name_the_jobs_on_the_gpu(workdir: Path, remediators: list[Remediator]) -> None:
    """The alert's `workloads` annotation (docs/workloads.md) names the jobs; words that are not job ids
    are left out and counted."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--execute")
    a = alert()
    a["annotations"]["workloads"] = "1003, 1004 ml/train-0 $(reboot)"
    assert r.post(payload(a)) == (200, {"queued": 1, "skipped": {}})
    wait_for(lambda: r.events("done"))
    assert drains(workdir) == [["scontrol", "update", "NodeName=gpu-node-1", "State=DRAIN",
                                f"Reason=nvml-remediator: GpuXidFellOffBus gpu=1 uuid={UUID1} fp=9385457bd1cc4094"
                                " jobs=1003,1004,ml/train-0"]]
    matched = r.events("matched")[0]
    assert (matched["workloads"], matched["workloads_refused"]) == (["1003", "1004", "ml/train-0"], 1)
    assert r.events("ran")[0]["workloads"] == r.events("done")[0]["workloads"] == ["1003", "1004", "ml/train-0"]


def test_dry_run_logs_exactly_what_would_run(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators)
    r.post(payload(alert()))
    wait_for(lambda: r.events("done"))
    assert calls(workdir) == []
    ran = r.events("ran")[0]
    assert ran["result"] == "dry_run" and ran["argv"][0][:4] == [str(workdir / "bin" / "scontrol"), "update",
                                                                 "NodeName=gpu-node-1", "State=DRAIN"]
    assert samples(r.metrics())["nvml_remediator_dry_run"] == 1


def test_authentication_and_bad_requests(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--execute", "--web.max-request-bytes=4096")
    assert r.post(payload(alert()), token=None)[0] == 401
    assert r.post(payload(alert()), token="wrong-token-0123456789")[0] == 401
    status, body = r.post(None, raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = r.post({**payload(alert()), "version": "3"})
    assert status == 400 and "version" in body["error"]
    status, body = r.post({"version": "4", "alerts": "nope"})
    assert status == 400 and "alerts must be a list" in body["error"]
    status, body = r.post(payload(*[alert(fingerprint=f"{i:016x}") for i in range(40)]))
    assert status == 413 and "over the limit" in body["error"]
    time.sleep(1.0)
    assert calls(workdir) == [] and r.events("queued") == []
    # refusals are counted, not audited (M7: the audit log is fsynced, and must not be an open door to the disk)
    assert r.events("request_refused") == []
    page = r.metrics()
    for code, n in (("401", 2), ("400", 3), ("413", 1)):
        assert f'nvml_remediator_requests_refused_total{{code="{code}"}} {n}.0' in page, code


def test_hostile_label_values_never_reach_a_shell(workdir: Path, remediators: list[Remediator]) -> None:
    (workdir / "script.py").write_text(
        "import os, json\n"
        f"open({str(workdir / 'env.json')!r}, 'w').write(json.dumps({{k: v for k, v in os.environ.items()"
        " if k.startswith('AM_')}))\n")
    policy(workdir, """\
        - name: drain
          match: ['alertname="GpuXidFellOffBus"']
          steps: [drain_node]
        - name: script
          match: ['alertname="GpuXidNvlink"']
          steps: [{exec: dump}]
        """, extra=f"exec: {{dump: [{sys.executable}, {workdir / 'script.py'}]}}\n")
    r = run(workdir, remediators, "--execute")
    evil = ["node1; rm -rf /", "$(touch /tmp/nvml-pwned)", "a\nb", "../../etc/passwd", "`id`"]
    hostile = [alert(node=v, fingerprint=f"{i:016x}") for i, v in enumerate(evil)]
    hostile += [alert(fingerprint="00000000000000a1", uuid="GPU-$(reboot)"),
                alert(fingerprint="00000000000000a2", gpu="1; reboot"),
                alert(alertname="GpuXidFellOffBus\nrm", fingerprint="00000000000000a3")]
    status, body = r.post(payload(*hostile))
    assert (status, body) == (200, {"queued": 0, "skipped": {"invalid_label": len(hostile)}})
    assert len(r.events("rejected")) == len(hostile)
    # a label that only travels in the environment arrives as it was sent, inert
    note = "; rm -rf / $(touch /tmp/nvml-pwned)\n../`id`"
    r.post(payload(alert(alertname="GpuXidNvlink", fingerprint="00000000000000b1", note=note)))
    wait_for(lambda: (workdir / "env.json").exists())
    env = json.loads((workdir / "env.json").read_text())
    assert env["AM_LABEL_NOTE"] == note and env["AM_NODE"] == "gpu-node-1"
    assert calls(workdir) == [] and not Path("/tmp/nvml-pwned").exists()


def test_replayed_and_resolved_alerts_run_nothing_again(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--execute")
    r.post(payload(alert()))
    wait_for(lambda: r.events("done"))
    assert r.post(payload(alert())) == (200, {"queued": 0, "skipped": {"duplicate": 1}})
    assert r.post(payload(alert(status="resolved"))) == (200, {"queued": 0, "skipped": {"resolved": 1}})
    r.stop()
    r = run(workdir, remediators, "--execute")  # the idempotency keys survive a restart
    assert r.post(payload(alert())) == (200, {"queued": 0, "skipped": {"duplicate": 1}})
    time.sleep(1.0)
    assert len(drains(workdir)) == 1


def test_killed_between_queueing_and_running_resumes(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, """\
        - name: fell-off-bus
          match: ['alertname="GpuXidFellOffBus"']
          steps: [checkpoint_signal, drain_node]
        """)
    (workdir / "standin" / "sleep-once.nvidia-smi").write_text("30")
    r = run(workdir, remediators, "--execute")
    assert r.post(payload(alert()))[1]["queued"] == 1
    wait_for(lambda: calls(workdir, "nvidia-smi"))  # the first step is running...
    r.kill()  # ...when the remediator dies
    assert drains(workdir) == []
    r = run(workdir, remediators, "--execute")
    wait_for(lambda: r.events("done"), timeout=30)
    assert r.events("recovered")[0]["next_step"] == 0
    # resumed: the signal step is repeatable and ran again (it was not skipped as a cooldown on its own
    # record, issue 15 H4), then the drain ran once
    assert r.events("cooldown") == []
    assert [(e["step"], e["result"], e["resumed"]) for e in r.events("ran")] == [
        ("checkpoint_signal", "ok", True), ("drain_node", "ok", False)]
    assert len(calls(workdir, "nvidia-smi")) == 2
    assert len(drains(workdir)) == 1
    r.post(payload(alert()))
    time.sleep(1)
    assert len(drains(workdir)) == 1


def test_interrupted_reset_is_reported_not_repeated(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, """\
        - name: reset
          match: ['alertname="GpuXidResetRequired"']
          steps: [drain_node, reset_gpu]
        """, extra="cooldowns: {node: 1s}\n")
    r = run(workdir, remediators, "--execute")
    (workdir / "standin" / "reset_sleep").write_text("30")  # the reset hangs
    r.post(payload(alert(alertname="GpuXidResetRequired")))
    wait_for(lambda: any("--gpu-reset" in c for c in calls(workdir, "nvidia-smi")), timeout=30)
    r.kill()
    (workdir / "standin" / "reset_sleep").unlink()
    r = run(workdir, remediators, "--execute")
    wait_for(lambda: r.events("interrupted"), timeout=30)
    assert "not repeated" in r.events("interrupted")[0]["reason"]
    time.sleep(1)
    assert sum("--gpu-reset" in c for c in calls(workdir, "nvidia-smi")) == 1


def test_hung_command_is_killed_at_its_timeout(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES, extra="timeouts: {default: 1s}\n")
    (workdir / "standin" / "sleep.scontrol").write_text("60")
    r = run(workdir, remediators, "--execute")
    r.post(payload(alert()))
    record = wait_for(lambda: r.events("timeout"), timeout=20)[0]  # type: ignore[index]
    assert record["result"] == "timeout" and "killed after 1s" in record["reason"]
    pid = int((workdir / "standin" / "pid.scontrol").read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text())


def test_circuit_breaker_stops_an_alert_storm(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES, extra="circuit_breaker: {max_actions: 5, window: 10m}\n")
    r = run(workdir, remediators, "--execute", "--workers=8")
    for batch in range(5):
        alerts = [alert(node=f"node-{batch * 100 + i}", fingerprint=f"{batch * 100 + i:016x}") for i in range(100)]
        assert r.post(payload(*alerts))[1]["queued"] == 100
    wait_for(lambda: samples(r.metrics())["nvml_remediator_queue_depth"] == 0, timeout=60)
    assert len(drains(workdir)) == 5
    assert len(r.events("breaker_tripped")) == 1
    assert len(r.events("circuit_open")) == 495
    assert samples(r.metrics())["nvml_remediator_circuit_breaker_open"] == 1
    out = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "reset-breaker",
                          f"--storage.path={workdir / 'state'}"], capture_output=True, text=True, check=True)
    assert "circuit breaker reset (was open: 5 actions" in out.stdout
    assert samples(r.metrics())["nvml_remediator_circuit_breaker_open"] == 0


def test_cooldown_per_node_and_action(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, DRAIN_RULES, extra="cooldowns: {node: 1h}\n")
    r = run(workdir, remediators, "--execute")
    r.post(payload(alert()))
    wait_for(lambda: r.events("done"))
    r.post(payload(alert(alertname="GpuXidFellOffBus", fingerprint="1111111111111111")))  # same node, new alert
    r.post(payload(alert(node="gpu-node-2", fingerprint="2222222222222222")))  # another node
    wait_for(lambda: len(drains(workdir)) == 2 and r.events("cooldown"))
    assert [d[2] for d in drains(workdir)] == ["NodeName=gpu-node-1", "NodeName=gpu-node-2"]


def test_reset_gpu_only_when_its_preconditions_hold(workdir: Path, remediators: list[Remediator]) -> None:
    policy(workdir, """\
        - name: reset
          match: ['alertname="GpuXidResetRequired"']
          steps: [drain_node, reset_gpu]
        """, extra="cooldowns: {node: 1s, drain_node: 1s, reset_gpu: 24h}\n")
    state = workdir / "standin"
    r = run(workdir, remediators, "--execute")

    def reset_for(fp: str) -> dict:
        r.post(payload(alert(alertname="GpuXidResetRequired", fingerprint=fp)))
        return wait_for(lambda: [e for e in r.audit() if e.get("step") == "reset_gpu" and fp in e.get("key", "")],
                        timeout=20)[0]  # type: ignore[index]

    (state / "state").write_text("MIXED+DRAIN")  # still draining: jobs run
    assert "node not drained: Slurm state MIXED+DRAIN" in reset_for("00000000000000c1")["reason"]
    time.sleep(1.1)
    (state / "state").write_text("IDLE+DRAIN")
    (state / "apps").write_text(f"4242, {UUID1}\n")  # a process on any GPU of the node blocks the reset
    assert "compute processes still run on the node's GPUs: [4242]" in reset_for("00000000000000c2")["reason"]
    time.sleep(1.1)
    (state / "apps").write_text("")
    done = reset_for("00000000000000c3")
    assert (done["result"], done["reason"]) == ("ok", "reset and healthy")
    assert done["argv"][0][1:] == ["--gpu-reset", "-i", UUID1]
    time.sleep(1.1)
    again = reset_for("00000000000000c4")  # never loops: one reset per GPU per day
    assert again["result"] == "cooldown"
    assert sum("--gpu-reset" in c for c in calls(workdir, "nvidia-smi")) == 1


def test_checkpoint_signal_reaches_the_gpus_processes(workdir: Path, remediators: list[Remediator]) -> None:
    marker = workdir / "checkpointed"
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, time, sys\n"
                              f"signal.signal(signal.SIGUSR1, lambda *a: open({str(marker)!r}, 'w').write('yes'))\n"
                              "time.sleep(30)"])
    try:
        time.sleep(0.3)
        (workdir / "standin" / "apps").write_text(f"{child.pid}, {UUID1}\n99999999, GPU-other\n")
        policy(workdir, """\
            - name: checkpoint
              match: ['alertname="GpuXidFellOffBus"']
              steps: [checkpoint_signal]
            """)
        r = run(workdir, remediators, "--execute")
        r.post(payload(alert()))
        wait_for(marker.exists)
        assert f"sent SIGUSR1 to pids [{child.pid}]" in r.events("ran")[0]["reason"]
    finally:
        child.kill()
        child.wait()


def test_checkpoint_signal_reaches_the_other_ranks_of_the_gpus_job(workdir: Path,
                                                                    remediators: list[Remediator]) -> None:
    """Job 1003 runs on GPU 1 and GPU 2; the alert is for GPU 1 and names the job (workloads annotation):
    its rank on GPU 2 is signalled too, another job's process on GPU 2 is not."""
    def sleeper(marker: Path, job: str) -> subprocess.Popen[bytes]:
        code = ("import signal, time\n"
                f"signal.signal(signal.SIGUSR1, lambda *a: open({str(marker)!r}, 'w').write('yes'))\n"
                "time.sleep(30)")
        return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "SLURM_JOB_ID": job})

    rank0, rank1, other = workdir / "rank0", workdir / "rank1", workdir / "other"
    procs = [sleeper(rank0, "1003"), sleeper(rank1, "1003"), sleeper(other, "2000")]
    try:
        time.sleep(0.3)
        (workdir / "standin" / "apps").write_text(f"{procs[0].pid}, {UUID1}\n{procs[1].pid}, GPU-two\n"
                                                  f"{procs[2].pid}, GPU-two\n")
        policy(workdir, """\
            - name: checkpoint
              match: ['alertname="GpuXidFellOffBus"']
              steps: [checkpoint_signal]
            """)
        r = run(workdir, remediators, "--execute")
        a = alert()
        a["annotations"]["workloads"] = "1003"
        r.post(payload(a))
        wait_for(lambda: rank0.exists() and rank1.exists())
        assert f"sent SIGUSR1 to pids [{procs[0].pid}, {procs[1].pid}]" in r.events("ran")[0]["reason"]
        assert not other.exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_refuses_to_start_without_authentication(workdir: Path) -> None:
    policy(workdir, DRAIN_RULES)
    base = [sys.executable, "-m", "nvml_exporter.remediator", f"--config={workdir / 'policy.yml'}",
            f"--storage.path={workdir / 'state'}", f"--audit.log={workdir / 'audit.jsonl'}"]
    out = subprocess.run([*base, "--web.listen-address=0.0.0.0:9401"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "refusing to start without authentication" in out.stderr
    out = subprocess.run([*base, "--web.listen-address=0.0.0.0:9401", "--insecure-no-auth"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "only allowed on a loopback address" in out.stderr
    (workdir / "short").write_text("abc")
    out = subprocess.run([*base, f"--auth.token-file={workdir / 'short'}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "at least 16 characters" in out.stderr


@pytest.mark.parametrize(("text", "message"), [
    ("rules:\n  - steps: [reboot_everything]\n", "unknown action 'reboot_everything'"),
    ("rules:\n  - match: ['alertname=GpuLost']\n    steps: [log]\n", "bad matcher"),
    ("rules:\n  - match: ['alertname=~\"(\"']\n    steps: [log]\n", "bad regex"),
    ("scheduler: slurm\ncommands: {scontrol: /nonexistent/scontrol}\nrules:\n  - steps: [drain_node]\n",
     "missing command(s): /nonexistent/scontrol"),
    ("rules:\n  - steps: [{exec: nope}]\n", "not in the exec allow-list"),
    ("exec: {x: 'rm -rf /'}\nrules:\n  - steps: [log]\n", "want a list of strings"),
    ("rules:\n  - steps: [drain_node]\n", "drain_node needs scheduler"),
    ("scheduler: slurm\nrules:\n  - steps: [reset_gpu]\n", "reset_gpu only after drain_node"),
    ("rules: []\n", "non-empty list"),
    ("rulez: []\n", "unknown field(s) rulez"),
])
def test_check_config_gives_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "check-config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_example_policy_is_valid_and_the_remediator_never_imports_the_collector(workdir: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "remediator.example.yml"
    text = example.read_text().replace("/usr/bin/scontrol", str(workdir / "bin" / "scontrol")).replace(
        "/usr/bin/nvidia-smi", str(workdir / "bin" / "nvidia-smi"))
    (workdir / "example.yml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "check-config",
                          str(workdir / "example.yml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    probe = ("import sys, nvml_exporter.remediator.cli as c; "
             "bad = [m for m in ('pynvml', 'nvml_exporter.collector', 'nvml_exporter.nvml') if m in sys.modules]; "
             "print(bad)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_resume_returns_only_its_own_drains(workdir: Path) -> None:
    policy(workdir, DRAIN_RULES)
    base = [sys.executable, "-m", "nvml_exporter.remediator", "resume", f"--config={workdir / 'policy.yml'}"]
    (workdir / "standin" / "reason").write_text("admin: bad DIMM, do not touch")
    out = subprocess.run([*base, "gpu-node-1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "drained for another reason (admin: bad DIMM, do not touch)" in out.stdout
    (workdir / "standin" / "reason").write_text("nvml-remediator: GpuXidFellOffBus gpu=1 uuid=GPU-x fp=0")
    out = subprocess.run([*base, "gpu-node-1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert calls(workdir, "scontrol")[-1] == ["scontrol", "update", "NodeName=gpu-node-1", "State=RESUME"]
    assert len([c for c in calls(workdir, "scontrol") if "State=RESUME" in c]) == 1
    out = subprocess.run([*base, "node; reboot"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "invalid node name" in out.stdout
