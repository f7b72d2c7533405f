"""The .deb: it builds, lintian finds nothing, the units verify and are hardened, and the package installs
into a scratch root where the installed exporter serves /metrics over the fake NVML."""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvml_exporter import __version__
from tests.conftest import free_port, require_tool, samples, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml

DEB = REPO / "dist" / f"prometheus-nvml-exporter_{__version__}_all.deb"
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


@pytest.fixture(scope="module")
def deb() -> Path:
    subprocess.run(["make", "-s", "deb"], cwd=REPO, check=True, capture_output=True)
    assert DEB.exists()
    return DEB


@pytest.fixture(scope="module")
def root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    r = tmp_path_factory.mktemp("root")
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "etc"):
        (r / d).mkdir(parents=True)
    (r / "var/lib/dpkg/status").touch()
    out = subprocess.run([require_tool("dpkg"), f"--root={r}", "--force-script-chrootless", "--force-depends",
                          "--force-not-root", "-i", str(deb)], capture_output=True, text=True, env=SYSTEM)
    assert out.returncode == 0, out.stdout + out.stderr
    yield r


def test_changelog_version_matches_the_package() -> None:
    first = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"prometheus-nvml-exporter ({__version__})")


def test_lintian_reports_no_error_or_warning(deb: Path) -> None:
    out = subprocess.run([require_tool("lintian"), "--fail-on", "error,warning", str(deb)], capture_output=True,
                         text=True, env=SYSTEM)
    tags = [line for line in out.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert out.returncode == 0 and not tags, out.stdout


def test_package_metadata_and_files(deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True).stdout
    depends = re.search(r"^ Depends: (.*)$", info, re.M).group(1)  # type: ignore[union-attr]
    for dep in ("python3-prometheus-client", "python3-systemd", "python3-yaml", "python3-bcrypt"):
        assert dep in depends
    assert "pynvml" not in depends and "libnvidia" not in depends and "Architecture: all" in info
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./usr/bin/nvml-exporter", "./usr/bin/nvml-remediator",
                 "./usr/share/prometheus-nvml-exporter/pynvml.py",
                 "./usr/share/prometheus-nvml-exporter/rules/nvml-exporter-alerts.yml",
                 "./usr/share/prometheus-nvml-exporter/rules/thanos/nvml-exporter-alerts.yml",
                 "./usr/share/prometheus-nvml-exporter/dashboards/nvml-exporter-node.json",
                 "./usr/share/doc/prometheus-nvml-exporter/runbooks/GpuLost.md",
                 "./usr/share/man/man1/nvml-exporter.1.gz", "./usr/share/man/man1/nvml-remediator.1.gz",
                 "./lib/systemd/system/prometheus-nvml-exporter.service",
                 "./lib/systemd/system/prometheus-nvml-remediator.service"):
        assert path in files, path


def test_install_creates_users_and_enables_only_the_exporter(root: Path) -> None:
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^prometheus:x:\d+:\d+:", passwd, re.M)
    assert re.search(r"^nvml-remediator:x:\d+:\d+:", passwd, re.M)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    assert (wants / "prometheus-nvml-exporter.service").is_symlink()
    assert not (wants / "prometheus-nvml-remediator.service").exists()
    conffiles = (root / "var/lib/dpkg/info/prometheus-nvml-exporter.conffiles").read_text().split()
    assert {"/etc/prometheus-nvml-exporter/remediator.yml", "/etc/prometheus-nvml-exporter/web-config.yml",
            "/etc/default/prometheus-nvml-exporter", "/etc/default/prometheus-nvml-remediator"} <= set(conffiles)
    assert 'ARGS=""' in (root / "etc/default/prometheus-nvml-exporter").read_text()


@pytest.mark.parametrize("unit", ["prometheus-nvml-exporter.service", "prometheus-nvml-remediator.service"])
def test_units_verify_cleanly(root: Path, tmp_path: Path, unit: str) -> None:
    text = (root / "lib/systemd/system" / unit).read_text()
    # point ExecStart at the installed program inside the scratch root, which verify requires to exist
    copy = tmp_path / unit
    copy.write_text(text.replace("ExecStart=/usr/bin/", f"ExecStart={root}/usr/bin/"))
    out = subprocess.run([require_tool("systemd-analyze"), "verify", "--man=no", str(copy)], capture_output=True,
                         text=True)
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "")


def test_exporter_unit_is_hardened(root: Path) -> None:
    unit = root / "lib/systemd/system/prometheus-nvml-exporter.service"
    out = subprocess.run([require_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", str(unit)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 2.0
    text = unit.read_text()
    assert "User=prometheus" in text and "Type=notify" in text and "WatchdogSec=" in text


def test_installed_exporter_serves_metrics_with_debian_python(root: Path, fake: FakeNvml) -> None:
    share = root / "usr/share/prometheus-nvml-exporter"
    port = free_port()
    env = {**SYSTEM, **fake.env(), "PYTHONPATH": str(share)}
    proc = subprocess.Popen(["/usr/bin/python3", str(root / "usr/bin/nvml-exporter"),
                             f"--web.listen-address=127.0.0.1:{port}", "--no-xid.journal"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def page() -> str | None:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                    return body if "nvidia_gpu_up{" in body else None
            except OSError:
                return None

        s = samples(str(wait_for(page, timeout=30)))
        assert sum(1 for k, v in s.items() if k.startswith("nvidia_gpu_up{") and v == 1) == 8
        build = next(k for k in s if k.startswith("nvml_exporter_build_info"))
        assert f'version="{__version__}"' in build
        probe = subprocess.run(["/usr/bin/python3", "-c", "import pynvml, prometheus_client; "
                                "print(pynvml.__file__, prometheus_client.__file__)"],
                               env=env, capture_output=True, text=True, check=True).stdout.split()
        assert probe[0] == str(share / "pynvml.py") and probe[1].startswith("/usr/lib/python3/dist-packages/")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_purge_removes_configuration(root: Path) -> None:
    out = subprocess.run([require_tool("dpkg"), f"--root={root}", "--force-script-chrootless", "--force-depends",
                          "--force-not-root", "--purge", "prometheus-nvml-exporter"], capture_output=True, text=True,
                         env=SYSTEM)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (root / "etc/prometheus-nvml-exporter/remediator.yml").exists()
    assert not (root / "usr/bin/nvml-exporter").exists()
    assert os.path.isdir(root / "var/lib/dpkg")
