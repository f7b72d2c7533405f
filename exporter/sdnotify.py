"""systemd integration that costs nothing outside systemd: readiness, status, watchdog, socket activation.

systemd-python is used when it is installed; without it the same datagrams go out through a plain
socket, so containers and hosts without python3-systemd behave the same.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("nvml_exporter.systemd")
LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """sd_notify(3): False (and nothing sent) when not running under a notify-aware service manager."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    try:
        from systemd import daemon  # optional: the fallback below speaks the same protocol

        return bool(daemon.notify(message))
    except ImportError:
        pass
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify the service manager", extra={"error": str(e)})
        return False
    return True


def listen_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    return socket.socket(fileno=LISTEN_FDS_START)


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, when systemd asked this process for watchdog pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


class SystemdWatchdog:
    """The systemd watchdog's pinger (WatchdogSec=; not the scheduler's hung-call watchdog): pings
    WATCHDOG=1 only while `healthy()` holds, and keeps STATUS= up to date: a wedged driver call stops the
    pings and systemd restarts the service."""

    def __init__(self, interval: float, healthy: Callable[[], tuple[bool, str]]):
        self._interval = interval
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            ok, status = self._healthy()
            if ok:
                notify(f"WATCHDOG=1\nSTATUS={status}")
            else:
                notify(f"STATUS=unhealthy: {status}")
                log.error("not pinging the watchdog", extra={"reason": status})
