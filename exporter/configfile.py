"""Strict reading of YAML configuration files: a typo is an error that names its place, never a
silently ignored key. Shared by the web config and the remediator's policy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


def load_yaml(path: str, error: type[ConfigError]) -> Any:
    import yaml  # only needed when a configuration file is used

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{where}: not valid YAML: {problem}") from None


def mapping(value: Any, where: str, error: type[ConfigError]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise error(f"{where}: expected a mapping")
    return value


def no_unknown(d: Mapping[str, Any], allowed: set[str], where: str, error: type[ConfigError]) -> None:
    extra = sorted(map(str, set(d) - allowed))
    if extra:
        raise error(f"{where}: unknown field(s) {', '.join(extra)}")
