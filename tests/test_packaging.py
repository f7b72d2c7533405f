"""The .deb: it builds, lintian finds nothing, the units verify and are hardened, and the package installs
into a scratch root where the installed exporter serves /metrics over the fake NVML; its docs' links
resolve where they are installed, an upgrade from a package with units in /lib keeps them, and purge
removes what the package made.

Lintian here is bookworm's; trixie's rejects any file under /lib (aliased-location), which
test_package_metadata_and_files holds the package to."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvml_exporter import __version__
from nvml_exporter.remediator import policy as policy_mod
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
    scratch_root(r)
    dpkg(r, "-i", str(deb))
    yield r


def scratch_root(r: Path) -> None:
    """An empty dpkg database, on a merged-/usr layout as bookworm and trixie install it."""
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "etc", "usr/lib", "usr/bin",
              "usr/sbin"):
        (r / d).mkdir(parents=True)
    for alias in ("lib", "bin", "sbin"):
        (r / alias).symlink_to(f"usr/{alias}")
    (r / "var/lib/dpkg/status").touch()


def dpkg(root: Path, *args: str) -> str:
    out = subprocess.run([require_tool("dpkg"), f"--root={root}", "--force-script-chrootless", "--force-depends",
                          "--force-not-root", *args], capture_output=True, text=True, env=SYSTEM)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


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
                 "./usr/share/prometheus-nvml-exporter/nvml_exporter/httpd/server.py",
                 "./usr/share/prometheus-nvml-exporter/rules/nvml-exporter-alerts.yml",
                 "./usr/share/prometheus-nvml-exporter/rules/thanos/nvml-exporter-alerts.yml",
                 "./usr/share/prometheus-nvml-exporter/dashboards/nvml-exporter-node.json",
                 "./usr/share/doc/prometheus-nvml-exporter/docs/runbooks/GpuLost.md",
                 "./usr/share/man/man1/nvml-exporter.1.gz", "./usr/share/man/man1/nvml-remediator.1.gz",
                 "./usr/lib/systemd/system/prometheus-nvml-exporter.service",
                 "./usr/lib/systemd/system/prometheus-nvml-remediator.service",
                 "./usr/lib/systemd/system/prometheus-nvml-remediator-agent.service",
                 "./usr/share/prometheus-nvml-exporter/nvml_exporter/remediator/agent.py",
                 "./usr/share/prometheus-nvml-exporter/nvml_exporter/control.py",
                 "./usr/share/doc/prometheus-nvml-exporter/examples/remediator.example.yml",
                 "./usr/share/doc/prometheus-nvml-exporter/examples/alertmanager.example.yml",
                 "./usr/share/prometheus-nvml-exporter/nvml_exporter/workload/kubelet.py",
                 "./usr/share/prometheus-nvml-exporter/nvml_exporter/workload/podresources/api_pb2.py",
                 "./usr/share/prometheus-nvml-exporter/slurm/nvml-exporter-prolog",
                 "./usr/share/prometheus-nvml-exporter/slurm/nvml-exporter-epilog",
                 "./usr/share/prometheus-nvml-exporter/slurm/nvml-exporter-slurm-lib.sh",
                 "./usr/share/doc/prometheus-nvml-exporter/docs/workloads.md",
                 "./usr/share/doc/prometheus-nvml-exporter/docs/remediation.md"):
        assert path in files, path
    assert re.search(r"^ Recommends: .*python3-grpcio", info, re.M)
    # nothing in the aliased directories (/lib is /usr/lib on merged-/usr systems): trixie's lintian says
    # aliased-location, and dpkg could lose a file that moves between the two names
    paths = [line.split()[-1] for line in files.splitlines()]
    assert not [p for p in paths if p.startswith(("./lib/", "./bin/", "./sbin/", "./lib64/"))]


def test_installed_docs_link_only_to_installed_files(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    doc = tmp_path / "usr/share/doc/prometheus-nvml-exporter"
    checked, dangling = 0, []
    for page in sorted(doc.rglob("*.md*")):
        text = gzip.decompress(page.read_bytes()).decode() if page.suffix == ".gz" else page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            checked += 1
            if not (page.parent / target.split("#")[0]).exists():
                dangling.append(f"{page.relative_to(doc)} -> {target}")
    assert checked > 20 and not dangling
    # the example policy is the one installed as the conffile
    example = "examples/remediator.example.yml"
    assert (doc / example).read_text() == (REPO / example).read_text()


def test_install_creates_users_and_enables_only_the_exporter(root: Path) -> None:
    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^prometheus:x:\d+:\d+:", passwd, re.M)
    assert re.search(r"^nvml-remediator:x:\d+:\d+:", passwd, re.M)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    assert (wants / "prometheus-nvml-exporter.service").is_symlink()
    assert not (wants / "prometheus-nvml-remediator.service").exists()
    assert not (wants / "prometheus-nvml-remediator-agent.service").exists()  # enabled by the operator
    conffiles = (root / "var/lib/dpkg/info/prometheus-nvml-exporter.conffiles").read_text().split()
    assert {"/etc/prometheus-nvml-exporter/remediator.yml", "/etc/prometheus-nvml-exporter/web-config.yml",
            "/etc/default/prometheus-nvml-exporter", "/etc/default/prometheus-nvml-remediator",
            "/etc/default/prometheus-nvml-remediator-agent"} <= set(conffiles)
    assert 'ARGS=""' in (root / "etc/default/prometheus-nvml-exporter").read_text()


@pytest.mark.parametrize("unit", ["prometheus-nvml-exporter.service", "prometheus-nvml-remediator.service",
                                  "prometheus-nvml-remediator-agent.service"])
def test_units_verify_cleanly(root: Path, tmp_path: Path, unit: str) -> None:
    text = (root / "usr/lib/systemd/system" / unit).read_text()
    # point ExecStart at the installed program inside the scratch root, which verify requires to exist
    copy = tmp_path / unit
    copy.write_text(text.replace("ExecStart=/usr/bin/", f"ExecStart={root}/usr/bin/"))
    out = subprocess.run([require_tool("systemd-analyze"), "verify", "--man=no", str(copy)], capture_output=True,
                         text=True)
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "")


def test_exporter_unit_is_hardened(root: Path) -> None:
    unit = root / "usr/lib/systemd/system/prometheus-nvml-exporter.service"
    out = subprocess.run([require_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", str(unit)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 2.0
    text = unit.read_text()
    assert "User=prometheus" in text and "Type=notify" in text and "WatchdogSec=" in text
    assert "RuntimeDirectory=prometheus-nvml-exporter" in text  # the control socket's home


def test_agent_unit_has_only_the_privileges_its_steps_need(root: Path) -> None:
    """Root (nvidia-smi --gpu-reset, systemctl), but only CAP_SYS_ADMIN (the reset) and CAP_KILL
    (checkpoint_signal) in its bounding set, no new privileges, the file system read-only but its state."""
    unit = root / "usr/lib/systemd/system/prometheus-nvml-remediator-agent.service"
    text = unit.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["CapabilityBoundingSet"] == "CAP_SYS_ADMIN CAP_KILL"
    assert settings["AmbientCapabilities"] == ""
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == "prometheus-nvml-remediator-agent" and settings["DevicePolicy"] == "closed"
    assert settings["ExecStart"].startswith("/usr/bin/nvml-remediator agent ")
    out = subprocess.run([require_tool("systemd-analyze"), "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    assert score <= 4.0, out.stdout  # root with CAP_SYS_ADMIN, yet "OK" (3.0 when written)


@pytest.mark.parametrize("unit", ["prometheus-nvml-remediator.service", "prometheus-nvml-remediator-agent.service"])
def test_remediator_units_let_a_running_step_finish_on_stop(root: Path, unit: str) -> None:
    """Issue 15 M1: on stop, systemd signals the main process only (KillMode=mixed), which stops taking
    jobs and waits for the step it runs, and the unit's stop timeout outlasts the longest step of the
    shipped policies (a step still running when it runs out is killed and re-run at the next start)."""
    text = (root / "usr/lib/systemd/system" / unit).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["KillMode"] == "mixed"
    m = re.fullmatch(r"(\d+)min", settings["TimeoutStopSec"])
    assert m, settings["TimeoutStopSec"]
    longest = max(max(policy_mod.load(str(REPO / "examples" / name)).timeouts.values())
                  for name in ("remediator.example.yml", "remediator-fleet.example.yml"))
    assert int(m.group(1)) * 60 >= 2 * longest


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
        # the vendored pynvml.py has no metadata of its own: the package carries its version
        assert f'pynvml_version="{importlib.metadata.version("nvidia-ml-py")}"' in build
        probe = subprocess.run(["/usr/bin/python3", "-c", "import pynvml, prometheus_client; "
                                "print(pynvml.__file__, prometheus_client.__file__)"],
                               env=env, capture_output=True, text=True, check=True).stdout.split()
        assert probe[0] == str(share / "pynvml.py") and probe[1].startswith("/usr/lib/python3/dist-packages/")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_upgrade_from_units_in_lib_keeps_them(deb: Path, tmp_path: Path) -> None:
    """Earlier packages had their units in /lib/systemd/system. On a merged-/usr system, dpkg removing
    the old version's /lib paths after unpacking the new /usr/lib ones must not take the units along."""
    tree = tmp_path / "old"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    (tree / "lib/systemd").mkdir(parents=True)
    shutil.move(tree / "usr/lib/systemd/system", tree / "lib/systemd/system")
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"^Version: .*$", "Version: 0.0.1", control.read_text(), flags=re.M))
    md5sums = tree / "DEBIAN/md5sums"
    md5sums.write_text(md5sums.read_text().replace(" usr/lib/systemd/system/", " lib/systemd/system/"))
    old = tmp_path / "old.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(old)], check=True, capture_output=True)
    root = tmp_path / "root"
    scratch_root(root)
    dpkg(root, "-i", str(base_package(tmp_path)))
    dpkg(root, "-i", str(old))
    assert "/lib/systemd/system/prometheus-nvml-exporter.service" in dpkg(root, "-L", "prometheus-nvml-exporter")
    dpkg(root, "-i", str(deb))
    listed = dpkg(root, "-L", "prometheus-nvml-exporter").splitlines()
    for unit in ("prometheus-nvml-exporter.service", "prometheus-nvml-remediator.service"):
        assert (root / "usr/lib/systemd/system" / unit).is_file(), unit
        assert f"/usr/lib/systemd/system/{unit}" in listed and f"/lib/systemd/system/{unit}" not in listed
    wants = root / "etc/systemd/system/multi-user.target.wants/prometheus-nvml-exporter.service"
    assert wants.is_symlink() and (root / os.readlink(wants).lstrip("/")).is_file()  # absolute, inside the root


def base_package(tmp_path: Path) -> Path:
    """A package with a file under /lib, as a real system has many (libc6, udev, ...): without one, dpkg
    would remove the /lib alias itself with the last package that named it."""
    tree = tmp_path / "base"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text("Package: scratch-base\nVersion: 1\nArchitecture: all\n"
                                          "Maintainer: tests <tests@invalid>\nDescription: owns a file in /lib\n")
    (tree / "lib").mkdir()
    (tree / "lib/scratch-base").write_text("a file under /lib\n")
    out = tmp_path / "scratch-base.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)], check=True, capture_output=True)
    return out


def test_purge_removes_what_the_package_made(root: Path) -> None:
    # what an administrator and the services make, as docs/packaging.md describes it
    (root / "etc/prometheus-nvml-exporter/remediator.token").write_text("0123456789abcdef0123\n")
    state = root / "var/lib/prometheus-nvml-remediator"
    state.mkdir(parents=True)
    agent_state = root / "var/lib/prometheus-nvml-remediator-agent"
    agent_state.mkdir(parents=True)
    (agent_state / "agent.sqlite").write_bytes(b"")
    (state / "remediator.sqlite").write_bytes(b"")
    (state / "audit.jsonl").write_text("{}\n")
    dpkg(root, "--purge", "prometheus-nvml-exporter")
    assert not (root / "etc/prometheus-nvml-exporter").exists()
    assert not state.exists() and not agent_state.exists()
    assert not (root / "etc/default/prometheus-nvml-exporter").exists()
    assert not (root / "usr/bin/nvml-exporter").exists()
    passwd, group = (root / "etc/passwd").read_text(), (root / "etc/group").read_text()
    assert not re.search(r"^nvml-remediator:", passwd, re.M) and not re.search(r"^nvml-remediator:", group, re.M)
    assert re.search(r"^prometheus:", passwd, re.M)  # shared with Debian's Prometheus packages: kept
    assert os.path.isdir(root / "var/lib/dpkg")
