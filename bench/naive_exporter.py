"""A baseline exporter written the way tutorials do it: on every scrape, one pynvml call per metric and
prometheus_client Gauge objects set one by one. Same metric set as nvml-exporter, for `make bench` only.

    LD_LIBRARY_PATH=... FAKE_NVML_STATE=... python bench/naive_exporter.py PORT
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pynvml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

REG = CollectorRegistry()
L = ["gpu", "uuid"]


def g(name: str, *extra: str) -> Gauge:
    return Gauge(name, name, L + list(extra), registry=REG)


INFO = g("nvidia_gpu_info", "name", "pci_bus_id", "serial", "vbios_version", "minor_number")
TEMP, MEMTEMP, THRESH = g("nvidia_gpu_temperature_celsius"), g("nvidia_gpu_memory_temperature_celsius"), \
    g("nvidia_gpu_temperature_threshold_celsius", "threshold")
POWER, LIMIT, DEFLIM, ENERGY = g("nvidia_gpu_power_watts"), g("nvidia_gpu_power_limit_watts"), \
    g("nvidia_gpu_power_default_limit_watts"), g("nvidia_gpu_energy_joules")
CLOCK, MAXCLOCK = g("nvidia_gpu_clock_hertz", "clock"), g("nvidia_gpu_clock_max_hertz", "clock")
UTIL, MEMUTIL, ENC, DEC = g("nvidia_gpu_utilization_ratio"), g("nvidia_gpu_memory_utilization_ratio"), \
    g("nvidia_gpu_encoder_utilization_ratio"), g("nvidia_gpu_decoder_utilization_ratio")
MEM = g("nvidia_gpu_memory_bytes", "kind")
PSTATE, PERSIST = g("nvidia_gpu_performance_state"), g("nvidia_gpu_persistence_mode")
PCIE = g("nvidia_gpu_pcie_link", "what")
REPLAY = g("nvidia_gpu_pcie_replay_errors")
EVENT = g("nvidia_gpu_clock_event_active", "reason")
VIOL = g("nvidia_gpu_clock_event_duration_seconds", "reason")
ECCON, ECC = g("nvidia_gpu_ecc_enabled"), g("nvidia_gpu_ecc_errors", "type", "scope")
RETIRED, RETPEND = g("nvidia_gpu_retired_pages", "cause"), g("nvidia_gpu_retired_pages_pending")
REMAP = g("nvidia_gpu_remapped_rows", "what")
NVUP, NVERR = g("nvidia_gpu_nvlink_up", "link"), g("nvidia_gpu_nvlink_errors", "link", "type")
RECOV, PROCS = g("nvidia_gpu_recovery_action"), g("nvidia_gpu_compute_processes")
REASONS = ["gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
           "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting"]


def field(h: object, fid: int) -> float:
    v = pynvml.nvmlDeviceGetFieldValues(h, [fid])[0]
    if v.nvmlReturn:
        raise pynvml.NVMLError(v.nvmlReturn)
    return float(v.value.uiVal if v.valueType == 1 else v.value.ullVal)


def update() -> None:
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        uuid = pynvml.nvmlDeviceGetUUID(h)
        lab = (str(i), uuid)

        def put(gauge: Gauge, fn, *extra: str, scale: float = 1.0) -> None:  # type: ignore[no-untyped-def]
            try:
                gauge.labels(*lab, *extra).set(float(fn()) * scale)
            except pynvml.NVMLError:
                pass  # tutorials swallow unsupported readings, and ask again next scrape

        try:
            INFO.labels(*lab, pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetPciInfo(h).busId,
                        pynvml.nvmlDeviceGetSerial(h), pynvml.nvmlDeviceGetVbiosVersion(h),
                        str(pynvml.nvmlDeviceGetMinorNumber(h))).set(1)
        except pynvml.NVMLError:
            pass
        put(TEMP, lambda: pynvml.nvmlDeviceGetTemperature(h, 0))
        put(MEMTEMP, lambda: field(h, 82))
        for t, name in enumerate(["shutdown", "slowdown", "memory_max", "gpu_max"]):
            put(THRESH, lambda t=t: pynvml.nvmlDeviceGetTemperatureThreshold(h, t), name)
        put(POWER, lambda: pynvml.nvmlDeviceGetPowerUsage(h), scale=1e-3)
        put(LIMIT, lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h), scale=1e-3)
        put(DEFLIM, lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h), scale=1e-3)
        put(ENERGY, lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h), scale=1e-3)
        for c, name in enumerate(["graphics", "sm", "memory", "video"]):
            put(CLOCK, lambda c=c: pynvml.nvmlDeviceGetClockInfo(h, c), name, scale=1e6)
            put(MAXCLOCK, lambda c=c: pynvml.nvmlDeviceGetMaxClockInfo(h, c), name, scale=1e6)
        put(UTIL, lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu, scale=0.01)
        put(MEMUTIL, lambda: pynvml.nvmlDeviceGetUtilizationRates(h).memory, scale=0.01)
        put(ENC, lambda: pynvml.nvmlDeviceGetEncoderUtilization(h)[0], scale=0.01)
        put(DEC, lambda: pynvml.nvmlDeviceGetDecoderUtilization(h)[0], scale=0.01)
        for kind in ("total", "used", "free", "reserved"):
            put(MEM, lambda kind=kind: getattr(pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2), kind),
                kind)
        put(PSTATE, lambda: pynvml.nvmlDeviceGetPerformanceState(h))
        put(PERSIST, lambda: pynvml.nvmlDeviceGetPersistenceMode(h))
        put(PCIE, lambda: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h), "gen")
        put(PCIE, lambda: pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h), "max_gen")
        put(PCIE, lambda: pynvml.nvmlDeviceGetCurrPcieLinkWidth(h), "width")
        put(PCIE, lambda: pynvml.nvmlDeviceGetMaxPcieLinkWidth(h), "max_width")
        put(REPLAY, lambda: pynvml.nvmlDeviceGetPcieReplayCounter(h))
        for bit, name in enumerate(REASONS):
            put(EVENT, lambda bit=bit: (pynvml.nvmlDeviceGetCurrentClocksEventReasons(h) >> bit) & 1, name)
        for p, name in enumerate(["power", "thermal", "sync_boost", "board_limit", "low_utilization", "reliability"]):
            put(VIOL, lambda p=p: pynvml.nvmlDeviceGetViolationStatus(h, p).violationTime, name, scale=1e-9)
        put(ECCON, lambda: pynvml.nvmlDeviceGetEccMode(h)[0])
        for e, t in enumerate(["corrected", "uncorrected"]):
            for c, scope in enumerate(["volatile", "aggregate"]):
                put(ECC, lambda e=e, c=c: pynvml.nvmlDeviceGetTotalEccErrors(h, e, c), t, scope)
        put(RETIRED, lambda: len(pynvml.nvmlDeviceGetRetiredPages(h, 0)), "single_bit")
        put(RETIRED, lambda: len(pynvml.nvmlDeviceGetRetiredPages(h, 1)), "double_bit")
        put(RETPEND, lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h))
        for k, name in enumerate(["correctable", "uncorrectable", "pending", "failed"]):
            put(REMAP, lambda k=k: pynvml.nvmlDeviceGetRemappedRows(h)[k], name)
        for link in range(18):
            try:
                up = pynvml.nvmlDeviceGetNvLinkState(h, link)
            except pynvml.NVMLError:
                break
            NVUP.labels(*lab, str(link)).set(up)
            for c, t in enumerate(["replay", "recovery", "crc_flit", "crc_data"]):
                put(NVERR, lambda link=link, c=c: pynvml.nvmlDeviceGetNvLinkErrorCounter(h, link, c), str(link), t)
        put(RECOV, lambda: field(h, 230))
        put(PROCS, lambda: len(pynvml.nvmlDeviceGetComputeRunningProcesses(h)))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        update()
        body = generate_latest(REG)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    pynvml.nvmlInit()
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
