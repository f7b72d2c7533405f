"""Log lines in logfmt (default) or JSON, as Prometheus exporters write them; `extra=` fields included."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
    out: dict[str, object] = {
        "ts": ts,
        "level": "warn" if record.levelno == logging.WARNING else record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


def _logfmt_value(v: object) -> str:
    s = str(v)
    if s and not any(c in s for c in ' ="\\\n\t'):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def journal_fields(record: logging.LogRecord, identifier: str) -> dict[str, str]:
    """A log record as journal fields: the message, priority, and every extra (gpu, uuid, xid, ...) as
    its own upper-case field, so `journalctl UUID=GPU-...` finds a GPU's lines."""
    fields = {"MESSAGE": record.getMessage(), "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
              "SYSLOG_IDENTIFIER": identifier, "LOGGER": record.name}
    for k, v in record.__dict__.items():
        if k not in _STANDARD:
            fields[k.upper()] = str(v)
    if record.exc_info:
        fields["EXCEPTION"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JournalHandler(logging.Handler):
    def __init__(self, identifier: str):
        super().__init__()
        from systemd import journal  # only constructed when python3-systemd is there

        self._send = journal.send
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = journal_fields(record, self._identifier)
            self._send(fields.pop("MESSAGE"), **fields)
        except Exception:  # logging must never take the exporter down
            self.handleError(record)


def setup(level: str, fmt: str, identifier: str = "nvml-exporter") -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    if os.environ.get("JOURNAL_STREAM"):  # stderr goes to journald: send structured records instead
        # without python3-systemd the plain stderr lines still reach the journal
        with contextlib.suppress(ImportError):
            handler = JournalHandler(identifier)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


class RateLimited:
    """At most one line per `interval` seconds for each key, so a flood (refused connections, an Xid
    storm) cannot flood the log. Lines held back are counted, and the next line for that key says
    how many as `suppressed=N`. Thread safe; keeps at most `max_keys` keys (the oldest go first)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        self._log, self._interval, self._max_keys, self._clock = logger, interval, max_keys, clock
        self._lock = threading.Lock()
        self._keys: dict[Hashable, tuple[float, int]] = {}  # key -> (when last logged, lines held back since)

    def log(self, level: int, msg: str, key: Hashable = None, extra: Mapping[str, object] | None = None,
            exc_info: bool = False) -> bool:
        """Log, or count the line as held back; whether it was logged."""
        if not self._log.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            last, held = self._keys.pop(key, (None, 0))
            if last is not None and now - last < self._interval:
                self._keys[key] = (last, held + 1)
                return False
            self._keys[key] = (now, 0)
            while len(self._keys) > self._max_keys:
                del self._keys[next(iter(self._keys))]
        fields = dict(extra or {})
        if held:
            fields["suppressed"] = held
        self._log.log(level, msg, extra=fields, exc_info=exc_info)
        return True
