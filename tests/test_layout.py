"""The package's shape, read from its source: only exporter/nvml/ talks to pynvml, the remediator never
imports the collector side, and every subpackage is shipped."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakenvml.scenario import REPO

EXPORTER = REPO / "exporter"
PACKAGE = "nvml_exporter"  # what exporter/ is installed as (pyproject's package-dir)


def module_name(path: Path, root: Path = EXPORTER) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in EXPORTER.rglob("*.py")}


def imports(path: Path, root: Path = EXPORTER) -> Iterator[str]:
    """Every module `path` names in an import, at any depth (a lazy import in a function counts), with
    relative imports resolved; `from pkg import name` yields pkg.name where that is a module, else pkg.
    importlib.import_module("x") and __import__("x") with a literal name count too."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    yield f"{module}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if called in ("import_module", "__import__"):
                yield node.args[0].value


def is_pynvml(module: str) -> bool:
    return module == "pynvml" or module.startswith("pynvml.")


def test_the_import_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    # The checks below are only as good as imports(): it must see what a module could hide pynvml behind.
    probe = tmp_path / "exporter" / "nvml" / "__init__.py"  # resolved as nvml_exporter.nvml would be
    probe.parent.mkdir(parents=True)
    probe.write_text("import pynvml as p\nfrom pynvml import nvmlInit\nimport importlib\n"
                     "def later():\n    import pynvml.smi\n    return importlib.import_module('pynvml')\n"
                     "from . import reader\nfrom ..snapshot import Values\n")
    found = list(imports(probe, tmp_path / "exporter"))
    assert found.count("pynvml") == 3 and "pynvml.smi" in found
    assert f"{PACKAGE}.nvml.reader" in found and f"{PACKAGE}.snapshot" in found


def test_only_the_nvml_package_imports_pynvml() -> None:
    offenders = {name: sorted(filter(is_pynvml, imports(path))) for name, path in MODULES.items()
                 if not (name == f"{PACKAGE}.nvml" or name.startswith(f"{PACKAGE}.nvml."))}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert any(is_pynvml(m) for m in imports(MODULES[f"{PACKAGE}.nvml.reader"]))  # the check can fail


# Imports the remediator's modules reach only in code it never runs, each a known debt, not a licence:
# control.py serves both sides, and its exporter half (ControlServer.handle) imports the collector's
# ReleaseError lazily. Moving ReleaseError into control.py ends it (the collector raises it).
NEVER_RUN_BY_THE_REMEDIATOR = {(f"{PACKAGE}.control", f"{PACKAGE}.collector")}


def closure(start: str, skip: set[tuple[str, str]]) -> set[str]:
    """The exporter's modules that importing `start` may load (parent packages included), and pynvml if
    any of them imports it; an import `skip` names (importer, imported) is not followed."""
    seen: set[str] = set()
    todo = [(start, start)]
    while todo:
        importer, name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            module = ".".join(parts[:i])
            if module in seen or (importer, module) in skip:
                continue
            if is_pynvml(module):
                seen.add("pynvml")
            elif module in MODULES:
                seen.add(module)
                todo.extend((module, imported) for imported in imports(MODULES[module]))
    return seen


def test_the_remediator_never_imports_the_collector_side() -> None:
    """The remediator is a separate program (docs/remediation.md): it must work where NVML does not."""
    forbidden = re.compile(rf"^(pynvml|{PACKAGE}\.(collector|nvml)(\..*)?)$")
    for name in MODULES:
        if name.startswith(f"{PACKAGE}.remediator"):
            assert sorted(filter(forbidden.match, closure(name, NEVER_RUN_BY_THE_REMEDIATOR))) == [], name
    assert "pynvml" in closure(f"{PACKAGE}.collector", set())  # the check can fail
    for importer, imported in NEVER_RUN_BY_THE_REMEDIATOR:
        assert imported in imports(MODULES[importer]), f"{importer} no longer imports {imported}: drop the exception"


def subpackages() -> list[str]:
    return sorted(module_name(p) for p in EXPORTER.rglob("__init__.py"))


def test_every_subpackage_is_installed_by_pyproject_and_the_deb() -> None:
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setuptools["packages"]) == subpackages()
    rules = (REPO / "packaging" / "debian" / "rules").read_text().replace("\\\n", " ")  # lines joined
    for package in subpackages():
        folder = "/".join(["exporter", *package.split(".")[1:]])
        target = "/".join(["nvml_exporter", *package.split(".")[1:]])
        assert re.search(rf"install -m 0644 {re.escape(folder)}/\*\.py .*\$\(SHARE\)/{re.escape(target)}/", rules), \
            package
