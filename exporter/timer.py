"""ScrapeTimer: a one-shot timer that a thread sleeps on (Linux timerfd), for the scheduler's hung-call
watchdog. Setting and cancelling it are system calls that wake nobody: a scrape can put a watchdog on
every collection for the price of two system calls, where handing the work to another thread costs two
thread wake-ups (on a VM, tens of microseconds each)."""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

log = logging.getLogger("nvml_exporter.timer")

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class ScrapeTimer:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd: int = fd
        # timerfd_settime never blocks: called holding the GIL (PyDLL), as releasing it would invite a
        # thread switch on every collection.
        self._settime = ctypes.PyDLL(None, use_errno=True).timerfd_settime
        self._on, self._off = _ITimerspec(), _ITimerspec()
        self._on_ref, self._off_ref = ctypes.byref(self._on), ctypes.byref(self._off)

    @classmethod
    def create(cls) -> ScrapeTimer | None:
        """A timer, or None where the C library has no timerfd (not Linux)."""
        try:
            return cls()
        except (OSError, AttributeError) as e:
            log.info("no timerfd: collections are handed to the sweep thread", extra={"error": str(e)})
            return None

    def set(self, seconds: float) -> None:
        """Fire once, `seconds` from now (at once if that is not in the future)."""
        value = self._on.it_value
        value.tv_sec, value.tv_nsec = divmod(max(1, int(seconds * 1e9)), 1_000_000_000)  # zero would cancel it
        self._call(self._on_ref)

    def cancel(self) -> None:
        self._call(self._off_ref)

    def _call(self, spec: Any) -> None:
        if self._settime(self.fd, 0, spec, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def wait(self) -> None:
        """Sleep until the timer fires."""
        os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)
