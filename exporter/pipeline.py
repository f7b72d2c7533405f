"""The pipeline stage: a raw snapshot (the GPUs as read) + the Xid history + the previous snapshot ->
the diagnosed snapshot that is served. No NVML, no threads of its own; what it keeps from one snapshot
to the next is in a `Pipeline` object, guarded by its lock.

Per GPU, by UUID (indices move after a reset):
- the Xid series and NVML event counts of the XidStore, and the incident history's view (escalations,
  counts, Xids of earlier boots), recording in the history what the readings show (a reset, remaps);
- the diagnosis (diagnosis.py), from the readings, the previous good snapshot and the Xids;
- the thermal model and risk score over the node's GPUs (thermal.py), and the workload labels;
- the sparse reveal (sparse.py): a healthy GPU's page leaves out what has had nothing to say.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .diagnosis import Diagnoser, Finding
from .history import History, HistoryError
from .snapshot import Freezer, GpuSnapshot, Snapshot, Values
from .sparse import Reveal, ZeroFirst
from .thermal import NodeModel, sample_of
from .workload import Tracker
from .xidcatalog import DAY
from .xidstore import XidEvent, XidStore

log = logging.getLogger("nvml_exporter.pipeline")

HISTORY_REFRESH_SECONDS = 5.0
_ENERGY = "nvidia_gpu_energy_joules_total"
_REMAP = ("nvidia_gpu_remapped_rows", "nvidia_gpu_remapped_rows_pending", "nvidia_gpu_remapped_rows_failed")


@dataclass(frozen=True)
class _HistoryView:
    findings: tuple[Finding, ...]
    past: tuple[XidEvent, ...]
    incidents: dict[tuple[str, ...], float]
    intervals: dict[tuple[str, ...], float]


class Pipeline:
    def __init__(self, xids: XidStore, *, history: History | None = None, peers: NodeModel | None = None,
                 sparse: bool = True, nvlink_per_link: bool = False, freeze: bool = False):
        """`peers`: the thermal model (None: not served). `sparse`: the sparse reveal (off for a one-shot
        diagnosis). `freeze`: the frozen-readings test mode (snapshot.py)."""
        self.xids = xids
        self.history = history
        self.workloads: Tracker | None = None  # nvidia_gpu_workload_info's source, set once before start
        self._peers = peers  # _lock
        self._sparse = sparse
        self._nvlink_per_link = nvlink_per_link
        self._freeze = freeze
        self._lock = threading.Lock()  # a scrape that stops waiting for a collection runs the pipeline too
        self._diagnoser = Diagnoser()  # _lock
        self._prev: dict[str, tuple[GpuSnapshot, float]] = {}  # _lock: last good snapshot per GPU, when
        self._reveals: dict[str, Reveal] = {}  # _lock
        self._views: dict[str, tuple[tuple[int, int], _HistoryView]] = {}  # _lock
        self._remaps: dict[str, tuple[object, ...]] = {}  # _lock: remap counters last recorded
        self._refreshed_at = float("-inf")  # _lock
        self._timeouts_served = ZeroFirst()  # _lock
        self._frozen: dict[str, Freezer] = {}  # _lock

    def run(self, raw: Snapshot, now: float, mono: float) -> Snapshot:
        """The diagnosed snapshot of `raw` (whose GPU values are as read), at wall time `now`, monotonic
        `mono`. Nothing of `raw` is changed (snapshot.py)."""
        with self._lock:
            # once per GPU and collection: it advances the zero-first reveal of new Xid series (xidstore.py)
            xids = {g.identity.uuid: self.xids.series(g.identity.uuid) for g in raw.gpus if g.identity.uuid}
            extra = self._model(raw.gpus, mono, xids)
            gpus = tuple(self._diagnosed(g, now, mono, xids, extra.get(g.identity.uuid)) for g in raw.gpus)
        return Snapshot(gpus=gpus, state=raw.state, taken_at=raw.taken_at)

    def served_timeouts(self, timeouts: Mapping[str, int], mono: float) -> dict[str, int]:
        """The timeouts as the page serves them: a GPU's from its first on, at 0 first (ZeroFirst)."""
        with self._lock:
            return self._timeouts_served.served(timeouts, mono)

    def _model(self, base: tuple[GpuSnapshot, ...], mono: float,
               xids: Mapping[str, Mapping[int, tuple[float, float]]]) -> dict[str, Values]:
        """The thermal model and risk series of the GPUs that answered (thermal.py)."""
        if self._peers is None:
            return {}
        samples = []
        for g in base:  # (a stale GPU's last good values count again: its series do not come and go)
            if g.up and g.identity.uuid:
                counts = {code: count for code, (count, _) in xids[g.identity.uuid].items()}
                samples.append(sample_of(g.identity.uuid, g.identity.name, g.values, counts))
        return self._peers.update(mono, samples)

    def _diagnosed(self, g: GpuSnapshot, now: float, mono: float,
                   xids: Mapping[str, Mapping[int, tuple[float, float]]], extra: Values | None = None) -> GpuSnapshot:
        """Add Xid series and the diagnosis; these stay on the page while the GPU is lost."""
        uuid = g.identity.uuid
        if not uuid:
            return g
        prev, prev_at = self._prev.get(uuid, (None, 0.0))  # (by UUID: indices move after a reset)
        if g.up and not g.stale:
            self._prev[uuid] = (g, mono)
        history = self.xids.history(uuid)
        view = self._history_view(g, prev, now, mono) if self.history is not None else None
        if view is not None:
            history = history + view.past  # the repeat rules see earlier boots' Xids too
        d = self._diagnoser.diagnose(g, history, prev if g.up else None, mono - prev_at, now,
                                     view.findings if view is not None else ())
        values: Values = dict(g.values)  # type: ignore[arg-type]  # (a new dict: the series below are new ones)
        if view is not None:
            values["nvidia_gpu_incidents_total"] = view.incidents
            if view.intervals:  # (from a GPU's second incident on: few series on healthy GPUs)
                values["nvidia_gpu_incident_interval_seconds"] = view.intervals
        for code, (count, last) in sorted(xids[uuid].items()):
            values.setdefault("nvidia_gpu_xid_errors_total", {})[(str(code),)] = count
            values.setdefault("nvidia_gpu_xid_last_timestamp_seconds", {})[(str(code),)] = last
        for name, count in sorted(self.xids.events(uuid).items()):
            values.setdefault("nvidia_gpu_nvml_events_total", {})[(name,)] = float(count)
        values.update(d.series)
        if extra and g.up:
            values.update(extra)
        if self.workloads is not None and (workloads := self.workloads.series(g.identity)):
            values["nvidia_gpu_workload_info"] = workloads
        if self._sparse:
            reveal = self._reveals.get(uuid)
            if reveal is None:
                reveal = self._reveals[uuid] = Reveal(per_link=self._nvlink_per_link)
            reveal.apply(values, mono, g.up)
        served = values
        if self._freeze:
            served = MappingProxyType(self._frozen.setdefault(uuid, Freezer()).freeze(values))  # type: ignore[assignment]
        return GpuSnapshot(identity=g.identity, up=g.up, values=served, errors=g.errors, stale=g.stale,
                           collect_seconds=g.collect_seconds, diagnosis=d)

    # -- the persistent incident history ------------------------------------------------------------
    def _history_view(self, g: GpuSnapshot, prev: GpuSnapshot | None, now: float, mono: float) -> _HistoryView:
        """What the history says of this GPU: its escalations, its counts, and its Xids from before this
        process started. Remade when the history changed, and each minute (windows move); a GPU reset
        seen in the counters and remap counters that went up are recorded first."""
        history = self.history
        assert history is not None
        uuid = g.identity.uuid
        try:
            if mono - self._refreshed_at >= HISTORY_REFRESH_SECONDS:
                self._refreshed_at = mono
                history.refresh()  # e.g. `nvml-exporter history clear` from another process
            if g.up and prev is not None and prev.identity.uuid == uuid:
                energy, before = g.value(_ENERGY), prev.value(_ENERGY)
                if energy is not None and before is not None and energy < before:
                    history.record_reset(uuid, now, "counters went back to zero (energy counter)")
            remap = tuple(g.values.get(name) for name in _REMAP)
            if g.up and remap[0] is not None and self._remaps.get(uuid) != remap:
                self._remaps[uuid] = remap
                counts = {f"rows_{k[0]}": v for k, v in (remap[0] or {}).items()}
                counts.update({name[len("nvidia_gpu_remapped_rows_"):]: next(iter(m.values()))
                               for name, m in zip(_REMAP[1:], remap[1:], strict=True) if m})
                history.observe_remap(uuid, counts, now)
        except HistoryError as e:
            log.error("could not record in the incident history", extra={"error": str(e)})
        key = (history.version, int(now // 60))
        kept = self._views.get(uuid)
        if kept is not None and kept[0] == key:
            return kept[1]
        findings = tuple(Finding("history", f.status, f.action, f.reason) for f in history.assess(uuid, now))
        past = tuple(XidEvent(uuid, code, ts, "history", message)
                     for code, ts, message in history.xid_events(uuid, self.xids.started_at, now - DAY))
        incidents, intervals = history.counts(uuid)
        view = _HistoryView(findings, past, {(k,): v for k, v in incidents.items()},
                            {(k,): v for k, v in intervals.items()} if intervals["count"] else {})
        self._views[uuid] = (key, view)
        return view


class HistorySinks:
    """What the Xid sources tell the incident history: every Xid counted (XidStore's sink) and the node
    agent's reset acknowledgements (JournalFollower's on_reset). A failed write is logged, not raised:
    the page is served without it."""

    def __init__(self, history: History):
        self._history = history

    def xid(self, event: XidEvent) -> None:
        try:
            self._history.record_xid(event.uuid, event.code, event.timestamp, event.message)
        except HistoryError as e:
            log.error("could not record an Xid in the incident history", extra={"error": str(e)})

    def reset(self, uuid: str, ts: float, line: str, ok: bool = True) -> None:
        try:
            if ok:
                self._history.record_reset(uuid, ts, f"acknowledged: {line}")
            else:
                self._history.record_reset_failed(uuid, ts, line)
        except HistoryError as e:
            log.error("could not record a GPU reset in the incident history", extra={"error": str(e)})
