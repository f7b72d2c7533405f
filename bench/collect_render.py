"""The exporter's own collect + render, without HTTP: the figure the C floor's header (bench/cref/cref.c)
says to compare it with. The same Collector (sweep thread, event thread, deadlines, diagnosis) and Renderer that serve
/metrics, built and started as `nvml-exporter --no-xid.journal` builds and starts them, looped like `cref -n N`; each
collection is handed to the renderer as a scrape hands it (Collector.collect_into).

    LD_LIBRARY_PATH=build/fakenvml FAKE_NVML_STATE=scenario.conf python bench/collect_render.py -n 2000

Prints one JSON line in cref's shape: gpus, iterations, cpu_us_per_collection (the process's CPU, all
threads), wall_us_per_collection, bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nvml_exporter.cli import _freeze_startup_objects, _one_malloc_arena, build_collector
from nvml_exporter.exposition import BuildInfo, Renderer
from nvml_exporter.nvml import Library
from nvml_exporter.snapshot import Snapshot

TIMEOUT = 60.0  # seconds: a collection's deadline, as --collect.timeout=60s in the server's bench runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="collections to time (default 2000)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("-n must be at least 1")
    _one_malloc_arena()
    collector = build_collector(Library(), min_interval=1e-6, journal=False)  # 1 us: every call collects
    renderer = Renderer()
    collector.start()
    last: list[tuple[Snapshot, list[bytes]]] = []

    def deliver(snap: Snapshot, _taken_over: bool) -> None:  # what the server's scrape does, less HTTP
        last[:] = [(snap, renderer.render_chunks(snap, build))]

    try:
        if not collector.initialised.wait(TIMEOUT):
            print(f"collect_render: NVML did not come up: {collector.last_init_error}", file=sys.stderr)
            return 1
        _freeze_startup_objects(collector)  # as the server does once the GPUs are attached
        build = BuildInfo.detect()
        for _ in range(min(20, args.n)):  # first reads plan the field decoding and fill the caches
            collector.collect_into(TIMEOUT, deliver)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(args.n):
            collector.collect_into(TIMEOUT, deliver)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        collector.stop()
    snap, page = last[0]
    print(json.dumps({"gpus": len(snap.gpus), "iterations": args.n, "cpu_us_per_collection": cpu / args.n * 1e6,
                      "wall_us_per_collection": wall / args.n * 1e6, "bytes": sum(map(len, page))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
