"""Flag types and the argument parser both programs use (the exporter and the remediator): one line and
exit 2 for a bad flag, as Prometheus's exporters do."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from .webconfig import parse_listen_address

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+")  # fullmatch: `$` would pass a final newline
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def duration(value: str) -> float:
    """'5s', '500ms', '1m30s' (Prometheus style) or plain seconds -> seconds > 0."""
    try:
        seconds = float(value)
    except ValueError:
        if not _DURATION.fullmatch(value):
            raise argparse.ArgumentTypeError(f"invalid duration {value!r} (want e.g. 5s, 500ms, 1m)") from None
        seconds = sum(float(n) * _UNIT[u] for n, u in _PART.findall(value))
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {value!r}")
    return seconds


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a positive integer, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"want a positive integer, not {n}")
    return n


def listen_address(value: str) -> tuple[str, int]:
    try:
        return parse_listen_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
