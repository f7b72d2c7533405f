"""The real-GPU check (run by tests/gpu/run.sh): nvml-exporter against nvidia-smi on the same board.

Writes into OUTDIR: summary.md (cross-check table, NVML latency per function, exporter vs C floor,
NOT_SUPPORTED readings, Xid event registration, diagnose report), metrics.txt, promtool.txt,
nvidia-smi-q.xml, diagnose.json, results.json. Needs only python3 with prometheus-client and
nvidia-ml-py; installs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT = Path(sys.argv[1])
SHIM = Path(sys.argv[2])  # a folder holding nvml_exporter -> REPO/exporter
CARRY = REPO / "build" / "gpu-carry"  # promtool / cref built elsewhere, if this machine lacks them

# exporter metric (labels) -> (nvidia-smi --query-gpu field, factor from nvidia-smi units, tolerance, note)
CROSS: list[tuple[str, tuple[str, ...], str, float, float, str]] = [
    ("nvidia_gpu_temperature_celsius", (), "temperature.gpu", 1, 2, "instantaneous"),
    ("nvidia_gpu_memory_temperature_celsius", (), "temperature.memory", 1, 2, "instantaneous"),
    ("nvidia_gpu_power_watts", (), "power.draw", 1, 25, "sampled at different moments"),
    ("nvidia_gpu_power_limit_watts", (), "enforced.power.limit", 1, 0.5, ""),
    ("nvidia_gpu_power_default_limit_watts", (), "power.default_limit", 1, 0.5, ""),
    ("nvidia_gpu_clock_hertz", ("sm",), "clocks.sm", 1e6, 200e6, "DVFS moves clocks"),
    ("nvidia_gpu_clock_hertz", ("memory",), "clocks.mem", 1e6, 20e6, ""),
    ("nvidia_gpu_clock_max_hertz", ("sm",), "clocks.max.sm", 1e6, 0, ""),
    ("nvidia_gpu_clock_max_hertz", ("memory",), "clocks.max.mem", 1e6, 0, ""),
    ("nvidia_gpu_utilization_ratio", (), "utilization.gpu", 0.01, 0.1, "sample period"),
    ("nvidia_gpu_memory_utilization_ratio", (), "utilization.memory", 0.01, 0.1, "sample period"),
    ("nvidia_gpu_memory_total_bytes", (), "memory.total", 2**20, 2**20, "nvidia-smi rounds to MiB"),
    ("nvidia_gpu_memory_used_bytes", (), "memory.used", 2**20, 64 * 2**20, "nvidia-smi rounds to MiB"),
    ("nvidia_gpu_memory_free_bytes", (), "memory.free", 2**20, 64 * 2**20, "nvidia-smi rounds to MiB"),
    ("nvidia_gpu_memory_reserved_bytes", (), "memory.reserved", 2**20, 2**20, "nvidia-smi rounds to MiB"),
    ("nvidia_gpu_pcie_link_generation", (), "pcie.link.gen.current", 1, 0, ""),
    ("nvidia_gpu_pcie_link_max_generation", (), "pcie.link.gen.max", 1, 0, ""),
    ("nvidia_gpu_pcie_link_width", (), "pcie.link.width.current", 1, 0, ""),
    ("nvidia_gpu_pcie_link_max_width", (), "pcie.link.width.max", 1, 0, ""),
    ("nvidia_gpu_ecc_errors_total", ("corrected", "volatile"), "ecc.errors.corrected.volatile.total", 1, 0, ""),
    ("nvidia_gpu_ecc_errors_total", ("uncorrected", "volatile"), "ecc.errors.uncorrected.volatile.total", 1, 0, ""),
    ("nvidia_gpu_ecc_errors_total", ("corrected", "aggregate"), "ecc.errors.corrected.aggregate.total", 1, 0, ""),
    ("nvidia_gpu_ecc_errors_total", ("uncorrected", "aggregate"), "ecc.errors.uncorrected.aggregate.total", 1, 0,
     ""),
    ("nvidia_gpu_retired_pages", ("single_bit",), "retired_pages.sbe", 1, 0, ""),
    ("nvidia_gpu_retired_pages", ("double_bit",), "retired_pages.dbe", 1, 0, ""),
    ("nvidia_gpu_fan_speed_ratio", ("0",), "fan.speed", 0.01, 0.05, ""),
]
STATE_FIELDS = [("nvidia_gpu_performance_state", "pstate"), ("nvidia_gpu_persistence_mode", "persistence_mode"),
                ("nvidia_gpu_ecc_enabled", "ecc.mode.current")]
EVENT_FIELDS = {"gpu_idle": "clocks_event_reasons.gpu_idle", "sw_power_cap": "clocks_event_reasons.sw_power_cap",
                "hw_slowdown": "clocks_event_reasons.hw_slowdown",
                "hw_thermal_slowdown": "clocks_event_reasons.hw_thermal_slowdown",
                "hw_power_brake_slowdown": "clocks_event_reasons.hw_power_brake_slowdown",
                "sw_thermal_slowdown": "clocks_event_reasons.sw_thermal_slowdown",
                "sync_boost": "clocks_event_reasons.sync_boost"}
IDENTITY = [("uuid", "uuid"), ("name", "name"), ("pci_bus_id", "pci.bus_id"), ("serial", "serial"),
            ("vbios_version", "vbios_version")]


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def tool(name: str) -> str | None:
    return shutil.which(name) or (str(CARRY / name) if (CARRY / name).exists() else None)


def smi_query(fields: list[str]) -> list[dict[str, str]]:
    """One nvidia-smi row per GPU; fields this driver does not know are asked for one by one and left out."""
    known = []
    for f in fields:
        if sh(["nvidia-smi", f"--query-gpu={f}", "--format=csv,noheader,nounits"]).returncode == 0:
            known.append(f)
    out = sh(["nvidia-smi", f"--query-gpu={','.join(known)}", "--format=csv,noheader,nounits"]).stdout
    return [dict(zip(known, [c.strip() for c in line.split(",")], strict=False)) for line in out.splitlines() if line]


def parse_metrics(page: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def find(m: dict, name: str, gpu: int, **labels: str) -> float | None:
    for (n, lab), v in m.items():
        d = dict(lab)
        if n == name and d.get("gpu") == str(gpu) and all(d.get(k) == x for k, x in labels.items()):
            return v
    return None


def sparse(metric: str) -> bool:
    from nvml_exporter.metrics import BY_NAME

    return BY_NAME[metric].sparse


LABELS = {"nvidia_gpu_clock_hertz": "clock", "nvidia_gpu_clock_max_hertz": "clock",
          "nvidia_gpu_retired_pages": "cause", "nvidia_gpu_fan_speed_ratio": "fan"}


def compute_apps() -> dict[str, int]:
    """Compute processes per GPU UUID, as nvidia-smi lists them."""
    out = sh(["nvidia-smi", "--query-compute-apps=gpu_uuid", "--format=csv,noheader"]).stdout
    apps: dict[str, int] = {}
    for line in out.splitlines():
        if line.strip().startswith("GPU-"):
            apps[line.strip()] = apps.get(line.strip(), 0) + 1
    return apps


def crosscheck(m: dict, rows: list[dict[str, str]], loaded: bool = False) -> tuple[list[str], int]:
    """Under load, readings that move by the millisecond (a note says so) are held to 20 % and clock-event
    reasons are shown but not counted: nvidia-smi and the exporter sample them at different moments."""
    lines = ["| GPU | metric | exporter | nvidia-smi (converted) | tolerance | verdict |",
             "|---:|---|---:|---:|---:|---|"]
    bad = 0
    apps = compute_apps()
    for i, row in enumerate(rows):
        for metric, labels, field, factor, tol, note in CROSS:
            kw = ({LABELS[metric]: labels[0]} if metric in LABELS else
                  {"type": labels[0], "scope": labels[1]} if labels else {})
            ours = find(m, metric, i, **kw)
            raw = row.get(field)
            theirs = None
            try:
                theirs = float(raw) * factor if raw not in (None, "", "[N/A]", "N/A", "[Not Supported]") else None
            except ValueError:
                theirs = None
            if ours is None and theirs is not None and sparse(metric):
                ours = 0.0  # a sparse family's series is absent while it has only been 0 (docs/metrics.md)
            if ours is None and theirs is None:
                verdict = "both N/A"
            elif ours is None or theirs is None:
                verdict = f"MISMATCH: one side N/A ({raw!r})"
                bad += 1
            elif abs(ours - theirs) <= (max(tol, 0.2 * abs(theirs)) if loaded and note else tol):
                verdict = "ok"
            else:
                verdict = f"MISMATCH {note}".strip()
                bad += 1
            lines.append(f"| {i} | {metric}{'{' + ','.join(labels) + '}' if labels else ''} | {ours} | {theirs} "
                         f"(`{field}`) | {tol:g} | {verdict} |")
        for metric, field in STATE_FIELDS:
            ours, raw = find(m, metric, i), row.get(field, "")
            theirs = {"Enabled": 1.0, "Disabled": 0.0}.get(raw)
            if field == "pstate" and raw.startswith("P"):
                theirs = float(raw[1:])
            ok = ours == theirs
            bad += not ok
            lines.append(f"| {i} | {metric} | {ours} | {theirs} (`{field}`={raw}) | 0 | {'ok' if ok else 'MISMATCH'} |")
        for reason, field in EVENT_FIELDS.items():
            ours, raw = find(m, "nvidia_gpu_clock_event_active", i, reason=reason), row.get(field, "")
            theirs = {"Active": 1.0, "Not Active": 0.0}.get(raw)
            if ours is None and theirs is not None:
                ours = 0.0  # sparse: absent until the reason has been active once
            ok = ours == theirs or theirs is None
            bad += not ok and not loaded
            lines.append(f"| {i} | clock_event_active{{{reason}}} | {ours} | {theirs} (`{field}`) | 0 | "
                         f"{'ok' if ok else 'MISMATCH (instantaneous)'} |")
        info = next((dict(lab) for (n, lab) in m if n == "nvidia_gpu_info" and dict(lab).get("gpu") == str(i)), {})
        ours, theirs = find(m, "nvidia_gpu_compute_processes", i), float(apps.get(row.get("uuid", ""), 0))
        bad += ours != theirs
        lines.append(f"| {i} | nvidia_gpu_compute_processes | {ours} | {theirs} (`--query-compute-apps`) | 0 | "
                     f"{'ok' if ours == theirs else 'MISMATCH'} |")
        for label, field in IDENTITY:
            a, b = info.get(label, ""), row.get(field, "")
            ok = a.lower() == b.lower() or (label == "pci_bus_id" and a.lower().endswith(b.lower()[-12:]))
            bad += not ok
            lines.append(f"| {i} | info{{{label}}} | {a} | {b} | = | {'ok' if ok else 'MISMATCH'} |")
    return lines, bad


def field_errors() -> list[str]:
    """Field-value entries GPU 0 answers with an error (the exporter drops these quietly, once)."""
    import pynvml

    from nvml_exporter import nvml as nv

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    fields = [*nv.FAST_FIELDS, *nv.SLOW_FIELDS, *nv.nvlink_fields(0)]
    entries = pynvml.nvmlDeviceGetFieldValues(h, [(f.field_id, f.scope) for f in fields])
    return [f"nvmlDeviceGetFieldValues field {f.field_id} ({f.metric}{{{','.join(f.labels)}}}): "
            f"{nv.error_name(e.nvmlReturn)}" for f, e in zip(fields, entries, strict=True) if e.nvmlReturn]


def times(fn: Any, n: int) -> list[float]:
    """Seconds each of n calls of fn took."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def reader_profile(n: int = 200) -> tuple[list[str], dict[str, Any]]:
    """Every NVML call the exporter's own reader makes on GPU 0, timed in place (median/p99 over n reads
    of each tier), and the raw answers: values per tier, errors, and each field-value entry as NVML
    filled it in (return code, value type, raw value, latencyUsec), for making the fake answer alike."""
    import pynvml

    from nvml_exporter import nvml as nv
    from nvml_exporter.scheduling import FAST_CALL, SLOW_FIELDS, sweepable

    lib = nv.Library()
    lib.init()
    h = lib.handle_by_index(0)
    errors: dict[str, str] = {}
    reader = nv.GpuReader(h, lambda f, c: errors.setdefault(f, nv.error_name(c)))
    timings: dict[str, list[float]] = {}
    plain = reader._call

    def timed(key: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        result = plain(key, fn, *args)
        if key != "nvmlDeviceGetFieldValues":  # timed per batch below
            timings.setdefault(key, []).append(time.perf_counter() - t0)
        return result

    reader._call = timed  # type: ignore[method-assign]
    raw: dict[str, Any] = {"identity": dataclasses.asdict(reader.read_identity()), "static": reader.read_static(),
                           "slow": reader.read_slow(), "fast": reader.read_fast()}
    t0 = time.perf_counter()
    ports = reader._nvlink_ports()
    timings[f"nvmlDeviceGetNvLinkState x{len(ports) + 1} (port discovery, once)"] = [time.perf_counter() - t0]
    for _ in range(n):
        reader.read_fast()
    for _ in range(n // 4):
        reader.read_slow()
    # the fast tier's one-number getters are called inline, not through _call: timed as it calls them
    for _, _, key, fn, argv, *_ in reader._getters.plain if reader._getters else ():
        if fn is not None:
            timings[key] = times(lambda fn=fn, argv=argv: fn(*argv), n)
    for name, batch in (("fast, with NVLink", reader._fast), ("slow", reader._slow)):
        if batch.fields:
            key = f"nvmlDeviceGetFieldValues ({name} batch, {len(batch.fields)} entries)"
            timings[key] = times(lambda batch=batch: batch.read(h, plain, {}), n)
    raw["errors"] = errors
    raw["nvlink_ports"] = ports
    links = (f for link in range(nv.MAX_NVLINKS) for f in nv.nvlink_fields(link))
    everything = [*nv.FAST_FIELDS, *nv.SLOW_FIELDS, *links]
    entries = [e for i in range(0, len(everything), 64)  # in chunks, as no driver documents a maximum
               for e in pynvml.nvmlDeviceGetFieldValues(h, [(f.field_id, f.scope) for f in everything[i:i + 64]])]
    raw["field_values"] = [
        {"field": f.field_id, "scope": f.scope, "metric": f.metric, "labels": list(f.labels),
         "return": nv.error_name(e.nvmlReturn) if e.nvmlReturn else "success", "value_type": e.valueType,
         "raw": e.value.ullVal, "latency_us": e.latencyUsec}
        for f, e in zip(everything, entries, strict=True)
    ]
    raw["values"] = {tier: {m: {",".join(k): v for k, v in series.items()} for m, series in raw.pop(tier).items()}
                     for tier in ("static", "slow", "fast")}
    lines = ["| call (as the exporter makes it) | calls | median µs | p99 µs |", "|---|---:|---:|---:|"]
    for key, ts in sorted(timings.items()):
        ts.sort()
        p99 = ts[min(len(ts) - 1, int(len(ts) * 0.99))]
        lines.append(f"| {key} | {len(ts)} | {statistics.median(ts) * 1e6:.1f} | {p99 * 1e6:.1f} |")
    reads = {tier: statistics.median(times(fn, 50)) * 1e3
             for tier, fn in (("fast", reader.read_fast), ("slow", reader.read_slow))}
    swept = sweepable(reader)
    lines += ["", f"One whole read of GPU 0 (median of 50): fast tier {reads['fast']:.2f} ms, slow tier "
              f"{reads['slow']:.2f} ms; quickest call of the last fast read {reader.fastest_call * 1e6:.1f} µs, "
              f"field values {reader.field_seconds * 1e3:.2f} ms by the driver's account (the collector "
              f"sweeps GPUs one after another below {FAST_CALL * 1e6:.0f} µs and {SLOW_FIELDS * 1e3:g} ms; "
              f"this one: {'swept' if swept else 'own thread'})."]
    raw["read_ms"] = reads
    raw["timings_us"] = {k: {"median": statistics.median(v) * 1e6, "n": len(v)} for k, v in timings.items()}
    return lines, raw


def driver_experiments(n: int = 50) -> tuple[list[str], dict[str, Any]]:
    """What a field-value batch's time is made of, how fresh the energy counter is, and whether
    concurrent field-value calls overlap in the driver and answer alike (nvml.md §4.1)."""
    import pynvml

    from nvml_exporter import nvml as nv

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    ids = [f.field_id for f in (*nv.FAST_FIELDS, *nv.SLOW_FIELDS)]
    out: dict[str, Any] = {}

    def median_us(fn: Any) -> float:
        return statistics.median(times(fn, n)) * 1e6

    per_field = {fid: median_us(lambda fid=fid: pynvml.nvmlDeviceGetFieldValues(h, [fid])) for fid in ids}
    fast_ids = [f.field_id for f in nv.FAST_FIELDS]
    out["per_field_us"] = per_field
    out["fast_batch_us"] = median_us(lambda: pynvml.nvmlDeviceGetFieldValues(h, fast_ids))
    out["fast_batch_without_energy_us"] = median_us(
        lambda: pynvml.nvmlDeviceGetFieldValues(h, [i for i in fast_ids if i != 83]))
    out["energy_getter_us"] = median_us(lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
    out["power_getter_us"] = median_us(lambda: pynvml.nvmlDeviceGetPowerUsage(h))
    samples = []
    for _ in range(20):
        e = pynvml.nvmlDeviceGetFieldValues(h, [83])[0]
        samples.append((time.monotonic(), e.timestamp, e.value.ullVal, e.latencyUsec))
        time.sleep(0.005)
    out["energy_samples"] = samples
    distinct = len({s[2] for s in samples})
    span_ms = (samples[-1][0] - samples[0][0]) * 1e3

    def batch_loop(k: int, bad: list[int]) -> None:
        for _ in range(k):
            for e in pynvml.nvmlDeviceGetFieldValues(h, fast_ids):
                if e.nvmlReturn != pynvml.NVML_SUCCESS:
                    bad.append(e.fieldId)

    wall = {}
    for threads in (1, 2, 4):
        bad: list[int] = []
        workers = [threading.Thread(target=batch_loop, args=(40 // threads, bad)) for _ in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall[threads] = ((time.perf_counter() - t0) * 1e3, sorted(set(bad)))
    out["concurrency"] = {str(k): {"wall_ms": v[0], "failed_fields": v[1]} for k, v in wall.items()}
    lines = ["| field id | alone, median µs |", "|---:|---:|",
             *(f"| {fid} | {us:.1f} |" for fid, us in per_field.items()), "",
             f"- fast batch ({len(fast_ids)} ids): {out['fast_batch_us']:.1f} µs; without field 83 (energy): "
             f"{out['fast_batch_without_energy_us']:.1f} µs",
             f"- nvmlDeviceGetTotalEnergyConsumption: {out['energy_getter_us']:.1f} µs; "
             f"nvmlDeviceGetPowerUsage: {out['power_getter_us']:.1f} µs",
             f"- field 83 read 20 times over {span_ms:.0f} ms: {distinct} distinct values",
             "- 40 fast batches on GPU 0 from 1, 2 and 4 threads at once: "
             + "; ".join(f"{k} thread(s) {v[0]:.1f} ms, entries failed: {v[1] or 'none'}" for k, v in wall.items())]
    return lines, out


def loaded_crosscheck(port: int) -> tuple[list[str], dict[str, Any]]:
    """The cross-check again while the GPU works (a bf16 matrix-product loop through torch, where this
    python has it): utilisation, power, clocks, memory and the process count must follow."""
    script = ("import time, torch\n"
              "a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)\n"
              "t = time.time()\n"
              "while time.time() - t < 20:\n"
              "    a @ a\n"
              "    torch.cuda.synchronize()\n")
    if sh([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"]).returncode != 0:
        return ["torch with CUDA is not available to this python: not run."], {}
    load = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(8)
        if load.poll() is not None:
            return [f"the load did not start: {load.stderr.read().decode()[-2000:]}"], {}  # type: ignore[union-attr]
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        fields = sorted({f for *_, f, _, _, _ in CROSS} | {f for _, f in STATE_FIELDS}
                        | set(EVENT_FIELDS.values()) | {f for _, f in IDENTITY})
        table, bad = crosscheck(parse_metrics(page), smi_query(fields), loaded=True)
    finally:
        load.kill()
        load.wait()
    return [f"{bad} mismatches (instantaneous readings held to 20 %, clock-event reasons not counted).", "",
            *table], {"mismatches_loaded": bad, "page": page}


def event_registration() -> list[str]:
    import pynvml

    pynvml.nvmlInit()
    lines = []
    es = pynvml.nvmlEventSetCreate()
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        try:
            supported = pynvml.nvmlDeviceGetSupportedEventTypes(h)
            wanted = supported & (0x8 | 0x2 | 0x4000 | 0x8000)
            pynvml.nvmlDeviceRegisterEvents(h, wanted, es)
            lines.append(f"- GPU {i}: supported event types {supported:#x}; registered {wanted:#x} (Xid: "
                         f"{'yes' if wanted & 0x8 else 'no'})")
        except pynvml.NVMLError as e:
            lines.append(f"- GPU {i}: registration failed: {e}")
    try:
        pynvml.nvmlEventSetWait(es, 100)
        lines.append("- a wait of 100 ms returned an event (an Xid is pending?)")
    except pynvml.NVMLError as e:
        lines.append(f"- a wait of 100 ms returned: {e} (expected: Timeout)")
    pynvml.nvmlEventSetFree(es)
    return lines


def scrape_cost(port: int, pid: int, n: int = 200) -> dict[str, float]:
    """Server CPU per scrape from the process's own counters, and client latency, over n scrapes made as
    Prometheus makes them: over one kept-alive connection, or a new one where the server closes it."""
    import http.client

    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick

    conn: list[http.client.HTTPConnection] = []

    def scrape() -> int:
        if not conn:
            conn.append(http.client.HTTPConnection("127.0.0.1", port, timeout=30))
        conn[0].request("GET", "/metrics")
        r = conn[0].getresponse()
        size = len(r.read())
        if r.will_close:
            conn.pop().close()
        return size

    for _ in range(5):
        scrape()
    c0, lat, size = cpu(), [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        size = scrape()
        lat.append(time.perf_counter() - t0)
        time.sleep(0.002)
    lat.sort()
    if conn:
        conn[0].close()
    return {"cpu_ms_per_scrape": (cpu() - c0) * 1e3 / n, "p50_ms": lat[n // 2] * 1e3,
            "p99_ms": lat[int(n * 0.99)] * 1e3, "bytes": size}


def wait_up(port: int, proc: subprocess.Popen[bytes], marker: str) -> str:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before serving")
        try:
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
            if marker in page:
                return page
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("did not serve within 30 s")


def naive_cost(env: dict[str, str]) -> dict[str, Any]:
    """bench/naive_exporter.py (the tutorial-style baseline of `make bench`) over the real driver."""
    port = 19402
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "naive_exporter.py"), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(port, proc, "nvidia_gpu")
        return scrape_cost(port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cref_cost() -> dict[str, Any]:
    cref_src = REPO / "bench" / "cref" / "cref.c"  # the C floor, in the repo (make bench builds it too)
    cref = CARRY / "cref"
    if not cref.exists() and shutil.which("gcc"):
        cref = OUT / "cref-bin"
        sh(["gcc", "-O2", "-std=c11", "-o", str(cref), str(cref_src), "-ldl"])
    if not cref.exists():
        return {"error": "no cref binary (make gpu-carry) and no gcc here"}
    try:
        out = sh([str(cref), "-n", "200", "-o", str(OUT / "cref-page.txt")])
        return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr}
    finally:
        if cref == OUT / "cref-bin":
            cref.unlink()
        (OUT / "cref-page.txt").unlink(missing_ok=True)


class Report:
    """summary.md, rewritten after every section, so that whatever ran comes back even if a later
    section fails or the time limit stops the run. A failing section is reported, not hidden."""

    def __init__(self, title: str):
        self.lines = [f"# {title} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
        self.failed: list[str] = []

    def section(self, heading: str, fn: Any) -> Any:
        t0 = time.monotonic()
        try:
            body, result = fn()
        except Exception:
            self.failed.append(heading)
            body, result = ["```", traceback.format_exc().strip(), "```"], None
        self.lines += [f"## {heading}", "", *body, "", f"<sub>{time.monotonic() - t0:.1f} s</sub>", ""]
        (OUT / "summary.md").write_text("\n".join(self.lines) + "\n")
        print(f"{heading}: {'FAILED' if heading in self.failed else 'done'}", flush=True)
        return result


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(SHIM))
    env = {**os.environ, "PYTHONPATH": f"{SHIM}:{os.environ.get('PYTHONPATH', '')}"}
    report = Report("nvml-exporter on a real GPU")
    results: dict[str, Any] = {}

    def board() -> tuple[list[str], None]:
        (OUT / "nvidia-smi-q.xml").write_text(sh(["nvidia-smi", "-q", "-x"]).stdout)
        return ["```", sh(["nvidia-smi", "-L"]).stdout.strip(), sh(["nvidia-smi", "--version"]).stdout.strip(),
                f"python {sys.version.split()[0]}; nvidia-ml-py {dist_version('nvidia-ml-py')}; prometheus-client "
                f"{dist_version('prometheus-client')}; {os.uname().sysname} {os.uname().release}", "```"], None

    report.section("Board", board)
    port = 19400
    proc = subprocess.Popen([sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}",
                             "--collect.min-interval=1ms", "--log.level=warn"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(OUT / "exporter.log", "w"))  # noqa: SIM115
    try:
        def scrape() -> tuple[list[str], dict]:
            wait_up(port, proc, "nvidia_gpu_up{")
            time.sleep(1.5)
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
            (OUT / "metrics.txt").write_text(page)
            promtool = tool("promtool")
            check = sh([promtool, "check", "metrics"], input=page) if promtool else None
            text = "promtool not available" if check is None else f"rc={check.returncode}\n{check.stdout}{check.stderr}"
            results["promtool_rc"] = None if check is None else check.returncode
            return ["```", text.strip(), "```"], parse_metrics(page)

        m = report.section("promtool check metrics", scrape) or {}

        def cross() -> tuple[list[str], None]:
            fields = sorted({f for *_, f, _, _, _ in CROSS} | {f for _, f in STATE_FIELDS}
                            | set(EVENT_FIELDS.values()) | {f for _, f in IDENTITY})
            table, bad = crosscheck(m, smi_query(fields))
            results["mismatches"] = bad
            return [f"{bad} mismatches.", "", *table], None

        report.section("Cross-check against nvidia-smi", cross)

        def unsupported() -> tuple[list[str], None]:
            names = sorted({dict(lab)["function"] for (n, lab) in m if n == "nvml_exporter_nvml_errors_total"
                            and dict(lab).get("error") == "not_supported"})
            names += field_errors()
            results["not_supported"] = names
            return [f"- {f}" for f in names or ["(none)"]], None

        report.section("NVML functions this board answers NOT_SUPPORTED", unsupported)

        def perf() -> tuple[list[str], None]:
            perf = {"ours": scrape_cost(port, proc.pid)}
            for name, fn in (("naive", lambda: naive_cost(env)), ("cref", cref_cost)):
                try:
                    perf[name] = fn()
                except Exception:  # reported in the table; ours is still worth having
                    perf[name] = {"error": traceback.format_exc()}
            results["perf"] = perf
            lines = ["| exporter | CPU ms/scrape | p50 ms | p99 ms | bytes | CPU vs ours |",
                     "|---|---:|---:|---:|---:|---:|"]
            ours = perf["ours"]["cpu_ms_per_scrape"]
            for name in ("ours", "naive"):
                r = perf[name]
                if "error" in r:
                    lines.append(f"| {name} | failed (see below) | | | | |")
                    continue
                lines.append(f"| {name} | {r['cpu_ms_per_scrape']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                             f"{r['bytes']} | {r['cpu_ms_per_scrape'] / ours:.2f} |")
            c = perf["cref"]
            if "cpu_us_per_collection" in c:
                lines.append(f"| cref (C floor) | {c['cpu_us_per_collection'] / 1e3:.3f} | "
                             f"{c['wall_us_per_collection'] / 1e3:.2f} | — | {c.get('bytes')} | "
                             f"{c['cpu_us_per_collection'] / 1e3 / ours:.2f} |")
            return [*lines, "", "```", json.dumps(perf, indent=2), "```"], None

        report.section("Exporter vs naive and the C floor (200 scrapes each)", perf)

        def under_load() -> tuple[list[str], None]:
            lines, got = loaded_crosscheck(port)
            if "page" in got:
                (OUT / "metrics-loaded.txt").write_text(got.pop("page"))
            results.update(got)
            return lines, None

        report.section("Cross-check against nvidia-smi under load", under_load)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def profile() -> tuple[list[str], None]:
        lines, raw = reader_profile()
        (OUT / "raw.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
        return lines, None

    report.section("NVML time per call, as the exporter makes them (GPU 0)", profile)

    def experiments() -> tuple[list[str], None]:
        lines, got = driver_experiments()
        results["driver"] = got
        return lines, None

    report.section("What a field-value call costs (GPU 0)", experiments)
    report.section("Xid event registration", lambda: (event_registration(), None))

    def diagnose() -> tuple[list[str], None]:
        diag = sh([sys.executable, "-m", "nvml_exporter", "diagnose"], env=env)
        diag_json = sh([sys.executable, "-m", "nvml_exporter", "diagnose", "--json"], env=env)
        (OUT / "diagnose.json").write_text(diag_json.stdout)
        results["diagnose_exit"] = diag.returncode
        return [f"exit {diag.returncode}", "", "```", diag.stdout.strip(), diag.stderr.strip(), "```"], None

    report.section("nvml-exporter diagnose", diagnose)
    results["failed_sections"] = report.failed
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}: {results.get('mismatches')} cross-check mismatches; diagnose exit "
          f"{results.get('diagnose_exit')}; failed sections: {report.failed or 'none'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
