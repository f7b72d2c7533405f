"""The kernel-line corpus (tests/data/kernel-lines.json): every published line, parsed for code, address and fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nvml_exporter import kernlog

CORPUS = json.loads((Path(__file__).parent / "data" / "kernel-lines.json").read_text())


def _parse(case: dict[str, Any]) -> kernlog.KernelLine | None:
    parser = kernlog.LineParser()
    got = None
    for record in case.get("records") or [case["line"]]:
        got = parser.parse(record)
    return got


@pytest.mark.parametrize("case", CORPUS["cases"], ids=lambda c: (c.get("line") or c["records"][-1])[:70])
def test_every_published_line(case: dict[str, Any]) -> None:
    assert case["source"] in CORPUS["sources"]
    got, want = _parse(case), case["expect"]
    if want is None:
        assert got is None
        return
    assert got is not None
    assert got.kind == want["kind"]
    assert got.fields == want["fields"]
    if got.kind == "reset":
        assert (got.uuid, got.pci) == (want["uuid"], None)
        return
    assert got.code == want["code"]
    assert got.pci == kernlog.pci_key(want["pci"])


def test_the_corpus_covers_every_format() -> None:
    kinds = {c["expect"]["kind"] for c in CORPUS["cases"] if c["expect"]}
    assert kinds == {"xid", "fell_off_bus", "sxid", "reset"}
    fields = set().union(*(c["expect"]["fields"] for c in CORPUS["cases"] if c["expect"]))
    assert {"gpu_instance", "compute_instance", "gpc", "tpc", "sm", "unit", "link", "severity"} <= fields


def test_a_three_record_message_needs_its_first_record() -> None:
    parser = kernlog.LineParser()
    assert parser.parse("NVRM: (PCI ID: 10de:26b5) installed in this system has") is None
    assert parser.parse("NVRM: fallen off the bus and is not responding to commands.") is None
    # an unrelated record between the first and the last breaks the message
    assert parser.parse("NVRM: The NVIDIA GPU 0000:b3:00.0") is None
    assert parser.parse("usb 1-1: new high-speed USB device") is None
    assert parser.parse("NVRM: fallen off the bus and is not responding to commands.") is None


def test_location_names_gpc_and_tpc_of_xid13_only() -> None:
    text = "pid=1, name=a, Graphics SM Warp Exception on (GPC 7, TPC 3, SM 0): Illegal Instruction Parameter"
    assert kernlog.location(13, text) == "GPC 7, TPC 3"
    assert kernlog.location(31, text) == ""
    assert kernlog.location(13, "Graphics Exception: ESR 0x57c730=0xc04000b") == ""
