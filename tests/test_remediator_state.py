"""Where nvml-remediator keeps its state: one default, shared by the packaged unit, the service and
`reset-breaker`, so that an operator's `nvml-remediator reset-breaker` closes the breaker the service
reads; and `reset-breaker` ends cleanly, its database closed, whatever it finds."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nvml_exporter.remediator import cli
from nvml_exporter.remediator.store import Store
from tests.fakenvml.scenario import REPO
from tests.remediator_helpers import TOKEN, make_standins, policy

UNIT = REPO / "packaging" / "debian" / "prometheus-nvml-exporter.prometheus-nvml-remediator.service"


def unit_setting(name: str) -> str:
    values = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{name}=")]
    assert len(values) == 1, name
    return values[0]


def open_files() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the fd of the listing itself, closed meanwhile
    return out


def test_the_packaged_unit_and_the_cli_default_to_one_state_directory() -> None:
    assert f"/var/lib/{unit_setting('StateDirectory')}" == cli.DEFAULT_STORAGE
    assert os.path.dirname(cli.DEFAULT_AUDIT_LOG) == cli.DEFAULT_STORAGE
    # the unit leaves both to the defaults (or, if it ever names them, names the same ones)
    argv = shlex.split(unit_setting("ExecStart"))
    for flag, default in (("--storage.path", cli.DEFAULT_STORAGE), ("--audit.log", cli.DEFAULT_AUDIT_LOG)):
        named = [a.split("=", 1)[1] for a in argv if a.startswith(f"{flag}=")]
        assert named in ([], [default]), flag


def test_the_service_and_reset_breaker_open_the_same_database_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    monkeypatch.setattr(cli, "DEFAULT_STORAGE", str(state))
    monkeypatch.setattr(cli, "DEFAULT_AUDIT_LOG", str(state / "audit.jsonl"))
    make_standins(tmp_path)
    rules = policy(tmp_path, "- name: all\n  steps: [log]\n")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    with socket.socket() as taken:  # the service opens its state, then fails to listen: returns 1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main([f"--config={rules}", f"--auth.token-file={token}",
                         f"--web.listen-address=127.0.0.1:{port}"]) == 1
    assert (state / cli.STATE_FILE).is_file() and (state / "audit.jsonl").is_file()
    store = Store(str(state / cli.STATE_FILE))
    store.trip("5 actions in 10m")
    store.close()
    capsys.readouterr()
    assert cli.main(["reset-breaker"]) == 0
    assert "circuit breaker reset (was open: 5 actions in 10m)" in capsys.readouterr().out
    store = Store(str(state / cli.STATE_FILE))
    assert store.breaker() is None
    store.close()


def test_reset_breaker_closes_its_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / cli.STATE_FILE
    store = Store(str(path))
    store.trip("storm")
    store.close()
    assert not any(f.startswith(str(path)) for f in open_files())
    assert cli.main(["reset-breaker", f"--storage.path={tmp_path}"]) == 0
    assert "(was open: storm)" in capsys.readouterr().out
    assert not any(f.startswith(str(path)) for f in open_files())


def test_reset_breaker_with_no_state_says_where_it_looked(tmp_path: Path) -> None:
    """No arguments, and nothing at the default: one line, exit 1, no traceback, and no empty database
    made there (which would "reset" a breaker no service reads)."""
    missing = tmp_path / "no-state-here"
    code = (f"import sys; from nvml_exporter.remediator import cli; cli.DEFAULT_STORAGE = {str(missing)!r}; "
            "sys.exit(cli.main(['reset-breaker']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stderr == (f"nvml-remediator reset-breaker: error: no remediator state at {missing}/{cli.STATE_FILE}: "
                          "give the --storage.path the service runs with\n")
    assert not missing.exists()
    # a file that is not a database: an error line too
    (tmp_path / cli.STATE_FILE).write_text("not sqlite")
    run = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "reset-breaker",
                          f"--storage.path={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "error:" in run.stderr and "Traceback" not in run.stderr
