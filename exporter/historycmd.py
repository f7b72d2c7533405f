"""`nvml-exporter history`: each GPU's incident history and escalation; `history clear` marks a GPU repaired.

    nvml-exporter history [--gpu UUID] [--json]
    nvml-exporter history clear --gpu UUID --reason TEXT

Reads the store the exporter writes (--history.path, by default under its StateDirectory). A clear is
recorded in the history itself, with the reason and who ran it; escalation then counts only what
comes after it. A replaced board needs no clear: it has a new UUID.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .history import History, HistoryError, default_path, row_dict

SCHEMA_ID = "nvml-exporter/history/v1"


def gpu_history(history: History, uuid: str, now: float) -> dict[str, Any]:
    findings = history.assess(uuid, now)
    incidents, intervals = history.counts(uuid)
    worst = max(findings, key=lambda f: f.status == "critical", default=None)
    return {"uuid": uuid, "status": worst.status if worst else "ok", "action": worst.action if worst else "none",
            "escalations": [{"status": f.status, "action": f.action, "reason": f.reason} for f in findings],
            "incidents": incidents, "interval_count": intervals["count"],
            "events": [row_dict(r) for r in history.rows(uuid)]}


def render_events(events: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    lines = []
    for e in events:
        if e["kind"] in ("xid", "remap") and "code" in e:
            what = (f"{e['kind']:<6} Xid {e['code']} {e['name']} x{e['count']}"
                    + (f" (to {e['last_time']})" if e["last_time"] != e["time"] else "")
                    + (f": {e['detail']}" if e["detail"] else ""))
        else:
            what = f"{e['kind']:<6} " + (e["boot_id"] if e["kind"] == "boot" else e["detail"])
        lines.append(f"{indent}{e['time']}  {what}".rstrip())
    return lines


def _text(doc: dict[str, Any]) -> str:
    lines = [f"incident history {doc['path']} (this boot {doc['boot_id']}); {len(doc['gpus'])} GPU(s)"]
    for g in doc["gpus"]:
        lines += ["", f"GPU {g['uuid']}: {g['status'].upper()} -> {g['action']}; incidents "
                  + ", ".join(f"{k} {v:g}" for k, v in g["incidents"].items())]
        lines += [f"  escalation    {f['reason']} -> {f['action']}" for f in g["escalations"]]
        lines += render_events(g["events"], "  ")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    clearing = argv[:1] == ["clear"]
    p = argparse.ArgumentParser(prog="nvml-exporter history" + (" clear" if clearing else ""),
                                description=(__doc__ or "").splitlines()[0], allow_abbrev=False)
    p.add_argument("--history.path", dest="path", default=default_path(), metavar="PATH",
                   help=f"the exporter's incident history (default {default_path()})")
    if clearing:
        p.add_argument("--gpu", required=True, metavar="UUID", help="the GPU repaired in place")
        p.add_argument("--reason", required=True, help="what was done (kept in the history)")
    else:
        p.add_argument("--gpu", metavar="UUID", help="this GPU only")
        p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv[1:] if clearing else argv)
    if not os.path.exists(args.path):
        print(f"{p.prog}: error: no incident history at {args.path} (is the exporter running with "
              f"--history.path?)", file=sys.stderr)
        return 1
    try:
        if clearing:
            return _clear(args.path, args.gpu, args.reason)
        history = History(args.path, readonly=True)
    except HistoryError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    try:
        uuids = [args.gpu] if args.gpu else history.uuids()
        if args.gpu and args.gpu not in history.uuids():
            print(f"{p.prog}: error: no history for GPU {args.gpu}", file=sys.stderr)
            return 1
        now = time.time()
        doc = {"schema": SCHEMA_ID, "path": args.path, "boot_id": history.boot_id,
               "gpus": [gpu_history(history, u, now) for u in uuids]}
    finally:
        history.close()
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else _text(doc))
    return 0


def _clear(path: str, uuid: str, reason: str) -> int:
    history = History(path)
    try:
        if uuid not in history.uuids():
            print(f"nvml-exporter history clear: error: no history for GPU {uuid}", file=sys.stderr)
            return 1
        who = os.environ.get("SUDO_USER") or getpass.getuser()
        history.clear(uuid, reason, who)
    finally:
        history.close()
    print(f"GPU {uuid}: history cleared ({reason}); escalation counts only what comes after this")
    return 0
