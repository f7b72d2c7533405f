"""`nvml-exporter diagnose`: a one-shot verdict on every GPU of this node, for people and for Slurm.

Exit codes follow Node Health Check: 0 healthy, 1 warning, 2 critical, 3 could not inspect (no
driver, no GPU). `--json` prints a document that validates against docs/diagnose.schema.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .cli import add_workload_flags, build_collector
from .diagnosis import STATUS_VALUE, Check
from .history import History, HistoryError, default_path, row_dict
from .kernlog import xid_fields
from .nvml import Library
from .snapshot import GpuSnapshot, Snapshot
from .workload import Tracker, wiring
from .workload.processes import Processes
from .xidcatalog import ACTIONS, SEVERITIES, lookup
from .xidstore import XidEvent

EXIT = {"ok": 0, "warning": 1, "critical": 2, "unknown": 3}
SCHEMA_ID = "nvml-exporter/diagnose/v1"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _xid(e: XidEvent) -> dict[str, Any]:
    x = lookup(e.code)
    out = {"code": e.code, "name": x.name, "category": x.category, "severity": x.severity, "action": x.action,
           "time": _iso(e.timestamp), "source": e.source, "message": e.message}
    if e.gpu_instance:
        out["gpu_instance"] = e.gpu_instance
    if fields := xid_fields(e.code, e.message):
        out["fields"] = fields
    return out


def _readings(g: GpuSnapshot) -> dict[str, Any]:
    v = g.value

    def listed(metric: str) -> dict[str, float]:
        return {",".join(k): val for k, val in sorted(g.values.get(metric, {}).items())}

    return {
        "temperature_celsius": v("nvidia_gpu_temperature_celsius"),
        "memory_temperature_celsius": v("nvidia_gpu_memory_temperature_celsius"),
        "thresholds_celsius": listed("nvidia_gpu_temperature_threshold_celsius"),
        "power_watts": v("nvidia_gpu_power_watts"),
        "power_limit_watts": v("nvidia_gpu_power_limit_watts"),
        "power_default_limit_watts": v("nvidia_gpu_power_default_limit_watts"),
        "clock_events_active": sorted(k[0] for k, val in g.values.get("nvidia_gpu_clock_event_active", {}).items()
                                      if val),
        "ecc_enabled": v("nvidia_gpu_ecc_enabled"),
        "ecc_errors": listed("nvidia_gpu_ecc_errors_total"),
        "remapped_rows": listed("nvidia_gpu_remapped_rows"),
        "remapped_rows_pending": v("nvidia_gpu_remapped_rows_pending"),
        "remapped_rows_failed": v("nvidia_gpu_remapped_rows_failed"),
        "retired_pages": listed("nvidia_gpu_retired_pages"),
        "retired_pages_pending": v("nvidia_gpu_retired_pages_pending"),
        "pcie": {"generation": v("nvidia_gpu_pcie_link_generation"),
                 "max_generation": v("nvidia_gpu_pcie_link_max_generation"),
                 "width": v("nvidia_gpu_pcie_link_width"), "max_width": v("nvidia_gpu_pcie_link_max_width"),
                 "replays": v("nvidia_gpu_pcie_replay_errors_total")},
        "nvlink": {"links": int(sum(g.values.get("nvidia_gpu_nvlink_links", {}).values())),
                   "down": sorted(int(k[0]) for k, val in g.values.get("nvidia_gpu_nvlink_link_up", {}).items()
                                  if val == 0),
                   "errors": sum(g.values.get("nvidia_gpu_nvlink_errors_total", {}).values())},
        "recovery_action": v("nvidia_gpu_recovery_action"),
    }


def report(snap: Snapshot, history: dict[str, tuple[XidEvent, ...]],
           unresolved: Sequence[tuple[str, XidEvent]], error: str = "",
           incidents: History | None = None,
           attribution: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`attribution`: uuid -> {"workloads": [...], "processes": [...]} (exporter/workload), merged into each GPU."""
    gpus = []
    worst = "ok" if snap.gpus else "unknown"
    action = "none"
    for g in snap.gpus:
        d = g.diagnosis
        checks: tuple[Check, ...] = d.checks if d else ()
        status = d.status if d else "critical"
        gpu_action = d.action if d else "reboot_node"
        gpus.append({
            "index": g.identity.index, "uuid": g.identity.uuid, "name": g.identity.name,
            "pci_bus_id": g.identity.pci_bus_id, "serial": g.identity.serial, "up": g.up,
            "status": status, "action": gpu_action,
            "readings": _readings(g),
            "xids": [_xid(e) for e in history.get(g.identity.uuid, ())],
            "checks": [{"name": c.name, "status": c.status, "reason": c.reason, "action": c.action} for c in checks],
            **(attribution or {}).get(g.identity.uuid, {}),
        })
        if incidents is not None:
            gpus[-1]["history"] = [row_dict(r) for r in incidents.rows(g.identity.uuid)]
        worst, action = _worse(worst, action, status, gpu_action)
    orphans = [{"pci_bus_id": pci, **_xid(e)} for pci, e in unresolved]
    for o in orphans:
        if o["severity"] in STATUS_VALUE:
            worst, action = _worse(worst, action, o["severity"], o["action"])
    if error:
        worst = "unknown"
    return {"schema": SCHEMA_ID, "hostname": socket.gethostname(), "time": _iso(time.time()),
            "driver_version": snap.state.driver_version, "status": worst, "action": action, "error": error or None,
            "gpus": gpus, "unattributed_xids": orphans}


def _worse(status: str, action: str, other: str, other_action: str) -> tuple[str, str]:
    if status == "unknown":
        return (other, other_action) if other in STATUS_VALUE else (status, action)
    key = (STATUS_VALUE[other], ACTIONS.index(other_action))
    if key > (STATUS_VALUE[status], ACTIONS.index(action)):
        return other, other_action
    return status, action


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"node {doc['hostname']}: {doc['status'].upper()} (action: {doc['action']}); "
             f"driver {doc['driver_version'] or 'unknown'}; {len(doc['gpus'])} GPU(s)"]
    if doc["error"]:
        lines.append(f"  cannot inspect: {doc['error']}")
    for g in doc["gpus"]:
        r = g["readings"]
        lines.append("")
        lines.append(f"GPU {g['index']}  {g['name'] or '?'}  {g['uuid'] or '?'}  {g['pci_bus_id'] or '?'}"
                     f"  serial {g['serial'] or '-'}  {'up' if g['up'] else 'LOST'}")
        if g["up"]:
            th = r["thresholds_celsius"]
            lines.append(f"  temperature   {_n(r['temperature_celsius'])} °C (slowdown {_n(th.get('slowdown'))}, "
                         f"shutdown {_n(th.get('shutdown'))}); HBM {_n(r['memory_temperature_celsius'])} °C "
                         f"(max {_n(th.get('memory_max'))})")
            lines.append(f"  power         {_n(r['power_watts'])} W, limit {_n(r['power_limit_watts'])} W "
                         f"(default {_n(r['power_default_limit_watts'])} W)")
            lines.append(f"  clock events  {', '.join(r['clock_events_active']) or 'none'}")
            ecc = r["ecc_errors"]
            lines.append(f"  memory        ECC {'on' if r['ecc_enabled'] else 'off/unknown'}; uncorrected "
                         f"volatile {_n(ecc.get('uncorrected,volatile'))}, aggregate "
                         f"{_n(ecc.get('uncorrected,aggregate'))}; remapped rows "
                         f"{_n(r['remapped_rows'].get('correctable'))}/{_n(r['remapped_rows'].get('uncorrectable'))}"
                         f" pending {_yn(r['remapped_rows_pending'])} failed {_yn(r['remapped_rows_failed'])};"
                         f" retired pages {_n(sum(r['retired_pages'].values()) if r['retired_pages'] else None)}")
            p = r["pcie"]
            lines.append(f"  pcie          Gen{_n(p['generation'])}/{_n(p['max_generation'])} "
                         f"x{_n(p['width'])}/{_n(p['max_width'])}, {_n(p['replays'])} replays")
            nv = r["nvlink"]
            lines.append(f"  nvlink        {nv['links'] - len(nv['down'])}/{nv['links']} links up, "
                         f"{nv['errors']:g} errors" + (f", down: {nv['down']}" if nv["down"] else ""))
        lines.extend(_xid_lines(g["xids"]))
        if "history" in g:
            from .historycmd import render_events

            lines.append(f"  history       {len(g['history'])} event(s) kept across restarts and reboots"
                         + (":" if g["history"] else ""))
            lines.extend(render_events(g["history"], "    "))
        lines.extend(_workload_lines(g))
        lines.append(f"  verdict       {g['status'].upper()} -> {g['action']}")
        lines.extend(f"    {c['name']:<15} {c['status']:<8} {c['reason']} -> {c['action']}"
                     for c in g["checks"] if c["status"] != "ok")
    if doc["unattributed_xids"]:
        lines.append("")
        lines.append("Xids for GPUs NVML cannot see:")
        lines.extend(f"  {o['pci_bus_id']}: Xid {o['code']} {o['name']} ({o['severity']} -> {o['action']}) "
                     f"at {o['time']}: {o['message']}" for o in doc["unattributed_xids"])
    return "\n".join(lines) + "\n"


def _xid_lines(xids: list[dict[str, Any]]) -> list[str]:
    if not xids:
        return ["  xids          none this boot"]
    return [f"  xid           {x['code']} {x['name']} ({x['category']}, {x['severity']} -> {x['action']}) "
            f"at {x['time']} via {x['source']}" + (f": {x['message']}" if x["message"] else "") for x in xids]


def _workload_lines(g: dict[str, Any]) -> list[str]:
    if "workloads" not in g:
        return []  # no workload source asked for
    lines = [f"  workload      {w['workload_id']} ({w['source']}"
             + "".join(f", {k}={v}" for k, v in sorted(w["labels"].items())) + ")" for w in g["workloads"]]
    lines.extend(f"  process       pid {p['pid']}, {_n(p['used_memory_bytes'])} bytes, "
                 f"workload {p['workload_id'] or 'unknown'}" for p in g.get("processes", []))
    return lines or ["  workload      none"]


def attribution(tracker: Tracker, gpus: Sequence[GpuSnapshot]) -> dict[str, dict[str, Any]]:
    """Each GPU's workloads (and processes, where that source is on), read once, for the report."""
    tracker.refresh_all()
    procs = next((s.processes for s in tracker.sources if isinstance(s, Processes)), None)
    out: dict[str, dict[str, Any]] = {}
    for g in gpus:
        doc: dict[str, Any] = {"workloads": [{"workload_id": w.workload_id, "source": w.source,
                                              "labels": dict(w.labels)} for w in tracker.workloads(g.identity)]}
        if procs is not None:
            doc["processes"] = [{"pid": p.pid, "used_memory_bytes": p.used_memory_bytes,
                                 "workload_id": p.workload.workload_id if p.workload else None}
                                for p in procs.get(g.identity.uuid, ())]
        out[g.identity.uuid] = doc
    return out


def _n(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g}"


def _yn(v: float | None) -> str:
    return "n/a" if v is None else "yes" if v else "no"


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="nvml-exporter diagnose", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--json", action="store_true", help="print JSON (docs/diagnose.schema.json)")
    p.add_argument("--nvml.library", dest="library", metavar="PATH")
    p.add_argument("--xid.journal", dest="journal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--xid.journal-path", dest="journal_path", metavar="PATH")
    p.add_argument("--history.path", dest="history_path", metavar="PATH",
                   help=f"the exporter's incident history, read only (default {default_path()} where it exists; "
                        "'' for none)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for NVML and the journal")
    add_workload_flags(p)
    args = p.parse_args(argv)
    assert set(EXIT) >= set(SEVERITIES) - {"info"}

    incidents = None
    path = default_path() if args.history_path is None else args.history_path
    if path and (args.history_path or os.path.exists(path)):
        try:
            incidents = History(path, readonly=True)
        except HistoryError as e:
            print(f"nvml-exporter diagnose: incident history not read: {e}", file=sys.stderr)
    # sparse=False: a one-shot report lists every reading (every link, every counter), not the page's selection
    collector = build_collector(Library(args.library), min_interval=0.0, events=False, journal=args.journal,
                                sparse=False, journal_path=args.journal_path,
                                init_backoff=(args.timeout, args.timeout), history=incidents)
    collector.start()
    collector.tried.wait(args.timeout)
    error = ""
    if not collector.initialised.wait(args.timeout if not collector.last_init_error else 0.0):
        error = f"NVML: {collector.last_init_error or 'no answer'}"
    if args.journal:
        collector.wait_journal(args.timeout)
    snap = collector.collect(args.timeout)
    tracker = wiring.build(collector, slurm_dir=args.workload_slurm_dir, kubelet_socket=args.workload_kubelet_socket,
                           processes=args.workload_processes, interval=args.workload_interval)
    attributed = attribution(tracker, snap.gpus) if tracker is not None else None
    collector.stop()
    if not error and not snap.gpus:
        error = "NVML sees no GPU"
    history = {g.identity.uuid: collector.xids.history(g.identity.uuid) for g in snap.gpus if g.identity.uuid}
    doc = report(snap, history, collector.xids.unresolved(), error, incidents, attributed)
    if incidents is not None:
        incidents.close()
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else render_text(doc))
    return EXIT[doc["status"]]
