"""Write scenarios for the fake libnvidia-ml.so.1 and read back what it counted.

The H100 SXM5 profile follows captures of real boards (nvidia-smi -q and NVML, driver 580,
8x H100 80GB HBM3): no fans (GetNumFans answers 0), no retired pages (row remapping instead), 18 NVLink
links, ECC on, thresholds 92/89/87/95 C, 700 W limit; event types as a real Hopper board on 580 reports
them. `h200_vm()` is the H200 our GPU check ran on (docs/hardware/), with its measured call latencies.
`python -m tests.fakenvml.scenario` prints the shipped 8-GPU demo scenario; a test keeps the shipped
file equal to it.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY_DIR = REPO / "build" / "fakenvml"
LIBRARY = LIBRARY_DIR / "libnvidia-ml.so.1"
SHIPPED_H100X8 = Path(__file__).resolve().parent / "scenarios" / "h100x8.conf"

MIB = 1024 * 1024
# PCI bus numbers of the 8 GPUs in the real 8x H100 capture
H100_BUSES = ("53", "64", "75", "86", "97", "A8", "B9", "CA")

XID_CRITICAL = 0x8
# What a Hopper board on driver 580 supports (real H200, docs/hardware/h200-580.159.04.md): ECC, pstate, Xid,
# clock, power source, MIG config, SBE storm, retirement, poison, GPU unavailable, recovery action.
EVENTS_HOPPER_580 = 0xFF9F

# NVML time per call on a real H200 (driver 580.159.04, medians of docs/hardware/h200-580.159.04.md) for
# the calls that cost more than the fake's own few microseconds. The energy counter dominates a read.
H200_LATENCY_US = {
    "latency_us.field.83": 2800, "latency_us.field.75": 610, "latency_us.field.94": 145,
    "latency_us.nvmlDeviceGetTotalEnergyConsumption": 3100,
    "latency_us.nvmlDeviceGetTemperatureThreshold": 170, "latency_us.nvmlDeviceGetEccMode": 143,
    "latency_us.nvmlDeviceGetNumFans": 206, "latency_us.nvmlDeviceGetMaxClockInfo": 800,
    "latency_us.nvmlDeviceGetMaxPcieLinkGeneration": 279, "latency_us.nvmlDeviceGetMaxPcieLinkWidth": 82,
    "latency_us.nvmlDeviceGetCurrPcieLinkWidth": 32, "latency_us.nvmlDeviceGetComputeRunningProcesses_v3": 11,
}


def gpu_uuid(index: int) -> str:
    return "GPU-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"nvml-exporter-fake-h100-{index}"))


def h100_sxm(index: int, *, load: bool = True) -> dict[str, str]:
    """One H100 SXM5 80GB, busy training (load=True) or idle as in the captures."""
    bus = H100_BUSES[index] if index < len(H100_BUSES) else f"{(0x18 + index * 3) % 256:02X}"
    busy = {
        "temp": 60 + index % 7, "mem_temp": 68 + index % 5, "power_mw": 640_000 + 3_000 * index,
        "util_gpu": 97, "util_mem": 61, "pstate": 0, "throttle": "0x0",
        "clock.graphics": 1980, "clock.sm": 1980, "clock.mem": 2619, "clock.video": 1545,
        "mem_used": 71_500 * MIB, "procs": f"{41000 + index}:{71_000 * MIB}",
        "energy_mj": f"{1_250_000_000 + 7_000_000 * index}+{640_000 + 3_000 * index}/s",
    }
    idle = {
        "temp": 30 + index % 3, "mem_temp": 37 + index % 3, "power_mw": 68_000 + 500 * index,
        "util_gpu": 0, "util_mem": 0, "pstate": 0, "throttle": "0x1",
        "clock.graphics": 345, "clock.sm": 345, "clock.mem": 2619, "clock.video": 765,
        "mem_used": 0, "procs": "",
        "energy_mj": f"{98_000_000 + 1_000_000 * index}+{68_000 + 500 * index}/s",
    }
    g: dict[str, object] = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": gpu_uuid(index),
        "serial": str(1650000000001 + index),
        "bus_id": f"00000000:{bus}:00.0",
        "vbios": "96.00.99.00.01",
        "board_part": "692-2G520-0200-000",
        "minor": index,
        "pci_device_id": "0x233010DE",
        "pci_subsystem_id": "0x16C110DE",
        "arch": 9,
        "cc_major": 9,
        "cc_minor": 0,
        "threshold.shutdown": 92, "threshold.slowdown": 89, "threshold.gpu_max": 87, "threshold.mem_max": 95,
        # T.Limit offsets (fields 193/194) as nvidia-smi prints them on every >=545 Hopper capture
        "tlimit.shutdown": -8, "tlimit.slowdown": -2,
        "power_limit_mw": 700_000, "power_default_mw": 700_000, "power_min_mw": 200_000, "power_max_mw": 700_000,
        "clock_max.graphics": 1980, "clock_max.sm": 1980, "clock_max.mem": 2619, "clock_max.video": 1545,
        "util_enc": 0, "util_dec": 0,
        "mem_total": 81_559 * MIB, "mem_reserved": 480 * MIB,
        "bar1_total": 131_072 * MIB, "bar1_used": MIB,
        "persistence": 1, "compute_mode": 0, "mig_mode": 0,
        "pcie_gen": 5, "pcie_gen_max": 5, "pcie_width": 16, "pcie_width_max": 16,
        "pcie_tx_kbs": 502, "pcie_rx_kbs": 578,
        "pcie_replay": (150, 144, 174, 158, 145, 172, 162, 106)[index % 8],
        "throttle_supported": "0x1ff",
        "violation.power": 7_014_307_013_000 + index, "violation.thermal": 0, "violation.sync_boost": 0,
        "violation.board_limit": 0, "violation.low_util": 0, "violation.reliability": 0,
        "ecc_mode": 1, "ecc_pending": 1,
        "ecc.sbe_vol": 0, "ecc.dbe_vol": 0, "ecc.sbe_agg": 0, "ecc.dbe_agg": 0,
        "remap_cor": 0, "remap_unc": 0, "remap_pending": 0, "remap_failure": 0,
        "recovery_action": 0,
        "nvlink_count": 18,
        "num_fans": 0,
        "events_supported": hex(EVENTS_HOPPER_580),
    }
    g.update(busy if load else idle)
    return {f"gpu.{index}.{k}": str(v) for k, v in g.items()}


def h100_node(n: int = 8, *, load: bool = True) -> dict[str, str]:
    state = {"driver_version": "580.105.08", "nvml_version": "13.580.105.08", "cuda_version": "13000",
             "gpu_count": str(n)}
    for i in range(n):
        state.update(h100_sxm(i, load=load))
    return state


def h200_vm(*, load: bool = False, latency: bool = True) -> dict[str, str]:
    """The one NVIDIA H200 of the device machine (a VM with the GPU passed through, no NVLink), as it
    answered on driver 580.159.04: idle as in docs/hardware/h200-580.159.04.raw.json (which a test holds
    the fake to), busy as in that run's cross-check under a bf16 matrix loop."""
    busy = {"temp": 65, "mem_temp": 52, "power_mw": 692_501, "util_gpu": 97, "util_mem": 23, "throttle": "0x4",
            "clock.graphics": 1485, "clock.sm": 1485, "clock.video": 1515, "mem_used": 925_696_000,
            "procs": f"4242:{904 * MIB}", "energy_mj": "8681044+692501/s"}
    idle = {"temp": 37, "mem_temp": 38, "power_mw": 81_321, "util_gpu": 0, "util_mem": 0, "throttle": "0x1",
            "clock.graphics": 345, "clock.sm": 345, "clock.video": 765, "mem_used": 0, "procs": "",
            "energy_mj": "3411907+81321/s"}
    g: dict[str, object] = {
        "name": "NVIDIA H200", "uuid": "GPU-e1209b80-738a-dafa-a90b-64b045a094ae", "serial": "1654524117163",
        "bus_id": "00000000:00:06.0", "vbios": "96.00.A5.00.1A", "board_part": "692-2G520-0282-001", "minor": 0,
        "pci_device_id": "0x233510DE", "pci_subsystem_id": "0x18BF10DE", "arch": 9, "cc_major": 9, "cc_minor": 0,
        # NVML answers absolute thresholds, though nvidia-smi -q prints them as T.Limit offsets (-8/-2/0 C)
        "threshold.shutdown": 95, "threshold.slowdown": 89, "threshold.gpu_max": 87, "threshold.mem_max": 95,
        "tlimit.shutdown": -8, "tlimit.slowdown": -2,  # nvidia-smi -q: gpu_temp_{max,slow}_tlimit_threshold
        "power_limit_mw": 700_000, "power_default_mw": 700_000, "power_min_mw": 200_000, "power_max_mw": 700_000,
        "clock_max.graphics": 1980, "clock_max.sm": 1980, "clock_max.mem": 3201, "clock_max.video": 1545,
        "clock.mem": 3201, "util_enc": 0, "util_dec": 0, "pstate": 0,
        "mem_total": 150_754_820_096, "mem_reserved": 644_939_776, "bar1_total": 262_144 * MIB, "bar1_used": MIB,
        "persistence": 1, "compute_mode": 0, "mig_mode": 0,
        "pcie_gen": 5, "pcie_gen_max": 5, "pcie_width": 16, "pcie_width_max": 16, "pcie_replay": 1,
        "pcie_tx_kbs": 1047, "pcie_rx_kbs": 641, "throttle_supported": "0x1ff",
        "violation.power": 0, "violation.thermal": 0, "violation.sync_boost": 0, "violation.board_limit": 0,
        "violation.low_util": 30_778_264_352, "violation.reliability": 0,
        "ecc_mode": 1, "ecc_pending": 1, "ecc.sbe_vol": 0, "ecc.dbe_vol": 0, "ecc.sbe_agg": 0, "ecc.dbe_agg": 0,
        "remap_cor": 0, "remap_unc": 0, "remap_pending": 0, "remap_failure": 0, "recovery_action": 0,
        "num_fans": 0, "nvlink_count": 0, "events_supported": hex(EVENTS_HOPPER_580),
    }
    g.update(busy if load else idle)
    state = {"driver_version": "580.159.04", "nvml_version": "13.580.159.04", "cuda_version": "13000",
             "gpu_count": "1", **{f"gpu.0.{k}": str(v) for k, v in g.items()}}
    if latency:
        state.update({k: str(v) for k, v in H200_LATENCY_US.items()})
    return state


def render(state: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in state.items())


def read_conf(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


class FakeNvml:
    """A scenario on disk: the state file, its events file and the shared call counters."""

    def __init__(self, directory: Path, state: Mapping[str, str] | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.state_path = directory / "state.conf"
        self.events_path = directory / "state.conf.events"
        self.counters_path = directory / "counters"
        self.events_path.touch()
        self.state: dict[str, str] = dict(state if state is not None else h100_node())
        self.write()

    def env(self) -> dict[str, str]:
        """Environment for a process that should load the fake as its libnvidia-ml.so.1."""
        return {
            "LD_LIBRARY_PATH": str(LIBRARY_DIR),
            "FAKE_NVML_STATE": str(self.state_path),
            "FAKE_NVML_COUNTERS": str(self.counters_path),
        }

    def write(self) -> None:
        """Replace the state file atomically: the fake notices the new inode on its next call."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(render(self.state))
        os.replace(tmp, self.state_path)

    def set(self, values: Mapping[str, object] | None = None, **kv: object) -> None:
        for k, v in {**(values or {}), **kv}.items():
            self.state[k] = str(v)
        self.write()

    def gpu(self, index: int, **kv: object) -> None:
        self.set({f"gpu.{index}.{k}": v for k, v in kv.items()})

    def unset(self, *keys: str) -> None:
        for k in keys:
            self.state.pop(k, None)
        self.write()

    # -- what a GPU reset and a driver reload do (README "Reset and reload") --------------------------
    def unbind(self, slot: int) -> None:
        """The GPU leaves the driver (unbind, or a reset in progress): enumeration skips it."""
        self.gpu(slot, absent=1)

    def rebind(self, slot: int, *, reset: bool = True) -> None:
        """The GPU is back; after a reset its volatile counters start again from zero and its recovery
        action is cleared (the aggregate ECC counts and remapped rows live in the InfoROM and stay)."""
        values: dict[str, object] = {"absent": 0, "lost": 0}
        if reset:
            values.update(VOLATILE_AFTER_RESET)
            for key in list(self.state):
                prefix = f"gpu.{slot}.nvlink."
                if key.startswith(prefix) and key.rsplit(".", 1)[1] in NVLINK_COUNTERS:
                    values[key[len(f"gpu.{slot}."):]] = 0
        self.gpu(slot, **values)

    def move(self, slot: int, to: int) -> None:
        """The board in `slot` comes back in slot `to` (another PCI position, hence another index)."""
        board = {k[len(f"gpu.{slot}."):]: v for k, v in self.state.items() if k.startswith(f"gpu.{slot}.")}
        for k in [k for k in self.state if k.startswith(f"gpu.{slot}.")]:
            del self.state[k]
        self.state[f"gpu.{slot}.absent"] = "1"
        self.state["gpu_count"] = str(max(int(self.state.get("gpu_count", "0")), to + 1))
        self.gpu(to, **{**board, "absent": 0})

    def unload_driver(self) -> None:
        """The kernel module goes away: nvmlInit answers DRIVER_NOT_LOADED, what a process held is stale."""
        self.set(init_error=9, driver_epoch=int(self.state.get("driver_epoch", "0")) + 1)

    def load_driver(self) -> None:
        self.set(init_error=0)

    def event(self, gpu: int, mask: int, data: int) -> None:
        with open(self.events_path, "a") as f:
            f.write(f"{gpu} {mask:#x} {data}\n")

    def xid(self, gpu: int, code: int) -> None:
        self.event(gpu, XID_CRITICAL, code)

    def counts(self) -> dict[str, int]:
        return read_counters(self.counters_path)


# What a GPU reset zeroes: the volatile ECC counts and the energy counter (counted since the driver last
# initialised the board); the recovery action the driver asked for is done.
VOLATILE_AFTER_RESET: dict[str, object] = {"ecc.sbe_vol": 0, "ecc.dbe_vol": 0, "energy_mj": 1000,
                                           "recovery_action": 0}
NVLINK_COUNTERS = ("replay", "recovery", "crc_flit", "crc_data")


def read_counters(path: Path) -> dict[str, int]:
    """The fake's per-symbol call counters: records of {char name[56]; uint64 count}."""
    data = path.read_bytes() if path.exists() else b""
    out = {}
    for off in range(0, len(data) - 63, 64):
        name, count = struct.unpack_from("=56sQ", data, off)
        out[name.rstrip(b"\0").decode()] = count
    return out


if __name__ == "__main__":
    print("# 8x NVIDIA H100 80GB HBM3 (SXM5) under a training load; written by tests/fakenvml/scenario.py")
    print(render(h100_node(8)), end="")
