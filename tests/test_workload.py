"""Workload attribution sources, one at a time: Slurm mapping files, the kubelet's pod-resources API
(an in-test gRPC server speaking the real proto over a unix socket), /proc, and the per-GPU cap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvml_exporter.nvml import Process
from nvml_exporter.snapshot import GpuIdentity
from nvml_exporter.workload import CAP, SourceError, Tracker, Workload, device_key
from nvml_exporter.workload.kubelet import Kubelet
from nvml_exporter.workload.processes import Processes
from nvml_exporter.workload.procfs import attribute
from nvml_exporter.workload.slurm import SlurmDir, parse_line
from tests.conftest import wait_for
from tests.kubelet_stub import GPU0_UUID, MIG_A, serving

GPU0 = GpuIdentity(0, GPU0_UUID, minor_number="0")
GPU1 = GpuIdentity(1, "GPU-11111111-1111-1111-1111-111111111111", minor_number="1")


def slurm(job: str, **labels: str) -> Workload:
    return Workload(job, "slurm", tuple(sorted((f"slurm_{k}", v) for k, v in labels.items())))


# -- Slurm ---------------------------------------------------------------------------------------------
def test_slurm_files_by_index_mig_instance_and_uuid(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("100\n101\n")  # dcgm-exporter's contract: index, a job per line
    (tmp_path / "1.3").write_text("200\n")  # GPU 1, MIG GPU instance 3
    (tmp_path / GPU1.uuid).write_text("# written by the prolog\n300 user=alice account=phys partition=gpu\n\n")
    (tmp_path / ".GPU-tmp.1234").write_text("999\n")  # the prolog's temporary file: ignored
    (tmp_path / "README").write_text("not a mapping file\n")
    tracker = Tracker([SlurmDir(str(tmp_path))])
    assert tracker.refresh(tracker.sources[0])
    assert tracker.workloads(GPU0) == (slurm("100"), slurm("101"))
    assert tracker.workloads(GPU1) == (slurm("200"), slurm("300", account="phys", partition="gpu", user="alice"))
    assert tracker.series(GPU1)[("300", "slurm", "alice", "phys", "gpu", "", "", "")] == 1.0
    assert tracker.errors_total() == {"slurm": 0}


def test_slurm_dir_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("100\n")
    source = SlurmDir(str(tmp_path))
    assert source.read() == {"index:0": [slurm("100")]}
    assert source.read() is None  # nothing changed: nothing read
    (tmp_path / "0").write_text("100\n102\n")
    assert source.read() == {"index:0": [slurm("100"), slurm("102")]}
    (tmp_path / "0").unlink()  # the epilog removed it
    assert source.read() == {}


def test_slurm_series_object_is_kept_while_nothing_changes(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("100\n")
    tracker = Tracker([SlurmDir(str(tmp_path))])
    tracker.refresh(tracker.sources[0])
    first = tracker.series(GPU0)
    tracker.refresh(tracker.sources[0])
    assert tracker.series(GPU0) is first  # the exposition reuses its rendered block


def test_slurm_unreadable_files_are_counted_and_the_rest_is_used(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("100\n")
    (tmp_path / "1").mkdir()  # cannot be read as a file (root reads any file, whatever its mode)
    (tmp_path / GPU1.uuid).write_text("300 colour=blue\n")  # an unknown key
    (tmp_path / "2").write_bytes(b"\xff\xfe\n")  # not UTF-8
    tracker = Tracker([SlurmDir(str(tmp_path))])
    assert not tracker.refresh(tracker.sources[0])
    assert tracker.errors_total() == {"slurm": 1}
    assert tracker.workloads(GPU0) == (slurm("100"),)
    assert tracker.workloads(GPU1) == ()


def test_slurm_directory_missing_means_no_jobs_and_unreadable_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "jobs"
    tracker = Tracker([SlurmDir(str(d))])
    assert tracker.refresh(tracker.sources[0])  # before the first prolog made it: no jobs, no error
    d.mkdir()
    (d / "0").write_text("100\n")
    assert tracker.refresh(tracker.sources[0])
    assert tracker.workloads(GPU0) == (slurm("100",),)
    (d / "0").unlink()
    d.rmdir()
    d.write_text("a file where the directory should be\n")
    assert not tracker.refresh(tracker.sources[0])
    assert tracker.errors_total() == {"slurm": 1}
    assert tracker.workloads(GPU0) == (slurm("100"),)  # the last good reading is kept
    d.unlink()
    assert tracker.refresh(tracker.sources[0])
    assert tracker.workloads(GPU0) == ()


@pytest.mark.parametrize("line", ["12 34", "job;rm", "1 user"])
def test_slurm_bad_lines_are_refused(line: str) -> None:
    with pytest.raises(ValueError):
        parse_line(line)


def test_device_ids_as_plugins_and_slurm_name_them() -> None:
    assert device_key(GPU0.uuid) == f"uuid:{GPU0.uuid}"
    assert device_key(MIG_A) == f"uuid:{MIG_A}"
    assert device_key("nvidia3") == "minor:3"
    assert device_key("3") == "index:3"
    assert device_key("3:1") == "index:3"  # the device plugin's index strategy for a MIG device
    assert device_key("fpga0") is None


# -- the cap -------------------------------------------------------------------------------------------
class Fixed:
    """A source whose reading the test sets."""

    name = "slurm"
    interval = 1.0

    def __init__(self, reading: dict[str, list[Workload]]):
        self.reading = reading

    def read(self) -> dict[str, list[Workload]]:
        return self.reading


def test_at_most_16_workloads_per_gpu_and_the_rest_counted_once() -> None:
    source = Fixed({"index:0": [slurm(str(1000 + i)) for i in range(CAP + 4)], "index:1": [slurm("7")]})
    tracker = Tracker([source])
    tracker.refresh(source)
    assert len(tracker.series(GPU0)) == CAP
    assert len(tracker.series(GPU1)) == 1
    assert tracker.dropped == 4
    source.reading = {**source.reading, "index:1": [slurm("8")]}  # a change elsewhere: GPU 0 resolved again
    tracker.refresh(source)
    tracker.series(GPU0)
    assert tracker.dropped == 4  # the same 4 are not counted again
    source.reading = {"index:0": [slurm(str(1000 + i)) for i in range(CAP + 5)]}
    tracker.refresh(source)
    tracker.series(GPU0)
    assert tracker.dropped == 5


def test_the_same_job_from_two_sources_is_one_series() -> None:
    class Procs(Fixed):
        name = "process"

    files = Fixed({"index:0": [slurm("100", user="alice")]})
    procs = Procs({f"uuid:{GPU0.uuid}": [Workload("100", "process"), Workload("200", "process")]})
    tracker = Tracker([procs, files])
    tracker.refresh(files)
    tracker.refresh(procs)
    assert tracker.workloads(GPU0) == (slurm("100", user="alice"), Workload("200", "process"))


# -- Kubernetes ----------------------------------------------------------------------------------------
@pytest.fixture
def kubelet(tmp_path: Path):
    path = tmp_path / "kubelet.sock"
    with serving(path) as lister:
        yield path, lister


def pod(ns: str, name: str, container: str) -> Workload:
    return Workload(f"{ns}/{name}", "kubelet", (("k8s_container", container), ("k8s_namespace", ns),
                                                ("k8s_pod", name)))


def test_kubelet_pods_by_gpu_uuid_nvidia_name_and_mig_uuid(kubelet) -> None:
    path, _ = kubelet
    source = Kubelet(str(path), timeout=5.0)
    tracker = Tracker([source], mig_parents=lambda: {MIG_A: GPU1.uuid})
    assert tracker.refresh(source)
    assert tracker.workloads(GPU0) == (pod("ml", "train-0", "trainer"),)
    assert tracker.workloads(GPU1) == (pod("lab", "notebook", "jupyter"), pod("web", "infer-7", "server"))
    assert tracker.series(GPU0) == {("ml/train-0", "kubelet", "", "", "", "ml", "train-0", "trainer"): 1.0}
    assert tracker.errors_total() == {"kubelet": 0}
    source.close()


def test_kubelet_socket_missing_is_counted(tmp_path: Path) -> None:
    source = Kubelet(str(tmp_path / "absent.sock"))
    tracker = Tracker([source])
    assert not tracker.refresh(source)
    with pytest.raises(SourceError, match="No such file"):
        source.read()
    assert tracker.errors_total() == {"kubelet": 1}


def test_kubelet_slow_server_times_out_and_keeps_the_last_reading(kubelet) -> None:
    path, lister = kubelet
    source = Kubelet(str(path), timeout=0.3)
    tracker = Tracker([source])
    assert tracker.refresh(source)
    lister.hang()
    try:
        assert not tracker.refresh(source)
        # the kubelet has still not answered: the refresh ended on its own timeout, not held by the kubelet
        assert lister.held == 1
    finally:
        lister.release()
    assert tracker.errors_total() == {"kubelet": 1}
    assert tracker.workloads(GPU0) == (pod("ml", "train-0", "trainer"),)  # served from the last good reading
    source.close()


def test_kubelet_refresh_thread_never_touches_the_scrape(kubelet) -> None:
    path, lister = kubelet
    # the refresh thread's List call waits as long as the kubelet does (timeout 60 s, past the gate's wait)
    source = Kubelet(str(path), interval=0.05, timeout=60.0)
    tracker = Tracker([source])
    tracker.start()
    try:
        wait_for(lambda: tracker.workloads(GPU0), timeout=10, interval=0.02)
        lister.hang()  # the kubelet hangs, with the refresh thread inside a List call
        assert lister.reached.wait(10)
        # a scrape's question is answered while that call is still held, from the last reading
        assert tracker.series(GPU0) == {("ml/train-0", "kubelet", "", "", "", "ml", "train-0", "trainer"): 1.0}
        assert lister.held == 1
        assert tracker.errors_total() == {"kubelet": 0}  # (and the refresh in flight has not ended)
    finally:
        lister.release()
        tracker.stop()
        source.close()


# -- processes -----------------------------------------------------------------------------------------
def fake_proc(root: Path, pid: int, cgroup: str, env: dict[str, str] | None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    if env is not None:
        (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()) + b"\0")


def test_processes_name_their_slurm_job_or_pod(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
              {"SLURM_JOB_ID": "4242", "SLURM_JOB_USER": "bob", "SLURM_JOB_ACCOUNT": "bio",
               "SLURM_JOB_PARTITION": "a100"})
    fake_proc(tmp_path, 11, "0::/slurm/uid_1000/job_77/step_batch\n", None)  # environ unreadable: cgroup tells
    fake_proc(tmp_path, 12, "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
                            "pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-abc.scope\n", {})
    fake_proc(tmp_path, 13, "0::/user.slice/user-1000.slice/session-3.scope\n", {"HOME": "/root"})
    assert attribute(10, str(tmp_path)) == Workload("4242", "process", (
        ("slurm_account", "bio"), ("slurm_partition", "a100"), ("slurm_user", "bob")))
    assert attribute(11, str(tmp_path)) == Workload("77", "process")
    assert attribute(12, str(tmp_path)) == Workload("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "process")
    assert attribute(13, str(tmp_path)) is None
    assert attribute(14, str(tmp_path)) is None  # gone

    listed = {"h0": [Process(10, 1 << 30), Process(13, None)], "h1": [Process(11, 5), Process(12, 6)]}
    source = Processes(lambda: {GPU0.uuid: "h0", GPU1.uuid: "h1"}, proc=str(tmp_path),
                       list_processes=lambda h: listed[h])
    tracker = Tracker([source])
    assert tracker.refresh(source)
    assert [w.workload_id for w in tracker.workloads(GPU0)] == ["4242"]
    assert [w.workload_id for w in tracker.workloads(GPU1)] == ["0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "77"]
    assert [(p.pid, p.used_memory_bytes) for p in source.processes[GPU0.uuid]] == [(10, 1 << 30), (13, None)]


def test_a_real_process_is_attributed_through_proc() -> None:
    """This very process, with a Slurm job id in its environment (os.environ is what /proc shows only
    for what the process was started with, so a child is started with it)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env={**os.environ, "SLURM_JOB_ID": "31337", "SLURM_JOB_USER": "carol"})
    try:
        # until the child has exec'd, /proc shows the environment it inherited from the fork
        wait_for(lambda: b"time.sleep" in Path(f"/proc/{child.pid}/cmdline").read_bytes(), timeout=10)
        assert attribute(child.pid) == Workload("31337", "process", (("slurm_user", "carol"),))
    finally:
        child.kill()
        child.wait()


def test_a_source_bug_is_counted_not_fatal() -> None:
    class Broken(Fixed):
        def read(self) -> dict[str, list[Workload]]:
            raise RuntimeError("bug")

    source = Broken({})
    tracker = Tracker([source])
    assert not tracker.refresh(source)
    assert tracker.errors_total() == {"slurm": 1}


def test_mig_devices_are_the_gpu_they_are_on() -> None:
    """New MIG UUIDs through NVML's answer (mig_parents), old ones (drivers before R470) by their name."""
    source = Fixed({f"uuid:MIG-{GPU1.uuid}/1/0": [slurm("1")], f"uuid:{MIG_A}": [slurm("2")],
                    "uuid:MIG-bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb": [slurm("3")]})  # on no GPU NVML knows
    asked = []
    tracker = Tracker([source], mig_parents=lambda: asked.append(1) or {MIG_A: GPU1.uuid})
    assert tracker.refresh(source)
    assert tracker.workloads(GPU1) == (slurm("1"), slurm("2"))
    assert tracker.workloads(GPU0) == ()
    assert asked == [1]  # NVML asked in the source's thread, once per reading, not per scrape
    tracker.workloads(GPU1)
    assert asked == [1]


def test_mig_lookup_failure_is_counted() -> None:
    from nvml_exporter.nvml import NvmlError

    def broken() -> dict[str, str]:
        raise NvmlError("nvmlDeviceGetMaxMigDeviceCount", 999)

    source = Fixed({f"uuid:{MIG_A}": [slurm("2")]})
    tracker = Tracker([source], mig_parents=broken)
    assert not tracker.refresh(source)
    assert tracker.errors_total() == {"slurm": 1}
    assert tracker.workloads(GPU1) == ()
