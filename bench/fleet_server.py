"""The fleet `make bench-fleet` scrapes: one loopback HTTP server answering `/node/<i>/metrics` for N
nodes, each a copy of one captured exporter page made to look like a different machine.

A frozen page would flatter the time-series database (a value that never changes compresses to a
bit per sample), and one page served N times would give every node the same GPU UUIDs. So each
node gets its own UUIDs and serials, gauges that move on real hardware (temperatures, power, clocks,
utilisation, memory in use, collection durations) are jittered per node and per scrape, counters
that advanced between two captures of the page keep advancing at that rate (scaled per node), and
timestamps are the time of the request. Everything else (thresholds, limits, health, per-link state,
Xid/ECC counts) is served as captured.

It also accepts POST /api/v2/alerts and answers 200, so vmalert has an Alertmanager to send to.

Run by bench/fleet.py: `fleet_server.py --page FILE [--page-later FILE] --nodes N`; prints
`listening <port>` once it is bound to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Gauges that move on real hardware from one scrape to the next; any gauge that changed between two
# captures moves too.
MOVING_GAUGES = frozenset({
    "nvidia_gpu_temperature_celsius", "nvidia_gpu_memory_temperature_celsius", "nvidia_gpu_power_watts",
    "nvidia_gpu_utilization_ratio", "nvidia_gpu_memory_utilization_ratio", "nvidia_gpu_memory_used_bytes",
    "nvidia_gpu_memory_free_bytes", "nvidia_gpu_clock_hertz", "nvml_exporter_collect_duration_seconds",
})
JITTER = 0.03  # ± relative, per node and per scrape
NOISE = 1 << 16  # size of the precomputed noise table
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
UUID = re.compile(r'uuid="(GPU-[0-9a-f-]{36})"')
SERIAL = re.compile(r'serial="([0-9]+)"')


@dataclass
class Slot:
    """One sample whose value the server computes per request."""
    kind: str  # "gauge" (jittered), "counter" (advancing), "now" (time of request)
    value: float
    rate: float = 0.0
    decimals: int = -1  # digits after the point as captured; -1: print the float as Python does
    ratio: bool = False  # stays within [0, 1]
    ceiling: bool = False  # a clock: jitters below the captured value, never above


@dataclass
class Template:
    chunks: list[bytes] = field(default_factory=list)  # len(slots) + 1 static pieces around the slots
    slots: list[Slot] = field(default_factory=list)
    series: int = 0
    gpus: int = 0
    uuids: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """(family -> type, [(line prefix up to the value, metric name, value text)]) of a text page;
    comment lines come back with name "#"."""
    types: dict[str, str] = {}
    lines: list[tuple[str, str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            lines.append((line, "#", ""))
            continue
        m = SAMPLE.match(line)
        if not m:
            raise ValueError(f"page line {n} is not a sample: {line[:120]!r}")
        lines.append((line[: m.start(3)], m.group(1), m.group(3)))
    return types, lines


def family_type(types: dict[str, str], name: str) -> str:
    if name in types:
        return types[name]
    for suffix in ("_total", "_created", "_bucket", "_count", "_sum", "_info"):
        if name.endswith(suffix) and name[: -len(suffix)] in types:
            return types[name[: -len(suffix)]]
    return "untyped"


def decimals(text: str) -> int:
    if "e" in text.lower() or "n" in text.lower():  # exponent, NaN, Inf
        return -1
    return len(text.split(".", 1)[1]) if "." in text else 0


def build(page: str, later: str | None = None) -> Template:
    """The template of a page; `later` is the same exporter's page captured some seconds after, whose
    `nvml_exporter_last_collect_timestamp_seconds` dates the two, for the counters' rates."""
    types, lines = parse(page)
    later_values: dict[str, float] = {}
    elapsed = 0.0
    if later is not None:
        _, later_lines = parse(later)
        later_values = {prefix: float(v) for prefix, name, v in later_lines if name != "#"}
        first = {prefix: float(v) for prefix, name, v in lines if name != "#"}
        stamp = "nvml_exporter_last_collect_timestamp_seconds "
        if stamp in first and stamp in later_values:
            elapsed = later_values[stamp] - first[stamp]
    t = Template()
    static: list[str] = []
    for prefix, name, value_text in lines:
        if name == "#":
            static.append(prefix + "\n")
            continue
        t.series += 1
        if name == "nvidia_gpu_up":
            t.gpus += 1
        value = float(value_text)
        kind_of = family_type(types, name)
        slot: Slot | None = None
        moved = prefix in later_values and later_values[prefix] != value
        if name.endswith("_timestamp_seconds") and value > 1e9:
            slot = Slot("now", value)
        elif kind_of == "counter" and moved and elapsed > 0:
            slot = Slot("counter", value, rate=(later_values[prefix] - value) / elapsed, decimals=3)
        elif kind_of == "gauge" and (name in MOVING_GAUGES or moved) and value != 0:
            slot = Slot("gauge", value, decimals=decimals(value_text), ratio=name.endswith("_ratio"),
                        ceiling=name.endswith("_hertz"))
        if slot is None:
            static.append(f"{prefix}{value_text}\n")
            continue
        static.append(prefix)
        t.chunks.append("".join(static).encode())
        t.slots.append(slot)
        static = ["\n"]  # the newline after the slot's value opens the next static chunk
    t.chunks.append("".join(static).encode())
    t.uuids = sorted(set(UUID.findall(page)))
    t.serials = sorted(set(SERIAL.findall(page)))
    if t.gpus == 0:
        raise ValueError("the page has no nvidia_gpu_up sample: not an nvml-exporter page of a node with GPUs")
    return t


class Fleet:
    def __init__(self, template: Template, nodes: int, step: float, seed: int = 14):
        self.t, self.nodes, self.step = template, nodes, step
        rng = random.Random(seed)
        self.noise = [rng.uniform(-1.0, 1.0) for _ in range(NOISE)]
        self.node_scale = [rng.uniform(0.9, 1.1) for _ in range(nodes)]
        self.start = time.time()
        # Per node, the UUIDs and serials it reports instead of the captured ones (same length, distinct).
        self.renames: list[list[tuple[bytes, bytes]]] = []
        for node in range(nodes):
            pairs = [(u.encode(), f"{u[:-12]}{node:06x}{k:06x}".encode()) for k, u in enumerate(template.uuids)]
            pairs += [(f'serial="{s}"'.encode(), f'serial="{int(s) + 1_000_000 * node}"'.encode())
                      for s in template.serials]
            self.renames.append([(a, b) for a, b in pairs if a != b])

    def render(self, node: int, now: float) -> bytes:
        t, noise = self.t, self.noise
        scale = self.node_scale[node]
        tick = int(now // self.step)
        base = (node * 7919 + tick * 104729) % NOISE
        out = [t.chunks[0]]
        for i, slot in enumerate(t.slots):
            if slot.kind == "now":
                text = f"{now:.3f}"
            else:
                if slot.kind == "counter":
                    v = slot.value * scale + slot.rate * scale * (now - self.start)
                else:
                    u = noise[(base + i * 31) % NOISE]
                    v = slot.value * (1 - JITTER * abs(u) if slot.ceiling else 1 + JITTER * u)
                    if slot.ratio:
                        v = min(1.0, max(0.0, v))
                text = repr(v) if slot.decimals < 0 else f"{v:.{slot.decimals}f}"
            out.append(text.encode())
            out.append(t.chunks[i + 1])
        body = b"".join(out)
        for old, new in self.renames[node]:
            body = body.replace(old, new)
        return body


NODE_PATH = re.compile(rb"^/node/(\d+)/metrics$")


async def handle(fleet: Fleet, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.split(b"\r\n")
            method, path, _ = request_line.split(b" ", 2)
            length = 0
            for h in header_lines:
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            status, ctype, body = b"404 Not Found", b"text/plain", b"not found\n"
            m = NODE_PATH.match(path.split(b"?", 1)[0])
            if method == b"GET" and m and int(m.group(1)) < fleet.nodes:
                status, ctype = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
                body = fleet.render(int(m.group(1)), time.time())
            elif method == b"POST" and path == b"/api/v2/alerts":
                status, body = b"200 OK", b""
            elif path in (b"/-/healthy", b"/-/ready"):
                status, body = b"200 OK", b"ok\n"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype +
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client closed its kept-alive connection: the normal end of one
    except (ValueError, asyncio.LimitOverrunError):
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    finally:
        writer.close()


async def serve(fleet: Fleet) -> None:
    server = await asyncio.start_server(lambda r, w: handle(fleet, r, w), "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--page", required=True, type=Path)
    ap.add_argument("--page-later", type=Path)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--step", type=float, default=15.0, help="seconds between two jittered values")
    args = ap.parse_args()
    try:
        template = build(args.page.read_text(), args.page_later.read_text() if args.page_later else None)
    except (OSError, ValueError) as e:
        print(f"fleet_server: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(Fleet(template, args.nodes, args.step)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
