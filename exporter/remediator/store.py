"""Durable state: the job queue, idempotency keys, cooldowns and the circuit breaker in SQLite, and the
audit log (JSON lines, fsynced, and the journal with structured fields when there is one).

Nothing that was accepted is lost: a job is committed (synchronous=FULL) before the webhook is
answered, each finished step is committed before the next starts, and a restart picks up where
the last process stopped.

Every write that fails (a full disk, an I/O error) raises StorageError and is reported to
StorageHealth; the first write that succeeds again clears it. The remediator is not ready, and
answers webhooks 503, while its state cannot be written.
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
from typing import Any, TypeVar

log = logging.getLogger("nvml_remediator.store")
_T = TypeVar("_T")

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
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
"""
# actions.step (the index of the job's step that recorded it) came later: added to older databases.
# It tells a step that was started but never finished (the process died) from one that never began.
KEY_TTL = 7 * 86400.0  # longer than any repeat_interval: a repeat of a done alert stays a duplicate


class StorageError(Exception):
    """The queue or the audit log could not be written (or read): the disk is full, read-only, failing."""


class StorageHealth:
    """Whether the queue and the audit log can be written, and why not. A failure is logged when it
    starts (then at most once a minute) and when it ends; `on_error(component)` counts each failure."""

    LOG_EVERY = 60.0

    def __init__(self, on_error: Callable[[str], None] = lambda component: None):
        self._on_error = on_error
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}  # component ("queue", "audit") -> the last error
        self._since = 0.0
        self._logged = 0.0
        self.errors = 0

    @property
    def healthy(self) -> bool:
        return not self._failing

    def reason(self) -> str:
        with self._lock:
            return "; ".join(f"{c}: {e}" for c, e in sorted(self._failing.items()))

    def failing_seconds(self) -> float:
        return time.monotonic() - self._since if self._failing else 0.0

    def failed(self, component: str, error: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            first = not self._failing
            if first:
                self._since = now
            self._failing[component] = str(error) or type(error).__name__
            self.errors += 1
            loud = first or now - self._logged >= self.LOG_EVERY
            if loud:
                self._logged = now
        self._on_error(component)
        if loud:
            log.error("cannot write the remediator's state: webhooks are answered 503 and no job runs until "
                      "it can", extra={"component": component, "error": str(error), "errors": self.errors})

    def ok(self, component: str) -> None:
        if component not in self._failing:  # the common case, without the lock
            return
        with self._lock:
            if self._failing.pop(component, None) is None or self._failing:
                return
            seconds = time.monotonic() - self._since
        log.warning("the remediator's state can be written again; resuming", extra={"failed_seconds": round(seconds)})


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
    """Opening raises StorageError (not a traceback) when the database cannot be created or read."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time, health: StorageHealth | None = None):
        self._clock = clock
        self._lock = threading.Lock()
        self.health = health or StorageHealth()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            if "step" not in {row[1] for row in self._db.execute("PRAGMA table_info(actions)")}:
                self._db.execute("ALTER TABLE actions ADD COLUMN step INTEGER")
        except sqlite3.Error as e:
            raise StorageError(f"{path}: {e}") from None

    def _tx(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite may already have rolled back (a full disk at COMMIT); a transaction left
                    # open would make every later BEGIN fail
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise  # a bug in a statement, not the storage failing
            except sqlite3.Error as e:
                self.health.failed("queue", e)
                raise StorageError(f"queue: {e}") from None
        self.health.ok("queue")
        return result

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchone()
            except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise  # a bug in a statement, not the storage failing
            except sqlite3.Error as e:  # an unreadable disk: as a failed write (the probe clears it)
                self.health.failed("queue", e)
                raise StorageError(f"queue: {e}") from None

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

    def release(self, job: Job) -> None:
        """Back to the queue as it stands (its finished steps stay finished): run again when it can be."""
        self._tx(lambda db: db.execute("UPDATE jobs SET state = 'queued', updated_at = ? WHERE id = ? "
                                       "AND state = 'running'", (self._clock(), job.id)))

    def probe(self) -> None:
        """A small real write, to learn whether the database can be written again."""
        self._tx(lambda db: db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (self._clock(),)))

    def queue_depth(self) -> int:
        return int(self._read("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")[0])

    def last_action(self, node: str, action: str, other_than_job: str) -> float | None:
        """When another job last ran this action on the node (a job's own record is its own step's)."""
        at: float | None = self._read("SELECT max(at) FROM actions WHERE node = ? AND action = ? AND job != ?",
                                      (node, action, other_than_job))[0]
        return at

    def last_node_action(self, node: str, other_than_job: str) -> float | None:
        """When another job last acted on the node (a job's own earlier steps do not count)."""
        at: float | None = self._read("SELECT max(at) FROM actions WHERE node = ? AND job != ?",
                                      (node, other_than_job))[0]
        return at

    def record_action(self, node: str, action: str, job: str, step: int) -> None:
        """Recorded before the step runs: it counts for cooldowns and the breaker even if we die in it."""
        self._tx(lambda db: db.execute("INSERT INTO actions (node, action, at, job, step) VALUES (?, ?, ?, ?, ?)",
                                       (node, action, self._clock(), job, step)))

    def step_started(self, job: str, step: int) -> bool:
        """Whether this step of this job was started before (by a process that died or could not record
        how it ended): the job's next_step only moves on once a step has finished."""
        return self._read("SELECT 1 FROM actions WHERE job = ? AND step = ? LIMIT 1", (job, step)) is not None

    def actions_since(self, since: float) -> int:
        return int(self._read("SELECT count(*) FROM actions WHERE at >= ?", (since,))[0])

    def breaker(self) -> tuple[float, str] | None:
        row = self._read("SELECT tripped_at, reason FROM breaker WHERE id = 1")
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
    """Append-only JSON lines, each fsynced before it counts; mirrored to the journal if available.
    A record that cannot be written whole is cut off again, so the file stays one JSON object a line."""

    def __init__(self, path: str, health: StorageHealth | None = None):
        self._lock = threading.Lock()
        self.health = health or StorageHealth()
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
            try:
                self._append(line)
            except OSError as e:
                self.health.failed("audit", e)
                raise StorageError(f"audit log: {e.strerror or e}") from None
        self.health.ok("audit")
        if self._journal is not None:
            extra = {f"REMEDIATOR_{k.upper()}": json.dumps(v) if not isinstance(v, str) else v
                     for k, v in fields.items()}
            self._journal.send(f"nvml-remediator: {event}", SYSLOG_IDENTIFIER="nvml-remediator",
                               REMEDIATOR_EVENT=event, **extra)

    def _append(self, line: bytes) -> None:
        end = os.fstat(self._fd).st_size  # only this process appends, under the lock
        try:
            written = 0
            while written < len(line):  # a full disk can take part of a write
                written += os.write(self._fd, line[written:])
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, end)
            except OSError as e:
                log.error("cannot cut a partly written audit record", extra={"error": str(e)})
            raise

    def close(self) -> None:
        os.close(self._fd)


def open_state(directory: str, state_file: str, audit_log: str, health: StorageHealth) -> tuple[Store, Audit]:
    """The queue (in `directory`) and the audit log of a remediator role; StorageError says why not, in
    one line for the command line."""
    try:
        os.makedirs(directory, exist_ok=True)
        return Store(os.path.join(directory, state_file), health=health), Audit(audit_log, health=health)
    except OSError as e:
        raise StorageError(f"cannot open state: {e.filename or directory}: {e.strerror or e}") from e
    except StorageError as e:
        raise StorageError(f"cannot open state: {e}") from e
