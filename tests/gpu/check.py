"""The real-GPU check (run by tests/gpu/run.sh): nvml-exporter against nvidia-smi on the same board.

Writes into OUTDIR: summary.md (cross-check table, NVML latency per function, exporter vs C floor,
NOT_SUPPORTED readings, Xid event registration, diagnose report), metrics.txt, promtool.txt,
nvidia-smi-q.xml, diagnose.json, results.json. Needs only python3 with prometheus-client and
nvidia-ml-py; installs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
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
    ("nvidia_gpu_clock_hertz", ("graphics",), "clocks.gr", 1e6, 200e6, "DVFS moves clocks"),
    ("nvidia_gpu_clock_hertz", ("sm",), "clocks.sm", 1e6, 200e6, "DVFS moves clocks"),
    ("nvidia_gpu_clock_hertz", ("memory",), "clocks.mem", 1e6, 20e6, ""),
    ("nvidia_gpu_clock_hertz", ("video",), "clocks.video", 1e6, 200e6, ""),
    ("nvidia_gpu_clock_max_hertz", ("graphics",), "clocks.max.gr", 1e6, 0, ""),
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


LABELS = {"nvidia_gpu_clock_hertz": "clock", "nvidia_gpu_clock_max_hertz": "clock",
          "nvidia_gpu_retired_pages": "cause", "nvidia_gpu_fan_speed_ratio": "fan"}


def crosscheck(m: dict, rows: list[dict[str, str]]) -> tuple[list[str], int]:
    lines = ["| GPU | metric | exporter | nvidia-smi (converted) | tolerance | verdict |",
             "|---:|---|---:|---:|---:|---|"]
    bad = 0
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
            if ours is None and theirs is None:
                verdict = "both N/A"
            elif ours is None or theirs is None:
                verdict = f"MISMATCH: one side N/A ({raw!r})"
                bad += 1
            elif abs(ours - theirs) <= tol:
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
            ok = ours == theirs or theirs is None
            bad += not ok
            lines.append(f"| {i} | clock_event_active{{{reason}}} | {ours} | {theirs} (`{field}`) | 0 | "
                         f"{'ok' if ok else 'MISMATCH (instantaneous)'} |")
        info = next((dict(lab) for (n, lab) in m if n == "nvidia_gpu_info" and dict(lab).get("gpu") == str(i)), {})
        for label, field in IDENTITY:
            a, b = info.get(label, ""), row.get(field, "")
            ok = a.lower() == b.lower() or (label == "pci_bus_id" and a.lower().endswith(b.lower()[-12:]))
            bad += not ok
            lines.append(f"| {i} | info{{{label}}} | {a} | {b} | = | {'ok' if ok else 'MISMATCH'} |")
    return lines, bad


def nvml_latency() -> list[str]:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    calls = {
        "nvmlDeviceGetTemperature": lambda: pynvml.nvmlDeviceGetTemperature(h, 0),
        "nvmlDeviceGetPowerUsage": lambda: pynvml.nvmlDeviceGetPowerUsage(h),
        "nvmlDeviceGetEnforcedPowerLimit": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h),
        "nvmlDeviceGetClockInfo": lambda: pynvml.nvmlDeviceGetClockInfo(h, 1),
        "nvmlDeviceGetUtilizationRates": lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
        "nvmlDeviceGetEncoderUtilization": lambda: pynvml.nvmlDeviceGetEncoderUtilization(h),
        "nvmlDeviceGetMemoryInfo_v2": lambda: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2),
        "nvmlDeviceGetPerformanceState": lambda: pynvml.nvmlDeviceGetPerformanceState(h),
        "nvmlDeviceGetPersistenceMode": lambda: pynvml.nvmlDeviceGetPersistenceMode(h),
        "nvmlDeviceGetCurrPcieLinkGeneration": lambda: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h),
        "nvmlDeviceGetCurrentClocksEventReasons": lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(h),
        "nvmlDeviceGetComputeRunningProcesses_v3": lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h),
        "nvmlDeviceGetTemperatureThreshold": lambda: pynvml.nvmlDeviceGetTemperatureThreshold(h, 1),
        "nvmlDeviceGetEccMode": lambda: pynvml.nvmlDeviceGetEccMode(h),
        "nvmlDeviceGetNvLinkState": lambda: pynvml.nvmlDeviceGetNvLinkState(h, 0),
        "nvmlDeviceGetFieldValues (fast batch, 12 ids)":
            lambda: pynvml.nvmlDeviceGetFieldValues(h, [82, 83, 94, 3, 4, 74, 75, 76, 77, 78, 79, 230]),
        "nvmlDeviceGetFieldValues (slow batch, 9 ids)":
            lambda: pynvml.nvmlDeviceGetFieldValues(h, [5, 6, 29, 30, 31, 142, 143, 144, 145]),
        "nvmlDeviceGetFieldValues (NVLink, 18 links x 5)":
            lambda: pynvml.nvmlDeviceGetFieldValues(h, [(f, link) for link in range(18) for f in (165, 161, 162, 163)]
                                                    + [39, 40, 41, 42, 43, 44]),
    }
    lines = ["| function | median µs | p99 µs | result |", "|---|---:|---:|---|"]
    for name, fn in calls.items():
        times, result = [], "ok"
        for _ in range(200):
            t0 = time.perf_counter()
            try:
                fn()
            except pynvml.NVMLError as e:
                result = str(e)
            times.append((time.perf_counter() - t0) * 1e6)
        times.sort()
        lines.append(f"| {name} | {statistics.median(times):.1f} | {times[197]:.1f} | {result} |")
    return lines


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


def exporter_vs_cref(port: int, pid: int) -> dict[str, Any]:
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick

    url = f"http://127.0.0.1:{port}/metrics"
    for _ in range(5):
        urllib.request.urlopen(url, timeout=30).read()
    c0, n, lat = cpu(), 200, []
    for _ in range(n):
        t0 = time.perf_counter()
        urllib.request.urlopen(url, timeout=30).read()
        lat.append(time.perf_counter() - t0)
        time.sleep(0.002)
    ours = {"cpu_ms_per_scrape": (cpu() - c0) * 1e3 / n, "p50_ms": sorted(lat)[n // 2] * 1e3}
    cref_src = REPO.parent / "shared" / "bench" / "cref" / "cref.c"
    cref = CARRY / "cref"
    if not cref.exists() and cref_src.exists() and shutil.which("gcc"):
        cref = OUT / "cref-bin"
        sh(["gcc", "-O2", "-o", str(cref), str(cref_src), "-ldl"])
    result: dict[str, Any] = {"ours": ours}
    if cref.exists():
        out = sh([str(cref), "-n", "200", "-o", str(OUT / "cref-page.txt")])
        result["cref"] = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr}
        if cref == OUT / "cref-bin":
            cref.unlink()
        (OUT / "cref-page.txt").unlink(missing_ok=True)
    else:
        result["cref"] = {"error": "no cref binary and no gcc/cref.c here"}
    return result


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{SHIM}:{os.environ.get('PYTHONPATH', '')}"}
    summary = [f"# nvml-exporter on a real GPU — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    q = sh(["nvidia-smi", "-q", "-x"])
    (OUT / "nvidia-smi-q.xml").write_text(q.stdout)
    summary += ["```", sh(["nvidia-smi", "-L"]).stdout.strip(), sh(["nvidia-smi", "--version"]).stdout.strip(), "```",
                ""]
    port = 19400
    proc = subprocess.Popen([sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}",
                             "--collect.min-interval=1ms", "--log.level=warn"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(OUT / "exporter.log", "w"))  # noqa: SIM115
    try:
        page = ""
        for _ in range(300):
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
                if "nvidia_gpu_up{" in page:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        time.sleep(1.5)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        fields = sorted({f for *_, f, _, _, _ in CROSS} | {f for _, f in STATE_FIELDS} | set(EVENT_FIELDS.values())
                        | {f for _, f in IDENTITY})
        rows = smi_query(fields)
        (OUT / "metrics.txt").write_text(page)
        promtool = tool("promtool")
        check = sh([promtool, "check", "metrics"], input=page) if promtool else None
        promtool_text = ("promtool not available" if check is None else
                         f"rc={check.returncode}\n{check.stdout}{check.stderr}")
        m = parse_metrics(page)
        table, bad = crosscheck(m, rows)
        summary += ["## promtool check metrics", "", "```", promtool_text.strip(), "```", "",
                    f"## Cross-check against nvidia-smi ({bad} mismatches)", "", *table, ""]
        unsupported = sorted({dict(lab)["function"] for (n, lab) in m
                              if n == "nvml_exporter_nvml_errors_total" and dict(lab).get("error") == "not_supported"})
        summary += ["## NVML functions this board answers NOT_SUPPORTED", "",
                    *(f"- {f}" for f in unsupported or ["(none)"]), ""]
        perf = exporter_vs_cref(port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    summary += ["## Exporter vs the C floor (cref)", "", "```", json.dumps(perf, indent=2), "```", ""]
    summary += ["## NVML latency per function (GPU 0, 200 calls)", "", *nvml_latency(), ""]
    summary += ["## Xid event registration", "", *event_registration(), ""]
    diag = sh([sys.executable, "-m", "nvml_exporter", "diagnose"], env=env)
    diag_json = sh([sys.executable, "-m", "nvml_exporter", "diagnose", "--json"], env=env)
    (OUT / "diagnose.json").write_text(diag_json.stdout)
    summary += [f"## nvml-exporter diagnose (exit {diag.returncode})", "", "```", diag.stdout.strip(),
                diag.stderr.strip(), "```", ""]
    (OUT / "summary.md").write_text("\n".join(summary) + "\n")
    (OUT / "results.json").write_text(json.dumps({"mismatches": bad, "not_supported": unsupported, "perf": perf,
                                                  "diagnose_exit": diag.returncode}, indent=2) + "\n")
    print(f"wrote {OUT}: {bad} cross-check mismatches; diagnose exit {diag.returncode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
