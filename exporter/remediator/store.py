"""Durable state: the job queue, idempotency keys, cooldowns and the circuit breaker in SQLite, and the
audit log (JSON lines, fsynced, and the journal with structured fields when there is one).

Nothing that was accepted is lost: a job is committed (synchronous=FULL) before the webhook is
answered, each finished step is committed before the next starts, and a restart picks up where
the last process stopped.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("nvml_remediator.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    received_at REAL NOT NULL,
    node TEXT NOT NULL,
    rule TEXT NOT NULL,
    alert TEXT NOT NULL,
    steps TEXT NOT NULL,
    next_step INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued',   -- queued | running | done | failed
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS actions (node TEXT NOT NULL, action TEXT NOT NULL, at REAL NOT NULL, job TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS actions_node ON actions (node, action, at);
CREATE TABLE IF NOT EXISTS breaker (id INTEGER PRIMARY KEY CHECK (id = 1), tripped_at REAL, reason TEXT);
"""
KEY_TTL = 7 * 86400.0  # longer than any repeat_interval: a repeat of a done alert stays a duplicate


@dataclass
class Job:
    id: int
    key: str
    node: str
    rule: str
    alert: dict[str, Any]
    steps: list[str]
    next_step: int
    state: str


class Store:
    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def _tx(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def enqueue(self, jobs: Iterable[tuple[str, str, str, dict[str, Any], list[str]]]) -> list[bool]:
        """Commit new jobs in one transaction; False for a key already seen (a duplicate delivery)."""
        now = self._clock()

        def add(db: sqlite3.Connection) -> list[bool]:
            db.execute("DELETE FROM jobs WHERE state IN ('done', 'failed') AND updated_at < ?", (now - KEY_TTL,))
            out = []
            for key, node, rule, alert, steps in jobs:
                cur = db.execute("INSERT OR IGNORE INTO jobs (key, received_at, node, rule, alert, steps, updated_at) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, now, node, rule, json.dumps(alert),
                                                                  json.dumps(steps), now))
                out.append(cur.rowcount == 1)
            return out

        return self._tx(add)

    def recover(self) -> list[Job]:
        """Jobs a previous process left running: back to the queue (the engine decides about the step)."""
        def fix(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()
            db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
            return [self._job(r) for r in rows]

        return self._tx(fix)

    def claim(self, busy_nodes: set[str]) -> Job | None:
        """The oldest queued job whose node has no job running."""
        def take(db: sqlite3.Connection) -> Job | None:
            marks = ",".join("?" * len(busy_nodes))
            where = f"AND node NOT IN ({marks})" if busy_nodes else ""
            row = db.execute(f"SELECT * FROM jobs WHERE state = 'queued' {where} ORDER BY id LIMIT 1",
                             tuple(busy_nodes)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', updated_at = ? WHERE id = ?", (self._clock(), row[0]))
            return self._job(row)

        return self._tx(take)

    def advance(self, job: Job, next_step: int, state: str) -> None:
        self._tx(lambda db: db.execute("UPDATE jobs SET next_step = ?, state = ?, updated_at = ? WHERE id = ?",
                                       (next_step, state, self._clock(), job.id)))

    def queue_depth(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
            return int(row[0])

    def last_action(self, node: str, action: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT max(at) FROM actions WHERE node = ? AND action = ?",
                                   (node, action)).fetchone()
        return row[0]

    def last_node_action(self, node: str, other_than_job: str) -> float | None:
        """When another job last acted on the node (a job's own earlier steps do not count)."""
        with self._lock:
            return self._db.execute("SELECT max(at) FROM actions WHERE node = ? AND job != ?",
                                    (node, other_than_job)).fetchone()[0]

    def record_action(self, node: str, action: str, job: str) -> None:
        self._tx(lambda db: db.execute("INSERT INTO actions (node, action, at, job) VALUES (?, ?, ?, ?)",
                                       (node, action, self._clock(), job)))

    def actions_since(self, since: float) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM actions WHERE at >= ?", (since,)).fetchone()[0])

    def breaker(self) -> tuple[float, str] | None:
        with self._lock:
            row = self._db.execute("SELECT tripped_at, reason FROM breaker WHERE id = 1").fetchone()
        return (row[0], row[1]) if row and row[0] is not None else None

    def trip(self, reason: str) -> None:
        self._tx(lambda db: db.execute("INSERT OR REPLACE INTO breaker (id, tripped_at, reason) VALUES (1, ?, ?)",
                                       (self._clock(), reason)))

    def reset_breaker(self) -> None:
        self._tx(lambda db: db.execute("DELETE FROM breaker"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _job(row: tuple[Any, ...]) -> Job:
        return Job(id=row[0], key=row[1], node=row[3], rule=row[4], alert=json.loads(row[5]),
                   steps=json.loads(row[6]), next_step=row[7], state=row[8])


class Audit:
    """Append-only JSON lines, each fsynced before it counts; mirrored to the journal if available."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            from systemd import journal  # optional: containers run without it

            self._journal: Any = journal if os.path.exists("/run/systemd/journal/socket") else None
        except ImportError:
            self._journal = None

    def write(self, event: str, **fields: Any) -> None:
        record = {"ts": time.time(), "event": event, **fields}
        line = (json.dumps(record, default=str, sort_keys=True) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)
        if self._journal is not None:
            extra = {f"REMEDIATOR_{k.upper()}": json.dumps(v) if not isinstance(v, str) else v
                     for k, v in fields.items()}
            self._journal.send(f"nvml-remediator: {event}", SYSLOG_IDENTIFIER="nvml-remediator",
                               REMEDIATOR_EVENT=event, **extra)

    def close(self) -> None:
        os.close(self._fd)
