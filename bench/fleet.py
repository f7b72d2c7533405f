"""`make bench-fleet`: the rule pack and the exporter's page at fleet scale, on Debian's Prometheus and on
VictoriaMetrics (vmagent + victoria-metrics + vmalert).

The exporter runs over the fake NVML library with the `make demo` scenario (8 H100 SXM5) plus NVLink
faults on three GPUs, so per-link series exist as they do in a real fleet; its page, captured twice a
few seconds apart, is served by bench/fleet_server.py for N nodes (default 1,250 = 10,000 GPUs), each a
distinct `instance` with its own GPU UUIDs and moving gauges/counters. Prometheus scrapes and evaluates
every 15 s with the rule pack loaded; once every target has been scraped the run lasts `--duration`
seconds (and until every group has been evaluated), sampling the server's own metrics. Then the same
fleet goes through vmagent -> victoria-metrics <- vmalert. Prints a table with PASS/MISS per goal and
writes the run into bench/fleet-results.json under `--label`; `--report` reprints the JSON as Markdown
(docs/performance.md's fleet table). Everything listens on 127.0.0.1; every process started is stopped
on exit, error or Ctrl-C. Timings are measurements of a shared machine: read them, never assert them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCENARIO = REPO / "tests" / "fakenvml" / "scenarios" / "h100x8.conf"
FAKE_LIBRARY_DIR = REPO / "build" / "fakenvml"
RESULTS = HERE / "fleet-results.json"
JOB = "nvml-exporter"  # the job name the rule pack's `up{job=...}` alert selects

# Appended to the demo scenario (a later key overrides an earlier one): one link down, one link whose
# CRC counter keeps counting (a replay count too), one link with recoveries: per-link detail that a
# fleet always has somewhere. The page is served for every node, so 3 GPUs in 8 carry a faulty link,
# far more than in a real fleet: for an exporter that shows per-link series only for faulty links,
# the figures are an upper bound.
FAULTS = """
# bench/fleet.py: NVLink faults on three of the eight GPUs
gpu.2.nvlink.5.up=0
gpu.5.nvlink.0.crc_flit=12+0.5/s
gpu.5.nvlink.0.replay=3
gpu.6.nvlink.11.recovery=2
"""

GOAL_GPUS = 10_000
GOALS = {  # at 10,000 GPUs on one of our 2-core machines (issue 14)
    "groups_sum_seconds": 5.0,
    "slowest_group_seconds": 2.0,
    "evaluation_failures": 0,
    "rss_gib": 2.5,
}
GIB = 1 << 30


class BenchError(Exception):
    """A run that could not be measured: a tool failed, a server did not come up, bad input."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def duration_seconds(text: str | int | float) -> float:
    """Prometheus durations as rule files and flags write them: 15s, 5m, 1h30m, 500ms."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise BenchError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def git_commit(path: Path) -> str | None:
    """The last commit that changed `path` (the exporter's package, the rules' directory) in the checkout
    holding it, with "+dirty" when its files differ from that commit; None outside a checkout."""
    d = path if path.is_dir() else path.parent
    try:
        head = subprocess.run(["git", "-C", str(d), "log", "-1", "--format=%h", "--abbrev=12", "--", str(path)],
                              capture_output=True, text=True, check=True).stdout.strip()
        if not head:
            return None  # not tracked
        dirty = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--", str(path)],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def package_version(package: str) -> str | None:
    """The Debian package's version (Debian's victoria-metrics binaries print an empty -version)."""
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def http_get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


def http_ok(url: str) -> bool:
    try:
        http_get(url, timeout=3)
        return True
    except (OSError, urllib.error.HTTPError):
        return False


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    # A child outlives a SIGKILLed bench otherwise; PR_SET_PDEATHSIG = 1.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Processes:
    """Every process the bench starts, stopped in reverse order however the bench ends."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it for its life
        try:
            proc = subprocess.Popen(argv, env=env, stdout=stdout if stdout is not None else log, stderr=log,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, start_new_session=True)
        except OSError as e:
            raise BenchError(f"cannot start {name} ({argv[0]}): {e}") from e
        finally:
            log.close()
        self.running.append((name, proc))
        return proc

    def check(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            name = next(n for n, p in self.running if p is proc)
            tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.5,
               alive: Callable[[], None] = lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        if predicate():
            return
        time.sleep(interval)
    raise BenchError(f"{what}: not within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------- the page

@dataclass
class Page:
    text: str
    later: str | None
    source: str
    commit: str | None
    series: int = 0
    gpus: int = 0
    per_link_series: int = 0

    def __post_init__(self) -> None:
        lines = [ln for ln in self.text.splitlines() if ln and not ln.startswith("#")]
        self.series = len(lines)
        self.gpus = sum(1 for ln in lines if ln.startswith("nvidia_gpu_up{"))
        self.per_link_series = sum(1 for ln in lines if 'link="' in ln)
        if not self.gpus:
            raise BenchError(f"{self.source}: no nvidia_gpu_up sample, not a page of a node with GPUs")

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "commit": self.commit, "bytes": len(self.text.encode()),
                "series": self.series, "gpus": self.gpus, "series_per_gpu": round(self.series / self.gpus, 1),
                "per_link_series": self.per_link_series,
                "sha256": hashlib.sha256(self.text.encode()).hexdigest()[:16]}


def capture_page(procs: Processes, workdir: Path, exporter_source: Path, gap: float) -> Page:
    """The exporter of `exporter_source` (a checkout's exporter/ package) over the fake with the demo
    scenario and the faults: two pages `gap` seconds apart."""
    if not (FAKE_LIBRARY_DIR / "libnvidia-ml.so.1").exists():
        raise BenchError(f"{FAKE_LIBRARY_DIR}/libnvidia-ml.so.1 is missing: run `make fakenvml`")
    state = workdir / "nvml" / "state.conf"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(SCENARIO.read_text() + FAULTS)
    Path(f"{state}.events").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_NVML", "LD_LIBRARY_PATH"))}
    env.update(LD_LIBRARY_PATH=str(FAKE_LIBRARY_DIR), FAKE_NVML_STATE=str(state))
    if exporter_source.resolve() != (REPO / "exporter").resolve():
        # Another checkout's exporter: its package first on the path, and no bytecode written into it.
        shim = workdir / "exporter-source"
        shim.mkdir(exist_ok=True)
        (shim / "nvml_exporter").symlink_to(exporter_source.resolve())
        env.update(PYTHONPATH=str(shim), PYTHONDONTWRITEBYTECODE="1")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    proc = procs.start("exporter", [sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}",
                                    "--no-xid.journal", "--log.level=warn"], env=env)

    def complete() -> bool:
        try:
            page = http_get(url, timeout=10).decode()
        except OSError:
            return False
        return page.count("\nnvidia_gpu_up{") == 8 and "nvml_exporter_last_collect_timestamp_seconds" in page

    wait_until("the exporter's page", complete, 60, alive=lambda: procs.check(proc))
    time.sleep(1.5)  # past --collect.min-interval, so the first capture is a fresh collection
    first = http_get(url).decode()
    time.sleep(gap)
    later = http_get(url).decode()
    procs.stop(proc)
    src = exporter_source.resolve()
    return Page(first, later, f"exporter {src} over the fake, {SCENARIO.name} + NVLink faults", git_commit(src))


# --------------------------------------------------------------------------------------------- the rules

@dataclass
class Group:
    file: str
    name: str
    interval: float
    rules: int


def load_rules(rules_dir: Path, dest: Path, interval: float, cap: float | None) -> list[Group]:
    """Copy the rule files of `rules_dir` (its *.yml / *.yaml with a top-level `groups`) into `dest`;
    with `cap`, a group interval above it is lowered to it (the smoke test: every group evaluates in
    seconds)."""
    files = sorted(p for p in rules_dir.glob("*.y*ml") if p.suffix in (".yml", ".yaml"))
    groups: list[Group] = []
    dest.mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise BenchError(f"{path}: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            continue  # e.g. an Alertmanager example next to the rules
        for g in data["groups"]:
            every = duration_seconds(g["interval"]) if "interval" in g else interval
            if cap is not None and every > cap:
                g["interval"] = f"{cap:g}s"
                every = cap
            groups.append(Group(path.name, g["name"], every, len(g.get("rules", []))))
        (dest / path.name).write_text(yaml.safe_dump(data, sort_keys=False, width=1000)
                                      if cap is not None else path.read_text())
    if not groups:
        raise BenchError(f"{rules_dir}: no rule files (YAML with a top-level `groups`)")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise BenchError(f"{rules_dir}: group names repeat across files: {sorted(names)}")
    return groups


def scrape_config(nodes: int, fleet_port: int, interval: float) -> dict[str, Any]:
    """N static targets `gpu-NNNNN:9400`, each relabelled onto the fleet server's /node/N/metrics: what a
    fleet's file or DNS discovery would give, `instance` being the node's own address."""
    width = max(5, len(str(nodes - 1)))
    return {
        "global": {"scrape_interval": f"{interval:g}s", "scrape_timeout": f"{min(10.0, interval):g}s"},
        "scrape_configs": [{
            "job_name": JOB,
            "static_configs": [{"targets": [f"gpu-{i:0{width}d}:9400" for i in range(nodes)]}],
            "relabel_configs": [
                {"source_labels": ["__address__"], "target_label": "instance"},
                {"source_labels": ["__address__"], "regex": r"gpu-(\d+):9400", "target_label": "__metrics_path__",
                 "replacement": "/node/${1}/metrics"},
                {"target_label": "__address__", "replacement": f"127.0.0.1:{fleet_port}"},
            ],
        }],
    }


# ------------------------------------------------------------------------------------------- measurement

@dataclass
class Evaluations:
    """Distinct evaluations of one group, as (timestamp, duration) seen while sampling."""
    interval: float
    seen: dict[float, float] = field(default_factory=dict)
    failures: float = 0.0
    missed: float = 0.0

    def summary(self, since: float, steady_from: float) -> dict[str, Any]:
        after = sorted((t, d) for t, d in self.seen.items() if t >= since)
        steady = [d for t, d in after if t >= steady_from] or [d for _, d in after[-1:]]
        return {"interval_seconds": self.interval, "evaluations": len(after),
                "last_seconds": after[-1][1] if after else None,
                "steady_seconds": statistics.median(steady) if steady else None,
                "max_seconds": max(d for _, d in after) if after else None,
                "failures": self.failures, "iterations_missed": self.missed}


@dataclass
class Phase:
    """One engine's run: what was sampled while the fleet was scraped and the rules evaluated."""
    groups: dict[str, Evaluations]
    started: float = field(default_factory=time.time)
    filled: float | None = None  # when every target had been scraped once and its series were in
    rss: dict[str, list[int]] = field(default_factory=dict)  # process -> VmRSS samples after `filled`
    hwm: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def memory(self, name: str, pid: int) -> None:
        with contextlib.suppress(OSError):
            m = proc_memory(pid)
            if self.filled is not None:
                self.rss.setdefault(name, []).append(m["VmRSS"])
            self.hwm[name] = m["VmHWM"]
            self.cpu[name] = cpu_seconds(pid)

    def all_evaluated(self) -> bool:
        return self.filled is not None and all(any(t >= self.filled for t in g.seen) for g in self.groups.values())

    def summary(self, ended: float) -> dict[str, Any]:
        assert self.filled is not None
        steady_from = self.filled + (ended - self.filled) / 2
        groups = {name: g.summary(self.filled, steady_from) for name, g in self.groups.items()}
        steady = {n: g["steady_seconds"] for n, g in groups.items() if g["steady_seconds"] is not None}
        last = {n: g["last_seconds"] for n, g in groups.items() if g["last_seconds"] is not None}
        slowest = max(steady, key=lambda n: steady[n]) if steady else None
        # Groups with longer intervals cost less per second than their duration says: the share of one
        # core the rules keep busy is the sum of duration / interval, and a group whose share nears 1
        # is about to overrun its interval.
        share = {n: d / self.groups[n].interval for n, d in steady.items()}
        tightest = max(share, key=lambda n: share[n]) if share else None
        return {
            "seconds_to_fill": round(self.filled - self.started, 1),
            "seconds_measured": round(ended - self.filled, 1),
            "groups": groups,
            "groups_sum_seconds": sum(steady.values()),
            "groups_sum_last_seconds": sum(last.values()),
            "slowest_group": slowest,
            "slowest_group_seconds": steady[slowest] if slowest else None,
            "evaluation_load": sum(share.values()),
            "tightest_group": tightest,
            "tightest_group_share": share[tightest] if tightest else None,
            "evaluation_failures": sum(g.failures for g in self.groups.values()),
            "iterations_missed": sum(g.missed for g in self.groups.values()),
            "not_evaluated": sorted(n for n, g in groups.items() if not g["evaluations"]),
            "rss_bytes": {n: {"last": v[-1], "max": max(v), "peak_hwm": self.hwm.get(n)} for n, v in self.rss.items()},
            "cpu_seconds": {n: round(v, 1) for n, v in self.cpu.items()},
            **self.figures,
        }


def query(base: str, expr: str) -> float | None:
    body = json.loads(http_get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=120))
    if body.get("status") != "success":
        raise BenchError(f"query {expr!r} at {base}: {body}")
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def measure(phase: Phase, sample: Callable[[], None], filled: Callable[[], float], duration: float,
            fill_timeout: float, cap: float, alive: Callable[[], None], label: str) -> float:
    """Sample until the head is full (`filled`: the share of targets up and of the fleet's samples in,
    whichever is less), then for `duration` seconds and until every group has run once since; returns
    when it ended. An overloaded engine that keeps a few targets failing (scrape timeouts) is measured
    as it is once 95 % are in, and the run says so."""
    def tolerant(read: Callable[[], Any], default: Any) -> Any:
        # An engine busy evaluating can answer its own /metrics or a query late: that sample is lost
        # and counted, the run goes on (a dead engine is caught by alive()).
        try:
            return read()
        except (OSError, ValueError) as e:
            phase.figures["samples_failed"] = phase.figures.get("samples_failed", 0) + 1
            print(f"  {label}: a sample failed ({e}); going on", flush=True)
            return default

    deadline = time.monotonic() + fill_timeout
    while (share := tolerant(filled, 0.0)) < 1.0:
        alive()
        tolerant(sample, None)
        if time.monotonic() > deadline:
            if share < 0.95:
                raise BenchError(f"{label}: {share:.0%} of the fleet's targets/series in after {fill_timeout:.0f} s")
            phase.figures["warning"] = f"only {share:.1%} of the fleet's targets/series were in at the start"
            print(f"  {label}: {phase.figures['warning']}; measuring anyway", flush=True)
            break
        time.sleep(2)
    phase.filled = time.time()
    print(f"  {label}: every target scraped, series in after {phase.filled - phase.started:.0f} s; "
          f"measuring {duration:.0f} s", flush=True)
    end_at = time.monotonic() + duration
    hard = end_at + cap
    next_note = time.monotonic() + 60
    while True:
        alive()
        tolerant(sample, None)
        now = time.monotonic()
        if now >= end_at and phase.all_evaluated():
            break
        if now >= hard:
            print(f"  {label}: stopping with groups not yet evaluated", flush=True)
            break
        if now >= next_note:
            rss = {n: f"{v[-1] / GIB:.2f}" for n, v in phase.rss.items() if v}
            print(f"  {label}: {max(0.0, end_at - now):.0f} s left; RSS GiB {rss}", flush=True)
            next_note = now + 60
        time.sleep(min(5.0, max(0.5, end_at - now)))
    tolerant(sample, None)
    return time.time()


def run_prometheus(procs: Processes, workdir: Path, nodes: int, fleet_port: int, rule_files: list[Path],
                   groups: list[Group], page: Page, interval: float, duration: float) -> dict[str, Any]:
    binary = shutil.which("prometheus")
    if not binary:
        raise BenchError("prometheus is not installed: `make bench-fleet` installs it (tools/install-deps)")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = workdir / "prometheus.yml"
    cfg = scrape_config(nodes, fleet_port, interval)
    cfg["global"]["evaluation_interval"] = f"{interval:g}s"
    cfg["rule_files"] = [str(p) for p in rule_files]
    config.write_text(json.dumps(cfg, indent=1))
    proc = procs.start("prometheus", [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prom'}",
                                      f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
    wait_until("Prometheus ready", lambda: http_ok(f"{base}/-/ready"), 120, alive=lambda: procs.check(proc))
    phase = Phase({g.name: Evaluations(g.interval) for g in groups})
    want = nodes * page.series
    head: dict[str, float] = {}

    def sample() -> None:
        phase.memory("prometheus", proc.pid)
        fams: dict[str, dict[str, float]] = {}
        text = http_get(f"{base}/metrics").decode()
        (workdir / "prometheus-metrics.txt").write_text(text)
        for name, labels, value in samples(text):
            if name.startswith("prometheus_rule_"):
                group = labels.get("rule_group", "").rpartition(";")[2]  # "<file>;<group>"
                per_group = fams.setdefault(name, {})
                per_group[group] = per_group.get(group, 0.0) + value
            elif name in ("prometheus_tsdb_head_series", "process_resident_memory_bytes"):
                head[name] = value
        if not fams and phase.groups:
            raise BenchError("Prometheus's /metrics has no prometheus_rule_* families: were the rules loaded?")
        for gname, g in phase.groups.items():
            ts = fams.get("prometheus_rule_group_last_evaluation_timestamp_seconds", {}).get(gname, 0.0)
            if ts > 0:
                g.seen[ts] = fams["prometheus_rule_group_last_duration_seconds"][gname]
            g.failures = fams.get("prometheus_rule_evaluation_failures_total", {}).get(gname, 0.0)
            g.missed = fams.get("prometheus_rule_group_iterations_missed_total", {}).get(gname, 0.0)

    def filled() -> float:
        return min((query(base, f'count(up{{job="{JOB}"}} == 1)') or 0) / nodes,
                   (query(base, f'sum(scrape_samples_scraped{{job="{JOB}"}})') or 0) / want)

    ended = measure(phase, sample, filled, duration, fill_timeout=max(120.0, 4 * interval + nodes * 0.2),
                    cap=max(g.interval for g in groups) + 60, alive=lambda: procs.check(proc), label="prometheus")
    phase.figures |= {
        "version": subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        "head_series": head.get("prometheus_tsdb_head_series"),
        "process_resident_memory_bytes": head.get("process_resident_memory_bytes"),
        "scraped_samples": query(base, f'sum(scrape_samples_scraped{{job="{JOB}"}})'),
        "targets_up": query(base, f'count(up{{job="{JOB}"}} == 1)'),
        # the fleet's own series, counted in the head: a cross-check for small runs (at a million series
        # the query itself would take seconds and memory, and the scraped samples say the same)
        "fleet_series": query(base, f'count({{job="{JOB}", __name__!~"up|scrape_.+|ALERTS|ALERTS_FOR_STATE|.+:.+"}})')
        if want <= 200_000 else None,
        "rules_last": rule_times(base),
    }
    procs.stop(proc)
    return phase.summary(ended)


def rule_times(base: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Per group, per rule: its last evaluation's seconds, health and the alerts it holds (pending or
    firing), from Prometheus's /api/v1/rules: which rules of a slow group cost its time. An alerting
    rule's annotations are expanded for every alert it holds on every evaluation, so a query in a
    template costs once per alert."""
    body = json.loads(http_get(f"{base}/api/v1/rules", timeout=120))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for g in body.get("data", {}).get("groups", []):
        for r in g.get("rules", []):
            out.setdefault(g["name"], {})[r["name"]] = {
                "seconds": r.get("evaluationTime"), "health": r.get("health"), "alerts": len(r.get("alerts") or [])}
    return out


def run_victoriametrics(procs: Processes, workdir: Path, nodes: int, fleet_port: int, rule_files: list[Path],
                        groups: list[Group], page: Page, interval: float, duration: float) -> dict[str, Any]:
    tools = {t: shutil.which(t) for t in ("victoria-metrics", "vmagent", "vmalert")}
    missing = [t for t, p in tools.items() if not p]
    if missing:
        raise BenchError(f"{', '.join(missing)} not installed: `make bench-fleet` installs victoria-metrics")
    vm_port, agent_port, alert_port = free_port(), free_port(), free_port()
    vm = f"http://127.0.0.1:{vm_port}"
    alert = f"http://127.0.0.1:{alert_port}"
    config = workdir / "vmagent.yml"
    config.write_text(json.dumps(scrape_config(nodes, fleet_port, interval), indent=1))
    server = procs.start("victoria-metrics", [
        str(tools["victoria-metrics"]), f"-storageDataPath={workdir / 'vm'}", f"-httpListenAddr=127.0.0.1:{vm_port}",
        "-retentionPeriod=1", "-loggerLevel=WARN", "-search.latencyOffset=0s"])
    wait_until("victoria-metrics ready", lambda: http_ok(f"{vm}/health"), 120, alive=lambda: procs.check(server))
    agent = procs.start("vmagent", [
        str(tools["vmagent"]), f"-promscrape.config={config}", f"-remoteWrite.url={vm}/api/v1/write",
        f"-remoteWrite.tmpDataPath={workdir / 'vmagent'}", f"-httpListenAddr=127.0.0.1:{agent_port}",
        "-loggerLevel=WARN"])
    evaluator = procs.start("vmalert", [
        str(tools["vmalert"]), *[f"-rule={p}" for p in rule_files], f"-datasource.url={vm}",
        f"-remoteWrite.url={vm}", f"-notifier.url=http://127.0.0.1:{fleet_port}", f"-evaluationInterval={interval:g}s",
        f"-httpListenAddr=127.0.0.1:{alert_port}", "-loggerLevel=WARN"])

    def alive() -> None:
        for p in (server, agent, evaluator):
            procs.check(p)

    wait_until("vmalert ready", lambda: http_ok(f"{alert}/-/healthy"), 120, alive=alive)
    phase = Phase({g.name: Evaluations(g.interval) for g in groups})
    want = nodes * page.series
    last_count: dict[str, float] = {}

    def sample() -> None:
        for name, p in (("victoria-metrics", server), ("vmagent", agent), ("vmalert", evaluator)):
            phase.memory(name, p.pid)
        sums: dict[str, dict[str, float]] = {}
        text = http_get(f"{alert}/metrics").decode()
        (workdir / "vmalert-metrics.txt").write_text(text)
        for name, labels, value in samples(text):
            if name.startswith("vmalert_") and "group" in labels:
                sums.setdefault(name, {})
                sums[name][labels["group"]] = sums[name].get(labels["group"], 0.0) + value
        now = time.time()
        for gname, g in phase.groups.items():
            # vmalert exports a duration summary per group: a new iteration shows as a grown count, and
            # the sum's growth over the count's is the mean duration of the iterations since.
            count = sums.get("vmalert_iteration_duration_seconds_count", {}).get(gname, 0.0)
            total = sums.get("vmalert_iteration_duration_seconds_sum", {}).get(gname, 0.0)
            before_count, before_total = last_count.get(gname, 0.0), last_count.get(gname + "\0sum", 0.0)
            if count > before_count:
                g.seen[now] = (total - before_total) / (count - before_count)
                last_count[gname], last_count[gname + "\0sum"] = count, total
            # vmalert 1.79 has no failure counter per group, but a gauge per rule: 1 while its last
            # evaluation failed. The bench counts the failing rules seen at any sample.
            failing = (sums.get("vmalert_alerting_rules_error", {}).get(gname, 0.0)
                       + sums.get("vmalert_recording_rules_error", {}).get(gname, 0.0))
            g.failures = max(g.failures, failing)
            g.missed = sums.get("vmalert_iteration_missed_total", {}).get(gname, 0.0)
        if not ("vmalert_alerting_rules_error" in sums or "vmalert_recording_rules_error" in sums):
            raise BenchError(f"vmalert's /metrics lacks the per-group families the bench reads: {sorted(sums)}")

    def filled() -> float:
        window = f"{2 * interval:g}s"
        return min((query(vm, f'count(last_over_time(up{{job="{JOB}"}}[{window}]) == 1)') or 0) / nodes,
                   (query(vm, f'sum(last_over_time(scrape_samples_scraped{{job="{JOB}"}}[{window}]))') or 0) / want)

    ended = measure(phase, sample, filled, duration, fill_timeout=max(180.0, 6 * interval + nodes * 0.3),
                    cap=max(g.interval for g in groups) + 60, alive=alive, label="victoria-metrics")
    status = json.loads(http_get(f"{vm}/api/v1/status/tsdb", timeout=120))
    phase.figures |= {
        "version": package_version("victoria-metrics"),
        "series": status.get("data", {}).get("totalSeries"),
        "scraped_samples": query(vm, f'sum(last_over_time(scrape_samples_scraped{{job="{JOB}"}}[{2 * interval:g}s]))'),
        "targets_up": query(vm, f'count(last_over_time(up{{job="{JOB}"}}[{2 * interval:g}s]) == 1)'),
    }
    for p in (evaluator, agent, server):
        procs.stop(p)
    return phase.summary(ended)


# ------------------------------------------------------------------------------------------------ report

def goals(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """PASS/MISS per goal for Prometheus, with the measured/goal ratio; the goal is at 10,000 GPUs and is
    judged on a run of at least that many only (a smaller fleet is reported, not judged)."""
    prom = run.get("prometheus")
    if not prom:
        return {}
    rss = prom["rss_bytes"]["prometheus"]["max"] / GIB
    measured = {"groups_sum_seconds": prom["groups_sum_seconds"],
                "slowest_group_seconds": prom["slowest_group_seconds"],
                "evaluation_failures": prom["evaluation_failures"], "rss_gib": rss}
    out = {}
    for key, goal in GOALS.items():
        value = measured[key]
        ok = value is not None and value <= goal
        out[key] = {"goal": goal, "measured": value,
                    "ratio": (value / goal if goal else (0.0 if not value else None)) if value is not None else None,
                    "verdict": ("PASS" if ok else "MISS") if run["gpus"] >= GOAL_GPUS else "n/a (< 10,000 GPUs)"}
    return out


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def cell(engine: dict[str, Any] | None, show: Callable[[dict[str, Any]], str]) -> str:
    return show(engine) if engine else "—"


def report_run(label: str, run: dict[str, Any]) -> list[str]:
    page, rules, gpus = run["page"], run["rules"], run["gpus"]
    prom, vm = run.get("prometheus"), run.get("victoriametrics")
    out = [f"### {label}: {run['nodes']:,} nodes, {gpus:,} GPUs ({run['when']})\n",
           f"Page: {page['source']} (commit {page['commit']}): {page['bytes']:,} bytes, {page['series']:,} "
           f"series per node, {page['series_per_gpu']} per GPU, {page['per_link_series']} of them per NVLink link. "
           f"Rules: {rules['dir']} (commit {rules['commit']}): {len(rules['groups'])} groups, "
           f"{sum(g['rules'] for g in rules['groups'])} rules. Measured {run['duration_seconds']:.0f} s "
           f"after every target had been scraped; scrape and evaluation every {run['interval_seconds']:g} s. "
           f"Prometheus {prom['version'].split()[2] if prom else '—'}, "
           f"victoria-metrics {vm['version'] if vm else '—'}; {run['machine']['cpus']} CPUs "
           f"({run['machine']['cpu']}), {run['machine']['memory_bytes'] / GIB:.0f} GiB, load average "
           f"{run['load_average_at_start'][0]:.1f} at the start, {run['load_average_at_end'][0]:.1f} at the end.\n",
           "| figure | Prometheus | VictoriaMetrics |", "|---|---:|---:|"]

    def groups_sum(e: dict[str, Any]) -> str:
        return f"{fmt(e['groups_sum_seconds'])} s ({fmt(e['groups_sum_last_seconds'])} s)"

    def slowest(e: dict[str, Any]) -> str:
        return f"{fmt(e['slowest_group_seconds'])} s ({e['slowest_group']})"

    def load(e: dict[str, Any]) -> str:
        return fmt(e.get("evaluation_load"), 3)

    def tightest(e: dict[str, Any]) -> str:
        return f"{fmt(e.get('tightest_group_share'), 3)} ({e.get('tightest_group')})" if "tightest_group" in e else "—"

    def cpu(e: dict[str, Any]) -> str:
        return ", ".join(f"{n} {v:,.0f}" for n, v in e["cpu_seconds"].items())

    rows = [
        ("series stored", cell(prom, lambda e: fmt(e["head_series"], 0) + " (head)"),
         cell(vm, lambda e: fmt(e["series"], 0))),
        ("fleet samples per scrape round", cell(prom, lambda e: fmt(e["scraped_samples"], 0)),
         cell(vm, lambda e: fmt(e["scraped_samples"], 0))),
        ("groups' evaluation time, sum: steady (last)", cell(prom, groups_sum), cell(vm, groups_sum)),
        ("slowest group, steady", cell(prom, slowest), cell(vm, slowest)),
        ("rules' load: Σ steady time ÷ interval (cores kept busy)", cell(prom, load), cell(vm, load)),
        ("group nearest its interval: steady time ÷ interval", cell(prom, tightest), cell(vm, tightest)),
        ("evaluation failures", cell(prom, lambda e: fmt(e["evaluation_failures"], 0)),
         cell(vm, lambda e: fmt(e["evaluation_failures"], 0))),
        ("group iterations missed (an evaluation overran its interval)",
         cell(prom, lambda e: fmt(e.get("iterations_missed"), 0)),
         cell(vm, lambda e: fmt(e.get("iterations_missed"), 0))),
        ("RSS, GiB: max sampled", cell(prom, lambda e: fmt(e["rss_bytes"]["prometheus"]["max"] / GIB)),
         cell(vm, lambda e: " + ".join(f"{n} {fmt(r['max'] / GIB)}" for n, r in e["rss_bytes"].items()))),
        ("RSS per GPU, KiB", cell(prom, lambda e: fmt(e["rss_bytes"]["prometheus"]["max"] / 1024 / gpus, 0)),
         cell(vm, lambda e: fmt(sum(r["max"] for r in e["rss_bytes"].values()) / 1024 / gpus, 0))),
        ("CPU seconds", cell(prom, cpu), cell(vm, cpu)),
    ]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]
    out += [f"{name}: {eng['warning']}.\n" for name, eng in (("Prometheus", prom), ("VictoriaMetrics", vm))
            if eng and eng.get("warning")]
    g = goals(run)
    if g:
        out += ["| goal (Prometheus, 10,000 GPUs) | goal | measured | ratio | verdict |", "|---|---:|---:|---:|---|"]
        for key, v in g.items():
            ratio = "—" if v["ratio"] is None else f"{v['ratio']:.2f}×"
            out.append(f"| {key} | {v['goal']:g} | {fmt(v['measured'])} | {ratio} | {v['verdict']} |")
        out.append("")
    out += ["| group | interval | rules | Prometheus: steady (max) s | VictoriaMetrics: steady (max) s |",
            "|---|---:|---:|---:|---:|"]
    for gr in rules["groups"]:
        cells = []
        for eng in (prom, vm):
            s = eng["groups"].get(gr["name"]) if eng else None
            cells.append(f"{fmt(s['steady_seconds'], 3)} ({fmt(s['max_seconds'], 3)})" if s else "—")
        out.append(f"| {gr['name']} | {gr['interval_seconds']:g} s | {gr['rules']} | {cells[0]} | {cells[1]} |")
    per_rule = [(v["seconds"], g, name, v["alerts"]) for g, rules in (prom or {}).get("rules_last", {}).items()
                for name, v in rules.items() if v.get("seconds") is not None]
    if per_rule:
        out += ["", f"Costliest rules on Prometheus (their last evaluation, of {len(per_rule)}; an alert's annotations "
                "are expanded for each alert it holds, every evaluation):", "",
                "| rule | group | seconds | alerts held |", "|---|---|---:|---:|"]
        out += [f"| {name} | {g} | {fmt(sec, 3)} | {alerts:,} |" for sec, g, name, alerts in sorted(per_rule)[::-1][:8]]
    return [*out, ""]


def report(results: dict[str, Any]) -> str:
    """Markdown: per run, the fleet, each engine's figures, the goals, and the per-group durations."""
    return "\n".join(line for label, run in results["runs"].items() for line in report_run(label, run))


DOC_BEGIN = "<!-- bench-fleet report: generated by `bench/fleet.py --report --doc FILE` from its results -->"
DOC_END = "<!-- end of bench-fleet report -->"


def write_doc(doc: Path, results: dict[str, Any]) -> None:
    """Replace the generated block of `doc` (between DOC_BEGIN and DOC_END) with the report."""
    text = doc.read_text()
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1:
        raise BenchError(f"{doc}: needs one line {DOC_BEGIN!r} and one {DOC_END!r} around the report")
    head, rest = text.split(DOC_BEGIN)
    _, tail = rest.split(DOC_END)
    doc.write_text(f"{head}{DOC_BEGIN}\n\n{report(results)}\n{DOC_END}{tail}")


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.machine())
    mem = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal:"))
    return {"cpus": os.cpu_count(), "cpu": model, "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def start_fleet(procs: Processes, workdir: Path, page: Page, nodes: int, interval: float) -> tuple[int, int]:
    (workdir / "page.prom").write_text(page.text)
    argv = [sys.executable, str(HERE / "fleet_server.py"), f"--page={workdir / 'page.prom'}", f"--nodes={nodes}",
            f"--step={interval:g}"]
    if page.later is not None:
        (workdir / "page-later.prom").write_text(page.later)
        argv.append(f"--page-later={workdir / 'page-later.prom'}")
    proc = procs.start("fleet-server", argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    line = b""
    deadline = time.monotonic() + 60
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        procs.check(proc)
        line += proc.stdout.read() or b""
        time.sleep(0.1)
    m = re.match(rb"listening (\d+)\n", line)
    if not m:
        raise BenchError(f"the fleet server did not say where it listens: {line!r}")
    return int(m.group(1)), proc.pid


def run(args: argparse.Namespace, procs: Processes, workdir: Path) -> dict[str, Any]:
    interval = duration_seconds(args.interval)
    cap = duration_seconds(args.max_group_interval) if args.max_group_interval else None
    if args.page:
        try:
            page = Page(args.page.read_text(), args.page_later.read_text() if args.page_later else None,
                        str(args.page.resolve()), git_commit(args.page.resolve()))
        except OSError as e:
            raise BenchError(f"--page: {e}") from e
    else:
        print(f"capturing the page of {args.exporter_source} over the fake ...", flush=True)
        page = capture_page(procs, workdir, args.exporter_source, args.capture_gap)
    groups = load_rules(args.rules, workdir / "rules", interval, cap)
    rule_files = sorted((workdir / "rules").iterdir())
    gpus = args.nodes * page.gpus
    print(f"fleet: {args.nodes:,} nodes x {page.series:,} series ({page.gpus} GPUs, {page.series / page.gpus:.1f} "
          f"series/GPU, {len(page.text.encode()):,} bytes) = {args.nodes * page.series:,} series, {gpus:,} GPUs; "
          f"rules: {len(groups)} groups from {args.rules}", flush=True)
    fleet_port, fleet_pid = start_fleet(procs, workdir, page, args.nodes, interval)
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "load_average_at_start": os.getloadavg(),
        "nodes": args.nodes, "gpus": gpus, "interval_seconds": interval, "duration_seconds": args.duration,
        "max_group_interval_seconds": cap,
        "page": page.summary(),
        "rules": {"dir": str(args.rules.resolve()), "commit": git_commit(args.rules.resolve()),
                  "groups": [{"file": g.file, "name": g.name, "interval_seconds": g.interval, "rules": g.rules}
                             for g in groups]},
    }
    engines = {"prometheus": run_prometheus, "victoriametrics": run_victoriametrics}
    for name in args.engines:
        print(f"{name}: starting", flush=True)
        (workdir / name).mkdir(exist_ok=True)
        result[name] = engines[name](procs, workdir / name, args.nodes, fleet_port, rule_files, groups, page,
                                     interval, args.duration)
    result["fleet_server_cpu_seconds"] = round(cpu_seconds(fleet_pid), 1)
    result["load_average_at_end"] = os.getloadavg()
    result["goals"] = goals(result)
    return result


def save(out: Path, label: str, result: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {"runs": {}}
    if out.exists():
        try:
            results = json.loads(out.read_text())
        except ValueError as e:
            raise BenchError(f"{out} is not JSON ({e}); move it away or pass another --out") from e
    results.setdefault("runs", {})[label] = result
    results["goals"] = {"gpus": GOAL_GPUS, **GOALS}
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1250, help="8-GPU nodes in the fleet")
    ap.add_argument("--duration", type=float, default=360, help="seconds measured per engine once the head is full")
    ap.add_argument("--interval", default="15s", help="scrape and evaluation interval")
    ap.add_argument("--rules", type=Path, default=REPO / "rules", help="directory of the rule pack (its *.yml)")
    ap.add_argument("--page", type=Path, help="a captured exporter page to serve instead of running the exporter")
    ap.add_argument("--page-later", type=Path,
                    help="the same exporter's page captured seconds after --page: counters advance at their rate")
    ap.add_argument("--exporter-source", type=Path, default=REPO / "exporter",
                    help="the exporter package directory (a checkout's exporter/) whose page is captured")
    ap.add_argument("--capture-gap", type=float, default=5.0, help="seconds between the two captures")
    ap.add_argument("--engines", default="prometheus,victoriametrics",
                    type=lambda s: [e for e in s.split(",") if e], help="prometheus and/or victoriametrics")
    ap.add_argument("--max-group-interval", help="lower longer group intervals to this (the smoke test)")
    ap.add_argument("--label", default="current", help="name of this run in the results file")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (runs of other labels are kept)")
    ap.add_argument("--workdir", type=Path, help="keep configs, logs and data here (default: a temporary dir)")
    ap.add_argument("--report", action="store_true", help="print the results file as Markdown and exit")
    ap.add_argument("--doc", type=Path, help="also write the report into this file's generated block "
                    "(docs/performance.md)")
    args = ap.parse_args(argv)
    if args.report:
        try:
            results = json.loads(args.out.read_text())
            print(report(results))
            if args.doc:
                write_doc(args.doc, results)
        except (OSError, ValueError, KeyError, BenchError) as e:
            print(f"bench-fleet: cannot report {args.out}: {e}", file=sys.stderr)
            return 2
        return 0
    unknown = set(args.engines) - {"prometheus", "victoriametrics"}
    if unknown or not args.engines or args.nodes < 1 or args.duration < 0:
        ap.error(f"bad --engines {sorted(unknown)}" if unknown or not args.engines else "--nodes >= 1, --duration >= 0")
    if args.page_later and not args.page:
        ap.error("--page-later needs --page")
    if not args.rules.is_dir():
        ap.error(f"--rules {args.rules}: not a directory")

    def terminated(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a shell starts background jobs with it ignored, and Python then leaves it so.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, terminated)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir)
    try:
        result = run(args, procs, workdir)
    except BenchError as e:
        print(f"bench-fleet: {e}\n(logs in {workdir})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench-fleet: interrupted; stopped every process it started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    try:
        results = save(args.out, args.label, result)
        if args.doc:
            write_doc(args.doc, results)
    except (OSError, BenchError) as e:
        print(f"bench-fleet: {e}", file=sys.stderr)
        return 2
    print()
    print(report({"runs": {args.label: results["runs"][args.label]}}))
    print(f"written: {args.out} (run {args.label!r}){f' and {args.doc}' if args.doc else ''}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
