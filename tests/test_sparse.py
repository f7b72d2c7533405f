"""exporter/sparse.py on its own: the NVLink per-GPU totals and what the page keeps of sparse families."""

from __future__ import annotations

from nvml_exporter.snapshot import Values
from nvml_exporter.sparse import ERRORS, LINK_ERRORS, LINK_UP, LINKS, NvlinkTotals, Reveal, ZeroFirst

ECC = "nvidia_gpu_ecc_errors_total"
ACTIVE = "nvidia_gpu_clock_event_active"
HEALTH = "nvidia_gpu_health"


def links(up: dict[int, float], errors: dict[tuple[int, str], float]) -> Values:
    return {LINK_UP: {(str(k),): v for k, v in up.items()},
            LINK_ERRORS: {(str(k), t): v for (k, t), v in errors.items()}}


def test_totals_count_links_by_state_and_sum_errors_by_type() -> None:
    totals = NvlinkTotals()
    v = links({0: 1, 1: 1, 2: 0}, {(0, "replay"): 2, (1, "replay"): 3, (0, "crc_flit"): 7, (1, "crc_flit"): 0})
    totals.apply(v)
    assert v[LINKS] == {("up",): 2, ("down",): 1}
    assert v[ERRORS] == {("replay",): 5, ("crc_flit",): 7}  # (types no link answered for are not invented)


def test_totals_never_go_down_when_a_link_stops_answering_or_its_counter_goes_back() -> None:
    totals = NvlinkTotals()
    totals.apply(links({0: 1, 1: 1}, {(0, "crc_flit"): 10, (1, "crc_flit"): 4}))
    down = links({0: 0, 1: 1}, {(1, "crc_flit"): 4})  # link 0 down: its counters answer NOT_SUPPORTED
    totals.apply(down)
    assert down[ERRORS] == {("crc_flit",): 14}
    assert down[LINK_ERRORS] == {("0", "crc_flit"): 10, ("1", "crc_flit"): 4}  # its last reading
    reset = links({0: 1, 1: 1}, {(0, "crc_flit"): 0, (1, "crc_flit"): 6})  # a GPU reset zeroed link 0
    totals.apply(reset)
    assert reset[ERRORS] == {("crc_flit",): 16}  # 10 counted before the reset, 0 since; link 1: 6
    assert reset[LINK_ERRORS] == {("0", "crc_flit"): 0, ("1", "crc_flit"): 6}


def test_totals_hand_out_the_same_mappings_while_the_readings_are_the_same() -> None:
    totals = NvlinkTotals()
    raw = links({0: 1}, {(0, "replay"): 0})
    first, second = dict(raw), dict(raw)
    totals.apply(first)
    totals.apply(second)
    assert first[ERRORS] is second[ERRORS] and first[LINKS] is second[LINKS]


def test_no_nvlink_no_totals() -> None:
    v: Values = {"nvidia_gpu_temperature_celsius": {(): 50.0}}
    NvlinkTotals().apply(v)
    assert v == {"nvidia_gpu_temperature_celsius": {(): 50.0}}


def test_a_sparse_counter_is_served_once_non_zero_and_at_0_first_when_that_happens_after_start() -> None:
    reveal = Reveal(hold=1.0)
    at_start = {ECC: {("corrected", "volatile"): 3.0, ("uncorrected", "volatile"): 0.0}}
    reveal.apply(at_start, now=0.0, up=True)
    assert at_start[ECC] == {("corrected", "volatile"): 3.0}  # non-zero at start: history, at once

    def page(now: float, uncorrected: float) -> dict[tuple[str, ...], float]:
        v: Values = {ECC: {("corrected", "volatile"): 3.0, ("uncorrected", "volatile"): uncorrected}}
        reveal.apply(v, now=now, up=True)
        return dict(v[ECC])

    assert page(10.0, 2.0) == {("corrected", "volatile"): 3.0, ("uncorrected", "volatile"): 0.0}
    assert page(10.5, 2.0)[("uncorrected", "volatile")] == 0.0  # held for `hold` seconds
    assert page(11.0, 2.0)[("uncorrected", "volatile")] == 2.0
    assert page(12.0, 0.0)[("uncorrected", "volatile")] == 0.0  # (a driver reload): still served


def test_a_sparse_gauge_is_served_from_its_first_non_zero_value_on() -> None:
    reveal = Reveal(hold=1.0)
    pages = []
    for now, mask in ((0.0, 0), (5.0, 1), (6.0, 0)):
        v: Values = {ACTIVE: {("gpu_idle",): float(mask), ("hw_slowdown",): 0.0}}
        reveal.apply(v, now=now, up=True)
        pages.append(v.get(ACTIVE))
    assert pages == [None, {("gpu_idle",): 1.0}, {("gpu_idle",): 0.0}]  # a gauge is not held at 0


def test_link_detail_is_shown_for_a_faulty_link_with_all_its_series_and_stays() -> None:
    reveal = Reveal(hold=1.0)
    healthy = links({0: 1, 1: 1}, {(0, "replay"): 0, (1, "replay"): 0, (0, "crc_flit"): 0, (1, "crc_flit"): 0})
    reveal.apply(healthy, now=0.0, up=True)
    assert LINK_UP not in healthy and LINK_ERRORS not in healthy
    errors = links({0: 1, 1: 1}, {(0, "replay"): 0, (1, "replay"): 4, (0, "crc_flit"): 0, (1, "crc_flit"): 0})
    reveal.apply(errors, now=3.0, up=True)
    assert errors[LINK_UP] == {("1",): 1.0}
    assert errors[LINK_ERRORS] == {("1", "replay"): 0.0, ("1", "crc_flit"): 0.0}
    again = links({0: 1, 1: 1}, {(0, "replay"): 0, (1, "replay"): 4, (0, "crc_flit"): 0, (1, "crc_flit"): 0})
    reveal.apply(again, now=4.0, up=True)
    assert again[LINK_ERRORS] == {("1", "replay"): 4.0, ("1", "crc_flit"): 0.0}
    assert reveal.links == {"1"}


def test_per_link_shows_every_link_from_the_start() -> None:
    reveal = Reveal(per_link=True)
    v = links({0: 1, 1: 1}, {(0, "replay"): 0, (1, "replay"): 0})
    reveal.apply(v, now=0.0, up=True)
    assert v[LINK_UP] == {("0",): 1.0, ("1",): 1.0} and len(v[LINK_ERRORS]) == 2


def test_health_shows_checks_that_were_not_ok() -> None:
    reveal = Reveal()
    v: Values = {HEALTH: {("memory",): 0.0, ("nvlink",): 2.0}}
    reveal.apply(v, now=0.0, up=True)
    assert v[HEALTH] == {("nvlink",): 2.0}


def test_an_unchanged_input_gives_the_same_mapping_back() -> None:
    reveal = Reveal()
    series = {("gpu_idle",): 1.0, ("hw_slowdown",): 0.0}
    first: Values = {ACTIVE: series}
    second: Values = {ACTIVE: series}
    reveal.apply(first, now=0.0, up=True)
    reveal.apply(second, now=1.0, up=True)
    assert first[ACTIVE] is second[ACTIVE]  # exposition then reuses the rendered block


def test_zero_first_counts() -> None:
    z = ZeroFirst(hold=1.0)
    assert z.served({"1": 1}, now=5.0) == {"1": 0}
    assert z.served({"1": 2}, now=5.5) == {"1": 0}
    assert z.served({"1": 2}, now=6.0) == {"1": 2}
