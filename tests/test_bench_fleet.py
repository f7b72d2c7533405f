"""`make bench-fleet`'s machinery, small: the fleet server's pages, and a 5-node run through Debian's
Prometheus and vmagent + victoria-metrics + vmalert with the shipped rule pack. Series counts and
evaluation failures are asserted; timings never are (they belong to the benchmark's report)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import require_tool
from tests.fakenvml.scenario import REPO


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


PAGE = """\
# HELP nvidia_gpu_up 1 if the GPU answers.
# TYPE nvidia_gpu_up gauge
nvidia_gpu_up{gpu="0",uuid="GPU-3a5f140c-be03-5509-8280-a40acf64db15"} 1
nvidia_gpu_up{gpu="1",uuid="GPU-9d1e0b4f-6f0e-5a1c-8e0b-2f4f3c1d9a77"} 1
# TYPE nvidia_gpu_info gauge
nvidia_gpu_info{gpu="0",uuid="GPU-3a5f140c-be03-5509-8280-a40acf64db15",serial="1650000000001"} 1
# TYPE nvidia_gpu_temperature_celsius gauge
nvidia_gpu_temperature_celsius{gpu="0",uuid="GPU-3a5f140c-be03-5509-8280-a40acf64db15"} 60
# TYPE nvidia_gpu_utilization_ratio gauge
nvidia_gpu_utilization_ratio{gpu="0",uuid="GPU-3a5f140c-be03-5509-8280-a40acf64db15"} 0.99
# TYPE nvidia_gpu_energy_joules_total counter
nvidia_gpu_energy_joules_total{gpu="0",uuid="GPU-3a5f140c-be03-5509-8280-a40acf64db15"} 1000.5
# TYPE nvidia_gpu_xid_errors_total counter
nvidia_gpu_xid_errors_total{gpu="0",uuid="GPU-3a5f140c-be03-5509-8280-a40acf64db15",xid="79"} 2
# TYPE nvml_exporter_last_collect_timestamp_seconds gauge
nvml_exporter_last_collect_timestamp_seconds 1796181226.5
"""


def values(page: bytes) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in page.decode().splitlines() if line and not line.startswith("#"))


def test_fleet_server_nodes_are_distinct_machines_whose_values_move() -> None:
    fs = load("fleet_server")
    later = PAGE.replace("} 1000.5", "} 1650.5").replace("1796181226.5", "1796181231.5")  # 650 W over 5 s
    template = fs.build(PAGE, later)
    assert (template.series, template.gpus) == (8, 2)
    fleet = fs.Fleet(template, nodes=3, step=15)
    now = fleet.start
    pages = [values(fleet.render(node, now)) for node in range(3)]
    # every node: the page's series, with its own UUIDs and serials, the same static values
    for node, page in enumerate(pages):
        assert len(page) == 8
        uuids = set(re.findall(r'uuid="([^"]+)"', "\n".join(page)))
        assert len(uuids) == 2 and all(len(u) == 40 for u in uuids)
        assert not uuids & set(re.findall(r'uuid="([^"]+)"', "\n".join(pages[(node + 1) % 3])))
        assert sum(1 for k in page if k.startswith("nvidia_gpu_xid_errors_total") and page[k] == "2") == 1
    assert len({p[k] for p in pages for k in p if k.startswith("nvidia_gpu_info")}) == 1
    # a gauge moves from one scrape step to the next and keeps the captured precision and range
    temps = {values(fleet.render(0, now + 15 * i))[next(k for k in pages[0] if "temperature" in k)]
             for i in range(20)}
    assert len(temps) > 1 and all(re.fullmatch(r"\d+", t) and 55 <= int(t) <= 65 for t in temps)
    ratios = [float(values(fleet.render(1, now + 15 * i))[next(k for k in pages[1] if "utilization" in k)])
              for i in range(20)]
    assert len(set(ratios)) > 1 and all(0 <= r <= 1 for r in ratios)
    # a counter advances at its captured rate (per-node scale 0.9-1.1); timestamps are the request's
    energy = next(k for k in pages[2] if "energy" in k)
    e0, e1 = (float(values(fleet.render(2, now + dt))[energy]) for dt in (0, 10))
    assert 0.9 * 1300 <= e1 - e0 <= 1.1 * 1300
    stamp = float(values(fleet.render(2, now + 10))["nvml_exporter_last_collect_timestamp_seconds"])
    assert abs(stamp - (now + 10)) < 0.001


def test_fleet_server_refuses_a_page_that_is_not_a_node() -> None:
    fs = load("fleet_server")
    for bad, why in (("# TYPE x gauge\nx 1\n", "no nvidia_gpu_up"), ("not a sample line\n", "line 1")):
        try:
            fs.build(bad)
        except ValueError as e:
            assert why in str(e)
        else:
            raise AssertionError(f"accepted {bad!r}")


CANARY = """\
groups:
  - name: bench-canary
    rules:
      # every node's `up` under one instance label: duplicate series, a failure on both engines (over the
      # last minute, not the last sample: vmalert may query before VictoriaMetrics shows the newest one)
      - record: bench:canary:duplicate
        expr: label_replace(last_over_time(up[1m]), "instance", "same", "", "")
"""


def test_fleet_of_five_nodes_on_prometheus_and_victoriametrics(tmp_path: Path) -> None:
    for tool in ("prometheus", "victoria-metrics", "vmagent", "vmalert"):
        require_tool(tool)
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (REPO / "rules").glob("*.yml"):
        shutil.copy(path, rules)
    (rules / "zz-canary.yml").write_text(CANARY)
    out = tmp_path / "results.json"
    nodes = 5
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fleet.py"), f"--nodes={nodes}", "--duration=4", "--interval=2s",
         "--max-group-interval=2s", f"--rules={rules}", f"--out={out}", f"--workdir={tmp_path / 'work'}",
         "--label=smoke", "--capture-gap=2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(out.read_text())["runs"]["smoke"]
    page = run["page"]
    assert page["gpus"] == 8 and run["gpus"] == nodes * 8
    assert page["per_link_series"] > 0  # the injected NVLink faults are on the page
    want = nodes * page["series"]
    shipped = {g["name"] for g in run["rules"]["groups"]} - {"bench-canary"}
    assert shipped
    for engine in ("prometheus", "victoriametrics"):
        figures = run[engine]
        assert figures["targets_up"] == nodes, engine
        assert figures["scraped_samples"] == want, engine
        assert figures["not_evaluated"] == [], engine
        for name in shipped:
            assert figures["groups"][name]["evaluations"] >= 1, (engine, name)
            assert figures["groups"][name]["failures"] == 0, (engine, name, figures["groups"][name])
        # a failing rule is counted: the zero above is a measurement, not a default
        assert figures["groups"]["bench-canary"]["failures"] >= 1, engine
        assert figures["evaluation_failures"] == figures["groups"]["bench-canary"]["failures"], engine
    # per rule: the failing canary shows as such, and every shipped group's rules are there
    per_rule = run["prometheus"]["rules_last"]
    assert per_rule["bench-canary"]["bench:canary:duplicate"]["health"] == "err"
    assert shipped <= set(per_rule)
    assert all(r["health"] == "ok" and isinstance(r["seconds"], (int, float))
               for group in shipped for r in per_rule[group].values()), "each rule's evaluation time was read"
    assert run["prometheus"]["fleet_series"] == want
    assert run["prometheus"]["head_series"] > want  # plus up/scrape_* and the records
    assert run["victoriametrics"]["series"] > want
    assert set(run["victoriametrics"]["rss_bytes"]) == {"victoria-metrics", "vmagent", "vmalert"}
    assert all(v == "n/a (< 10,000 GPUs)" for v in (g["verdict"] for g in run["goals"].values()))
    # the report regenerates from the file
    report = subprocess.run([sys.executable, str(REPO / "bench" / "fleet.py"), "--report", f"--out={out}"],
                            capture_output=True, text=True, check=True).stdout
    assert "### smoke: 5 nodes, 40 GPUs" in report and "| bench-canary | 2 s | 1 |" in report
    assert "Costliest rules on Prometheus" in report


def test_performance_doc_shows_the_committed_fleet_results() -> None:
    fleet = load("fleet")
    results = json.loads((REPO / "bench" / "fleet-results.json").read_text())
    doc = (REPO / "docs" / "performance.md").read_text()
    block = doc.split(fleet.DOC_BEGIN)[1].split(fleet.DOC_END)[0]
    assert block.strip() == fleet.report(results).strip(), "run: bench/fleet.py --report --doc docs/performance.md"
