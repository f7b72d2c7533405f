"""The Xid catalog covers every code NVIDIA documents, tiers are disjoint, repeat rules count bursts."""

from __future__ import annotations

from nvml_exporter.xidcatalog import ACTIONS, CATALOG, REPEAT_RULES, TIERS, count_bursts, lookup, tier_codes
from nvml_exporter.xidstore import HISTORY_MAX, XidEvent, XidStore
from tests.fakenvml.scenario import REPO

CATALOG_TABLE = REPO / "tests" / "data" / "nvidia-xid-catalog.tsv"  # NVIDIA's Xid table; source in its README


def documented_codes() -> set[int]:
    """The codes of NVIDIA's Xid table as the repo carries it, ranges and lists expanded."""
    codes: set[int] = set()
    rows = [line for line in CATALOG_TABLE.read_text().splitlines() if line and not line.startswith("#")]
    assert rows[0].split("\t") == ["codes", "mnemonic", "immediate_action"]
    for row in rows[1:]:
        cell, mnemonic, action = row.split("\t")
        assert mnemonic and action, row
        for part in cell.split(","):
            lo, _, hi = part.partition("-")
            codes.update(range(int(lo), int(hi or lo) + 1))
    return codes


def test_every_documented_code_resolves_to_a_verdict() -> None:
    codes = documented_codes()
    assert len(codes) > 100 and {13, 31, 48, 74, 79, 94, 95, 119, 154, 172} <= codes
    missing = codes - set(CATALOG)
    assert not missing
    for code in codes:
        x = lookup(code)
        assert x.tier in TIERS and x.action in ACTIONS and x.severity in ("info", "warning", "critical")
        assert x.name and x.nvidia_action


def test_tiers_are_disjoint_and_cover_the_catalog() -> None:
    seen: set[int] = set()
    for tier in TIERS:
        codes = set(tier_codes(tier))
        assert not codes & seen, tier
        seen |= codes
    assert seen == set(CATALOG)


def test_tiers_match_the_reference_pack() -> None:
    assert set(tier_codes("reset")) >= {46, 62, 64, 95, 109, 110, 119, 120, 136, 140, 143, 150, 155, 158}
    assert tier_codes("double_bit_ecc") == [48, 171, 172]
    assert tier_codes("fell_off_bus") == [79, 167]
    assert tier_codes("nvlink") == [74, 144, 145, 146, 147, 148, 149]
    assert tier_codes("mechanical") == [54]
    assert tier_codes("contained") == [94]
    assert {13, 31, 43, 45, 68} <= set(tier_codes("application"))
    assert {56, 57, 58, 61, 65, 73, 81, 122, 123, 124, 125} <= set(tier_codes("unexpected"))
    assert lookup(79).action == "reboot_node" and lookup(48).action == "drain_and_reset"
    assert lookup(64).action == "drain_and_reset" and lookup(94).action == "restart_app"


def test_unknown_code_is_unexpected() -> None:
    x = lookup(999)
    assert (x.tier, x.severity, x.action) == ("unexpected", "warning", "contact_support")


def test_bursts_and_repeat_rules() -> None:
    assert count_bursts([]) == 0
    assert count_bursts([0, 60, 120, 170]) == 1  # gaps under 3 minutes: one burst
    assert count_bursts([0, 200, 400, 10_000]) == 4
    rules = {r.name: r for r in REPEAT_RULES}
    assert rules["xid31_repeating"].bursts == 2 and rules["xid31_repeating"].window_seconds == 86400
    assert 31 not in rules["fatal_recurring"].codes and 79 in rules["fatal_recurring"].codes


def test_store_bounds_history_and_merges_the_two_sources() -> None:
    now = 1_000_000.0
    store = XidStore(started_at=now, clock=lambda: now)
    for i in range(10_000):
        store.record(XidEvent("GPU-a", 13 if i % 2 else 31, now + i * 0.001, "nvml"))
    assert len(store.history("GPU-a")) == HISTORY_MAX
    counts = store.series("GPU-a")
    assert counts[13][0] + counts[31][0] == 0  # new live series are served at 0 first...
    now += 1.5
    counts = store.series("GPU-a")
    assert counts[13][0] + counts[31][0] == 10_000  # ...then with every Xid counted
    # the journal's line for an Xid already counted from NVML adds its text, not a count
    assert store.record(XidEvent("GPU-b", 48, now + 1, "nvml"))
    assert not store.record(XidEvent("GPU-b", 48, now + 1.2, "journal", "An uncorrectable double bit error"))
    assert store.record(XidEvent("GPU-b", 48, now + 1.3, "journal", "a second one"))  # unmatched: counts
    assert [e.message for e in store.history("GPU-b")] == ["An uncorrectable double bit error", "a second one"]
    # a GPU falls off the bus once per event: NVML's Xid 79, the Xid 79 line and the driver's line
    # without an Xid (parsed as 79) are one, in whichever order they come
    assert store.record(XidEvent("GPU-d", 79, now + 1, "journal", "GPU 0000:64:00.0: GPU has fallen off the bus."))
    assert not store.record(XidEvent("GPU-d", 79, now + 1.1, "journal", "GPU has fallen off the bus."))
    assert not store.record(XidEvent("GPU-d", 79, now + 1.2, "nvml"))
    assert len(store.history("GPU-d")) == 1
    # a backfilled Xid (before start) is history: served with its count at once
    assert store.record(XidEvent("GPU-c", 48, now - 3600, "journal", "DBE"))
    assert store.series("GPU-c") == {48: (1.0, now - 3600)}
