"""Kubernetes pods on GPUs, from the kubelet's pod-resources API (`--collect.workload.kubelet-socket`).

`v1.PodResourcesLister/List` over the kubelet's unix socket (usually
/var/lib/kubelet/pod-resources/kubelet.sock), through grpcio and the vendored, generated v1 proto
(podresources/). Device ids of `nvidia.com/*` resources are matched as GPU UUIDs, MIG UUIDs, `nvidiaN`
(/dev/nvidiaN) and plain NVML indices (the device plugin's index strategy).
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

from . import Reading, SourceError, Workload, device_key, merge

log = logging.getLogger("nvml_exporter.workload.kubelet")

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
RESOURCE_PREFIX = "nvidia.com/"  # nvidia.com/gpu, nvidia.com/mig-1g.10gb, nvidia.com/gpu.shared, ...


def reading_of(response: Any) -> Reading:
    """A ListPodResourcesResponse -> the pods by GPU key, one workload per (pod, container)."""
    pairs: list[tuple[str, Workload]] = []
    for pod in response.pod_resources:
        for container in pod.containers:
            w = Workload(f"{pod.namespace}/{pod.name}", "kubelet",
                         (("k8s_container", container.name), ("k8s_namespace", pod.namespace), ("k8s_pod", pod.name)))
            for devices in container.devices:
                if not devices.resource_name.startswith(RESOURCE_PREFIX):
                    continue
                for device_id in devices.device_ids:
                    if (key := device_key(device_id)) is not None:
                        pairs.append((key, w))
    return merge(pairs)


class Kubelet:
    name = "kubelet"

    def __init__(self, socket_path: str = DEFAULT_SOCKET, interval: float = 5.0, timeout: float = 2.0):
        self.path = socket_path
        self.interval = interval
        self.timeout = timeout  # of one List call: a kubelet that answers later is counted as a failure
        self._channel: Any = None
        self._list: Any = None

    def _connect(self) -> None:
        # grpcio is imported here, so that a node without Kubernetes needs none of it.
        try:
            import grpc

            from .podresources import api_pb2, api_pb2_grpc
        except ImportError as e:  # (Debian: python3-grpcio and python3-protobuf, which the package recommends)
            raise SourceError(f"the kubelet source needs grpcio and protobuf: {e}") from None

        self._grpc, self._request = grpc, api_pb2.ListPodResourcesRequest()
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(self.path)}")
        self._list = api_pb2_grpc.PodResourcesListerStub(self._channel).List

    def read(self) -> Reading:
        try:
            mode = os.stat(self.path).st_mode
        except OSError as e:
            raise SourceError(f"kubelet socket {self.path}: {e.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise SourceError(f"kubelet socket {self.path}: not a socket")
        if self._channel is None:
            self._connect()
        try:
            response = self._list(self._request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            detail = e.details() if hasattr(e, "details") else str(e)
            if code != self._grpc.StatusCode.DEADLINE_EXCEEDED:
                self.close()  # connect again next time: the kubelet may have restarted on a new socket
            raise SourceError(f"kubelet List: {code.name if code else 'error'}: {detail}") from None
        return reading_of(response)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
