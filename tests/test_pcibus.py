"""GPU-gone (issue 19): NVIDIA GPUs on the PCI bus from a sysfs tree, against NVML's count and --gpus.expected,
over a fake sysfs tree and the real exporter."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvml_exporter.pcibus import PciBusError, count_nvidia_gpus
from tests.conftest import samples, wait_for
from tests.fakenvml.scenario import FakeNvml, h100_node


def pci_tree(root: Path, functions: dict[str, tuple[str, str]]) -> Path:
    """root/<address>/{vendor,class}, as the kernel writes them ("0x10de\\n", "0x030200\\n")."""
    for address, (vendor, pci_class) in functions.items():
        (root / address).mkdir(parents=True)
        (root / address / "vendor").write_text(vendor + "\n")
        (root / address / "class").write_text(pci_class + "\n")
    return root


NODE = {
    "0000:18:00.0": ("0x10de", "0x030200"),  # H100 SXM: 3D controller
    "0000:2a:00.0": ("0x10de", "0x030200"),
    "0000:3a:00.0": ("0x10de", "0x030000"),  # a VGA-class NVIDIA GPU counts too
    "0000:05:00.0": ("0x10de", "0x068000"),  # NVSwitch (bridge class): not a GPU
    "0000:3a:00.1": ("0x10de", "0x040300"),  # the audio function of a board: not a GPU
    "0000:00:02.0": ("0x8086", "0x030000"),  # the host's Intel VGA: not NVIDIA
}


def test_counts_only_nvidia_display_and_3d_functions(tmp_path: Path) -> None:
    assert count_nvidia_gpus(pci_tree(tmp_path / "devices", NODE)) == 3


def test_an_unreadable_function_is_skipped_not_fatal(tmp_path: Path) -> None:
    root = pci_tree(tmp_path / "devices", NODE)
    (root / "0000:2a:00.0" / "class").write_text("garbage\n")
    (root / "0000:99:00.0").mkdir()  # no vendor file at all
    assert count_nvidia_gpus(root) == 2


def test_a_missing_tree_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PciBusError, match="cannot list"):
        count_nvidia_gpus(tmp_path / "nope")


def test_the_exporter_serves_the_bus_count_and_the_expected_count(tmp_path: Path, fake: FakeNvml,
                                                                  start_exporter) -> None:
    fake.state = h100_node(2)
    fake.write()
    root = pci_tree(tmp_path / "devices", {"0000:18:00.0": ("0x10de", "0x030200"),
                                           "0000:2a:00.0": ("0x10de", "0x030200"),
                                           "0000:3a:00.0": ("0x10de", "0x030200")})
    exp = start_exporter(fake, f"--collect.pci.sysfs-root={root}", "--gpus.expected=4", "--no-xid.journal",
                         wait_ready=True)
    s = samples(exp.metrics())
    # 3 on the bus, 2 answering NVML, 4 expected: both GPU-gone alerts' inputs (docs/runbooks)
    assert s["nvidia_gpu_pci_devices"] == 3 and s["nvidia_gpu_expected"] == 4
    assert sum(v for k, v in s.items() if k.startswith("nvidia_gpu_up{")) == 2


def test_without_the_flag_no_expected_count_and_a_bad_root_serves_no_bus_count(tmp_path: Path, fake: FakeNvml,
                                                                              start_exporter) -> None:
    fake.state = h100_node(1)
    fake.write()
    exp = start_exporter(fake, f"--collect.pci.sysfs-root={tmp_path / 'missing'}", "--no-xid.journal",
                         wait_ready=True)
    page = str(wait_for(lambda: (p := exp.metrics()) and "nvidia_gpu_up{" in p and p))
    assert "nvidia_gpu_pci_devices" not in page and "nvidia_gpu_expected" not in page
    assert "PCI bus not readable" in str(wait_for(lambda: "PCI bus" in (t := exp.log()) and t))
