"""Workload attribution in the real exporter over the fake driver: cardinality, NVML processes, diagnose."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema

from tests.conftest import require_tool, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml, h100_node
from tests.kubelet_stub import serving

SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) \S+$")


def series_of(page: str) -> set[str]:
    return {m[1] for line in page.splitlines() if (m := SERIES.match(line))}


def workload_series(page: str) -> set[str]:
    return {s for s in series_of(page) if s.startswith("nvidia_gpu_workload_info")}


def test_eight_jobs_on_eight_gpus_add_eight_series_and_change_no_other(
        fake: FakeNvml, start_exporter, tmp_path: Path) -> None:
    fake.state = h100_node(8)
    fake.write()
    plain = series_of(start_exporter(fake, "--no-xid.journal", wait_ready=True).metrics())
    jobs = tmp_path / "slurm"
    jobs.mkdir()
    exp = start_exporter(fake, "--no-xid.journal", f"--collect.workload.slurm-dir={jobs}",
                         "--collect.min-interval=10ms", wait_ready=True)
    idle = series_of(exp.metrics())
    # A workload source adds the exporter's own two counters, and nothing per GPU while no job runs.
    assert idle - plain == {"nvml_exporter_workloads_dropped_total",
                            'nvml_exporter_workload_refresh_errors_total{source="slurm"}'}
    assert plain - idle == set()
    for i in range(8):
        (jobs / fake.state[f"gpu.{i}.uuid"]).write_text(f"{1000 + i} user=u{i} account=acct partition=gpu\n")
    busy_page = str(wait_for(lambda: (p := exp.metrics()) and len(workload_series(p)) == 8 and p))
    busy = series_of(busy_page)
    assert busy - idle == workload_series(busy_page)
    assert idle - busy == set()
    uuid3 = fake.state["gpu.3.uuid"]
    assert (f'nvidia_gpu_workload_info{{gpu="3",uuid="{uuid3}",workload_id="1003",source="slurm",'
            f'slurm_user="u3",slurm_account="acct",slurm_partition="gpu"}}') in busy
    result = subprocess.run([require_tool("promtool"), "check", "metrics"], input=busy_page, capture_output=True,
                            text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    # The epilog removes the files: the series go with the jobs.
    for f in jobs.iterdir():
        f.unlink()
    wait_for(lambda: not workload_series(exp.metrics()))


def test_compute_processes_from_nvml_name_their_job(fake: FakeNvml, start_exporter, tmp_path: Path) -> None:
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                           env={**os.environ, "SLURM_JOB_ID": "5150", "SLURM_JOB_PARTITION": "debug"})
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    try:
        fake.gpu(2, procs=f"{job.pid}:1048576,{stray.pid}:2048")
        exp = start_exporter(fake, "--no-xid.journal", "--collect.workload.processes",
                             "--collect.workload.interval=100ms", "--collect.min-interval=10ms", wait_ready=True)
        uuid2 = fake.state["gpu.2.uuid"]
        want = (f'nvidia_gpu_workload_info{{gpu="2",uuid="{uuid2}",workload_id="5150",source="process",'
                f'slurm_partition="debug"}}')
        page = str(wait_for(lambda: (p := exp.metrics()) and want in series_of(p) and p))
        assert workload_series(page) == {want}  # the process without a job makes no series
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}
        env.update(fake.env())
        out = subprocess.run([sys.executable, "-m", "nvml_exporter", "diagnose", "--timeout=5", "--no-xid.journal",
                              "--collect.workload.processes"], env=env, capture_output=True, text=True, timeout=60)
        assert "  workload      5150 (process, slurm_partition=debug)" in out.stdout, out.stdout + out.stderr
        assert f"  process       pid {job.pid}, 1.04858e+06 bytes, workload 5150" in out.stdout
        assert f"  process       pid {stray.pid}, 2048 bytes, workload unknown" in out.stdout
    finally:
        for p in (job, stray):
            p.kill()
            p.wait()


def test_diagnose_prints_and_reports_each_gpus_workloads(fake: FakeNvml, tmp_path: Path) -> None:
    jobs = tmp_path / "slurm"
    jobs.mkdir()
    (jobs / "0").write_text("77\n")
    (jobs / fake.state["gpu.1.uuid"]).write_text("88 user=alice account=phys partition=gpu\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML")}
    env.update(fake.env())
    cmd = [sys.executable, "-m", "nvml_exporter", "diagnose", "--timeout=5", "--no-xid.journal",
           f"--collect.workload.slurm-dir={jobs}"]
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout
    gpu1 = text.split("\nGPU 1 ")[1].split("\nGPU 2 ")[0]
    assert "  workload      88 (slurm, slurm_account=phys, slurm_partition=gpu, slurm_user=alice)" in gpu1
    assert "  workload      77 (slurm)" in text.split("\nGPU 0 ")[1].split("\nGPU 1 ")[0]
    assert "  workload      none" in text.split("\nGPU 2 ")[1]
    doc = json.loads(subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=60).stdout)
    jsonschema.validate(doc, json.loads((REPO / "docs" / "diagnose.schema.json").read_text()))
    assert doc["gpus"][1]["workloads"] == [{"workload_id": "88", "source": "slurm", "labels": {
        "slurm_account": "phys", "slurm_partition": "gpu", "slurm_user": "alice"}}]
    assert doc["gpus"][2]["workloads"] == []


def test_kubelet_pods_on_the_exporters_page(fake: FakeNvml, start_exporter, tmp_path: Path) -> None:
    """The exporter over the fake driver asks an in-test kubelet: GPU 0 by UUID, GPU 1 as nvidia1 (its
    minor number); the MIG device matches no GPU (the fake has no MIG), which is not an error."""
    sock = tmp_path / "kubelet.sock"
    with serving(sock, gpu0=fake.state["gpu.0.uuid"]) as lister:
        exp = start_exporter(fake, "--no-xid.journal", f"--collect.workload.kubelet-socket={sock}",
                             "--collect.workload.interval=100ms", "--collect.min-interval=10ms", wait_ready=True)
        uuid0, uuid1 = fake.state["gpu.0.uuid"], fake.state["gpu.1.uuid"]
        want = {f'nvidia_gpu_workload_info{{gpu="0",uuid="{uuid0}",workload_id="ml/train-0",source="kubelet",'
                'k8s_namespace="ml",k8s_pod="train-0",k8s_container="trainer"}',
                f'nvidia_gpu_workload_info{{gpu="1",uuid="{uuid1}",workload_id="web/infer-7",source="kubelet",'
                'k8s_namespace="web",k8s_pod="infer-7",k8s_container="server"}'}
        page = str(wait_for(lambda: (p := exp.metrics()) and workload_series(p) == want and p))
        assert 'nvml_exporter_workload_refresh_errors_total{source="kubelet"} 0' in page
        lister.delay = 5.0  # a kubelet that hangs: the scrape does not wait, the failure is counted
        wait_for(lambda: 'nvml_exporter_workload_refresh_errors_total{source="kubelet"} 0' not in exp.metrics(),
                 timeout=20)
        assert workload_series(exp.metrics()) == want  # the last good reading
        lister.delay = 0.0


def test_bad_workload_interval_exits_2() -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nvml_exporter", *argv], capture_output=True, text=True,
                              timeout=30)

    r = run("--collect.workload.interval=0s")
    assert (r.returncode, r.stderr) == (2, "nvml-exporter: error: argument --collect.workload.interval: "
                                           "duration must be positive, got '0s'\n")
    r = run("diagnose", "--collect.workload.interval=soon")  # (diagnose's parser prints its usage first)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "nvml-exporter diagnose: error: argument --collect.workload.interval: invalid duration 'soon' "
        "(want e.g. 5s, 500ms, 1m)")
