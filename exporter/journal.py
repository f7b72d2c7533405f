"""Xids from the kernel journal (this boot), through systemd-python: the ones that happened while the
exporter was down, and the message text NVML events do not carry. Without journald (containers, no
systemd-python) the exporter says so once and relies on NVML events alone."""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import kernlog
from .kernlog import pci_key, pci_text
from .logs import RateLimited
from .xidstore import XidEvent, XidStore

__all__ = ["JournalFollower", "pci_key"]

log = logging.getLogger("nvml_exporter.journal")
_unresolved_log = RateLimited(log, 10.0)  # one line per PCI address per 10 s, however many Xids it sends

JOURNAL_DIRS = ("/run/log/journal", "/var/log/journal")
# Reset acknowledgements are logged from user space (NVSentinel's reset job), not by the kernel.
# nvml-remediator: the node agent's acknowledgement of its own resets (docs/remediation.md).
RESET_IDENTIFIERS = ("nvsentinel-gpu-reset", "nvml-remediator")
UNRELIABLE_POLL_SECONDS = 1.0  # where the journal's fd cannot be trusted to wake us (network file systems)


class JournalFollower:
    def __init__(self, store: XidStore, resolve: Callable[[tuple[int, int, int]], str | None],
                 path: str | None = None, ready: threading.Event | None = None,
                 on_reset: Callable[[str, float, str, bool], None] | None = None):
        """`resolve` maps a PCI address to the GPU's UUID; `path` reads a journal file or directory
        instead of the system journal; `ready` is set once GPU identities are known; `on_reset` hears
        of GPU resets (uuid, time, the line)."""
        self._store = store
        self._on_reset = on_reset
        self._lines = kernlog.LineParser()
        self._resolve = resolve
        self._path = path
        self._ready = ready
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # stop() ends a wait at once
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self.available = True
        self.done_backfill = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError as e:  # the pipe is full: a wake-up is already pending
            log.debug("journal wake-up not written", extra={"error": str(e)})

    def _open(self) -> Any:  # systemd.journal.Reader, an optional dependency without types
        from systemd import journal

        if self._path is None:
            if not any(os.path.isdir(d) for d in JOURNAL_DIRS):
                raise OSError(f"no journal in {' or '.join(JOURNAL_DIRS)} (journald not running here)")
            reader = journal.Reader()
        elif not os.path.exists(self._path):
            raise OSError(f"{self._path} does not exist")
        elif self._path.endswith(".journal"):
            reader = journal.Reader(files=[self._path])
        else:
            reader = journal.Reader(path=self._path)
        # this boot, and (the kernel's lines or a reset acknowledgement)
        reader.add_match(_TRANSPORT="kernel")
        for identifier in RESET_IDENTIFIERS:
            reader.add_disjunction()
            reader.add_match(SYSLOG_IDENTIFIER=identifier)
        reader.add_conjunction()
        reader.this_boot()
        return reader

    def _run(self) -> None:
        try:
            reader = self._open()
        except (ImportError, OSError) as e:
            self.available = False
            self.done_backfill.set()
            log.warning("kernel journal not available; counting Xids from NVML events only",
                        extra={"error": str(e)})
            return
        if self._ready is not None:
            while not self._ready.wait(0.5):
                if self._stop.is_set():
                    return
        self._drain(reader)
        self.done_backfill.set()
        try:
            self._follow(reader)
        finally:
            reader.close()

    def _follow(self, reader) -> None:  # type: ignore[no-untyped-def]
        """Sleep on the journal's inotify fd (sd_journal_get_fd) until journald writes, instead of
        looking every second, which was a tenth of the idle exporter's CPU (make bench-idle)."""
        from systemd import journal

        poller = select.poll()
        poller.register(reader.fileno(), reader.get_events())
        poller.register(self._wake_r, select.POLLIN)
        reliable = reader.reliable_fd()
        while not self._stop.is_set():
            timeout_ms = reader.get_timeout_ms()  # -1: none; else when sd-journal wants another look
            if not reliable:
                limit = int(UNRELIABLE_POLL_SECONDS * 1000)
                timeout_ms = limit if timeout_ms < 0 else min(timeout_ms, limit)
            poller.poll(timeout_ms)
            if self._stop.is_set():
                return
            if reader.process() != journal.NOP:  # new entries, or new and rotated journal files
                self._drain(reader)

    def _drain(self, reader) -> None:  # type: ignore[no-untyped-def]
        for entry in reader:
            message = entry.get("MESSAGE", "")
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
            line = self._lines.parse(message)
            if line is None:
                continue
            stamp = entry.get("__REALTIME_TIMESTAMP")
            ts = stamp.timestamp() if isinstance(stamp, datetime) else 0.0
            self._handle(line, ts, message)

    def _handle(self, line: kernlog.KernelLine, ts: float, message: str) -> None:
        if line.kind == "reset":
            if self._on_reset is not None:  # (a failed one too: the history keeps it, not as a remedy)
                self._on_reset(line.uuid, ts, line.text, line.fields.get("success") != "false")
            return
        assert line.pci is not None
        pci = pci_text(line.pci)
        if line.kind == "sxid":
            self._store.record_sxid(pci, line.code, ts)
            return
        uuid = self._resolve(line.pci)
        event = XidEvent(uuid or "", line.code, ts, "journal", line.text, line.fields.get("gpu_instance", ""))
        if uuid is None:
            _unresolved_log.log(logging.WARNING, "Xid for a PCI address no GPU answers for", key=pci,
                                extra={"pci": pci, "message": message})
            self._store.record_unresolved(pci, event)
            return
        self._store.record(event)
