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
            return yaml.load(f, Loader=_strict_loader())  # a SafeLoader that refuses duplicate keys
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
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


def _strict_loader() -> Any:
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last one, so a setting could be overridden by accident)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # merge keys (<<) first: an override through them is allowed
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        repeated = key in seen
                    except TypeError:  # an unhashable key: the base class says so
                        continue
                    if repeated:
                        raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                                f"key {key!r} given twice", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader
