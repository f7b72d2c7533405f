"""A kubelet pod-resources server for tests: the real v1 proto over a unix socket."""

from __future__ import annotations

import contextlib
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

    def List(self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext,
             ) -> api_pb2.ListPodResourcesResponse:
        self.calls += 1
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
        server.stop(grace=None)
