"""Real rulers on loopback, for end-to-end tests: Debian's Prometheus and Alertmanager, and the
VictoriaMetrics stack (victoria-metrics, vmagent, vmalert)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_tool, wait_for
from tests.fakenvml.scenario import REPO


def scaled_rules(directory: Path) -> list[str]:
    """The pack as rules/generate.py writes it with --test-timing: every group evaluated every 1-2 s and
    every `for:` turned from minutes into seconds, so tests take seconds; expressions are unchanged."""
    subprocess.run([sys.executable, str(REPO / "rules" / "generate.py"), "--test-timing", f"--out={directory}"],
                   check=True)
    return [str(directory / name) for name in ("nvml-exporter-alerts.yml", "nvml-exporter-records.yml")]


class Api:
    def __init__(self, port: int, ready_path: str = "/-/ready"):
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def alerts(self) -> list[dict[str, Any]]:
        """The ruler's alerts, pending and firing (Prometheus and vmalert answer alike; vmalert with null
        for none)."""
        return self.get("/api/v1/alerts")["data"]["alerts"] or []

    def received(self) -> list[dict[str, Any]]:
        """An Alertmanager's active alerts."""
        return self.get("/api/v2/alerts")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


@contextlib.contextmanager
def running(argv: list[str], log: Path, api: Api) -> Iterator[Api]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return api.ready()

        wait_for(ready, timeout=60)
        yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def prometheus(directory: Path, exporter_port: int, alertmanager_port: int | None = None) -> Iterator[Api]:
    port = free_port()
    config = directory / "prometheus.yml"
    alerting = (f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['127.0.0.1:{alertmanager_port}']}}]}}]}}\n"
                if alertmanager_port else "")
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms}\n"
        f"rule_files: {json.dumps(scaled_rules(directory))}\n{alerting}"
        "scrape_configs:\n"
        "  - job_name: nvml-exporter\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
        "  - job_name: prometheus\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
    argv = [require_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with running(argv, directory / "prometheus.log", Api(port)) as api:
        yield api


@contextlib.contextmanager
def alertmanager(directory: Path, webhook_url: str | None = None, token_file: Path | None = None) -> Iterator[Api]:
    """Alertmanager sending to the remediator's webhook, or to no receiver (the test reads its API)."""
    directory.mkdir(exist_ok=True)
    port = free_port()
    config = directory / "alertmanager.yml"
    receiver = "  - name: remediator\n"
    if webhook_url:
        receiver += ("    webhook_configs:\n"
                     f"      - url: {webhook_url}\n"
                     "        send_resolved: true\n"
                     f"        http_config: {{authorization: {{type: Bearer, credentials_file: {token_file}}}}}\n")
    config.write_text(
        "route: {receiver: remediator, group_by: [alertname, instance], group_wait: 1s, group_interval: 1s, "
        "repeat_interval: 1h}\n"
        f"receivers:\n{receiver}")
    argv = [require_tool("prometheus-alertmanager"), f"--config.file={config}",
            f"--storage.path={directory / 'am-data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=", "--log.level=warn"]
    with running(argv, directory / "alertmanager.log", Api(port)) as api:
        yield api


class VmStack(Api):
    """vmalert's API (alerts), with the VictoriaMetrics server's (queries) as `tsdb`."""

    def __init__(self, port: int, tsdb: Api):
        super().__init__(port, "/health")
        self.tsdb = tsdb

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.tsdb.query(expr)


@contextlib.contextmanager
def victoriametrics(directory: Path, exporter_port: int, alertmanager_port: int) -> Iterator[VmStack]:
    """vmagent scrapes the exporter (and vmalert, for the pack's ruler alerts) every second and
    remote-writes to victoria-metrics; vmalert evaluates the pack against it, writes its records back
    and notifies the Alertmanager."""
    directory.mkdir(exist_ok=True)
    vm_port, agent_port, alert_port = free_port(), free_port(), free_port()
    vm = f"http://127.0.0.1:{vm_port}"
    scrape = directory / "vmagent.yml"
    scrape.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 900ms}\n"
        "scrape_configs:\n"
        "  - job_name: nvml-exporter\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
        "  - job_name: vmalert\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{alert_port}']}}]\n")
    rules = scaled_rules(directory)
    # By default VictoriaMetrics hides the last 30 s from queries, which would delay every alert by that.
    server = [require_tool("victoria-metrics"), f"-storageDataPath={directory / 'vm-data'}", "-retentionPeriod=1d",
              f"-httpListenAddr=127.0.0.1:{vm_port}", "-search.latencyOffset=1s", "-search.disableCache",
              "-loggerLevel=WARN"]
    agent = [require_tool("vmagent"), f"-promscrape.config={scrape}", f"-remoteWrite.url={vm}/api/v1/write",
             f"-remoteWrite.tmpDataPath={directory / 'vmagent-data'}", f"-httpListenAddr=127.0.0.1:{agent_port}",
             "-remoteWrite.flushInterval=200ms", "-loggerLevel=WARN"]
    ruler = [require_tool("vmalert"), *(f"-rule={r}" for r in rules), f"-datasource.url={vm}",
             f"-remoteWrite.url={vm}", f"-remoteRead.url={vm}", "-remoteWrite.flushInterval=200ms",
             f"-notifier.url=http://127.0.0.1:{alertmanager_port}", f"-httpListenAddr=127.0.0.1:{alert_port}",
             "-evaluationInterval=1s", "-loggerLevel=WARN"]
    with running(server, directory / "victoria-metrics.log", Api(vm_port, "/health")) as tsdb, \
            running(agent, directory / "vmagent.log", Api(agent_port, "/health")), \
            running(ruler, directory / "vmalert.log", VmStack(alert_port, tsdb)) as api:
        yield api  # type: ignore[misc]
