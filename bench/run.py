"""`make bench`: nvml-exporter against a tutorial-style exporter, nvitop-exporter and the C floor, on the
same fake NVML scenarios, in one run. Prints a table and the targets, writes bench/results.json.

Server CPU comes from the process's own counters (/proc/PID/stat) over many scrapes; NVML calls from the
fake's shared call counters. These are measurements of this machine at this moment: compare ratios
within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.fakenvml.scenario import H200_LATENCY_US, FakeNvml, h100_node, read_counters  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
# (GPUs, µs per NVML call): 0 and 200 for every call, or "h200": the per-call and per-field costs measured on a
# real H200 (tests/fakenvml/scenario.py H200_LATENCY_US; the energy counter ~2.8 ms, most calls microseconds).
CASES: list[tuple[int, int | str]] = [(gpus, lat) for gpus in (1, 8, 64) for lat in (0, 200)] + [(1, "h200"),
                                                                                                (8, "h200")]
SECONDS_PER_CASE = float(os.environ.get("BENCH_SECONDS", "6"))  # per exporter and case
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "6"))  # blocks each, in turn
NVITOP = os.environ.get("NVITOP_EXPORTER", str(REPO / "build" / "bench-venv" / "bin" / "nvitop-exporter"))
CREF = REPO / "build" / "cref" / "cref"
RSS_SCRAPES = int(os.environ.get("BENCH_RSS_SCRAPES", "10000"))  # RSS read at scrape 1,000 and at this one
RSS_GOALS = {8: "≤ 30, flat", 64: "≤ 40, flat"}
IDLE_SECONDS = float(os.environ.get("BENCH_IDLE_SECONDS", "20"))  # CPU read over this long with no scrape
IDLE_GOAL_MS_PER_S = 0.5


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """Nanoseconds each thread of `pid` has run (/proc/PID/task/TID/schedstat): /proc/PID/stat counts in
    clock ticks (10 ms), too coarse for an idle process's fraction of a millisecond per second."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def calls(fake: FakeNvml) -> int:
    return sum(read_counters(fake.counters_path).values())


def get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        n = len(r.read())
    return time.perf_counter() - t0, n


class Server:
    def __init__(self, argv: list[str], fake: FakeNvml, port: int, path: str = "/metrics"):
        self.url = f"http://127.0.0.1:{port}{path}"
        self.port, self.path = port, path
        self._conn: http.client.HTTPConnection | None = None
        self.proc = subprocess.Popen(argv, env={**os.environ, **fake.env()}, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(self.url, timeout=30).read().decode()
                if "nvidia_gpu" in body or "nvitop" in body or "gpu" in body:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{argv} did not come up")

    def scrape(self) -> tuple[float, int]:
        """One scrape as Prometheus makes it: over the connection of the last one, if the server kept it
        open (HTTP/1.1), else over a new one. Returns (seconds, bytes)."""
        t0 = time.perf_counter()
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self._conn.request("GET", self.path)
                r = self._conn.getresponse()
                n = len(r.read())
                if r.will_close:
                    self._conn.close()
                    self._conn = None
                return time.perf_counter() - t0, n
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                t0 = time.perf_counter()  # the server had closed an idle connection: time the retry only
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def ours(fake: FakeNvml, min_interval: str = "0.000001", *flags: str) -> Server:  # 1 us: every scrape collects
    port = free_port()
    return Server([sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}",
                   f"--collect.min-interval={min_interval}", "--collect.timeout=60s", "--no-xid.journal",
                   "--log.level=error", *flags], fake, port)


def naive(fake: FakeNvml) -> Server:
    port = free_port()
    return Server([sys.executable, str(HERE / "naive_exporter.py"), str(port)], fake, port)


def paired_loops(servers: dict[str, Server], fake: FakeNvml, seconds: float, rounds: int = ROUNDS,
                 max_n: int = 2000, others: dict[str, Callable[[], dict[str, float]]] | None = None,
                 ) -> dict[str, dict[str, float]]:
    """Scrape each server in turn, in `rounds` blocks each, and take each figure's median over the blocks:
    these machines are shared, and a slow minute then weighs on every exporter alike rather than on
    whichever was being measured. A server whose scrape takes over a tenth of the budget gets one block.
    `others` (the C floor) run once per round between the servers' blocks, their figures as medians too."""
    others = others or {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in others}
    for server in servers.values():
        for _ in range(3):
            server.scrape()
    blocks: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    sizes: dict[str, list[int]] = {name: [] for name in servers}
    slow = {name: server.scrape()[0] > seconds / 10 for name, server in servers.items()}
    for r in range(rounds):
        for name, server in servers.items():
            if slow[name] and r:
                continue
            budget = seconds if slow[name] else seconds / rounds
            c0, n0, t0 = cpu_seconds(server.proc.pid), calls(fake), time.monotonic()
            n = 0
            while (time.monotonic() - t0 < budget or n < 3) and n < max_n // rounds:
                dt, size = server.scrape()
                latencies[name].append(dt)
                sizes[name].append(size)
                n += 1
            blocks[name].append({"cpu": (cpu_seconds(server.proc.pid) - c0) / n, "calls": (calls(fake) - n0) / n})
        for name, run in others.items():
            runs[name].append(run())
    out = {}
    for name in servers:
        lat = sorted(latencies[name])
        n = len(lat)
        out[name] = {"scrapes": n, "blocks": len(blocks[name]),
                     "cpu_ms": statistics.median(b["cpu"] for b in blocks[name]) * 1e3,
                     "p50_ms": lat[n // 2] * 1e3, "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1e3,
                     "nvml_calls": statistics.median(b["calls"] for b in blocks[name]),
                     "bytes": statistics.mean(sizes[name])}
    for name, results in runs.items():
        out[name] = {**results[0], "blocks": len(results),
                     **{k: statistics.median(r[k] for r in results) for k in ("cpu_ms", "p50_ms")}}
    return out


def nvitop_case(fake: FakeNvml, seconds: float) -> dict[str, float] | None:
    """nvitop-exporter collects on its own interval; figures are per collection."""
    if not Path(NVITOP).exists():
        return None
    port, interval = free_port(), 0.25
    server = Server([NVITOP, "--bind-address=127.0.0.1", f"--port={port}", f"--interval={interval}"], fake, port)
    try:
        time.sleep(1)
        c0, n0, t0 = cpu_seconds(server.proc.pid), calls(fake), time.monotonic()
        latencies, sizes = [], []
        while time.monotonic() - t0 < seconds:
            dt, size = get(server.url)
            latencies.append(dt)
            sizes.append(size)
            time.sleep(interval)
        elapsed = time.monotonic() - t0
        collections = elapsed / interval
        latencies.sort()
        return {"collections": collections, "cpu_ms": (cpu_seconds(server.proc.pid) - c0) * 1e3 / collections,
                "p50_ms": latencies[len(latencies) // 2] * 1e3, "p99_ms": latencies[-1] * 1e3,
                "nvml_calls": (calls(fake) - n0) / collections, "bytes": statistics.mean(sizes)}
    finally:
        server.stop()


def cref_block(fake: FakeNvml, seconds: float) -> dict[str, float]:
    """One run of the C floor: as many collections as fit `seconds` (a 64-GPU collection at 200 µs/call
    takes ~0.3 s), at least 3."""
    return _looped([str(CREF)], fake, seconds)


def collect_render_block(fake: FakeNvml, seconds: float) -> dict[str, float]:
    """One run of bench/collect_render.py: our collect + render without HTTP, looped as cref is (the figure
    cref.c's header compares the floor with)."""
    return _looped([sys.executable, str(HERE / "collect_render.py")], fake, seconds)


def _looped(argv: list[str], fake: FakeNvml, seconds: float) -> dict[str, float]:
    """Run a program that loops collections `-n` times and prints cref's JSON line; its figures."""
    calls_per_collection = 24 * len([k for k in fake.state if k.endswith(".uuid")])
    per_collection = calls_per_collection * float(fake.state.get("latency_us", 0)) * 1e-6
    n = max(3, min(300, int(seconds / max(per_collection, 1e-4))))
    out = subprocess.run([*argv, "-n", str(n)], env={**os.environ, **fake.env()}, cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    r = json.loads(out)
    return {"cpu_ms": r["cpu_us_per_collection"] / 1e3, "p50_ms": r["wall_us_per_collection"] / 1e3,
            "nvml_calls": r.get("nvml_calls_per_collection"), "bytes": r["bytes"]}


def rss_case(gpus: int, scrapes: int, tmp: Path) -> dict[str, float]:
    fake = FakeNvml(tmp / f"rss{gpus}", h100_node(gpus))
    server = ours(fake)
    try:
        at = {}
        for i in range(1, scrapes + 1):
            server.scrape()
            if i in (1000, scrapes):
                at[i] = rss_mib(server.proc.pid)
        return {"gpus": gpus, "rss_mib_at_1000": at[1000], f"rss_mib_at_{scrapes}": at[scrapes],
                "scrapes": scrapes}
    finally:
        server.stop()


def latency_case(tmp: Path, rounds: int = ROUNDS) -> dict[str, float]:
    """The 8-GPU / 1-GPU latency ratio at 200 µs/call, from two servers scraped in turn, a second each per
    round: the cases' own p50s are measured minutes apart, and this machine's speed drifts meanwhile."""
    servers = {}
    try:
        for gpus in (1, 8):
            state = h100_node(gpus)
            state["latency_us"] = "200"
            servers[gpus] = ours(FakeNvml(tmp / f"lat{gpus}", state))
            for _ in range(20):
                servers[gpus].scrape()
        latencies: dict[int, list[float]] = {1: [], 8: []}
        for _ in range(rounds):
            for gpus, server in servers.items():
                t0 = time.monotonic()
                while time.monotonic() - t0 < SECONDS_PER_CASE / rounds:
                    latencies[gpus].append(server.scrape()[0])
        p50 = {gpus: statistics.median(lat) * 1e3 for gpus, lat in latencies.items()}
        return {"p50_ms_1_gpu": p50[1], "p50_ms_8_gpus": p50[8], "ratio": p50[8] / p50[1]}
    finally:
        for server in servers.values():
            server.stop()


def idle_case(tmp: Path, seconds: float = IDLE_SECONDS) -> dict[str, float]:
    """CPU the exporter burns with no scrape at all, every source on: 8 GPUs, NVML events, and the journal
    follower on a journal directory (a real journal file, as tests/journal.py writes them). Read from
    /proc/PID/stat over `seconds` after the start-up has settled; no request is made meanwhile."""
    from tests.journal import write_journal

    fake = FakeNvml(tmp / "idle", h100_node(8))
    journal_dir = tmp / "idle-journal"
    journal_dir.mkdir()
    write_journal(journal_dir / "system.journal", [(time.time() - 60, "kernel: an unrelated line")])
    port = free_port()
    server = Server([sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}",
                     f"--xid.journal-path={journal_dir}", "--log.level=error"], fake, port)
    try:
        if server._conn is not None:
            server._conn.close()
        time.sleep(5)  # start-up: the first collections, event registration, journal backfill, gc freeze
        pid = server.proc.pid
        c0, s0, t0 = cpu_seconds(pid), thread_cpu_ns(pid), time.monotonic()
        time.sleep(seconds)
        cpu, ns, elapsed = cpu_seconds(pid) - c0, thread_cpu_ns(pid), time.monotonic() - t0
        run_ns = sum(v - s0.get(tid, 0) for tid, v in ns.items())
        return {"seconds": elapsed, "cpu_ms_per_s": run_ns / 1e6 / elapsed, "stat_cpu_ms_per_s": cpu * 1e3 / elapsed,
                "tick_ms": 1e3 / TICK}
    finally:
        server.stop()


def concurrency_case(tmp: Path, collections: int = 10) -> dict[str, float]:
    """NVML calls per second with 1 and with 100 scrapers hammering, at the default min-interval (1s).
    Measured over whole collection periods (from one collection to the 10th after it, as the pages'
    last-collection timestamps show): a fixed window would catch 5 or 6 collections by chance."""
    fake = FakeNvml(tmp / "conc", h100_node(8))
    server = ours(fake, "1s", "--web.max-connections=128")  # all 100 served (the default cap is 64)
    out = {}

    def stamp() -> str:
        with urllib.request.urlopen(server.url, timeout=120) as r:
            page = r.read().decode()
        return next(line for line in page.splitlines() if line.startswith("nvml_exporter_last_collect_timestamp"))

    try:
        for scrapers in (1, 100):
            stop = threading.Event()

            def hammer(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    get(server.url)

            threads = [threading.Thread(target=hammer) for _ in range(scrapers - 1)]  # and this one, observing
            for t in threads:
                t.start()
            last = stamp()
            while (now := stamp()) == last:
                pass
            last, seen = now, 0
            n0, t0 = calls(fake), time.monotonic()
            while seen < collections:
                if (now := stamp()) != last:
                    last, seen = now, seen + 1
            out[f"nvml_calls_per_s_{scrapers}_scrapers"] = (calls(fake) - n0) / (time.monotonic() - t0)
            stop.set()
            for t in threads:
                t.join()
    finally:
        server.stop()
    return out


def main() -> int:
    if sys.argv[1:] == ["--idle"]:  # only the idle figure: a minute instead of the whole run
        with tempfile.TemporaryDirectory() as d:
            idle = idle_case(Path(d))
        print(idle_line(idle))
        return 0
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform()}, "cases": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for gpus, lat in CASES:
            state = h100_node(gpus)
            if lat == "h200":
                state.update({k: str(v) for k, v in H200_LATENCY_US.items()})
            elif lat:
                state["latency_us"] = str(lat)
            fake = FakeNvml(tmp / f"g{gpus}l{lat}", state)
            case: dict[str, Any] = {"gpus": gpus, "latency_us": lat}
            servers: dict[str, Server] = {}
            try:
                servers["ours"] = ours(fake)
                servers["naive"] = naive(fake)
                block = SECONDS_PER_CASE / ROUNDS
                others = {"ours_collect_render": functools.partial(collect_render_block, fake, block)}
                if CREF.exists():
                    others["cref"] = functools.partial(cref_block, fake, block)
                case.update(paired_loops(servers, fake, SECONDS_PER_CASE, others=others))
            finally:
                for server in servers.values():
                    server.stop()
            case["nvitop"] = nvitop_case(fake, SECONDS_PER_CASE)
            results["cases"].append(case)
            print(f"  measured {gpus} GPUs, {lat} µs/call", file=sys.stderr)
        results["rss"] = [rss_case(gpus, RSS_SCRAPES, tmp) for gpus in (1, 8, 64)]
        results["latency_200us"] = latency_case(tmp)
        results["concurrency"] = concurrency_case(tmp)
        results["idle"] = idle_case(tmp)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return 0


SHOWN = {"ours_collect_render": "ours, no HTTP"}  # the table's names where the JSON's keys differ


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def report(r: dict[str, Any]) -> str:
    lines = ["| GPUs | µs/call | exporter | CPU ms/scrape | p50 ms | p99 ms | NVML calls | bytes | CPU vs ours |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in r["cases"]:
        base = c["ours"]["cpu_ms"]
        for name in ("ours", "ours_collect_render", "naive", "nvitop", "cref"):
            m, shown = c.get(name), SHOWN.get(name, name)
            if m is None:
                lines.append(f"| {c['gpus']} | {c['latency_us']} | {shown} | not run | | | | | |")
                continue
            lines.append(f"| {c['gpus']} | {c['latency_us']} | {shown} | {_f(m['cpu_ms'], 3)} | {_f(m['p50_ms'])} | "
                         f"{_f(m.get('p99_ms'))} | {_f(m['nvml_calls'], 0)} | {m['bytes']:.0f} | "
                         f"{m['cpu_ms'] / base:.2f} |")
    by = {(c["gpus"], c["latency_us"]): c for c in r["cases"]}
    c8 = by[(8, 0)]
    t = [
        ("CPU per scrape ≥ 10× lower than naive (8 GPUs)", c8["naive"]["cpu_ms"] / c8["ours"]["cpu_ms"], ">= 10"),
        ("CPU per scrape below nvitop-exporter's per collection (8 GPUs)",
         (c8["nvitop"]["cpu_ms"] / c8["ours"]["cpu_ms"]) if c8["nvitop"] else None, "> 1"),
        ("collect + render CPU within 2× of the C floor, compared as cref.c's header says (8 GPUs, 0 µs)",
         (c8["ours_collect_render"]["cpu_ms"] / c8["cref"]["cpu_ms"]) if c8.get("cref") else None, "<= 2"),
        ("whole scrape's CPU, HTTP included, over the C floor's (8 GPUs, 0 µs; the floor serves no HTTP)",
         (c8["ours"]["cpu_ms"] / c8["cref"]["cpu_ms"]) if c8.get("cref") else None, "<= 2 (stricter)"),
        ("8-GPU scrape latency / 1-GPU latency at 200 µs/call (p50s, scraped in turn)",
         r["latency_200us"]["ratio"], "<= 1.5"),
        ("the same from the two cases' own p50s, measured minutes apart",
         by[(8, 200)]["ours"]["p50_ms"] / by[(1, 200)]["ours"]["p50_ms"], "—"),
        ("8-GPU / 1-GPU scrape latency with a real H200's call costs (no goal set)",
         by[(8, "h200")]["ours"]["p50_ms"] / by[(1, "h200")]["ours"]["p50_ms"], "—"),
        ("NVML calls per scrape / naive's (8 GPUs)", c8["ours"]["nvml_calls"] / c8["naive"]["nvml_calls"], "<= 0.33"),
    ]
    lines += ["", "| target | measured | goal |", "|---|---:|---|"]
    lines += [f"| {name} | {_f(v)} | {goal} |" for name, v, goal in t]
    for x in r["rss"]:
        last = next(k for k in x if k.startswith("rss_mib_at_") and k != "rss_mib_at_1000")
        lines.append(f"| RSS at {x['gpus']} GPUs, scrape 1,000 → {x['scrapes']:,} (MiB) | "
                     f"{x['rss_mib_at_1000']:.1f} → {x[last]:.1f} | {RSS_GOALS.get(x['gpus'], 'flat (no size set)')} |")
    cc = r["concurrency"]
    many, one = cc["nvml_calls_per_s_100_scrapers"], cc["nvml_calls_per_s_1_scrapers"]
    lines.append(f"| NVML calls/s, 100 scrapers vs 1 (ratio) | {many:.1f} vs {one:.1f} ({many / one:.3f}) | "
                 "not higher (this resolves ~1 %) |")
    if "idle" in r:
        lines.append(idle_line(r["idle"]))
    return "\n".join(lines)


def idle_line(idle: dict[str, float]) -> str:
    return (f"| CPU with no scrape, 8 GPUs, events and journal on (ms per s over {idle['seconds']:.0f} s, from "
            f"schedstat; utime+stime in {idle['tick_ms']:.0f} ms ticks: {idle['stat_cpu_ms_per_s']:.2f}) | "
            f"{idle['cpu_ms_per_s']:.2f} | ≤ {IDLE_GOAL_MS_PER_S} |")


if __name__ == "__main__":
    raise SystemExit(main())
