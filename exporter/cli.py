"""`nvml-exporter`: flags in Prometheus exporter style, then serve until SIGTERM."""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__, control, logs, sdnotify, webconfig
from .argtypes import Parser, duration, listen_address, positive_int
from .collector import Collector
from .exposition import BuildInfo, Renderer
from .history import BOOT_ID_PATH, History, HistoryError
from .journal import JournalFollower
from .node import Node
from .nvml import Library
from .nvml.events import EventWatcher
from .pcibus import SYSFS_PCI
from .pipeline import HistorySinks, Pipeline
from .server import App, Server
from .thermal import NodeModel
from .workload import wiring
from .xidstore import XidStore

log = logging.getLogger("nvml_exporter")

def telemetry_path(value: str) -> str:
    if not value.startswith("/") or value in ("/", "/-/healthy", "/-/ready"):
        raise argparse.ArgumentTypeError(f"telemetry path must start with / and not shadow another page: {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nvml-exporter", description="Prometheus exporter for NVIDIA GPU health over NVML. "
                "`nvml-exporter diagnose --help`: a one-shot report on this node's GPUs; "
                "`nvml-exporter history --help`: each GPU's incident history.", allow_abbrev=False)
    p.add_argument("--web.listen-address", dest="listen", type=listen_address, default=":9400",
                   metavar="ADDR", help="address to listen on (default :9400)")
    p.add_argument("--web.telemetry-path", dest="path", type=telemetry_path, default="/metrics",
                   help="path for metrics (default /metrics)")
    p.add_argument("--web.config.file", dest="web_config", metavar="FILE",
                   help="exporter-toolkit web config: TLS and basic auth")
    p.add_argument("--web.max-connections", dest="max_connections", type=positive_int, default=64, metavar="N",
                   help="connections served at once, each on its own thread; more get a 503 (default 64)")
    p.add_argument("--collect.timeout", dest="timeout", type=duration, default=5.0, metavar="DURATION",
                   help="deadline of a scrape when Prometheus sends none (default 5s)")
    p.add_argument("--collect.min-interval", dest="min_interval", type=duration, default=1.0, metavar="DURATION",
                   help="scrapes this close to the last collection are served from it (default 1s)")
    p.add_argument("--collect.slow-interval", dest="slow_interval", type=duration, default=30.0,
                   metavar="DURATION",
                   help="refresh of thresholds, limits, persistence and ECC mode, ECC aggregates, retired pages and "
                        "remapped rows (default 30s)")
    p.add_argument("--collect.nvlink.per-link", dest="nvlink_per_link", action="store_true",
                   help="serve every NVLink link's state and error counters; by default only links that are or "
                        "were down or counted errors since the exporter started (the per-GPU totals are always "
                        "served)")
    add_workload_flags(p)
    p.add_argument("--gpus.expected", dest="gpus_expected", type=positive_int, metavar="N",
                   help="GPUs this node should have: served as nvidia_gpu_expected, for the GPU-gone alert")
    p.add_argument("--collect.pci.sysfs-root", dest="pci_root", default=SYSFS_PCI, metavar="DIR",
                   help=f"where the kernel lists PCI functions, for nvidia_gpu_pci_devices (default {SYSFS_PCI}; "
                        "a container may need the host's; empty: not read)")
    p.add_argument("--nvml.library", dest="library", metavar="PATH",
                   help="load this libnvidia-ml.so.1 instead of the one the dynamic linker finds")
    p.add_argument("--xid.journal", dest="journal", action=argparse.BooleanOptionalAction, default=True,
                   help="count Xids from the kernel journal too (backfill and message text; default on)")
    p.add_argument("--xid.journal-path", dest="journal_path", metavar="PATH",
                   help="read this journal file or directory instead of the system journal")
    p.add_argument("--history.path", dest="history_path", metavar="PATH",
                   help="incident history (SQLite) kept across restarts, resets and reboots; default "
                        "$STATE_DIRECTORY/history.sqlite under systemd (/var/lib/prometheus-nvml-exporter), "
                        "otherwise none; '' turns it off")
    p.add_argument("--history.boot-id-path", dest="boot_id_path", default=BOOT_ID_PATH, metavar="PATH",
                   help=f"where this boot's id is read (default {BOOT_ID_PATH})")
    p.add_argument("--control.socket", dest="control_socket", metavar="PATH",
                   help="unix socket on which the node agent asks the exporter to release NVML for a GPU reset "
                        "and to reacquire it (docs/remediation.md); default $RUNTIME_DIRECTORY/control.sock under "
                        "systemd, otherwise off; '' turns it off")
    p.add_argument("--control.group", dest="control_group", metavar="GROUP",
                   help="group owning the control socket (mode 0660): the node agent's group")
    p.add_argument("--control.allow-user", dest="control_users", action="append", default=[], metavar="USER",
                   help="a user besides root and the exporter's own whose processes may use the control socket "
                        "(checked with SO_PEERCRED); repeatable")
    p.add_argument("--log.level", dest="log_level", choices=sorted(logs.LEVELS), default="info")
    p.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt")
    p.add_argument("--version", action="version", version=f"nvml-exporter {__version__}")
    return p


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """nvidia_gpu_workload_info's sources (docs/workloads.md); shared with `nvml-exporter diagnose`."""
    p.add_argument("--collect.workload.slurm-dir", dest="workload_slurm_dir", metavar="DIR",
                   help="Slurm job-mapping files, a file per GPU named by index or UUID (default off)")
    p.add_argument("--collect.workload.kubelet-socket", dest="workload_kubelet_socket", metavar="PATH",
                   help="kubelet pod-resources socket, usually /var/lib/kubelet/pod-resources/kubelet.sock "
                        "(default off)")
    p.add_argument("--collect.workload.processes", dest="workload_processes", action="store_true",
                   help="attribute the GPUs' compute processes to Slurm jobs and pods through /proc (default off)")
    p.add_argument("--collect.workload.interval", dest="workload_interval", type=duration, default=5.0,
                   metavar="DURATION", help="how often the kubelet and the process list are read (default 5s; "
                   "the Slurm directory is looked at every second, and read when it changed)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["diagnose"]:
        from . import diagnosecmd

        logs.setup("error", "logfmt")
        return diagnosecmd.main(argv[1:])
    if argv[:1] == ["history"]:
        from . import historycmd

        logs.setup("error", "logfmt")
        return historycmd.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    _one_malloc_arena()
    try:
        web = webconfig.load(args.web_config) if args.web_config else webconfig.WebConfig()
    except webconfig.WebConfigError as e:
        parser.error(f"--web.config.file: {e}")

    history = _open_history(args.history_path, args.boot_id_path)
    if isinstance(history, str):
        print(f"nvml-exporter: error: {history}", file=sys.stderr)
        return 1
    collector = build_collector(Library(args.library), min_interval=args.min_interval,
                                slow_interval=args.slow_interval, journal=args.journal, journal_path=args.journal_path,
                                nvlink_per_link=args.nvlink_per_link, history=history, pci_root=args.pci_root or None,
                                expected_gpus=args.gpus_expected, peers=NodeModel(),
                                freeze=os.environ.get(FREEZE_ENV) == "1")
    workloads = wiring.build(collector, slurm_dir=args.workload_slurm_dir,
                             kubelet_socket=args.workload_kubelet_socket, processes=args.workload_processes,
                             interval=args.workload_interval)
    app = App(collect=collector.collect, ready=collector.initialised.is_set, web=web, build=BuildInfo.detect(),
              telemetry_path=args.path, collect_timeout=args.timeout, collect_into=collector.collect_into,
              renderer=Renderer())
    host, port = args.listen
    try:
        activated = sdnotify.listen_socket()
        server = Server((host, port), app, sock=activated, max_connections=args.max_connections)
    except OSError as e:
        if host == "" and e.errno == 97:  # no IPv6 on this host: all IPv4 addresses then
            server = Server(("0.0.0.0", port), app, max_connections=args.max_connections)
        else:
            print(f"nvml-exporter: error: cannot listen on {host or '*'}:{port}: {e.strerror}", file=sys.stderr)
            return 1

    control_path = control.default_path() if args.control_socket is None else args.control_socket
    ctl: control.ControlServer | None = None
    if control_path:
        try:
            ctl = control.ControlServer(control_path, collector.release, collector.reacquire, collector.released,
                                        group=args.control_group,
                                        allow_uids=control.resolve_users(args.control_users))
        except control.ControlError as e:
            server.server_close()
            print(f"nvml-exporter: error: --control.socket: {e}", file=sys.stderr)
            return 1

    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        if stopping.is_set():
            return
        stopping.set()
        sdnotify.notify("STOPPING=1")
        # The handler runs in the main thread, inside serve_forever's wait: raising ends that wait now,
        # which lets the wait be long (a short poll interval woke an idle exporter twice a second).
        raise _Stopping

    systemd_watchdog: sdnotify.SystemdWatchdog | None = None
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:  # (from here on: a signal may arrive before serve_forever is reached)
        collector.start()
        if ctl is not None:
            ctl.start()
        if workloads is not None:
            workloads.start()
        threading.Thread(target=_freeze_startup_objects, args=(collector,), name="gc-freeze", daemon=True).start()
        log.info("listening", extra={"address": f"{host or '*'}:{server.server_address[1]}",
                                      "tls": web.ssl_context is not None, "version": __version__,
                                      "socket_activated": activated is not None})
        systemd_watchdog = _systemd(collector, args.timeout)
        server.serve_forever(poll_interval=_SERVE_POLL_SECONDS)
    except _Stopping:
        log.debug("serving stopped")
    finally:
        if systemd_watchdog is not None:
            systemd_watchdog.stop()
        if ctl is not None:
            ctl.stop()
        if workloads is not None:
            workloads.stop()
        collector.stop()
        server.server_close()
        if history is not None:
            history.close()
    return 0


# The frozen-readings test mode (snapshot.py): the tests' exporters run in it, so that a stage that changes
# a reading in place raises instead of being served a cached verdict or page.
FREEZE_ENV = "NVML_EXPORTER_FREEZE_READINGS"


def build_collector(library: Library, *, min_interval: float = 1.0, slow_interval: float = 30.0,
                    init_backoff: tuple[float, float] = (0.5, 10.0), events: bool = True, journal: bool = True,
                    journal_path: str | None = None, history: History | None = None, sparse: bool = True,
                    nvlink_per_link: bool = False, pci_root: str | None = None, expected_gpus: int | None = None,
                    peers: NodeModel | None = None, freeze: bool = False) -> Collector:
    """The collector over `library`, with its Xid sources: the XidStore its pipeline reads, and the NVML
    event watcher and the kernel journal follower that fill it (`events`, `journal`), each Xid and each
    acknowledged reset recorded in the incident history where there is one."""
    node = Node(library, slow_interval=slow_interval, init_backoff=init_backoff, pci_root=pci_root, freeze=freeze)
    sinks = HistorySinks(history) if history is not None else None
    xids = XidStore(sink=sinks.xid if sinks is not None else None)
    watcher = EventWatcher(node.attached, xids, node.count_error) if events else None
    follower = (JournalFollower(xids, node.resolve_pci, journal_path, ready=node.initialised,
                                on_reset=sinks.reset if sinks is not None else None) if journal else None)
    pipeline = Pipeline(xids, history=history, peers=peers, sparse=sparse, nvlink_per_link=nvlink_per_link,
                        freeze=freeze)
    return Collector(node, pipeline, events=watcher, journal=follower, min_interval=min_interval,
                     expected_gpus=expected_gpus)


def _open_history(path: str | None, boot_id_path: str) -> History | str | None:
    """The incident history, None where it is off, or why it cannot be opened."""
    if path is None:
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        if not state:
            log.info("incident history off: no --history.path, and not run by systemd with a StateDirectory")
            return None
        path = os.path.join(state, "history.sqlite")
    if not path:
        return None
    try:
        history = History(path, boot_id_path=boot_id_path)
    except HistoryError as e:
        return str(e)
    log.info("incident history", extra={"path": path, "boot_id": history.boot_id})
    return history


class _Stopping(Exception):
    """SIGTERM or SIGINT: out of serve_forever."""


_SERVE_POLL_SECONDS = 3600.0  # nothing else asks serve_forever to stop: a signal ends its wait at once


def _one_malloc_arena() -> None:
    """glibc gives every thread that allocates its own heap arena and keeps what was freed in each;
    a few threads that allocate in turn (the GIL serialises them anyway) then hold several partly
    empty heaps. One arena keeps the exporter at its working size: ~2 MiB less at 64 GPUs (make bench).
    Called before any thread starts."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: malloc arenas left as they are")
        return
    if mallopt(_M_ARENA_MAX, 1) != 1:
        log.debug("mallopt(M_ARENA_MAX) refused: malloc arenas left as they are")


_M_ARENA_MAX = -8  # malloc.h


def _freeze_startup_objects(collector: Collector) -> None:
    """Once the GPUs are attached, move every object made so far (modules, catalogs, handles, label
    caches) out of the garbage collector's sight: a full collection then walks only what scrapes
    made, instead of the ~100,000 objects of a started interpreter (a tenth of a scrape's CPU)."""
    if collector.initialised.wait(timeout=600):
        gc.freeze()


def _systemd(collector: Collector, timeout: float) -> sdnotify.SystemdWatchdog | None:
    """READY=1 once the socket listens and NVML has been tried; then watchdog pings while healthy."""
    def ready() -> None:
        collector.tried.wait()
        collector.initialised.wait(timeout)
        sdnotify.notify(f"READY=1\nSTATUS={collector.health(float('inf'))[1]}")

    threading.Thread(target=ready, name="sd-ready", daemon=True).start()
    interval = sdnotify.watchdog_interval()
    if interval is None:
        return None

    def healthy() -> tuple[bool, str]:
        if collector.initialised.is_set():
            collector.collect(min(timeout, interval))  # a collection proves the loop; cached if recent
        return collector.health(max_hang=2 * interval)

    watchdog = sdnotify.SystemdWatchdog(interval, healthy)
    watchdog.start()
    return watchdog


if __name__ == "__main__":
    raise SystemExit(main())
