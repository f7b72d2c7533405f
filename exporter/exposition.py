"""Snapshot -> Prometheus text format 0.0.4.

Label strings are built once per GPU and per label set and reused (memoised pure functions, keyed by
value), so a scrape costs a dictionary walk and string joins, not a generic object model per sample.
A `Renderer` (one per server) keeps, per GPU and family, the block it rendered last and reuses it while
the family's values are the same mapping or compare equal: `render()` is that with a renderer of its own.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

from . import __version__
from .metrics import ALL_METRICS, BY_NAME, HISTOGRAM, Metric
from .nvml import bindings_version
from .snapshot import GpuIdentity, GpuSnapshot, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class BuildInfo:
    version: str = __version__
    pynvml_version: str = ""
    python_version: str = platform.python_version()

    @classmethod
    def detect(cls) -> BuildInfo:
        return cls(pynvml_version=bindings_version())


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(v: float) -> str:
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


@lru_cache(maxsize=4096)
def _gpu_labels(index: int, uuid: str) -> str:
    return f'gpu="{index}",uuid="{escape(uuid)}"'


@lru_cache(maxsize=16384)
def _extra_labels(metric: str, values: tuple[str, ...]) -> str:
    m = BY_NAME[metric]
    return "".join(f',{n}="{escape(v)}"' for n, v in zip(m.labels, values, strict=True) if v or not m.optional_labels)


@lru_cache(maxsize=2048)  # the series of families that change from scrape to scrape
def _series(metric: str, index: int, uuid: str, labels: tuple[str, ...]) -> str:
    """'name{gpu="0",uuid="…",extra="…"} ', built once per series and reused every scrape."""
    if BY_NAME[metric].type == HISTOGRAM:  # keyed by the bound, "sum" and "count"
        if labels[0] in ("sum", "count"):
            return f"{metric}_{labels[0]}{{{_gpu_labels(index, uuid)}}} "
        return f"{metric}_bucket{{{_gpu_labels(index, uuid)}{_extra_labels(metric, labels)}}} "
    extra = _extra_labels(metric, labels) if labels else ""
    return f"{metric}{{{_gpu_labels(index, uuid)}{extra}}} "


@lru_cache(maxsize=4096)  # the exporter's own series: per GPU, per NVML function and error
def _labelset(name: str, values: tuple[str, ...]) -> str:
    labels = BY_NAME[name].labels
    return "{" + ",".join(f'{n}="{escape(v)}"' for n, v in zip(labels, values, strict=True)) + "}"


@lru_cache(maxsize=8192)
def _up_line(index: int, uuid: str, up: bool) -> bytes:
    return f"nvidia_gpu_up{{{_gpu_labels(index, uuid)}}} {1 if up else 0}\n".encode()


def _exporter_samples(metric: Metric, snap: Snapshot, build: BuildInfo) -> Iterator[str]:
    s = snap.state
    series: list[tuple[tuple[str, ...], float]]
    match metric.name:
        case "nvml_exporter_build_info":
            series = [((build.version, build.pynvml_version, build.python_version), 1.0)]
        case "nvml_exporter_nvml_up":
            series = [((), 1.0 if s.nvml_up else 0.0)]
        case "nvml_exporter_collect_duration_seconds":
            # One series per index: a GPU gone (up 0) keeps its last index, which another may hold now.
            by_index: dict[str, float] = {}
            for g in snap.gpus:
                if g.up or str(g.identity.index) not in by_index:
                    by_index[str(g.identity.index)] = g.collect_seconds
            series = [((gpu,), v) for gpu, v in by_index.items()]
        case "nvml_exporter_collect_timeouts_total":
            # A GPU's series from its first timeout on, served at 0 first (the collector), so that the first
            # timeout is an increase().
            served = s.timeouts if s.served_timeouts is None else s.served_timeouts
            series = [((gpu,), float(n)) for gpu, n in sorted(served.items(), key=lambda kv: int(kv[0]))]
        case "nvml_exporter_nvml_errors_total":
            series = [(key, float(n)) for key, n in sorted(s.nvml_errors.items())]
        case "nvml_exporter_invalid_readings_total":
            series = [((m,), float(n)) for m, n in sorted(s.invalid_readings.items())]
        case "nvml_exporter_journal_up":
            series = [] if s.journal_up is None else [((), 1.0 if s.journal_up else 0.0)]
        case "nvml_exporter_workloads_dropped_total":
            series = [] if s.workloads_dropped is None else [((), float(s.workloads_dropped))]
        case "nvml_exporter_workload_refresh_errors_total":
            series = [((source,), float(n)) for source, n in sorted(s.workload_errors.items())]
        case "nvml_exporter_last_collect_timestamp_seconds":
            series = [((), s.last_collect_timestamp)] if s.last_collect_timestamp else []
        case "nvidia_gpu_pci_devices":
            series = [] if s.pci_devices is None else [((), float(s.pci_devices))]
        case "nvidia_gpu_expected":
            series = [] if s.expected_gpus is None else [((), float(s.expected_gpus))]
        case "nvidia_nvswitch_sxid_errors_total":
            series = [(key, float(n)) for key, (n, _) in sorted(s.sxids.items())]
        case "nvidia_nvswitch_sxid_last_timestamp_seconds":  # alerts on recency: a count seen at start is old
            series = [(key, last) for key, (_, last) in sorted(s.sxids.items()) if last]
        case _:
            raise KeyError(metric.name)
    for labels, v in series:
        yield f"{metric.name}{_labelset(metric.name, labels) if labels else ''} {format_value(v)}\n"


def render(snap: Snapshot, build: BuildInfo) -> bytes:
    """The page, by a renderer of its own (nothing kept from earlier pages)."""
    return b"".join(Renderer().render_chunks(snap, build))


_Blocks = dict[str, tuple[Mapping[tuple[str, ...], float], bytes]]  # family -> the values rendered, the block


class Renderer:
    """Renders snapshots, keeping per GPU (index and uuid) and family the values a block was rendered
    from, and the block, encoded. Most families of a GPU read the same from one scrape to the next (error
    counters, limits, flags) and are reused whole; the values are compared by identity first, so this
    relies on the no-mutation invariant (snapshot.py). Shared by the server's connection threads without a
    lock: each entry is replaced whole (one dict store, atomic under the GIL), and two threads rendering
    at once cost at most a block rendered twice."""

    MAX_GPUS = 4096  # blocks kept for at most this many GPUs; more means GPUs came and went: start afresh

    def __init__(self) -> None:
        self._blocks: dict[tuple[int, str], _Blocks] = {}  # (index, uuid) -> the GPU's blocks
        self._info: dict[int, tuple[GpuIdentity, str, bytes]] = {}  # index -> identity, driver, its info line

    def render(self, snap: Snapshot, build: BuildInfo) -> bytes:
        return b"".join(self.render_chunks(snap, build))

    def render_chunks(self, snap: Snapshot, build: BuildInfo) -> list[bytes]:
        """The page as the pieces it is made of (mostly blocks kept from earlier scrapes), for a server
        that can send them as they are, without copying them into one page first. This is the hot loop of
        a scrape: a GPU's lines of a family are re-rendered only when that family's values changed."""
        out: list[bytes] = []
        append = out.append
        gpus = snap.gpus
        blocks = [self._blocks_of(g.identity) for g in gpus]
        for metric in ALL_METRICS:
            name = metric.name
            if name in _SPECIAL:
                if metric.per_gpu:
                    text = self._gpu_samples(name, gpus, snap.state.driver_version)
                else:
                    text = "".join(_exporter_samples(metric, snap, build)).encode()
                if text:
                    append(_header(metric))
                    append(text)
                continue
            header = len(out)
            append(b"")  # the family's HELP and TYPE, once it has a sample
            for g, kept in zip(gpus, blocks, strict=True):
                series = g.values.get(name)
                if not series:
                    continue
                block = kept.get(name)
                if block is None or (block[0] is not series and block[0] != series):  # compared as dicts, in C
                    block = kept[name] = (series, _render_block(name, g.identity, series))
                append(block[1])
            if len(out) > header + 1:
                out[header] = _header(metric)
            else:
                out.pop()
        return out

    def _blocks_of(self, identity: GpuIdentity) -> _Blocks:
        key = (identity.index, identity.uuid)
        kept = self._blocks.get(key)
        if kept is None:
            if len(self._blocks) >= self.MAX_GPUS:
                self._blocks.clear()
            kept = self._blocks[key] = {}
        return kept

    def _gpu_samples(self, name: str, gpus: tuple[GpuSnapshot, ...], driver: str) -> bytes:
        """nvidia_gpu_info and nvidia_gpu_up, which come from the GPU's identity, not its values."""
        if name == "nvidia_gpu_info":
            return b"".join([self._info_line(g.identity, driver) for g in gpus if g.identity.uuid])
        return b"".join([_up_line(g.identity.index, g.identity.uuid, g.up) for g in gpus])

    def _info_line(self, i: GpuIdentity, driver: str) -> bytes:
        kept = self._info.get(i.index)
        if kept is None or kept[0] is not i or kept[1] != driver:  # (hashing the identity cost more than this)
            vals = (i.name, i.pci_bus_id, i.serial, i.vbios_version, i.minor_number, driver)
            line = f"nvidia_gpu_info{{{_gpu_labels(i.index, i.uuid)}{_extra_labels('nvidia_gpu_info', vals)}}} 1\n"
            kept = self._info[i.index] = (i, driver, line.encode())
        return kept[2]


def _header(metric: Metric) -> bytes:
    return _HEADERS[metric.name]


_HEADERS = {m.name: f"# HELP {m.name} {m.help}\n# TYPE {m.name} {m.type}\n".encode() for m in ALL_METRICS}


def _render_block(name: str, identity: GpuIdentity, series: Mapping[tuple[str, ...], float]) -> bytes:
    index, uuid = identity.index, identity.uuid
    return "".join([f"{_series(name, index, uuid, lab)}{format_value(v)}\n" for lab, v in series.items()]).encode()


# Families rendered from the snapshot's state or the GPUs' identities rather than their values.
_SPECIAL = frozenset({m.name for m in ALL_METRICS if not m.per_gpu} | {"nvidia_gpu_info", "nvidia_gpu_up"})
