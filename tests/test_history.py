"""The incident history: across exporter restarts (kill -9), GPU resets, reboots and a changed GPU order,
escalation as data, clearing a GPU, bounds under a storm, and the kernel lines that feed it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import tracemalloc
from pathlib import Path

import jsonschema

from nvml_exporter import escalation
from nvml_exporter import history as hist
from nvml_exporter.diagnosis import diagnose
from nvml_exporter.history import History
from nvml_exporter.snapshot import GpuIdentity, GpuSnapshot
from nvml_exporter.xidcatalog import DAY
from nvml_exporter.xidstore import XidEvent
from tests.conftest import EXPORTER, free_port, require_tool, samples, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml
from tests.journal import write_journal, xid_line

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def store(tmp_path: Path, boot: str = "boot-a", clock: Clock | None = None, **kw: object) -> History:
    return History(str(tmp_path / "history.sqlite"), boot_id=boot, clock=clock or Clock(), **kw)  # type: ignore[arg-type]


def actions(h: History, uuid: str, now: float) -> list[str]:
    return [f.action for f in h.assess(uuid, now)]


def boot_file(tmp_path: Path, boot: str) -> Path:
    path = tmp_path / f"boot_id-{boot}"
    path.write_text(boot + "\n")
    return path


def gpu_series(fake: FakeNvml, gpu: int, uuid: str, metric: str, **labels: str) -> str:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f'{metric}{{gpu="{gpu}",uuid="{uuid}"{extra}}}'


def history_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXPORTER, "history", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


# -- through the exporter, the fake driver and journal files ------------------------------------------

def test_xid79_after_a_reset_and_a_reboot_ends_at_rma_eval_across_kill_9_and_a_new_gpu_order(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    db = tmp_path / "state" / "history.sqlite"
    u0, u1 = fake.state["gpu.0.uuid"], fake.state["gpu.1.uuid"]
    common = (f"--history.path={db}", "--collect.min-interval=10ms")

    def run(boot: str, *args: str):  # type: ignore[no-untyped-def]
        return start_exporter(fake, *common, f"--history.boot-id-path={boot_file(tmp_path, boot)}", *args,
                              wait_ready=True)

    def value(exp, gpu: int, uuid: str, metric: str, **labels: str) -> float | None:  # type: ignore[no-untyped-def]
        return samples(exp.metrics()).get(gpu_series(fake, gpu, uuid, metric, **labels))

    # boot A: GPU 0 falls off the bus
    exp = run("boot-a", "--no-xid.journal")
    fake.xid(0, 79)
    wait_for(lambda: value(exp, 0, u0, "nvidia_gpu_incidents_total", kind="fatal_xid") == 1)
    assert value(exp, 0, u0, "nvidia_gpu_recommended_action", action="reboot_node") == 1
    exp.proc.send_signal(signal.SIGKILL)
    exp.proc.wait()

    # the GPU is reset (the reset job's acknowledgement in the journal), and Xid 79 comes back
    journal = write_journal(tmp_path / "reset.journal", [(time.time(), f"GPU reset executed: {u0}, success: true")])
    exp = run("boot-a", f"--xid.journal-path={journal}")
    wait_for(lambda: value(exp, 0, u0, "nvidia_gpu_incidents_total", kind="reset") == 1)
    assert value(exp, 0, u0, "nvidia_gpu_incidents_total", kind="fatal_xid") == 1  # kept across the kill -9
    fake.xid(0, 79)
    wait_for(lambda: value(exp, 0, u0, "nvidia_gpu_incidents_total", kind="fatal_xid") == 2)
    assert value(exp, 0, u0, "nvidia_gpu_recommended_action", action="rma_eval") is None  # one remedy failed
    exp.proc.send_signal(signal.SIGKILL)
    exp.proc.wait()

    # reboot (a new boot id), and the GPUs come back in another order: GPU 0's board is now index 1
    fake.set({"gpu.0.uuid": u1, "gpu.1.uuid": u0})
    exp = run("boot-b", "--no-xid.journal")
    assert value(exp, 1, u0, "nvidia_gpu_incidents_total", kind="fatal_xid") == 2
    # (a sparse family: a GPU with no incident serves no series, which reads as 0)
    assert not value(exp, 0, u1, "nvidia_gpu_incidents_total", kind="fatal_xid")
    fake.xid(1, 79)
    wait_for(lambda: value(exp, 1, u0, "nvidia_gpu_recommended_action", action="rma_eval") == 1)
    s = samples(exp.metrics())
    assert s[gpu_series(fake, 1, u0, "nvidia_gpu_health", check="history")] == 2
    assert s[gpu_series(fake, 1, u0, "nvidia_gpu_incident_interval_seconds_count")] == 2
    # a sparse family: a check that was never off is not served (absent reads as 0)
    assert s.get(gpu_series(fake, 0, u1, "nvidia_gpu_health", check="history"), 0) == 0
    assert gpu_series(fake, 0, u1, "nvidia_gpu_incident_interval_seconds_count") not in s  # no incident: no series
    assert s[gpu_series(fake, 1, u0, "nvidia_gpu_incident_interval_seconds_bucket", le="900")] == 2
    checked = subprocess.run([require_tool("promtool"), "check", "metrics"], input=exp.metrics(), capture_output=True,
                             text=True)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")

    # the reason, for people
    doc = json.loads(history_cli(f"--history.path={db}", "--gpu", u0, "--json").stdout)
    (gpu,) = doc["gpus"]
    assert (gpu["status"], gpu["action"]) == ("critical", "rma_eval")
    reason = gpu["escalations"][0]["reason"]
    assert "Xid 79 GPU_HAS_FALLEN_OFF_THE_BUS came back after 2 GPU resets or reboots" in reason
    assert "2 boot(s)" in reason
    assert [e["kind"] for e in gpu["events"]] == ["boot", "xid", "reset", "xid", "boot", "xid"]

    # repaired in place: cleared, audited, and the running exporter sees it
    cleared = history_cli("clear", f"--history.path={db}", "--gpu", u0, "--reason", "reseated the board")
    assert cleared.returncode == 0, cleared.stderr
    wait_for(lambda: value(exp, 1, u0, "nvidia_gpu_health", check="history") == 0, timeout=20)
    assert value(exp, 1, u0, "nvidia_gpu_recommended_action", action="reboot_node") == 1  # the fresh Xid 79
    text = history_cli(f"--history.path={db}").stdout
    assert "clear" in text and "reseated the board (by " in text


def test_journal_lines_without_an_xid_count_once_and_nvswitch_sxids_per_switch(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    now = time.time()
    journal = write_journal(tmp_path / "kernel.journal", [
        (now - 60, xid_line("0000:64:00", 79, "GPU has fallen off the bus.")),
        (now - 60, "NVRM: GPU 0000:64:00.0: GPU has fallen off the bus."),
        (now - 30, "NVRM: The NVIDIA GPU 0000:53:00.0"),
        (now - 30, "NVRM: (PCI ID: 10de:2330) installed in this system has"),
        (now - 30, "NVRM: fallen off the bus and is not responding to commands."),
        (now - 20, "NVRM: Xid (PCI:0000:53:00 GPU-I:05): 94, pid=7194, Contained: CE User Channel (0x9). "
                   "RST: No, D-RST: No"),
        (now - 10, "nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 20009, Non-fatal, Link 28 RX Short Error Rate"),
        (now - 9, "nvidia-nvswitch0: SXid (PCI:0000:c3:00.0): 20009, Non-fatal, Link 29 RX Short Error Rate"),
        (now - 8, "nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 24007, Fatal, Link 30 sourcetrack timeout error"),
    ])
    exp = start_exporter(fake, f"--xid.journal-path={journal}", f"--history.path={tmp_path / 'h.sqlite'}",
                         wait_ready=True)
    u0, u1 = fake.state["gpu.0.uuid"], fake.state["gpu.1.uuid"]

    def ready() -> dict[str, float] | None:
        s = samples(exp.metrics())
        return s if s.get(gpu_series(fake, 0, u0, "nvidia_gpu_xid_errors_total", xid="94")) == 1 else None

    s = wait_for(ready)
    assert isinstance(s, dict)
    assert s[gpu_series(fake, 1, u1, "nvidia_gpu_xid_errors_total", xid="79")] == 1  # two lines, one event
    assert s[gpu_series(fake, 0, u0, "nvidia_gpu_xid_errors_total", xid="79")] == 1  # the 3-record message
    assert s['nvidia_nvswitch_sxid_errors_total{pci="00000000:c3:00.0",sxid="20009"}'] == 2
    assert s['nvidia_nvswitch_sxid_errors_total{pci="00000000:05:00.0",sxid="24007"}'] == 1
    assert s[gpu_series(fake, 1, u1, "nvidia_gpu_incidents_total", kind="fatal_xid")] == 1
    diag = subprocess.run([*EXPORTER, "diagnose", "--json", f"--xid.journal-path={journal}",
                           f"--history.path={tmp_path / 'h.sqlite'}"], capture_output=True, text=True, cwd=REPO,
                          env={**fake.env(), "PATH": "/usr/bin:/bin"}, timeout=60)
    doc = json.loads(diag.stdout)
    jsonschema.validate(doc, json.loads((REPO / "docs" / "diagnose.schema.json").read_text()))
    g0 = next(g for g in doc["gpus"] if g["uuid"] == u0)
    (x94,) = [x for x in g0["xids"] if x["code"] == 94]
    assert x94["message"].startswith("pid=7194, Contained")
    assert (x94["gpu_instance"], x94["fields"]) == ("5", {"pid": "7194"})
    assert [(e["kind"], e.get("code")) for e in g0["history"]] == [("boot", None), ("xid", 79), ("xid", 94)]
    text = subprocess.run([*EXPORTER, "diagnose", f"--xid.journal-path={journal}",
                           f"--history.path={tmp_path / 'h.sqlite'}"], capture_output=True, text=True, cwd=REPO,
                          env={**fake.env(), "PATH": "/usr/bin:/bin"}, timeout=60).stdout
    assert "history       3 event(s) kept across restarts and reboots:" in text
    assert "xid    Xid 79 GPU_HAS_FALLEN_OFF_THE_BUS x1" in text


# -- the store and its escalation, in process -------------------------------------------------------

def test_identical_xids_within_5_s_are_one_incident_and_a_reread_counts_nothing(tmp_path: Path) -> None:
    h = store(tmp_path)
    assert h.record_xid("GPU-0", 79, T0, "GPU has fallen off the bus.")
    assert not h.record_xid("GPU-0", 79, T0 + 3)
    assert not h.record_xid("GPU-0", 79, T0 + 7)  # 4 s after the last: still the same incident
    assert not h.record_xid("GPU-0", 79, T0 + 3)  # the journal read again after a restart
    assert h.record_xid("GPU-0", 79, T0 + 20)
    assert h.record_xid("GPU-0", 48, T0 + 20)  # another code is another incident
    assert not h.record_xid("GPU-0", 43, T0 + 30)  # informational: not kept
    rows = [r for r in h.rows("GPU-0") if r.kind == "xid"]
    assert [(r.code, r.count, r.last_ts - r.first_ts) for r in rows] == [(79, 3, 7.0), (79, 1, 0.0), (48, 1, 0.0)]
    assert actions(h, "GPU-0", T0 + 60) == []  # the same Xid, but no remedy came between


def test_the_same_fatal_xid_after_two_remedies_escalates_and_the_threshold_is_data(tmp_path: Path) -> None:
    clock = Clock()
    h = store(tmp_path, clock=clock)
    h.record_xid("GPU-0", 48, T0)
    assert h.record_reset("GPU-0", T0 + 60, "counters went back to zero")
    assert not h.record_reset("GPU-0", T0 + 120, "acknowledged")  # the same reset, told twice
    h.record_xid("GPU-0", 48, T0 + 600)
    assert actions(h, "GPU-0", T0 + 700) == []
    h.record_reset("GPU-0", T0 + 4000, "acknowledged")
    h.record_xid("GPU-0", 48, T0 + 5000)
    (finding,) = h.assess("GPU-0", T0 + 5000)
    assert (finding.status, finding.action) == ("critical", "rma_eval")
    assert "came back after 2 GPU resets or reboots" in finding.reason and "limit 2" in finding.reason
    assert actions(h, "GPU-1", T0 + 5000) == []  # another GPU's resets and Xids are its own
    assert escalation.threshold(48) == 2 and escalation.threshold(94) is None and escalation.threshold(63) is None


def test_xid94_repeats_never_escalate(tmp_path: Path) -> None:
    clock = Clock()
    for i, boot in enumerate(("boot-a", "boot-b", "boot-c", "boot-d")):
        clock.now = T0 + i * 3600
        h = store(tmp_path, boot, clock)
        for j in range(3):
            h.record_xid("GPU-0", 94, clock.now + j * 60, "Contained: CE User Channel (0x9). RST: No, D-RST: No")
            h.record_reset("GPU-0", clock.now + j * 60 + 30 + (j * 400), "acknowledged")
        h.close()
    h = store(tmp_path, "boot-d", clock)
    assert actions(h, "GPU-0", clock.now + 600) == []
    assert h.counts("GPU-0")[0]["fatal_xid"] == 0  # contained errors are not incidents
    assert len([r for r in h.rows("GPU-0") if r.kind == "xid"]) == 12  # but they are kept


def test_five_incidents_on_a_node_within_7_days_call_for_support(tmp_path: Path) -> None:
    clock = Clock()
    h = store(tmp_path, clock=clock)
    for gpu in range(4):
        h.record_xid(f"GPU-{gpu}", 79 if gpu % 2 else 48, T0 + gpu * 1.3 * DAY)
    assert "contact_support" not in actions(h, "GPU-0", T0 + 5 * DAY)
    h.record_xid("GPU-4", 74, T0 + 6 * DAY)
    now = T0 + 6 * DAY + 60
    for gpu in range(5):
        assert actions(h, f"GPU-{gpu}", now) == ["contact_support"], gpu
    reason = h.assess("GPU-0", now)[0].reason
    assert "5 incidents on this node's GPUs (5 GPU(s)) within 7 days (limit 5)" in reason
    assert actions(h, "GPU-7", now) == []  # a GPU with no incident is not the one to send back
    assert actions(h, "GPU-4", T0 + 7.5 * DAY) == []  # the first incident left the 7-day window
    # a GPU repaired in place no longer counts towards the node's
    h.clear("GPU-0", "replaced the riser", who="ops")
    assert actions(h, "GPU-4", now) == []


def test_earlier_boots_xids_feed_the_repeat_rules(tmp_path: Path) -> None:
    clock = Clock()
    h = store(tmp_path, "boot-a", clock)
    h.record_xid("GPU-0", 31, T0 - 5000, "MMU Fault: ENGINE GRAPHICS")
    h.close()
    h = store(tmp_path, "boot-b", clock)
    snap = GpuSnapshot(GpuIdentity(0, "GPU-0"), up=True, values={})
    now_event = [XidEvent("GPU-0", 31, T0 - 10, "nvml")]
    assert {c.name: c for c in diagnose(snap, now_event, None, 0, T0).checks}["xid"].status == "ok"
    past = tuple(XidEvent("GPU-0", code, ts, "history", m) for code, ts, m in h.xid_events("GPU-0", T0 - 60, T0 - DAY))
    check = {c.name: c for c in diagnose(snap, now_event + list(past), None, 0, T0).checks}["xid"]
    assert (check.status, check.action) == ("warning", "rma_eval")


def test_row_remaps_are_events_not_incidents(tmp_path: Path) -> None:
    h = store(tmp_path)
    assert not h.observe_remap("GPU-0", {"rows_correctable": 0, "rows_uncorrectable": 1, "pending": 0}, T0)
    assert not h.observe_remap("GPU-0", {"rows_correctable": 0, "rows_uncorrectable": 1, "pending": 0}, T0 + 30)
    assert h.observe_remap("GPU-0", {"rows_correctable": 0, "rows_uncorrectable": 2, "pending": 1}, T0 + 60)
    assert h.record_xid("GPU-0", 63, T0 + 61, "Row Remapper: New row marked for remapping, reset gpu to activate.")
    assert h.record_xid("GPU-0", 64, T0 + 3600)
    totals, _ = h.counts("GPU-0")
    assert totals == {"fatal_xid": 0.0, "reset": 0.0, "remap": 3.0}
    assert "pending, rows_uncorrectable went up" in h.rows("GPU-0")[1].detail
    h.close()
    assert store(tmp_path).observe_remap("GPU-0", {"rows_correctable": 0, "rows_uncorrectable": 2, "pending": 1},
                                         T0 + 90) is False  # the baseline survives a restart


def test_interval_histogram_counts_gaps_between_incidents(tmp_path: Path) -> None:
    h = store(tmp_path)
    for ts in (T0, T0 + 600, T0 + 600 + 2 * 3600, T0 + 600 + 2 * 3600 + 10 * DAY):
        h.record_xid("GPU-0", 79, ts)
    _, intervals = h.counts("GPU-0")
    assert intervals == {"900": 1.0, "3600": 1.0, "86400": 2.0, "604800": 2.0, "2592000": 3.0, "+Inf": 3.0,
                         "sum": 600 + 7200 + 10 * DAY, "count": 3.0}


def test_a_100000_xid_storm_keeps_the_store_within_its_cap_and_memory_bounded(tmp_path: Path) -> None:
    clock = Clock()
    h = store(tmp_path, clock=clock)
    tracemalloc.start()
    try:
        for i in range(100_000):  # every one a new incident: 6 s apart on each GPU and code
            h.record_xid(f"GPU-{i % 8}", (79, 48, 13, 119)[(i // 8) % 4], T0 + (i // 32) * 6.0, "storm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    h.close()
    # (the store's Python heap; the exporter's resident memory and files under a storm of the same size are
    # held in test_history_acceptance.py)
    assert peak < 12 * 1024 * 1024, peak
    path = tmp_path / "history.sqlite"
    rows = History(str(path), readonly=True, boot_id="boot-a")
    kept = sum(len([r for r in rows.rows(f"GPU-{g}") if r.kind == "xid"]) for g in range(8))
    assert hist.MAX_ROWS * 0.8 <= kept <= hist.MAX_ROWS
    assert path.stat().st_size < 4 * 1024 * 1024
    newest = max(r.first_ts for r in rows.rows("GPU-7"))
    assert newest == T0 + (99_999 // 32) * 6.0  # the oldest went first
    rows.close()


def test_a_storm_of_one_code_is_one_incident(tmp_path: Path) -> None:
    h = store(tmp_path)
    for i in range(100_000):
        h.record_xid("GPU-0", 13, T0 + i * 0.001)
    (row,) = [r for r in h.rows("GPU-0") if r.kind == "xid"]
    assert (row.count, row.last_ts) == (100_000, T0 + 99_999 * 0.001)
    h.close()
    (row,) = [r for r in store(tmp_path).rows("GPU-0") if r.kind == "xid"]
    assert row.count == 100_000  # the coalesced count reached the disk


def test_clear_needs_a_reason_and_an_unreadable_store_is_a_clear_error(tmp_path: Path) -> None:
    h = store(tmp_path)
    h.record_xid("GPU-0", 79, T0)
    try:
        h.clear("GPU-0", "  ")
    except hist.HistoryError as e:
        assert "reason" in str(e)
    else:
        raise AssertionError("cleared without a reason")
    h.close()
    (tmp_path / "garbage.sqlite").write_bytes(b"not a database" * 100)
    try:
        History(str(tmp_path / "garbage.sqlite"), boot_id="x")
    except hist.HistoryError as e:
        assert "garbage.sqlite" in str(e)
    else:
        raise AssertionError("opened a file that is not a database")
    (tmp_path / "a-file").write_text("")
    exporter = subprocess.run([*EXPORTER, f"--web.listen-address=127.0.0.1:{free_port()}",
                               f"--history.path={tmp_path / 'a-file' / 'history.sqlite'}"],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
    assert exporter.returncode == 1
    assert "nvml-exporter: error: incident history" in exporter.stderr and "a-file" in exporter.stderr
    out = history_cli(f"--history.path={tmp_path / 'none.sqlite'}")
    assert out.returncode == 1 and "no incident history at" in out.stderr
    out = history_cli("clear", f"--history.path={tmp_path / 'history.sqlite'}", "--gpu", "GPU-9", "--reason", "x")
    assert out.returncode == 1 and "no history for GPU GPU-9" in out.stderr
