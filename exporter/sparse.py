"""The two per-GPU stages that keep a healthy GPU's page small without losing what a fault shows.

- `NvlinkTotals` runs on every read of a GPU: from its per-link NVLink readings it makes the per-GPU
  families every GPU always serves, `nvidia_gpu_nvlink_links{state}` and `nvidia_gpu_nvlink_errors_total{type}`.
- `Reveal` runs on every snapshot of a GPU, after the diagnosis (which reads everything): the sparse
  families (metrics.py, `sparse=True`) and the per-link NVLink detail keep only the series that have had
  something to say since the exporter started, and keep them from then on (no series comes and goes).

A counter series that starts to be served after the GPU's first snapshot is served at 0 for
ZERO_HOLD_SECONDS first, as new Xid series are (xidstore.py): Prometheus then has a sample before the
first errors, and `increase()`/`rate()` count them. What is non-zero at the first snapshot is history and
is served as it is at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from .metrics import COUNTER, GPU_METRICS
from .snapshot import Values
from .xidstore import ZERO_HOLD_SECONDS

LINK_UP = "nvidia_gpu_nvlink_link_up"
LINK_ERRORS = "nvidia_gpu_nvlink_link_errors_total"
LINKS = "nvidia_gpu_nvlink_links"
ERRORS = "nvidia_gpu_nvlink_errors_total"
ERROR_TYPES = ("replay", "recovery", "crc_flit", "crc_data")

Series = Mapping[tuple[str, ...], float]
# family -> whether it is a counter (served at 0 first when it appears after the first snapshot)
SPARSE: dict[str, bool] = {m.name: m.type == COUNTER for m in GPU_METRICS if m.sparse}


class NvlinkTotals:
    """One GPU's NVLink links by state and errors by type, summed over its links, made on every read.

    The per-GPU counter never goes down where no error counter of the board was reset: a link whose
    counters cannot be read (an inactive link answers NOT_SUPPORTED) counts with its last reading, which
    the per-link detail also keeps serving; and where one link's counter goes back (a GPU reset), what it
    had counted stays in the GPU's total. A plain sum would drop when a link goes down, and Prometheus
    reads a drop as a counter reset: increase() would count the whole sum again as new errors."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], float] = {}  # (link, type) -> its last reading
        self._carried: dict[str, float] = {}  # type -> counts of links whose counter went back
        self._seen: tuple[Series | None, Series | None] = (None, None)
        self._out: dict[str, dict[tuple[str, ...], float]] = {}

    def apply(self, values: Values) -> None:
        """Add the per-GPU families to one read's values; the per-link errors become the last readings."""
        up, errors = values.get(LINK_UP), values.get(LINK_ERRORS)
        if up is None and errors is None and not self._last:
            return  # no NVLink (or nothing read yet)
        if up is not self._seen[0] or errors is not self._seen[1]:  # (the reader hands out unchanged readings again)
            self._out = self._totals(up, errors)
            self._seen = (up, errors)
        values.pop(LINK_ERRORS, None)
        values.update(self._out)

    def _totals(self, up: Series | None, errors: Series | None) -> dict[str, dict[tuple[str, ...], float]]:
        out: dict[str, dict[tuple[str, ...], float]] = {}
        if up:
            down = sum(1 for v in up.values() if v == 0)
            out[LINKS] = {("up",): float(len(up) - down), ("down",): float(down)}
        last, carried = self._last, self._carried
        if errors and errors is not self._seen[1]:
            for key, v in errors.items():
                old = last.get(key)
                if old is not None and v < old:
                    carried[key[1]] = carried.get(key[1], 0.0) + old
                last[key] = v
        if last:
            sums = dict.fromkeys(ERROR_TYPES, 0.0)
            for (_, kind), v in last.items():
                sums[kind] = sums.get(kind, 0.0) + v
            present = {kind for _, kind in last}
            out[ERRORS] = {(kind,): total + carried.get(kind, 0.0) for kind, total in sums.items() if kind in present}
            out[LINK_ERRORS] = dict(last)
        return out


class Reveal:
    """One GPU's sparse families and NVLink per-link detail, filtered for its page (see the module doc).

    A link's detail (nvidia_gpu_nvlink_link_up and every nvidia_gpu_nvlink_link_errors_total series of the
    link) is shown once the link has been down or counted an error, or always with `per_link`. A series
    of another sparse family is shown once it has been non-zero. Filtered mappings are remembered and
    handed out again while their input is the same mapping and nothing new was shown, so that exposition
    reuses the GPU's rendered block (a healthy GPU's page costs a few identity checks here)."""

    def __init__(self, per_link: bool = False, hold: float = ZERO_HOLD_SECONDS):
        self._per_link = per_link
        self._hold = hold
        self._started = False
        self._shown: dict[str, set[tuple[str, ...]]] = {}
        self._links: set[str] = set()
        self._held: dict[tuple[str, tuple[str, ...]], float] = {}  # counter series served at 0, since when
        self._generation = 0  # grows whenever a series or link is shown
        self._links_seen: tuple[Series | None, Series | None] = (None, None)
        self._kept: dict[str, tuple[Series, int, dict[tuple[str, ...], float]]] = {}

    @property
    def links(self) -> frozenset[str]:
        """Links whose detail is shown."""
        return frozenset(self._links)

    def apply(self, values: Values, now: float, up: bool) -> None:
        """Filter one snapshot's values of a GPU in place (a dict of its own; the mappings are not changed).
        Not thread-safe: its owner (the pipeline) calls it under its lock."""
        self._faulty_links(values.get(LINK_UP), values.get(LINK_ERRORS))
        for name, counter in SPARSE.items():
            self._filter(values, name, now, counter, None)
        self._filter(values, LINK_UP, now, False, 0)
        self._filter(values, LINK_ERRORS, now, True, 0)
        if up:
            self._started = True  # what is non-zero from now on is news, not history

    def _faulty_links(self, up: Series | None, errors: Series | None) -> None:
        if up is self._links_seen[0] and errors is self._links_seen[1]:
            return
        self._links_seen = (up, errors)
        links = self._links
        before = len(links)
        if self._per_link:
            links.update(k[0] for k in up or ())
            links.update(k[0] for k in errors or ())
        else:
            links.update(k[0] for k, v in (up or {}).items() if v == 0)
            links.update(k[0] for k, v in (errors or {}).items() if v > 0)
        if len(links) != before:
            self._generation += 1

    def _filter(self, values: Values, name: str, now: float, counter: bool, link_label: int | None) -> None:
        series = values.get(name)
        if series is None:
            return
        kept = self._kept.get(name)
        if kept is not None and kept[0] is series and kept[1] == self._generation and not self._holding(name):
            out = kept[2]
        else:
            out = self._select(name, series, now, counter, link_label)
            self._kept[name] = (series, self._generation, out)
        if out:
            values[name] = out
        else:
            del values[name]

    def _holding(self, name: str) -> bool:
        return bool(self._held) and any(family == name for family, _ in self._held)

    def _select(self, name: str, series: Series, now: float, counter: bool,
                link_label: int | None) -> dict[tuple[str, ...], float]:
        shown = self._shown.setdefault(name, set())
        held = self._held
        out: dict[tuple[str, ...], float] = {}
        for labels, v in series.items():
            if labels not in shown:
                if link_label is not None:
                    if labels[link_label] not in self._links:
                        continue
                elif v == 0:
                    continue
                shown.add(labels)
                self._generation += 1
                if counter and self._started:
                    held[(name, labels)] = now
            since = held.get((name, labels))
            if since is not None:
                if now - since < self._hold:
                    out[labels] = 0.0
                    continue
                del held[(name, labels)]
            out[labels] = v
        return out


class ZeroFirst:
    """Counts keyed by name (the exporter's per-GPU timeouts), each served at 0 first when it appears."""

    def __init__(self, hold: float = ZERO_HOLD_SECONDS):
        self._hold = hold
        self._since: dict[str, float] = {}

    def served(self, counts: Mapping[str, int], now: float) -> dict[str, int]:
        out = {}
        for key, n in counts.items():
            since = self._since.setdefault(key, now)
            out[key] = n if now - since >= self._hold else 0
        return out
