"""Xids from the kernel journal (this boot), through systemd-python: the ones that happened while the
exporter was down, and the message text NVML events do not carry. Without journald (containers, no
systemd-python) the exporter says so once and relies on NVML events alone."""

from __future__ import annotations

import logging
import os
import re
import select
import threading
from collections.abc import Callable
from datetime import datetime

from .xidstore import XidEvent, XidStore

log = logging.getLogger("nvml_exporter.journal")

JOURNAL_DIRS = ("/run/log/journal", "/var/log/journal")
UNRELIABLE_POLL_SECONDS = 1.0  # where the journal's fd cannot be trusted to wake us (network file systems)

# NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.
XID_LINE = re.compile(r"NVRM: Xid \(PCI:(?P<pci>[0-9a-fA-F]+:[0-9a-fA-F]+:[0-9a-fA-F]+)(?:\.[0-7])?\): "
                      r"(?P<code>\d+),? ?(?P<text>.*)")


def pci_key(address: str) -> tuple[int, int, int] | None:
    """'0000:3b:00', '00000000:3B:00.0' -> (domain, bus, device)."""
    parts = address.split(".")[0].split(":")
    if len(parts) != 3:
        return None
    try:
        domain, bus, device = (int(p, 16) for p in parts)
    except ValueError:
        return None
    return domain, bus, device


def parse(message: str) -> tuple[tuple[int, int, int], int, str] | None:
    m = XID_LINE.search(message)
    if not m:
        return None
    key = pci_key(m["pci"])
    return (key, int(m["code"]), m["text"].strip()) if key else None


class JournalFollower:
    def __init__(self, store: XidStore, resolve: Callable[[tuple[int, int, int]], str | None],
                 path: str | None = None, ready: threading.Event | None = None):
        """`resolve` maps a PCI address to the GPU's UUID; `path` reads a journal file or directory
        instead of the system journal; `ready` is set once GPU identities are known."""
        self._store = store
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

    def _open(self):  # type: ignore[no-untyped-def]  # systemd.journal.Reader, an optional dependency
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
        reader.this_boot()
        reader.add_match(_TRANSPORT="kernel")
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
            parsed = parse(message)
            if parsed is None:
                continue
            key, code, text = parsed
            stamp = entry.get("__REALTIME_TIMESTAMP")
            ts = stamp.timestamp() if isinstance(stamp, datetime) else 0.0
            uuid = self._resolve(key)
            if uuid is None:
                pci = "{:08x}:{:02x}:{:02x}.0".format(*key)
                log.warning("Xid for a PCI address no GPU answers for", extra={"pci": pci, "message": message})
                self._store.record_unresolved(pci, XidEvent("", code, ts, "journal", text))
                continue
            self._store.record(XidEvent(uuid, code, ts, "journal", text))
