"""packaging/slurm's Prolog and Epilog, run as slurmd would (its environment, a stand-in nvidia-smi),
and what the exporter reads from the files they write."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nvml_exporter.workload import Workload
from nvml_exporter.workload.slurm import SlurmDir
from tests.fakenvml.scenario import REPO

SCRIPTS = REPO / "packaging" / "slurm"
UUIDS = [f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-0000-0000-0000-00000000000{i}" for i in range(4)]


def stand_in_nvidia_smi(tmp_path: Path, fail: bool = False) -> Path:
    smi = tmp_path / "nvidia-smi"
    table = "".join(f"{i}, {u}\n" for i, u in enumerate(UUIDS))
    assert_args = '[ "$*" = "--query-gpu=index,uuid --format=csv,noheader" ] || exit 9'
    smi.write_text(f"#!/bin/sh\n{assert_args}\n" + ("echo 'NVIDIA-SMI has failed' >&2; exit 6\n" if fail
                                                    else f"printf '%s' '{table}'\n"))
    smi.chmod(0o755)
    return smi


def run(script: str, directory: Path, smi: Path, job: str, gpus: str | None, gpu_var: str = "SLURM_JOB_GPUS",
        **extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "NVML_EXPORTER_SLURM_DIR": str(directory), "NVIDIA_SMI": str(smi),
           "SLURM_JOB_ID": job, **extra}
    if gpus is not None:
        env[gpu_var] = gpus
    return subprocess.run([str(SCRIPTS / f"nvml-exporter-{script}")], env=env, capture_output=True, text=True,
                          timeout=30)


def files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir() if not p.name.startswith(".")}


def test_prolog_writes_and_epilog_removes_the_jobs_gpus_by_uuid(tmp_path: Path) -> None:
    smi, d = stand_in_nvidia_smi(tmp_path), tmp_path / "slurm"
    job = {"SLURM_JOB_USER": "alice", "SLURM_JOB_ACCOUNT": "physics", "SLURM_JOB_PARTITION": "gpu"}
    r = run("prolog", d, smi, "100", "0,2", **job)
    assert (r.returncode, r.stderr) == (0, "")
    # a second job shares GPU 2 (GPU sharding); its GPUs come as CUDA_VISIBLE_DEVICES, one as a UUID
    assert run("prolog", d, smi, "101", f"2,{UUIDS[3]}", "CUDA_VISIBLE_DEVICES",
               SLURM_JOB_USER="bob").returncode == 0
    assert files(d) == {UUIDS[0]: "100 user=alice account=physics partition=gpu\n",
                        UUIDS[2]: "100 user=alice account=physics partition=gpu\n101 user=bob\n",
                        UUIDS[3]: "101 user=bob\n"}
    assert all((d / u).stat().st_mode & 0o044 == 0o044 for u in files(d))  # readable by the exporter's user
    reading = SlurmDir(str(d)).read()
    alice = Workload("100", "slurm", (("slurm_account", "physics"), ("slurm_partition", "gpu"),
                                      ("slurm_user", "alice")))
    assert reading == {f"uuid:{UUIDS[0]}": [alice], f"uuid:{UUIDS[2]}": [alice, Workload("101", "slurm", (
        ("slurm_user", "bob"),))], f"uuid:{UUIDS[3]}": [Workload("101", "slurm", (("slurm_user", "bob"),))]}
    assert run("epilog", d, smi, "100", "0,2").returncode == 0
    assert files(d) == {UUIDS[2]: "101 user=bob\n", UUIDS[3]: "101 user=bob\n"}
    assert run("epilog", d, smi, "101", f"2,{UUIDS[3]}", "CUDA_VISIBLE_DEVICES").returncode == 0
    assert files(d) == {}


def test_the_scripts_never_fail_the_job(tmp_path: Path) -> None:
    d = tmp_path / "slurm"
    r = run("prolog", d, stand_in_nvidia_smi(tmp_path, fail=True), "7", "0")
    assert r.returncode == 0 and "nvidia-smi failed" in r.stderr
    assert files(d) == {}
    r = run("prolog", d, stand_in_nvidia_smi(tmp_path), "7", "9,x1")
    assert r.returncode == 0 and "no GPU of index 9" in r.stderr and "'x1' is neither" in r.stderr
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    r = run("prolog", blocked, stand_in_nvidia_smi(tmp_path), "7", "0")
    assert r.returncode == 0 and "cannot write" in r.stderr
    r = run("prolog", d, stand_in_nvidia_smi(tmp_path), "7; rm -rf /", "0")
    assert r.returncode == 0 and "no usable SLURM_JOB_ID" in r.stderr
    r = run("prolog", d, stand_in_nvidia_smi(tmp_path), "8", "1", SLURM_JOB_ACCOUNT="a b")
    assert r.returncode == 0 and "left out" in r.stderr
    assert files(d) == {UUIDS[1]: "8\n"}
    assert run("prolog", d, stand_in_nvidia_smi(tmp_path), "9", None).returncode == 0  # a job without GPUs
    assert files(d) == {UUIDS[1]: "8\n"}
