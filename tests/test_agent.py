"""Remediation at fleet scale (issue 17), end to end on loopback: two real Alertmanagers in an HA pair, the
central remediator (webhook) draining through a stand-in scontrol, and one node agent per node pulling
its node's alerts, which resets the GPU safely: the node's real exporter (over the fake NVML) lets go of
NVML through its control socket, the holders are stopped through a stand-in systemctl, and the stand-in
nvidia-smi refuses the reset unless both are true, as the real one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from nvml_exporter import control
from nvml_exporter.remediator.agent import AlertmanagerSource, as_payload
from tests.conftest import Exporter, free_port, require_tool, samples, wait_for
from tests.fakenvml.scenario import LIBRARY_DIR, REPO, FakeNvml, h100_node
from tests.promstack import Api, running
from tests.remediator_helpers import Remediator, calls, make_standins, start_remediator

HOLDERS = ("nvidia-dcgm", "dcgm-exporter")


@dataclass
class Fleet:
    directory: Path
    fake: FakeNvml
    exporter: Exporter
    socket: Path
    central: Remediator
    ams: list[Api]
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def uuid(self) -> str:
        return self.fake.state["gpu.0.uuid"]

    def fire(self, node: str = "node-a", alertname: str = "GpuXidFellOffBus") -> None:
        """What Prometheus does: the same alert to every Alertmanager of the pair."""
        now = datetime.now(timezone.utc).replace(microsecond=0)
        alert = [{"labels": {"alertname": alertname, "instance": f"{node}:9400", "gpu": "0", "uuid": self.uuid,
                             "severity": "critical", "xid": "79"},
                  "annotations": {"summary": "Xid 79"}, "startsAt": now.isoformat().replace("+00:00", "Z"),
                  "endsAt": (now + timedelta(hours=1)).isoformat().replace("+00:00", "Z")}]
        for am in self.ams:
            req = urllib.request.Request(am.url + "/api/v2/alerts", data=json.dumps(alert).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200

    def agent(self, node: str, *args: str) -> subprocess.Popen[bytes]:
        d = self.directory / f"agent-{node}"
        d.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "nvml_exporter.remediator", "agent", f"--config={self.directory / 'policy.yml'}",
                f"--node={node}", *[f"--alertmanager.url={am.url}" for am in self.ams], "--poll-interval=500ms",
                f"--storage.path={d}", f"--audit.log={d / 'audit.jsonl'}", "--log.level=debug", *args]
        with open(d / "agent.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.agents.append(proc)
        return proc

    def audit(self, node: str) -> list[dict[str, Any]]:
        path = self.directory / f"agent-{node}" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps(self, node: str) -> dict[str, str]:
        """step -> result, from the agent's audit (the last record of each step)."""
        return {r["step"]: r["result"] for r in self.audit(node) if "step" in r}

    def standin(self, name: str, text: str) -> None:
        (self.directory / "standin" / name).write_text(text)


def alertmanager_pair(directory: Path, webhook: str, token_file: Path) -> Iterator[list[Api]]:
    ports = [free_port() for _ in range(2)]
    cluster = [free_port() for _ in range(2)]
    config = directory / "alertmanager.yml"
    config.write_text(
        "route: {receiver: central, group_by: [alertname, instance], group_wait: 1s, group_interval: 1s, "
        "repeat_interval: 1h}\n"
        "receivers:\n  - name: central\n    webhook_configs:\n"
        f"      - url: {webhook}\n        send_resolved: false\n"
        f"        http_config: {{authorization: {{type: Bearer, credentials_file: {token_file}}}}}\n")
    import contextlib
    with contextlib.ExitStack() as stack:
        apis = []
        for i in range(2):
            argv = [require_tool("prometheus-alertmanager"), f"--config.file={config}",
                    f"--storage.path={directory / f'am{i}'}", f"--web.listen-address=127.0.0.1:{ports[i]}",
                    f"--cluster.listen-address=127.0.0.1:{cluster[i]}",
                    f"--cluster.peer=127.0.0.1:{cluster[1 - i]}", "--cluster.settle-timeout=2s",
                    "--cluster.gossip-interval=50ms", "--cluster.pushpull-interval=1s", "--log.level=warn"]
            apis.append(stack.enter_context(running(argv, directory / f"am{i}.log", Api(ports[i]))))
        yield apis


def write_policy(directory: Path, socket: Path, *, reboot: bool = False, resume: bool = True,
                 scheduler: str = "slurm") -> None:
    b = directory / "bin"
    (directory / "policy.yml").write_text(f"""\
scheduler: {scheduler}
node_label: instance
commands: {{scontrol: {b}/scontrol, kubectl: {b}/kubectl, nvidia_smi: {b}/nvidia-smi, systemctl: {b}/systemctl,
           logger: {b}/logger, nvml_exporter: {b}/nvml-exporter}}
timeouts: {{default: 20s, reset_gpu: 60s}}
node_agent:
  holders: [{", ".join(HOLDERS)}]
  drain_wait: 60s
  reboot_node: {str(reboot).lower()}
  resume_after_reset: {str(resume).lower()}
  exporter_socket: {socket}
rules:
  - name: fell-off-bus
    match: ['alertname="GpuXidFellOffBus"']
    steps: [checkpoint_signal, drain_node, reset_gpu]
  - name: the-rest
    steps: [log]
""")


@pytest.fixture
def fleet(tmp_path: Path, start_exporter, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    execute, scheduler = request.param if hasattr(request, "param") else (True, "slurm")
    make_standins(tmp_path)
    fake = FakeNvml(tmp_path / "nvml", h100_node(2))
    sock = tmp_path / "run" / "control.sock"
    sock.parent.mkdir()
    exporter = start_exporter(fake, "--collect.min-interval=10ms", f"--control.socket={sock}", "--no-xid.journal",
                              wait_ready=True)
    # `nvml-exporter diagnose` on node A: the real one, over the same fake GPUs
    env = " ".join(f"{k}={v}" for k, v in fake.env().items())
    diag = tmp_path / "bin" / "nvml-exporter"
    diag.write_text(f"#!/bin/sh\ncd {REPO}\nexec env {env} {sys.executable} -m nvml_exporter \"$@\"\n")
    diag.chmod(0o755)
    write_policy(tmp_path, sock, scheduler=scheduler)
    st = tmp_path / "standin"
    (st / "stateful").write_text("1")
    (st / "state.node-a").write_text("ALLOCATED")  # a job runs until the central remediator drains
    (st / "state.node-b").write_text("ALLOCATED")
    (st / "control_socket").write_text(str(sock))
    (st / "holders").write_text(" ".join(HOLDERS))
    central = start_remediator(tmp_path, *(["--execute"] if execute else []))
    ams_cm = alertmanager_pair(tmp_path, central.url + "/webhook", tmp_path / "token")
    ams = next(ams_cm)
    f = Fleet(tmp_path, fake, exporter, sock, central, ams)
    try:
        yield f
    finally:
        for p in f.agents:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        ams_cm.close()
        central.stop()


def resets(f: Fleet) -> list[list[str]]:
    return [c for c in calls(f.directory, "nvidia-smi") if "--gpu-reset" in c]


@pytest.mark.parametrize("fleet", [(True, "kubernetes")], indirect=True)
def test_execute_on_kubernetes_cordon_reset_uncordon(fleet: Fleet) -> None:
    f = fleet
    f.agent("node-a", "--execute")
    f.agent("node-b", "--execute")
    f.fire("node-a")
    wait_for(lambda: f.steps("node-a").get("resume_node") == "ok", timeout=90)
    acted = [c[1:3] for c in calls(f.directory, "kubectl") if c[1] in ("cordon", "uncordon", "annotate")]
    assert acted == [["cordon", "node-a"], ["annotate", "--overwrite"], ["uncordon", "node-a"]]
    assert resets(f) == [["nvidia-smi", "--gpu-reset", "-i", f.uuid]]
    assert not [c for c in calls(f.directory) if "node-b" in " ".join(c)]


def test_execute_xid79_drain_release_reset_confirm_restore_resume(fleet: Fleet) -> None:
    f = fleet
    a, b = f.agent("node-a", "--execute"), f.agent("node-b", "--execute")
    f.fire("node-a")
    # (the resume is part of the reset step, whose own record comes when the step returns)
    wait_for(lambda: f.steps("node-a").get("resume_node") == "ok" and "reset_gpu" in f.steps("node-a"), timeout=90)
    assert a.poll() is None and b.poll() is None
    st = f.steps("node-a")
    assert st["checkpoint_signal"] == "ok" and st["drain_node"] == "ok" and st["reset_gpu"] == "ok"
    # the central remediator drained node A once (both Alertmanagers sent it), and resumed by the agent
    updates = [c for c in calls(f.directory, "scontrol") if c[1] == "update"]
    assert [u[2:4] for u in updates] == [["NodeName=node-a", "State=DRAIN"], ["NodeName=node-a", "State=RESUME"]]
    # one reset, of that GPU, which the stand-in allowed only with NVML released and the holders stopped
    assert resets(f) == [["nvidia-smi", "--gpu-reset", "-i", f.uuid]]
    order = [c for c in calls(f.directory) if c[0] in ("systemctl", "nvidia-smi", "logger") and
             c[1:2] != ["--query-compute-apps=pid,gpu_uuid"]]
    stops = [i for i, c in enumerate(order) if c[:2] == ["systemctl", "stop"]]
    starts = [i for i, c in enumerate(order) if c[:2] == ["systemctl", "start"]]
    reset_at = order.index(["nvidia-smi", "--gpu-reset", "-i", f.uuid])
    assert len(stops) == len(starts) == 2 and max(stops) < reset_at < min(starts)
    assert ["logger", "-t", "nvml-remediator", "-p", "daemon.notice",
            f"GPU reset executed: {f.uuid}, success: true"] in order
    reset = next(r for r in f.audit("node-a") if r.get("step") == "reset_gpu")
    assert "confirmed: recovery action None" in reset["reason"]
    # the exporter has NVML back and serves the GPU
    assert control.request(str(f.socket), "status") == "released=none"
    wait_for(lambda: samples(f.exporter.metrics()).get(f'nvidia_gpu_up{{gpu="0",uuid="{f.uuid}"}}') == 1)
    # node B's agent did nothing: no alert of its node
    assert not [r for r in f.audit("node-b") if r["event"] in ("queued", "ran", "matched")]
    assert not [c for c in calls(f.directory) if "node-b" in " ".join(c)]
    # the HA pair: every Alertmanager held the alert, the agent queued it once
    assert len([r for r in f.audit("node-a") if r["event"] == "queued"]) == 1
    # central: the node-local steps are delegated to the agent, not run there
    central = {r["step"]: r["result"] for r in f.central.audit() if "step" in r}
    assert central == {"checkpoint_signal": "delegated", "drain_node": "ok", "reset_gpu": "delegated"}
    # and nothing runs twice: another pull a while later queues nothing new
    time.sleep(1.5)
    assert len(resets(f)) == 1 and len([r for r in f.audit("node-a") if r["event"] == "queued"]) == 1


@pytest.mark.parametrize("fleet", [(False, "slurm")], indirect=True)
def test_dry_run_end_to_end_changes_nothing(fleet: Fleet) -> None:
    f = fleet
    f.agent("node-a")
    f.agent("node-b")
    f.fire("node-a")
    wait_for(lambda: f.steps("node-a").get("reset_gpu") == "dry_run", timeout=60)
    wait_for(lambda: {r.get("step"): r["result"] for r in f.central.audit() if "step" in r}.get("drain_node")
             == "dry_run")
    assert f.steps("node-a") == {"checkpoint_signal": "dry_run", "drain_node": "dry_run", "reset_gpu": "dry_run"}
    plan = next(r for r in f.audit("node-a") if r.get("step") == "reset_gpu")["argv"]
    assert ["nvidia-smi", "--gpu-reset", "-i", f.uuid] in [[Path(a[0]).name, *a[1:]] for a in plan]
    acted = [c for c in calls(f.directory) if c[1:2] in (["update"], ["stop"], ["start"]) or "--gpu-reset" in c]
    assert acted == []
    assert control.request(str(f.socket), "status") == "released=none"
    assert not [r for r in f.audit("node-b") if r["event"] in ("queued", "ran")]


def test_failed_reset_restores_everything_and_escalates(fleet: Fleet) -> None:
    f = fleet
    write_policy(f.directory, f.socket, reboot=True)
    f.standin("reset_rc", "1")
    f.agent("node-a", "--execute")
    f.fire("node-a")
    # (the reset step's own record comes after the escalation it made, when the step returns)
    wait_for(lambda: f.steps("node-a").get("rma_eval") == "escalated" and "reset_gpu" in f.steps("node-a"),
             timeout=90)
    st = f.steps("node-a")
    assert st["reset_gpu"] == "failed" and st["reboot_node"] == "ok" and "resume_node" not in st
    assert ["systemctl", "reboot"] in calls(f.directory, "systemctl")
    # the holders came back and the exporter took NVML back, whatever happened
    assert not list((f.directory / "standin").glob("stopped.*"))
    assert control.request(str(f.socket), "status") == "released=none"
    assert ["logger", "-t", "nvml-remediator", "-p", "daemon.err",
            f"GPU reset executed: {f.uuid}, success: false"] in calls(f.directory, "logger")
    # not resumed: the node stays drained for a person
    assert [c[3] for c in calls(f.directory, "scontrol") if c[1] == "update"] == ["State=DRAIN"]


def test_unconfirmed_reset_escalates_without_reboot_unless_enabled(fleet: Fleet) -> None:
    f = fleet
    f.standin("recovery_action", "Node Reboot Required")
    f.agent("node-a", "--execute")
    f.fire("node-a")
    # (the reset step's own record comes after the escalation it made, when the step returns)
    wait_for(lambda: f.steps("node-a").get("rma_eval") == "escalated" and "reset_gpu" in f.steps("node-a"),
             timeout=90)
    st = f.steps("node-a")
    assert st["reset_gpu"] == "failed" and st["reboot_node"] == "skipped"
    reset = next(r for r in f.audit("node-a") if r.get("step") == "reset_gpu")
    assert "not confirmed: recovery action Node Reboot Required" in reset["reason"]
    assert ["systemctl", "reboot"] not in calls(f.directory, "systemctl")


def test_exporter_that_will_not_release_refuses_the_reset(fleet: Fleet) -> None:
    f = fleet
    f.exporter.proc.terminate()  # no exporter to release NVML: the reset must not run
    f.exporter.proc.wait(timeout=10)
    f.agent("node-a", "--execute")
    f.fire("node-a")
    wait_for(lambda: f.steps("node-a").get("reset_gpu") == "refused", timeout=90)
    reset = next(r for r in f.audit("node-a") if r.get("step") == "reset_gpu")
    assert "the exporter did not release NVML" in reset["reason"]
    assert resets(f) == []
    assert not [c for c in calls(f.directory, "systemctl") if c[1] in ("stop", "reboot")]


def test_source_filter_and_ha_dedupe(tmp_path: Path) -> None:
    """The query the agent sends, and how an HA pair's alerts become one (unit level)."""
    s = AlertmanagerSource(["http://127.0.0.1:1/"], "instance", "node-a.dc1")
    assert "filter=instance%3D~%22node-a%5C.dc1%28%3A%5B0-9%5D%2B%29%3F%22" in s.query
    assert "active=true" in s.query and "silenced=false" in s.query and "inhibited=false" in s.query
    payload = as_payload([{"labels": {"a": "b"}, "fingerprint": "f1", "startsAt": "t", "status": {"state": "active"}},
                          {"labels": {"a": "c"}, "fingerprint": "f2", "startsAt": "t",
                           "status": {"state": "suppressed"}}])
    assert [a["status"] for a in payload["alerts"]] == ["firing", "resolved"]


def test_agent_refuses_bad_flags(tmp_path: Path) -> None:
    make_standins(tmp_path)
    write_policy(tmp_path, tmp_path / "c.sock")
    base = [sys.executable, "-m", "nvml_exporter.remediator", "agent", f"--config={tmp_path / 'policy.yml'}",
            f"--storage.path={tmp_path / 's'}", f"--audit.log={tmp_path / 'a.jsonl'}"]
    env = {**os.environ, "LD_LIBRARY_PATH": str(LIBRARY_DIR)}
    for extra, why in ((["--alertmanager.url=ftp://x"], "want http"),
                       (["--alertmanager.url=http://127.0.0.1:1", "--node=bad node"], "invalid node name"),
                       ([], "required")):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 2 and why in r.stderr, r.stderr
    port = free_port()  # nothing listens there
    r = subprocess.run([*base, f"--alertmanager.url=http://127.0.0.1:{port}", "--once", "--node=node-a"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "no Alertmanager answered" in r.stderr, r.stderr
    (tmp_path / "policy.yml").write_text((tmp_path / "policy.yml").read_text().split("node_agent:")[0] +
                                         "rules:\n  - name: x\n    steps: [log]\n")
    r = subprocess.run([*base, "--alertmanager.url=http://127.0.0.1:1"], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 2 and "no node_agent" in r.stderr


def test_fleet_example_policy_is_valid_for_both_roles(tmp_path: Path) -> None:
    make_standins(tmp_path)
    b = tmp_path / "bin"
    text = (REPO / "examples" / "remediator-fleet.example.yml").read_text()
    for name, prog in (("scontrol", "scontrol"), ("nvidia-smi", "nvidia-smi"), ("systemctl", "systemctl"),
                       ("logger", "logger"), ("nvml-exporter", "nvml-exporter")):
        text = text.replace(f"/usr/bin/{name}", str(b / prog))
    (tmp_path / "fleet.yml").write_text(text)
    out = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "check-config",
                          str(tmp_path / "fleet.yml")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    from nvml_exporter.remediator import policy
    p = policy.load(str(tmp_path / "fleet.yml"))
    assert p.agent is not None and p.agent.holders == ("nvidia-dcgm", "dcgm-exporter") and not p.agent.reboot_node
    assert policy.agent_commands(p) == []
    assert [s.kind for s in p.rules[0].steps] == ["checkpoint_signal", "drain_node", "reset_gpu"]


def test_agent_restarted_after_dying_mid_reset_restores_holders_and_exporter(fleet: Fleet) -> None:
    """The agent died between stopping the holders and restoring them: its next start restores them."""
    f = fleet
    assert control.request(str(f.socket), "release all").startswith("released all")
    state = f.directory / "agent-node-a"
    state.mkdir()
    (state / "reset-in-progress.json").write_text(json.dumps({"uuid": f.uuid, "stopped": ["nvidia-dcgm"],
                                                              "released": True}))
    f.standin("stopped.nvidia-dcgm", "")
    f.agent("node-a", "--execute")
    wait_for(lambda: [r for r in f.audit("node-a") if r["event"] == "reset_recovered"], timeout=30)
    assert ["systemctl", "start", "nvidia-dcgm"] in calls(f.directory, "systemctl")
    assert control.request(str(f.socket), "status") == "released=none"
    # (the agent writes the audit record, then removes the marker: wait for it rather than race it)
    wait_for(lambda: not (state / "reset-in-progress.json").exists(), timeout=10)
    wait_for(lambda: samples(f.exporter.metrics()).get(f'nvidia_gpu_up{{gpu="0",uuid="{f.uuid}"}}') == 1)


def test_source_over_tls_with_a_bearer_token_and_one_alertmanager_down(tmp_path: Path) -> None:
    """An Alertmanager behind TLS and a bearer token (e.g. a reverse proxy), its peer down: the alerts of
    the one that answers, with the query the agent sends."""
    import http.server
    import ssl
    import threading

    from nvml_exporter.remediator.agent import SourceError
    from tests.test_http_security import make_cert

    cert, key = make_cert(tmp_path)
    seen: list[tuple[str, str]] = []
    alerts = [{"labels": {"alertname": "GpuXidFellOffBus", "instance": "node-a:9400"}, "fingerprint": "ab12",
               "startsAt": "2026-12-02T04:00:00.000Z", "status": {"state": "active"}}]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization", "")))
            ok = self.headers.get("Authorization") == "Bearer s3cret-token-0123456789"
            body = json.dumps(alerts if ok else {"error": "no"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = f"https://127.0.0.1:{server.server_address[1]}"
        down = f"https://127.0.0.1:{free_port()}"
        source = AlertmanagerSource([down, up], "instance", "node-a", token="s3cret-token-0123456789",
                                    ca_file=str(cert))
        got, errors = source.fetch()
        assert got == alerts and list(errors) == [down]
        path, auth = seen[-1]
        assert path.startswith("/api/v2/alerts?filter=instance%3D~%22node-a%28%3A%5B0-9%5D%2B%29%3F%22&active=true")
        assert auth == "Bearer s3cret-token-0123456789"
        wrong = AlertmanagerSource([up], "instance", "node-a", token="wrong", ca_file=str(cert))
        with pytest.raises(SourceError, match="HTTP 401"):
            wrong.fetch()
        untrusted = AlertmanagerSource([up], "instance", "node-a", token="s3cret-token-0123456789")
        with pytest.raises(SourceError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            untrusted.fetch()
    finally:
        server.shutdown()
