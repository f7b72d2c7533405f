"""Debian's real Prometheus and Alertmanager on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_tool, wait_for
from tests.fakenvml.scenario import REPO


def scaled_rules(directory: Path) -> list[str]:
    """The rule pack with every `for:` turned from minutes into seconds and the 5-minute reliability
    group run every 2 seconds, so tests take seconds; expressions are unchanged."""
    out = []
    for name in ("nvml-exporter-alerts.yml", "nvml-exporter-records.yml"):
        text = (REPO / "rules" / name).read_text()
        text = re.sub(r"(\n\s+for: )(\d+)m", r"\1\2s", text)
        text = text.replace("interval: 5m", "interval: 2s")
        (directory / name).write_text(text)
        out.append(str(directory / name))
    return out


class Api:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/alerts")["data"]["alerts"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
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
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    argv = [require_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with running(argv, directory / "prometheus.log", Api(port)) as api:
        yield api


@contextlib.contextmanager
def alertmanager(directory: Path, webhook_url: str, token_file: Path) -> Iterator[Api]:
    port = free_port()
    config = directory / "alertmanager.yml"
    config.write_text(
        "route: {receiver: remediator, group_by: [alertname, instance], group_wait: 1s, group_interval: 1s, "
        "repeat_interval: 1h}\n"
        "receivers:\n"
        "  - name: remediator\n"
        "    webhook_configs:\n"
        f"      - url: {webhook_url}\n"
        "        send_resolved: true\n"
        f"        http_config: {{authorization: {{type: Bearer, credentials_file: {token_file}}}}}\n")
    argv = [require_tool("prometheus-alertmanager"), f"--config.file={config}",
            f"--storage.path={directory / 'am-data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=", "--log.level=warn"]
    with running(argv, directory / "alertmanager.log", Api(port)) as api:
        yield api
