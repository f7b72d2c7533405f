"""A kubelet pod-resources server for tests: the real v1 proto over a unix socket."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from nvml_exporter.workload.podresources import api_pb2, api_pb2_grpc

GPU0_UUID = "GPU-00000000-0000-0000-0000-000000000000"
MIG_A = "MIG-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"  # a MIG device of GPU 1 (as NVML would tell)


class Lister(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, gpu0: str = GPU0_UUID) -> None:
        self.gpu0 = gpu0  # the UUID the first pod's GPU is named by
        self.delay = 0.0
        self.calls = 0
        # A hung kubelet, on the test's word instead of a clock: `hang()` and every List call waits at the
        # gate until `release()`; `held` counts the calls waiting there, `reached` is set when one arrives.
        self.gate = threading.Event()
        self.gate.set()
        self.reached = threading.Event()
        self.held = 0
        self._lock = threading.Lock()

    def hang(self) -> None:
        self.reached.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def List(self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext,
             ) -> api_pb2.ListPodResourcesResponse:
        self.calls += 1
        if not self.gate.is_set():
            with self._lock:
                self.held += 1
            self.reached.set()
            try:
                self.gate.wait(60)
            finally:
                with self._lock:
                    self.held -= 1
        time.sleep(self.delay)

        def container(name: str, resource: str, *ids: str) -> api_pb2.ContainerResources:
            return api_pb2.ContainerResources(name=name, devices=[
                api_pb2.ContainerDevices(resource_name=resource, device_ids=list(ids))])

        return api_pb2.ListPodResourcesResponse(pod_resources=[
            api_pb2.PodResources(name="train-0", namespace="ml", containers=[
                container("trainer", "nvidia.com/gpu", self.gpu0)]),
            api_pb2.PodResources(name="infer-7", namespace="web", containers=[
                container("server", "nvidia.com/gpu", "nvidia1")]),
            api_pb2.PodResources(name="notebook", namespace="lab", containers=[
                container("jupyter", "nvidia.com/mig-1g.10gb", MIG_A)]),
            api_pb2.PodResources(name="nic", namespace="net", containers=[
                container("c", "example.com/sriov", "0")]),  # not a GPU resource
        ])


@contextlib.contextmanager
def serving(path: Path, gpu0: str = GPU0_UUID) -> Iterator[Lister]:
    lister = Lister(gpu0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(lister, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    try:
        yield lister
    finally:
        lister.release()  # no server thread left waiting at the gate
        server.stop(grace=None)
