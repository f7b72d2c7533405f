"""The exporter's control socket: the node agent (`nvml-remediator agent`) asks the exporter to let go
of NVML before a GPU reset, and to take it back after.

A unix stream socket, by default `$RUNTIME_DIRECTORY/control.sock` under systemd and off otherwise. One
command per connection, one line each way:

    release all | release <uuid>   ->  ok released ...      (NVML shut down / the GPU's handle dropped)
    reacquire                      ->  ok reacquired
    status                         ->  ok released=all|<uuids>|none

and `error <why>` where it cannot be done. Two guards: the socket file's mode (0660, group
`--control.group`), and the peer's credentials (SO_PEERCRED): only root, the exporter's own user and
the users named with `--control.allow-user` are served; anyone else gets `error` and is logged. A GPU
reset needs the exporter to hold no device file, which only nvmlShutdown gives: the agent sends
`release all`. `release <uuid>` stops reading one GPU and drops its handle and event registration, for
work on one GPU that does not need the device files closed.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("nvml_exporter.control")

MAX_LINE = 256
READ_TIMEOUT = 5.0  # seconds a client has to send its command
UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]{1,90}$")


class ControlError(Exception):
    pass


def default_path() -> str:
    """$RUNTIME_DIRECTORY/control.sock under systemd (RuntimeDirectory=), else '' (off)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, "control.sock") if runtime else ""


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, from the kernel (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def resolve_users(names: Iterable[str]) -> set[int]:
    uids = set()
    for name in names:
        try:
            uids.add(int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ControlError(f"no such user: {name}") from None
    return uids


class ControlServer:
    """Serves the control socket in one thread; commands run one at a time (a release waits for the
    reads in flight, up to its timeout)."""

    def __init__(self, path: str, release: Callable[[str | None], str], reacquire: Callable[[], str],
                 released: Callable[[], list[str]], *, group: str | None = None,
                 allow_uids: Iterable[int] = (), mode: int = 0o660):
        self.path = path
        self._release, self._reacquire, self._released = release, reacquire, released
        self._allowed = {0, os.geteuid(), *allow_uids}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            if not _is_socket(path):
                raise ControlError(f"{path} exists and is not a socket; not replacing it")
            os.unlink(path)  # a socket left by an earlier run
        try:
            old = os.umask(0o177)  # no moment with the socket open to all: 0600 until chmod below
            try:
                self._sock.bind(path)
            finally:
                os.umask(old)
            if group:
                try:
                    os.chown(path, -1, grp.getgrnam(group).gr_gid)
                except KeyError:
                    raise ControlError(f"no such group: {group}") from None
            os.chmod(path, mode)
            self._sock.listen(8)
        except OSError as e:
            self._sock.close()
            raise ControlError(f"cannot serve the control socket {path}: {e.strerror or e}") from None
        except ControlError:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()
        log.info("control socket", extra={"path": self.path, "allowed_uids": sorted(self._allowed)})

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                log.exception("control socket accept failed")
                continue
            with conn:
                try:
                    self._one(conn)
                except OSError as e:
                    log.warning("control connection failed", extra={"error": str(e)})

    def _one(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer_credentials(conn)
        if uid not in self._allowed:
            log.warning("control request refused: peer user not allowed", extra={"pid": pid, "uid": uid})
            conn.sendall(b"error not allowed\n")
            return
        conn.settimeout(READ_TIMEOUT)
        data = b""
        while b"\n" not in data and len(data) <= MAX_LINE:
            chunk = conn.recv(MAX_LINE + 1)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        reply = self.handle(line, pid, uid)
        conn.sendall(reply.encode() + b"\n")

    def handle(self, line: str, pid: int = 0, uid: int = 0) -> str:
        from .collector import ReleaseError

        words = line.split()
        log.warning("control request", extra={"command": line[:MAX_LINE], "pid": pid, "uid": uid})
        try:
            match words:
                case ["release", "all"]:
                    return "ok " + self._release(None)
                case ["release", uuid] if UUID.match(uuid):
                    return "ok " + self._release(uuid)
                case ["reacquire"]:
                    return "ok " + self._reacquire()
                case ["status"]:
                    return "ok released=" + (",".join(self._released()) or "none")
                case _:
                    return "error usage: release all | release <uuid> | reacquire | status"
        except ReleaseError as e:
            return f"error {e}"


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)


def request(path: str, command: str, timeout: float = 30.0) -> str:
    """Send one command to an exporter's control socket; its answer after `ok`, or ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            # refused before it read the command (an unknown peer): the refusal is still there to read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(command.encode() + b"\n")
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            raise ControlError(f"exporter control socket {path}: {e.strerror or e}") from None
    reply = data.decode("utf-8", "replace").strip()
    if not reply.startswith("ok"):
        raise ControlError(f"exporter refused {command!r}: {reply or 'no answer'}")
    return reply[2:].strip()
