"""Incident history per GPU, kept across exporter restarts, GPU resets and reboots, and escalation from it.

The remedy for most fatal Xids is a GPU reset or a reboot, which wipes what the exporter knew in memory.
This store remembers, per GPU UUID (so a GPU that moves to another index keeps its past):

- `xid`: an incident, that is Xids of one code on one GPU coalesced while they come within COALESCE_SECONDS
  of each other (as the NCSA Delta study counts them); Xids the catalog calls informational are not kept;
- `remap`: a row-remap event (Xid 63/64, or NVML's remapped-row counters going up);
- `reset`: a GPU reset (the reset acknowledgement line, or counters back at zero);
- `boot`: a boot of the node (`/proc/sys/kernel/random/boot_id` changed), for every GPU (uuid '');
- `clear`: a person marked the GPU repaired (`nvml-exporter history clear`); escalation starts over.

SQLite in WAL mode: a commit is atomic, a crash or power loss never leaves a torn file. Bounded: rows
older than the retention are deleted, and past `max_rows` the oldest go first. The rows of the
retention window are also held in memory (at most `max_rows`), so a scrape never reads the disk.

What the rows call for is escalation.py's: data tables and one pure function over the rows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from .escalation import NODE_RULE, REMAP_XIDS, Finding, Row, assess, cleared_at, is_incident
from .xidcatalog import DAY, REPEAT_RULES, lookup

log = logging.getLogger("nvml_exporter.history")

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
DEFAULT_DIR = "/var/lib/prometheus-nvml-exporter"  # the unit's StateDirectory
FILE_NAME = "history.sqlite"
COALESCE_SECONDS = 5.0  # identical Xids on one GPU this close together are one incident
RESET_DEDUPE_SECONDS = 300.0  # the acknowledgement and the counters may both report one reset
RETENTION_SECONDS = 90 * DAY
MAX_ROWS = 10_000  # ~1.5 MB of file, a few MB in memory; a storm of distinct incidents keeps the newest
COMMIT_SECONDS = 0.2  # what is recorded is committed within this
URGENT_COMMITS = 20  # new events a second committed the moment they are recorded

# A time-between-incidents histogram with few buckets (15 min ... 30 d): each is a series per GPU.
INTERVAL_BUCKETS = (900.0, 3600.0, DAY, 7 * DAY, 30 * DAY)
_RECORDED_CODES = frozenset().union(*(r.codes for r in REPEAT_RULES))


def read_boot_id(path: str = BOOT_ID_PATH) -> str:
    return Path(path).read_text().strip()


def default_path() -> str:
    """Under systemd's StateDirectory (`$STATE_DIRECTORY`), else the packaged location."""
    return os.path.join(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_DIR, FILE_NAME)


class HistoryError(Exception):
    pass


class History:
    def __init__(self, path: str, *, boot_id: str | None = None, boot_id_path: str = BOOT_ID_PATH,
                 clock: Callable[[], float] = time.time, retention: float = RETENTION_SECONDS,
                 max_rows: int = MAX_ROWS, readonly: bool = False):
        """Open (creating it unless `readonly`) the store at `path` and record this boot."""
        self.path = path
        self._clock = clock
        self._retention = retention
        self._max_rows = max_rows
        self.readonly = readonly
        self._lock = threading.RLock()
        try:
            self.boot_id = boot_id if boot_id is not None else read_boot_id(boot_id_path)
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                           isolation_level=None)
            else:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL: a power loss may lose the last commits, never the file's consistency
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
            self._db.execute("PRAGMA busy_timeout=5000")
            self._data_version = -1
            self._rows: dict[str, list[Row]] = {}
            self._state: dict[str, str] = {}
            self._committed_at = self._second = float("-inf")
            self._urgent = 0
            self._timer: threading.Timer | None = None
            self.version = 0  # bumped on every change the escalation may see
            self._inserts = 0
            self._reload()
            if not readonly:
                self._record_boot()
        except (OSError, sqlite3.Error) as e:
            raise HistoryError(f"incident history {path}: {e}") from e

    # -- reading ----------------------------------------------------------------------------------
    def _reload(self) -> None:
        horizon = self._clock() - self._retention
        rows: dict[str, list[Row]] = {}
        for r in self._db.execute("SELECT id, uuid, kind, code, first_ts, last_ts, count, boot_id, detail "
                                  "FROM events WHERE last_ts >= ? ORDER BY first_ts, id", (horizon,)):
            rows.setdefault(r[1], []).append(Row(r[0], sys.intern(r[1]), r[2], r[3], r[4], r[5], r[6],
                                                 sys.intern(r[7]), r[8]))
        self._rows = rows
        self._state = dict(self._db.execute("SELECT key, value FROM state").fetchall())
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self.version += 1

    def refresh(self) -> None:
        """Notice what another process wrote (`nvml-exporter history clear`), and write what waits."""
        with self._lock:
            try:
                self._commit()
                if self._db.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
                    self._reload()
            except sqlite3.Error as e:
                log.warning("incident history not readable", extra={"path": self.path, "error": str(e)})

    def uuids(self) -> list[str]:
        with self._lock:
            return sorted(u for u in self._rows if u)

    def rows(self, uuid: str) -> list[Row]:
        """The GPU's rows and the node's boots, oldest first."""
        with self._lock:
            mine = list(self._rows.get(uuid, ()))
            return sorted(mine + list(self._rows.get("", ())), key=lambda r: (r.first_ts, r.id))

    def state(self, key: str) -> str | None:
        with self._lock:
            return self._state.get(key)

    # -- recording --------------------------------------------------------------------------------
    def record_xid(self, uuid: str, code: int, ts: float, message: str = "") -> bool:
        """An Xid; True when it opened a new incident (or remap event). A read-only store records nothing
        (`nvml-exporter diagnose` reads what the exporter recorded)."""
        if self.readonly:
            return False
        if lookup(code).severity == "info" and code not in _RECORDED_CODES and code not in REMAP_XIDS:
            return False
        kind = "remap" if code in REMAP_XIDS else "xid"
        with self._lock:
            rows = self._rows.setdefault(uuid, [])
            for r in reversed(rows[-64:]):  # the open incident of this code, if any (the storm's case)
                if r.kind != kind or r.code != code:
                    continue
                if r.first_ts <= ts <= r.last_ts:
                    return False  # already counted (the journal read again after a restart)
                if (r.first_ts - COALESCE_SECONDS <= ts <= r.last_ts + COALESCE_SECONDS and r.boot_id == self.boot_id
                        and not any(x.kind == "reset" and min(ts, r.last_ts) <= x.first_ts <= max(ts, r.first_ts)
                                    for x in rows[-64:])):  # a remedy between them: another incident
                    r.first_ts, r.last_ts, r.count = min(r.first_ts, ts), max(r.last_ts, ts), r.count + 1
                    if message and not r.detail:
                        r.detail = message
                    self._update(r)
                    return False
            self._insert(uuid, kind, code, ts, message)
            return True

    def record_reset(self, uuid: str, ts: float, how: str) -> bool:
        return self._record_reset(uuid, "reset", ts, how)

    def record_reset_failed(self, uuid: str, ts: float, how: str) -> bool:
        """A reset that failed or was not confirmed (the node agent's acknowledgement with success: false):
        kept in the GPU's history for people and RMA evaluation, but not a remedy (escalation's epochs
        count only resets that worked) and not counted in nvidia_gpu_incidents_total."""
        return self._record_reset(uuid, "reset_failed", ts, how)

    def _record_reset(self, uuid: str, kind: str, ts: float, how: str) -> bool:
        """Once per reset: the agent's acknowledgement and the counters may both report it."""
        if self.readonly:
            return False
        with self._lock:
            for r in self._rows.get(uuid, ()):
                if r.kind == kind and abs(r.first_ts - ts) <= RESET_DEDUPE_SECONDS:
                    return False
            self._insert(uuid, kind, 0, ts, how)
            return True

    def observe_remap(self, uuid: str, counts: dict[str, float], ts: float) -> bool:
        """NVML's remapped-row counters and pending flag; a remap event when any went up. The first
        reading of a GPU is its baseline."""
        if self.readonly:
            return False
        now = ",".join(f"{k}={counts[k]:g}" for k in sorted(counts))
        key = f"remap:{uuid}"
        with self._lock:
            before = self._state.get(key)
            if before == now:
                return False
            self._write("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, now))
            self._state[key] = now
            if before is None:
                return False
            old = dict(p.split("=") for p in before.split(",") if p)
            went_up = [k for k in sorted(counts) if counts[k] > float(old.get(k, 0))]
            if not went_up:
                return False
            self._insert(uuid, "remap", 0, ts, f"{', '.join(went_up)} went up ({before} -> {now})")
            return True

    def clear(self, uuid: str, reason: str, who: str = "") -> None:
        """Mark a GPU repaired in place: escalation counts only what comes after."""
        if not reason.strip():
            raise HistoryError("a reason is required to clear a GPU's history")
        with self._lock:
            self._insert(uuid, "clear", 0, self._clock(), f"{reason.strip()}" + (f" (by {who})" if who else ""))

    def _record_boot(self) -> None:
        last = self._db.execute("SELECT boot_id FROM events WHERE kind = 'boot' ORDER BY id DESC LIMIT 1").fetchone()
        if last is not None and last[0] == self.boot_id:
            return
        try:
            uptime = float(Path("/proc/uptime").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            uptime = 0.0
        # (after everything recorded in the boot before: the uptime of a container may not be the node's)
        latest = self._db.execute("SELECT MAX(last_ts) FROM events").fetchone()[0]
        self._insert("", "boot", 0, max(self._clock() - uptime, latest or 0.0), "")

    def _insert(self, uuid: str, kind: str, code: int, ts: float, detail: str) -> None:
        if self.readonly:
            raise HistoryError(f"incident history {self.path} is open read-only")
        self._count(uuid, kind, code, ts)
        cur = self._write("INSERT INTO events(uuid, kind, code, first_ts, last_ts, count, boot_id, detail) "
                          "VALUES (?, ?, ?, ?, ?, 1, ?, ?)", (uuid, kind, code, ts, ts, self.boot_id, detail),
                          urgent=True)
        row = Row(int(cur.lastrowid or 0), sys.intern(uuid), kind, code, ts, ts, 1, self.boot_id, detail)
        rows = self._rows.setdefault(row.uuid, [])
        rows.append(row)
        if len(rows) > 1 and rows[-2].first_ts > ts:  # a backfilled event older than the last one
            rows.sort(key=lambda r: (r.first_ts, r.id))
        self.version += 1
        self._prune_if_due()

    def _count(self, uuid: str, kind: str, code: int, ts: float) -> None:
        """The GPU's counters and time-between-incidents histogram: kept apart from the rows, so that
        retention and the row cap never make them go down (they are Prometheus counters)."""
        name = "fatal_xid" if is_incident(kind, code) else kind if kind in ("reset", "remap") else ""
        if not uuid or not name:
            return
        key = f"counts:{uuid}"
        c = json.loads(self._state.get(key) or _EMPTY_COUNTS)
        c[name] += 1
        if name == "fatal_xid":
            if c["last"] is not None and ts >= c["last"]:  # (a backfilled older incident adds no interval)
                gap = ts - c["last"]
                c["buckets"] = [n + (gap <= le) for n, le in zip(c["buckets"], INTERVAL_BUCKETS, strict=True)]
                c["sum"] += gap
                c["count"] += 1
            c["last"] = ts if c["last"] is None else max(ts, c["last"])
        self._state[key] = json.dumps(c)
        self._write("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, self._state[key]))

    def _update(self, r: Row) -> None:
        if not self.readonly:
            self._write("UPDATE events SET first_ts = ?, last_ts = ?, count = ?, detail = ? WHERE id = ?",
                        (r.first_ts, r.last_ts, r.count, r.detail, r.id))

    def _write(self, sql: str, args: tuple[object, ...], urgent: bool = False) -> sqlite3.Cursor:
        """Run a change in the open transaction. A new event (`urgent`) is committed at once, up to
        URGENT_COMMITS a second; anything else, and events past that (a storm), within COMMIT_SECONDS:
        a storm then costs a commit per interval, not one per Xid."""
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
            cur = self._db.execute(sql, args)
            now = time.monotonic()
            if urgent and now - self._second >= 1.0:
                self._second, self._urgent = now, 0
            if urgent and self._urgent < URGENT_COMMITS:
                self._urgent += 1
                self._commit()
            elif now - self._committed_at >= COMMIT_SECONDS:
                self._commit()
            elif self._timer is None:
                self._timer = threading.Timer(COMMIT_SECONDS, self._commit_later)
                self._timer.daemon = True
                self._timer.start()
            return cur
        except sqlite3.Error as e:
            raise HistoryError(f"incident history {self.path}: {e}") from e

    def _commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._committed_at = time.monotonic()

    def _commit_later(self) -> None:
        with self._lock:
            self._timer = None
            try:
                self._commit()
            except sqlite3.Error as e:
                log.error("incident history: commit failed", extra={"path": self.path, "error": str(e)})

    def _prune_if_due(self) -> None:
        """Retention and the row cap, every tenth of the cap's inserts: down to 90% of the cap, the
        oldest first (a person's clear stays), on disk and in memory alike."""
        self._inserts += 1
        if self._inserts % max(1, self._max_rows // 10):
            return
        horizon = self._clock() - self._retention
        try:
            keep = self._db.execute("SELECT id FROM events WHERE kind != 'clear' ORDER BY id DESC LIMIT 1 OFFSET ?",
                                    (self._max_rows * 9 // 10,)).fetchone()
        except sqlite3.Error as e:
            raise HistoryError(f"incident history {self.path}: {e}") from e
        cutoff = keep[0] if keep else 0
        self._write("DELETE FROM events WHERE kind != 'clear' AND (last_ts < ? OR id <= ?)", (horizon, cutoff))
        for rows in self._rows.values():
            rows[:] = [r for r in rows if r.kind == "clear" or (r.last_ts >= horizon and r.id > cutoff)]

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            try:
                self._commit()
            finally:
                self._db.close()

    # -- escalation -------------------------------------------------------------------------------
    def assess(self, uuid: str, now: float) -> list[Finding]:
        with self._lock:
            return assess(uuid, self.rows(uuid), self._node_incidents(now), now)

    def _node_incidents(self, now: float) -> list[Row]:
        out = []
        for rows in self._rows.values():
            cleared = cleared_at(rows)
            out += [r for r in rows if is_incident(r.kind, r.code) and r.first_ts > cleared
                    and now - r.last_ts <= NODE_RULE.window_seconds]
        return out

    def xid_events(self, uuid: str, before: float, since: float) -> list[tuple[int, float, str]]:
        """(code, time, message) of the GPU's Xids kept between `since` and `before` (a previous boot's,
        for the repeat rules): a coalesced incident gives its first and its last time."""
        out = []
        with self._lock:
            cleared = cleared_at(self._rows.get(uuid, ()))
            for r in self._rows.get(uuid, ()):
                if r.kind in ("xid", "remap") and r.code and r.first_ts > cleared and since <= r.last_ts < before:
                    out.append((r.code, r.first_ts, r.detail))
                    if r.last_ts != r.first_ts:
                        out.append((r.code, r.last_ts, r.detail))
        return out

    def counts(self, uuid: str) -> tuple[dict[str, float], dict[str, float]]:
        """(nvidia_gpu_incidents_total by kind, nvidia_gpu_incident_interval_seconds), since the GPU's first
        record."""
        with self._lock:
            c = json.loads(self._state.get(f"counts:{uuid}") or _EMPTY_COUNTS)
        totals = {k: float(c[k]) for k in ("fatal_xid", "reset", "remap")}
        hist = {f"{le:.0f}": float(n) for le, n in zip(INTERVAL_BUCKETS, c["buckets"], strict=True)}
        hist.update({"+Inf": float(c["count"]), "sum": float(c["sum"]), "count": float(c["count"])})
        return totals, hist


_EMPTY_COUNTS = json.dumps({"fatal_xid": 0, "reset": 0, "remap": 0, "last": None,
                            "buckets": [0] * len(INTERVAL_BUCKETS), "sum": 0.0, "count": 0})


def row_dict(r: Row) -> dict[str, object]:
    """A row for people and JSON (`nvml-exporter history`, `diagnose`)."""
    out: dict[str, object] = {"kind": r.kind, "time": _iso(r.first_ts), "boot_id": r.boot_id, "detail": r.detail}
    if r.kind in ("xid", "remap") and r.code:
        x = lookup(r.code)
        out.update(code=r.code, name=x.name, severity=x.severity, incident=is_incident(r.kind, r.code),
                   count=r.count, last_time=_iso(r.last_ts))
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY,
    uuid TEXT NOT NULL,
    kind TEXT NOT NULL,
    code INTEGER NOT NULL,
    first_ts REAL NOT NULL,
    last_ts REAL NOT NULL,
    count INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_uuid ON events(uuid, first_ts);
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
