"""Flags: Prometheus exporter style; a bad one is one clear line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from nvml_exporter.cli import build_parser, duration


@pytest.mark.parametrize(("text", "seconds"), [("5s", 5), ("500ms", 0.5), ("1m30s", 90), ("2", 2), ("0.25", 0.25),
                                               ("1h", 3600)])
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "5x", "-1s", "0", "0s", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_defaults() -> None:
    args = build_parser().parse_args([])
    assert args.listen == ("", 9400)
    assert (args.path, args.timeout, args.min_interval, args.slow_interval) == ("/metrics", 5.0, 1.0, 30.0)
    assert (args.log_level, args.log_format, args.library, args.web_config) == ("info", "logfmt", None, None)
    assert args.max_connections == 64
    assert build_parser().parse_args(["--web.listen-address=[::1]:9500"]).listen == ("::1", 9500)


@pytest.mark.parametrize(("flag", "message"), [
    ("--collect.timeout=abc", "invalid duration"),
    ("--collect.min-interval=-1s", "invalid duration"),
    ("--web.listen-address=nope", "invalid listen address"),
    ("--web.listen-address=:99999", "invalid listen address"),
    ("--web.telemetry-path=metrics", "telemetry path must start with /"),
    ("--log.level=verbose", "invalid choice"),
    ("--web.max-connections=0", "want a positive integer, not 0"),
    ("--web.max-connections=many", "want a positive integer, not 'many'"),
    ("--gpus.expected=0", "--gpus.expected: want a positive integer, not 0"),
    ("--log.format=xml", "invalid choice"),
    ("--no-such-flag", "unrecognized arguments"),
])
def test_bad_flag_exits_2_with_one_line(flag: str, message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "nvml_exporter", flag], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "nvml_exporter", f"--web.listen-address=127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_version() -> None:
    result = subprocess.run([sys.executable, "-m", "nvml_exporter", "--version"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("nvml-exporter 0.")
