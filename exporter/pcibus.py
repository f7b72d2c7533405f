"""NVIDIA GPUs on the PCI bus, from sysfs: what NVML should see, for the GPU-gone signal (issue 19).

A GPU that falls off the bus (Xid 79) or that the driver fails to initialise is missing from NVML's count,
while the kernel still lists its PCI function: `nvidia_gpu_pci_devices` above `count(nvidia_gpu_up == 1)`
says so, and an optional `--gpus.expected N` (`nvidia_gpu_expected`) catches a GPU missing from both. gpud
and NVSentinel make the same comparison. Only display controllers count (PCI class 0x0300 VGA, 0x0302 3D),
which excludes NVSwitches (0x0680) and the audio and USB functions of some boards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("nvml_exporter.pcibus")

SYSFS_PCI = "/sys/bus/pci/devices"
NVIDIA_VENDOR = 0x10DE
GPU_CLASSES = frozenset({0x0300, 0x0302})  # base class 03 display: VGA-compatible, 3D controller


class PciBusError(Exception):
    """The sysfs tree cannot be read at all (no such directory, no permission)."""


def count_nvidia_gpus(root: str | os.PathLike[str] = SYSFS_PCI) -> int:
    """NVIDIA display/3D functions under `root` (one directory per PCI function, each with the kernel's
    `vendor` and `class` files, as /sys/bus/pci/devices). A function whose files cannot be read or parsed
    is skipped and logged: one odd entry must not hide the others."""
    base = Path(root)
    try:
        entries = sorted(os.listdir(base))
    except OSError as e:
        raise PciBusError(f"cannot list {base}: {e.strerror or e}") from e
    count = 0
    for name in entries:
        try:
            vendor = int((base / name / "vendor").read_text().strip(), 16)
            if vendor != NVIDIA_VENDOR:
                continue
            pci_class = int((base / name / "class").read_text().strip(), 16)
        except (OSError, ValueError) as e:
            log.warning("unreadable PCI function skipped", extra={"device": name, "error": str(e)})
            continue
        if pci_class >> 8 in GPU_CLASSES:
            count += 1
    return count
