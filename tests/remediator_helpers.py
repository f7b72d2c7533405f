"""Stand-ins for scontrol, kubectl and nvidia-smi that record their argv, and a remediator process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port, wait_for

# a policy that drains on a fell-off-the-bus Xid and only logs the rest
DRAIN_RULES = """\
- name: fell-off-bus
  match: ['alertname="GpuXidFellOffBus"']
  steps: [drain_node]
- name: the-rest
  steps: [log]
"""
TOKEN = "test-token-0123456789abcdef"
UUID1 = "GPU-35afb4b2-0148-580c-b89e-d0578b5f99a9"

STANDIN = textwrap.dedent('''\
    #!{python}
    # Stand-in for {prog}: records its argv; behaviour from files in {state}.
    import json, os, socket, sys, time
    state = {state!r}
    prog = {prog!r}
    def read(name, default=""):
        try:
            return open(os.path.join(state, name)).read()
        except OSError:
            return default
    def write(name, text):
        with open(os.path.join(state, name), "w") as f:
            f.write(text)
    def exporter_status():
        # what the node's exporter says through its control socket ("released=all" during a reset)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(read("control_socket"))
            s.sendall(b"status\\n")
            return s.recv(200).decode().strip()
    with open(os.path.join(state, "calls.jsonl"), "a") as f:
        f.write(json.dumps([prog] + sys.argv[1:]) + "\\n")
    with open(os.path.join(state, "pid." + prog), "w") as f:
        f.write(str(os.getpid()))
    once = os.path.join(state, "sleep-once." + prog)
    if os.path.exists(once):
        seconds = float(read("sleep-once." + prog))
        os.remove(once)
        time.sleep(seconds)
    if read("sleep." + prog):
        time.sleep(float(read("sleep." + prog)))
    args = sys.argv[1:]
    if prog == "scontrol" and args[:2] == ["show", "node"]:
        # per node once the scheduler is stateful (file "stateful"): a drain is seen by later shows
        print("NodeName=%s Arch=x86_64 State=%s Reason=%s Comment=(null)"
              % (args[-1], read("state." + args[-1]) or read("state", "IDLE+DRAIN"),
                 read("reason." + args[-1]) or read("reason", "x")))
    elif prog == "scontrol" and args[:1] == ["update"] and read("stateful"):
        kv = dict(a.split("=", 1) for a in args[1:])
        if kv.get("State") == "DRAIN":
            write("state." + kv["NodeName"], "IDLE+DRAIN")
            write("reason." + kv["NodeName"], kv.get("Reason", ""))
        elif kv.get("State") == "RESUME":
            write("state." + kv["NodeName"], "IDLE")
            write("reason." + kv["NodeName"], "none")
    elif prog == "nvidia-smi" and args and args[0].startswith("--query-compute-apps"):
        sys.stdout.write(read("apps"))
    elif prog == "nvidia-smi" and "--gpu-reset" in args:
        time.sleep(float(read("reset_sleep", "0")))
        if read("control_socket") and exporter_status() != "ok released=all":
            print("GPU in use by another client (the exporter holds NVML)")  # as the real one refuses
            sys.exit(3)
        if read("holders") and any(not os.path.exists(os.path.join(state, "stopped." + u))
                                   for u in read("holders").split()):
            print("GPU in use by another client (a holder still runs)")
            sys.exit(3)
        sys.exit(int(read("reset_rc", "0")))
    elif prog == "nvidia-smi" and "-q" in args:
        print("    GPU Recovery Action                   : " + read("recovery_action", "None"))
        sys.exit(int(read("health_rc", "0")))
    elif prog == "systemctl" and args[:1] == ["is-active"]:
        sys.exit(0 if not os.path.exists(os.path.join(state, "inactive." + args[-1])) else 3)
    elif prog == "systemctl" and args[:1] in (["stop"], ["start"]):
        marker = os.path.join(state, "stopped." + args[-1])
        if args[0] == "stop":
            write("stopped." + args[-1], "")
        elif os.path.exists(marker):
            os.remove(marker)
        sys.exit(int(read("systemctl_rc." + args[0], "0")))
    elif prog == "nvml-exporter":
        sys.stdout.write(read("diagnose.json"))
    elif prog == "kubectl" and read("stateful") and args[:1] in (["cordon"], ["uncordon"]):
        write("unschedulable." + args[1], "true" if args[0] == "cordon" else "false")
    elif prog == "kubectl" and read("stateful") and args[:1] == ["annotate"]:
        write("annotation." + args[3], args[4].split("=", 1)[1])
    elif prog == "kubectl" and read("stateful") and args[:2] == ["get", "node"]:
        asked = args[-1]
        if "annotations" in asked:
            sys.stdout.write(read("annotation." + args[2]))
        else:
            sys.stdout.write(read("unschedulable." + args[2], "false"))
    elif prog == "kubectl" and args[:2] == ["get", "node"]:
        sys.stdout.write(read("unschedulable", "true"))
''')


def make_standins(directory: Path) -> Path:
    bin_dir, state = directory / "bin", directory / "standin"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    for prog in ("scontrol", "kubectl", "nvidia-smi", "systemctl", "logger", "nvml-exporter"):
        path = bin_dir / prog
        path.write_text(STANDIN.format(python=sys.executable, prog=prog, state=str(state)))
        path.chmod(0o755)
    return bin_dir


def calls(directory: Path, prog: str | None = None) -> list[list[str]]:
    path = directory / "standin" / "calls.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = [json.loads(line) for line in lines]
    return [c for c in out if prog is None or c[0] == prog]


def policy(directory: Path, rules: str, extra: str = "") -> Path:
    b = directory / "bin"
    text = (f"scheduler: slurm\ncommands: {{scontrol: {b}/scontrol, kubectl: {b}/kubectl, "
            f"nvidia_smi: {b}/nvidia-smi}}\n{extra}rules:\n{textwrap.indent(textwrap.dedent(rules), '  ')}")
    path = directory / "policy.yml"
    path.write_text(text)
    return path


def alert(alertname: str = "GpuXidFellOffBus", node: str = "gpu-node-1", fingerprint: str = "9385457bd1cc4094",
          status: str = "firing", starts: str = "2026-11-27T02:18:11Z", **labels: str) -> dict[str, Any]:
    base = {"alertname": alertname, "instance": f"{node}:9400", "gpu": "1", "uuid": UUID1, "severity": "critical",
            "xid": "79"}
    base.update(labels)
    return {"status": status, "labels": base, "annotations": {"summary": "s"}, "startsAt": starts,
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus/graph", "fingerprint": fingerprint}


def payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {"version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing", "receiver": "remediator",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
            "alerts": list(alerts)}


@dataclass
class Remediator:
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, body: Any, token: str | None = TOKEN, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + "/webhook", data=data, headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text or b"{}")
            except ValueError:  # the HTTP layer's own refusals (400, 408, 413) are plain text
                return e.code, {"error": text.decode(errors="replace").strip()}

    def audit(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r["event"] == event]

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self, token: str | None = TOKEN) -> str:
        """GET /metrics, which needs the webhook's credentials."""
        status, body = self.get("/metrics", token)
        assert status == 200, body
        return body

    def log(self) -> str:
        return (self.directory / f"remediator-{self.port}.log").read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def start_remediator(directory: Path, *args: str, token: bool = True, port: int | None = None,
                     wait: bool = True) -> Remediator:
    port = port or free_port()
    (directory / "token").write_text(TOKEN + "\n")
    argv = [sys.executable, "-m", "nvml_exporter.remediator", f"--config={directory / 'policy.yml'}",
            f"--web.listen-address=127.0.0.1:{port}", f"--storage.path={directory / 'state'}",
            f"--audit.log={directory / 'audit.jsonl'}", "--log.level=debug", *args]
    if token:
        argv.append(f"--auth.token-file={directory / 'token'}")
    log = open(directory / f"remediator-{port}.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    log.close()
    rem = Remediator(proc, port, directory)
    if wait:
        def healthy() -> bool:
            assert proc.poll() is None, (directory / f"remediator-{port}.log").read_text()
            try:
                with urllib.request.urlopen(rem.url + "/-/healthy", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(healthy)
    return rem
