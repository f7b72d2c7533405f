"""Issue 16's acceptance, through the real exporter over the fake driver and real journal files: contained
Xids (94) never escalate however often a reset follows them, five incidents on a node within 7 days call
for support (and four do not), and a storm of distinct incidents keeps the store within its cap and the
process's resident memory bounded."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

from nvml_exporter import history as hist
from nvml_exporter.xidcatalog import DAY
from tests.conftest import EXPORTER, Exporter, samples, wait_for
from tests.fakenvml.scenario import REPO, FakeNvml
from tests.journal import write_journal, xid_line


def pci(fake: FakeNvml, gpu: int) -> str:
    """The GPU's address as the driver's Xid line writes it: '00000000:53:00.0' -> '0000:53:00'."""
    _, bus, device = fake.state[f"gpu.{gpu}.bus_id"].split(".")[0].split(":")
    return f"0000:{bus}:{device}"


def key(fake: FakeNvml, gpu: int, metric: str, **labels: str) -> str:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f'{metric}{{gpu="{gpu}",uuid="{fake.state[f"gpu.{gpu}.uuid"]}"{extra}}}'


def actions(s: dict[str, float], fake: FakeNvml, gpu: int) -> set[str]:
    """The actions nvidia_gpu_recommended_action serves at 1 for a GPU."""
    prefix = key(fake, gpu, "nvidia_gpu_recommended_action")[:-1] + ',action="'
    return {k[len(prefix):-2] for k, v in s.items() if k.startswith(prefix) and v == 1}


def reset_line(fake: FakeNvml, gpu: int) -> str:
    return f"GPU reset executed: {fake.state[f'gpu.{gpu}.uuid']}, success: true"


def cli(fake: FakeNvml, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXPORTER, *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**fake.env(), "PATH": "/usr/bin:/bin"})


def test_xid94_after_every_reset_never_escalates_while_xid48_so_repeated_goes_to_rma_eval(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    """GPU 0: a contained ECC error (Xid 94) four times, a GPU reset acknowledged after each of the first three.
    GPU 1, the control: the same journal pattern with Xid 48 (uncorrectable ECC), which must escalate, so that
    GPU 0's quiet shows the threshold table at work and not lines that were never read."""
    start = time.time() - 4 * 3600  # within the last day: the live repeat rules see these too
    lines = []
    for n in range(4):
        t = start + n * 1800  # resets 15 min after each Xid: far past the 5 s coalescing and the reset de-dupe
        lines.append((t, xid_line(pci(fake, 0), 94, "Contained: CE User Channel (0x9). "
                                                    "RST: No, D-RST: No")))
        lines.append((t + 1, xid_line(pci(fake, 1), 48, "An uncorrectable double bit error (DBE) has been "
                                                        "detected on GPU in the framebuffer at partition 1, "
                                                        "subpartition 0.")))
        if n < 3:
            lines.append((t + 900, reset_line(fake, 0)))
            lines.append((t + 901, reset_line(fake, 1)))
    journal = write_journal(tmp_path / "kernel.journal", lines)
    db = tmp_path / "state" / "history.sqlite"
    exp = start_exporter(fake, f"--history.path={db}", f"--xid.journal-path={journal}", "--collect.min-interval=10ms",
                         wait_ready=True)

    def read() -> dict[str, float] | None:  # the whole journal, to its last line (GPU 1's fourth Xid 48)
        s = samples(exp.metrics())
        done = (s.get("nvml_exporter_journal_up") == 1
                and s.get(key(fake, 1, "nvidia_gpu_incidents_total", kind="fatal_xid")) == 4)
        return s if done else None

    s = wait_for(read, timeout=30)
    assert isinstance(s, dict)
    # the control: Xid 48 back after 3 resets is beyond its threshold (2)
    assert s[key(fake, 1, "nvidia_gpu_health", check="history")] == 2
    assert actions(s, fake, 1) == {"rma_eval"}
    assert s[key(fake, 1, "nvidia_gpu_incidents_total", kind="fatal_xid")] == 4
    # GPU 0 saw as many Xids and as many resets, and nothing escalates
    assert s[key(fake, 0, "nvidia_gpu_xid_errors_total", xid="94")] == 4
    assert s[key(fake, 0, "nvidia_gpu_incidents_total", kind="reset")] == 3
    # contained: not an incident (a sparse family: no incident, no series, which reads as 0)
    assert not s.get(key(fake, 0, "nvidia_gpu_incidents_total", kind="fatal_xid"))
    assert s.get(key(fake, 0, "nvidia_gpu_health", check="history"), 0) == 0  # sparse: absent reads as 0
    assert "rma_eval" not in actions(s, fake, 0) and "contact_support" not in actions(s, fake, 0)
    assert len(actions(s, fake, 0)) == 1  # one action is served: the diagnosis did run for GPU 0

    # `diagnose`, reading the same history, agrees, and says why GPU 1 escalates
    out = cli(fake, "diagnose", "--json", "--timeout=10", f"--xid.journal-path={journal}", f"--history.path={db}")
    doc = json.loads(out.stdout)
    g0, g1 = (next(g for g in doc["gpus"] if g["uuid"] == fake.state[f"gpu.{i}.uuid"]) for i in (0, 1))
    assert g0["action"] != "rma_eval" and not [c for c in g0["checks"] if c["action"] == "rma_eval"], g0["checks"]
    assert [e["kind"] for e in g0["history"] if e["kind"] != "boot"] == ["xid", "reset"] * 3 + ["xid"]
    (h1,) = [c for c in g1["checks"] if c["name"] == "history"]
    assert (g1["action"], h1["status"], h1["action"]) == ("rma_eval", "critical", "rma_eval")
    assert "Xid 48 GPU_ECC_DBE came back after 3 GPU resets or reboots" in h1["reason"]
    text = cli(fake, "diagnose", "--timeout=10", f"--xid.journal-path={journal}", f"--history.path={db}").stdout
    assert "Xid 48 GPU_ECC_DBE came back after 3 GPU resets or reboots" in text
    doc = json.loads(cli(fake, "history", f"--history.path={db}", "--gpu", fake.state["gpu.0.uuid"], "--json").stdout)
    (g0,) = doc["gpus"]
    assert g0["escalations"] == [] and g0["action"] != "rma_eval"


def test_five_incidents_on_five_gpus_within_6_days_call_for_support_and_four_do_not(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    """Fatal Xids on GPUs 0-3 over the last 6 days (one each: no GPU's own rule fires), then a fifth on GPU 4:
    the node rule (NODE_RULE: 5 incidents within 7 days) sends every GPU that had one to contact_support."""
    now = time.time()
    directory = tmp_path / "journal"
    directory.mkdir()
    four = [(now - 6 * DAY + 3600, 79, "GPU has fallen off the bus."),
            (now - 4.5 * DAY, 48, "An uncorrectable double bit error (DBE) has been detected on GPU."),
            (now - 3 * DAY, 74, "NVLink: fatal error detected on link 3"),
            (now - 1.5 * DAY, 119, "Timeout after 6s of waiting for RPC response from GPU0 GSP!")]
    write_journal(directory / "system.journal", [(ts, xid_line(pci(fake, gpu), code, text))
                                                 for gpu, (ts, code, text) in enumerate(four)])
    db = tmp_path / "history.sqlite"
    exp = start_exporter(fake, f"--history.path={db}", f"--xid.journal-path={directory}",
                         "--collect.min-interval=10ms", wait_ready=True)
    incidents = [key(fake, gpu, "nvidia_gpu_incidents_total", kind="fatal_xid") for gpu in range(8)]

    def recorded(n: int) -> dict[str, float] | None:
        s = samples(exp.metrics())
        return s if [s.get(k, 0.0) for k in incidents] == [1.0] * n + [0.0] * (8 - n) else None  # (sparse)

    s = wait_for(lambda: recorded(4), timeout=30)
    assert isinstance(s, dict)
    for gpu in range(8):
        assert "contact_support" not in actions(s, fake, gpu), gpu
        assert s.get(key(fake, gpu, "nvidia_gpu_health", check="history"), 0) == 0, gpu

    # the fifth, a minute ago, in a journal file that appears while the exporter runs
    fifth = xid_line(pci(fake, 4), 79, "GPU has fallen off the bus.")
    write_journal(directory / "system@2.journal", [(now - 60, fifth)])
    s = wait_for(lambda: recorded(5), timeout=30)
    assert isinstance(s, dict)
    s = wait_for(lambda: (p := samples(exp.metrics())) and all(
        p.get(key(fake, gpu, "nvidia_gpu_health", check="history")) == 2 for gpu in range(5)) and p, timeout=20)
    assert isinstance(s, dict)
    for gpu in range(5):
        assert actions(s, fake, gpu) == {"contact_support"}, gpu
    for gpu in range(5, 8):  # a GPU with no incident is not the one to send back
        assert "contact_support" not in actions(s, fake, gpu), gpu
        assert s.get(key(fake, gpu, "nvidia_gpu_health", check="history"), 0) == 0, gpu
    doc = json.loads(cli(fake, "history", f"--history.path={db}", "--gpu", fake.state["gpu.0.uuid"], "--json").stdout)
    (g0,) = doc["gpus"]
    assert g0["action"] == "contact_support"
    assert any("5 incidents on this node's GPUs (5 GPU(s)) within 7 days (limit 5)" in e["reason"]
               for e in g0["escalations"]), g0["escalations"]


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


STORM_CODES = (48, 119, 74, 95)  # incident tiers; not 79, whose lines on one GPU within 30 s are one event
MIB = 1024  # KiB


def _storm(tmp_path: Path, fake: FakeNvml, start_exporter, n: int) -> tuple[Exporter, Path, float]:
    """An exporter that read a journal of `n` Xids, every one a new incident (6 s apart for one GPU and code:
    coalescing joins those within 5 s), the last a minute ago; returns it, its history and the last Xid's time."""
    buses = [pci(fake, gpu) for gpu in range(8)]
    last = time.time() - 60
    lines = [(last - 6.0 * ((n - 1) // 32 - i // 32), xid_line(buses[i % 8], STORM_CODES[(i // 8) % 4], "storm"))
             for i in range(n)]
    journal = write_journal(tmp_path / f"storm-{n}.journal", lines)
    db = tmp_path / f"storm-{n}" / "history.sqlite"
    exp = start_exporter(fake, f"--history.path={db}", f"--xid.journal-path={journal}", wait_ready=True)

    def incidents() -> float:
        return sum(v for k, v in samples(exp.metrics()).items()
                   if k.startswith("nvidia_gpu_incidents_total{") and 'kind="fatal_xid"' in k)

    wait_for(lambda: incidents() == n, timeout=120, interval=0.5)  # every line reached the history
    return exp, db, lines[-1][0]


def test_a_100000_xid_storm_through_the_exporter_keeps_the_store_within_its_cap_and_memory_bounded(
        tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    """The storm through the exporter's own path (journal reader, live Xid store, history), and what a user
    would notice: the history's files on disk and the process's resident memory. Memory is held to two
    bounds: a generous cap on the peak, and no growth with the storm's size (a storm of 12,000 and one of
    100,000 both fill the row cap; keeping the storm's events or rows would cost >= 25 MB more for the
    larger one)."""
    small, _, _ = _storm(tmp_path, fake, start_exporter, 12_000)
    small_anon = _status_kib(small.proc.pid, "RssAnon")
    small.proc.terminate()
    small.proc.wait(timeout=30)

    exp, db, last = _storm(tmp_path, fake, start_exporter, 100_000)
    s = samples(exp.metrics())
    assert s[key(fake, 7, "nvidia_gpu_xid_errors_total", xid="95")] == 100_000 // 32
    hwm, anon = _status_kib(exp.proc.pid, "VmHWM"), _status_kib(exp.proc.pid, "RssAnon")
    # VmHWM: the peak of VmRSS over the process's life, storm included (about 55 MiB here, a third of that
    # the journal file sd-journal maps)
    assert hwm < 128 * MIB, f"peak resident {hwm} KiB"
    assert anon - small_anon < 8 * MIB, f"100,000 Xids kept {anon} KiB anonymous, 12,000 kept {small_anon} KiB"
    files = sum(p.stat().st_size for p in db.parent.glob("history.sqlite*"))  # with the WAL and its index
    assert files < 8 * 1024 * 1024, f"{files} bytes of history while running"

    exp.proc.terminate()
    exp.proc.wait(timeout=30)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT COUNT(*) FROM events WHERE kind = 'xid'").fetchone()[0]
        newest = con.execute("SELECT MAX(first_ts) FROM events WHERE kind = 'xid'").fetchone()[0]
    assert hist.MAX_ROWS * 0.8 <= rows <= hist.MAX_ROWS, rows
    assert abs(newest - last) < 1e-3  # the newest stayed: the oldest went first
    assert db.stat().st_size < 4 * 1024 * 1024, db.stat().st_size
