"""nvml-remediator against a hostile client and under faults (issue 15): each test names its finding.

The full-disk cases run on a small real tmpfs, which needs root: `make test` runs as root (README), and
without root they fail with the reason, as a missing tool does (conftest.require_tool), never skip."""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import json
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import free_port, wait_for
from tests.remediator_helpers import (
    DRAIN_RULES,
    TOKEN,
    UUID1,
    Remediator,
    alert,
    calls,
    payload,
    policy,
    start_remediator,
)
from tests.test_http_security import make_cert

PAGE = 4096  # tmpfs allocates whole pages: an append that needs a new page is what a full disk refuses




def run(workdir: Path, remediators: list[Remediator], *args: str) -> Remediator:
    r = start_remediator(workdir, *args)
    remediators.append(r)
    return r


def drains(workdir: Path) -> list[list[str]]:
    return [c for c in calls(workdir, "scontrol") if c[1] == "update"]


def _needs_root(why: str) -> None:
    assert os.geteuid() == 0, f"{why} needs root: run `make test` as root, as the README says"


@contextlib.contextmanager
def mounted(path: Path, options: str) -> Iterator[Path]:
    _needs_root("mounting a tmpfs")
    path.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the remediator's queue and audit log; workdir/audit.jsonl points into it."""
    with mounted(workdir / "disk", "size=4m,mode=0755") as disk:
        (workdir / "audit.jsonl").symlink_to(disk / "audit.jsonl")
        yield disk


def on_disk(disk: Path) -> list[str]:
    return [f"--storage.path={disk / 'state'}", f"--audit.log={disk / 'audit.jsonl'}"]


def fill(disk: Path, pad_audit: bool = True) -> Path:
    """Fill the disk. First the audit log is padded (with a valid record) to a page boundary, so that
    the remediator's very next audit record needs a page the disk no longer has."""
    audit = disk / "audit.jsonl"
    pad = -audit.stat().st_size % PAGE
    if pad and pad_audit:
        filler = '{"event": "test_padding", "pad": ""}\n'
        pad += PAGE if pad < len(filler) else 0
        with open(audit, "a") as f:
            f.write(filler.replace('""', '"' + "x" * (pad - len(filler)) + '"'))
        assert audit.stat().st_size % PAGE == 0
    block = b"\0" * 65536
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, block)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
        for size in (4096, 1):  # the last partial page too
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block[:size])
    finally:
        os.close(fd)
    return disk / "filler"


def ready(r: Remediator) -> int:
    return r.get("/-/ready", token=None)[0]


def test_full_disk_webhook_is_503_not_ready_and_it_recovers(workdir: Path, small_disk: Path,
                                                           remediators: list[Remediator]) -> None:
    """H3: with the audit log unwritable a webhook gets 503 (Alertmanager retries), /-/ready is 503, a
    metric and a log line say why; once space is freed it is ready again and the retried alert runs."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--execute", "--workers=1", *on_disk(small_disk))
    assert r.post(payload(alert()))[0] == 200
    wait_for(lambda: r.events("done"))
    filler = fill(small_disk)
    second = payload(alert(node="gpu-node-2", fingerprint="2222222222222222"))
    status, body = r.post(second)
    assert status == 503 and "cannot record the alerts durably" in body["error"], body
    assert ready(r) == 503
    page = r.metrics()
    assert "nvml_remediator_storage_ok 0.0" in page
    assert 'nvml_remediator_storage_errors_total{store="audit"} 0.0' not in page
    assert 'nvml_remediator_webhooks_received_total{result="unavailable"} 1.0' in page
    assert "cannot write the remediator's state" in r.log() and "No space left on device" in r.log()
    filler.unlink()
    wait_for(lambda: ready(r) == 200, timeout=20)
    assert r.events("storage_recovered")
    assert r.post(second) == (200, {"queued": 1, "skipped": {}})  # Alertmanager's retry
    wait_for(lambda: len(r.events("done")) == 2, timeout=20)
    assert [d[2] for d in drains(workdir)] == ["NodeName=gpu-node-1", "NodeName=gpu-node-2"]
    assert "nvml_remediator_storage_ok 1.0" in r.metrics()
    assert all(isinstance(json.loads(line), dict) for line in (small_disk / "audit.jsonl").read_text().splitlines())


def test_full_disk_in_the_middle_of_a_job_the_worker_survives(workdir: Path, small_disk: Path,
                                                              remediators: list[Remediator]) -> None:
    """H3: the disk fills while a step runs, so its outcome cannot be recorded: the only worker
    survives, waits, and once space is freed re-runs the (repeatable) step and takes new jobs."""
    policy(workdir, DRAIN_RULES)
    (workdir / "standin" / "sleep-once.scontrol").write_text("3")
    r = run(workdir, remediators, "--execute", "--workers=1", *on_disk(small_disk))
    assert r.post(payload(alert()))[1]["queued"] == 1
    wait_for(lambda: calls(workdir, "scontrol"))  # the drain runs, and nothing is written until it ends...
    filler = fill(small_disk)  # ...when the disk fills
    wait_for(lambda: ready(r) == 503, timeout=10)
    assert "nvml_remediator_storage_ok 0.0" in r.metrics()
    assert r.proc.poll() is None
    filler.unlink()
    wait_for(lambda: r.events("done"), timeout=30)
    ran = [e for e in r.events("ran") if e["step"] == "drain_node"]
    assert [(e["result"], e["resumed"]) for e in ran] == [("ok", True)]
    assert len(drains(workdir)) == 2  # a drain that may not have been recorded is run again
    assert r.post(payload(alert(node="gpu-node-2", fingerprint="2222222222222222")))[1]["queued"] == 1
    wait_for(lambda: len(r.events("done")) == 2, timeout=20)  # the worker is alive
    assert ready(r) == 200


def test_interrupted_drain_runs_again_after_a_restart(workdir: Path, remediators: list[Remediator]) -> None:
    """H4: a drain that was running when the process was killed runs again after the restart; it is
    not skipped as `cooldown` on its own record (the node would never be drained)."""
    policy(workdir, DRAIN_RULES)
    (workdir / "standin" / "sleep-once.scontrol").write_text("30")
    r = run(workdir, remediators, "--execute")
    r.post(payload(alert()))
    wait_for(lambda: drains(workdir))
    first = int((workdir / "standin" / "pid.scontrol").read_text())
    r.kill()
    os.kill(first, signal.SIGKILL)  # what systemd does to the unit's processes
    r = run(workdir, remediators, "--execute")
    wait_for(lambda: r.events("done"), timeout=30)
    assert r.events("cooldown") == []
    ran = r.events("ran")
    assert [(e["step"], e["result"], e["resumed"]) for e in ran] == [("drain_node", "ok", True)]
    assert len(drains(workdir)) == 2
    assert r.post(payload(alert())) == (200, {"queued": 0, "skipped": {"duplicate": 1}})


def test_sigterm_lets_the_running_step_finish_and_the_job_goes_on_at_the_next_start(
        workdir: Path, remediators: list[Remediator]) -> None:
    """M1: SIGTERM while a step runs: the step finishes (bounded by its timeout) and is recorded, no
    further step starts, the command is not orphaned, and the next start goes on with the next step."""
    policy(workdir, """\
        - name: fell-off-bus
          match: ['alertname="GpuXidFellOffBus"']
          steps: [drain_node, checkpoint_signal]
        """)
    (workdir / "standin" / "sleep-once.scontrol").write_text("5")
    r = run(workdir, remediators, "--execute")
    r.post(payload(alert()))
    wait_for(lambda: drains(workdir))
    command = int((workdir / "standin" / "pid.scontrol").read_text())
    r.proc.terminate()
    time.sleep(1.0)
    assert r.proc.poll() is None, "exited while its step was still running"
    assert r.proc.wait(timeout=20) == 0
    assert not Path(f"/proc/{command}").exists() or "zombie" in Path(f"/proc/{command}/status").read_text()
    ran = r.events("ran")
    assert [(e["step"], e["result"], e["rc"]) for e in ran] == [("drain_node", "ok", 0)]
    assert r.events("paused")[0]["next_step"] == 1 and r.events("stopped")
    assert calls(workdir, "nvidia-smi") == []
    r = run(workdir, remediators, "--execute")
    wait_for(lambda: r.events("done"), timeout=30)
    assert [e["step"] for e in r.events("ran")] == ["drain_node", "checkpoint_signal"]
    assert len(drains(workdir)) == 1 and r.events("recovered") == []


def test_trailing_newline_in_a_label_is_rejected_and_cannot_get_round_a_cooldown(
        workdir: Path, remediators: list[Remediator]) -> None:
    """M5: `$` matches before a final newline: `node1\\n` passed the node pattern, reached the argv and,
    as another node, got round the cooldowns. Every validated label is full-matched now."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators)  # a dry run: decisions only
    assert r.post(payload(alert()))[1]["queued"] == 1
    wait_for(lambda: r.events("done"))
    tricks = [alert(node="gpu-node-1\n", fingerprint="00000000000000d1"),
              alert(fingerprint="00000000000000d2", uuid=UUID1 + "\n"),
              alert(fingerprint="00000000000000d3", gpu="1\n"),
              alert(fingerprint="00000000000000d4", xid="79\n"),
              alert(alertname="GpuXidFellOffBus\n", fingerprint="00000000000000d5"),
              alert(fingerprint="00000000000000d6\n")]
    assert r.post(payload(*tricks)) == (200, {"queued": 0, "skipped": {"invalid_label": len(tricks)}})
    time.sleep(1.0)
    assert len(r.events("ran")) == 1
    out = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "resume",
                          f"--config={workdir / 'policy.yml'}", "gpu-node-1\n"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and "invalid node name" in out.stdout


def test_refused_requests_are_counted_not_audited(workdir: Path, remediators: list[Remediator]) -> None:
    """M7: each refused request was an fsynced audit record, an unauthenticated way to fill the disk:
    now a counter and a rate-limited log line."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--execute")
    audit = workdir / "audit.jsonl"
    size = audit.stat().st_size
    for i in range(200):
        assert r.post(payload(alert()), token=None if i % 2 else "wrong-token-0123456789")[0] == 401
    assert r.get("/metrics", token=None)[0] == 401
    assert r.post(None, raw=b"{")[0] == 400
    assert audit.stat().st_size == size
    page = r.metrics()
    assert 'nvml_remediator_requests_refused_total{code="401"} 201.0' in page
    assert 'nvml_remediator_webhooks_received_total{result="unauthorized"} 200.0' in page
    assert 1 <= r.log().count("request refused") <= 3  # one line per status per 10 s


@pytest.mark.parametrize(("body", "why"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"version": "4", "alerts": [], "n": ' + b"7" * 5000 + b"}", "body is not JSON"),
    (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"alertname": ' + b"[" * 990 + b"]" * 990
     + b"}}]}", "nested too deeply"),
])
def test_hostile_json_is_a_400(workdir: Path, remediators: list[Remediator], body: bytes, why: str) -> None:
    """L4: deeply nested JSON or a 5,000-digit number got no answer and a traceback; now a 400."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators)
    status, answer = r.post(None, raw=body)
    assert status == 400 and why in answer["error"], answer
    assert "Traceback" not in r.log()
    assert r.post(payload(alert()))[0] == 200


def test_metrics_need_the_webhooks_credentials(workdir: Path, remediators: list[Remediator]) -> None:
    """L3: GET /metrics answered anyone; it now needs the webhook's credentials, health checks do not."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators)
    assert r.get("/metrics", token=None)[0] == 401
    assert r.get("/metrics", token="wrong-token-0123456789")[0] == 401
    assert r.get("/metrics")[0] == 200
    assert r.get("/-/healthy", token=None) == (200, "OK\n")
    assert r.get("/-/ready", token=None) == (200, "OK\n")


@pytest.mark.parametrize(("text", "message"), [
    ("timeouts: {defualt: 5s}\nrules:\n  - steps: [log]\n", "timeouts: unknown field(s) defualt"),
    ("cooldowns: {drain: 5m}\nrules:\n  - steps: [log]\n", "cooldowns: unknown field(s) drain"),
    ("cooldowns: {node: 1m}\ncooldowns: {node: 1s}\nrules:\n  - steps: [log]\n", "key 'cooldowns' given twice"),
    ("cooldowns: {node: 1m, node: 1s}\nrules:\n  - steps: [log]\n", "key 'node' given twice"),
    ("circuit_breaker: {max_actions: true}\nrules:\n  - steps: [log]\n", "want a positive integer, not True"),
    ("node_label: ''\nrules:\n  - steps: [log]\n", "node_label: want a label name, not ''"),
    ("node: 'gpu-1\\n'\nrules:\n  - steps: [log]\n", "node: want \"any\" or a node name"),
])
def test_policy_gaps_are_errors(tmp_path: Path, text: str, message: str) -> None:
    """L7: misspelt keys under cooldowns/timeouts, duplicate keys, a bool for a number and an empty
    node_label were silently accepted."""
    path = tmp_path / "policy.yml"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "nvml_exporter.remediator", "check-config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def _serve(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (workdir / "token").write_text("test-token-0123456789abcdef\n")
    base = [sys.executable, "-m", "nvml_exporter.remediator", f"--config={workdir / 'policy.yml'}",
            f"--web.listen-address=127.0.0.1:{free_port()}", f"--auth.token-file={workdir / 'token'}"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("args", "message"), [
    (["--workers=0"], "--workers: want a positive integer, not 0"),
    (["--web.max-request-bytes=-1"], "--web.max-request-bytes: want a positive integer, not -1"),
    (["--workers=many"], "--workers: want a positive integer, not 'many'"),
])
def test_bad_flags_are_one_line_and_exit_2(workdir: Path, args: list[str], message: str) -> None:
    """L7: --workers 0 started and never ran a job; a negative --web.max-request-bytes refused everything."""
    policy(workdir, DRAIN_RULES)
    out = _serve(workdir, f"--storage.path={workdir / 'state'}", f"--audit.log={workdir / 'audit.jsonl'}", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_non_utf8_policy_is_one_line_and_exit_2(workdir: Path) -> None:
    """L7: a policy file that is not UTF-8 gave a traceback and exit 1."""
    (workdir / "policy.yml").write_bytes(b"rules:\n  - name: caf\xe9\n    steps: [log]\n")
    out = _serve(workdir, f"--storage.path={workdir / 'state'}", f"--audit.log={workdir / 'audit.jsonl'}")
    assert out.returncode == 2 and "not UTF-8 text" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_read_only_storage_is_one_line_and_exit_2(workdir: Path) -> None:
    """L7: an empty read-only storage directory gave a traceback (sqlite3.OperationalError) and exit 1."""
    policy(workdir, DRAIN_RULES)
    with mounted(workdir / "ro", "ro,size=1m") as ro:
        for args in ([f"--storage.path={ro}", f"--audit.log={workdir / 'audit.jsonl'}"],
                     [f"--storage.path={workdir / 'state'}", f"--audit.log={ro / 'audit.jsonl'}"]):
            out = _serve(workdir, *args)
            assert out.returncode == 2 and "cannot open state" in out.stderr, out.stderr
            assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_storage_failure_leaves_no_half_record(tmp_path: Path) -> None:
    """H3: a record the disk took only part of is cut off again, so the audit log stays one JSON
    object a line for whoever reads it after the disk was freed."""
    from nvml_exporter.remediator.store import Audit, StorageError, StorageHealth

    with mounted(tmp_path / "disk", "size=64k") as disk:
        errors: list[str] = []
        health = StorageHealth(on_error=errors.append)
        audit = Audit(str(disk / "audit.jsonl"), health=health)
        audit.write("first")
        size = (disk / "audit.jsonl").stat().st_size
        fill(disk, pad_audit=False)  # the rest of the log's last page is still free: a write takes part
        with pytest.raises(StorageError, match="No space left on device"):
            audit.write("big", data="x" * 3 * PAGE)
        assert not health.healthy and errors == ["audit"] and "audit" in health.reason()
        assert (disk / "audit.jsonl").stat().st_size == size
        assert [json.loads(line)["event"] for line in (disk / "audit.jsonl").read_text().splitlines()] == ["first"]
        (disk / "filler").unlink()
        audit.write("after")
        assert health.healthy
        audit.close()



# The HTTP findings: the remediator now serves on the shared layer (httpd); these hold it to them. ----

def raw_exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    """Send `data`, then read until the server closes or `wait` seconds pass without an end."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def webhook_head(length: int, token: str = TOKEN, extra: str = "") -> bytes:
    return (f"POST /webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


def https(port: int, cafile: Path) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                       context=ssl.create_default_context(cafile=str(cafile)))


def test_idle_tcp_connect_does_not_block_tls_webhooks(workdir: Path, remediators: list[Remediator]) -> None:
    """H2: with TLS the handshake ran in the accept loop on a socket without a timeout: one connect that
    sent nothing held every Alertmanager delivery. Now it runs in the connection's own thread, under
    the request deadline."""
    cert, key = make_cert(workdir)
    (workdir / "web.yml").write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    policy(workdir, DRAIN_RULES)
    r = start_remediator(workdir, f"--web.config.file={workdir / 'web.yml'}", wait=False)
    remediators.append(r)

    def up() -> bool:
        try:
            conn = https(r.port, cert)
            conn.request("GET", "/-/healthy")
            return conn.getresponse().status == 200
        except OSError:
            return False

    wait_for(up)
    with socket.create_connection(("127.0.0.1", r.port)):  # connects, sends no ClientHello
        time.sleep(0.2)
        # https()'s 10 s socket timeout is the bound: a handshake queued behind the idle one would wait for
        # its 30 s deadline (--web.request-timeout's default), and this delivery would fail
        conn = https(r.port, cert)
        conn.request("POST", "/webhook", json.dumps(payload(alert())),
                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"queued": 1, "skipped": {}})


def test_connection_cap_and_whole_request_deadline(workdir: Path, remediators: list[Remediator]) -> None:
    """M2: no connection limit and no whole-request deadline: a head dribbled a byte at a time was held
    for as long as it kept coming. Now past --web.max-connections a 503, and a request not whole within
    --web.request-timeout a 408 and the connection closed."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--web.max-connections=3", "--web.request-timeout=1s")
    held = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(3)]
    try:
        for s in held:
            s.sendall(b"P")  # a request has begun on each
        time.sleep(0.2)
        extra = raw_exchange(r.port, b"GET /-/healthy HTTP/1.1\r\n\r\n")
        assert extra.startswith(b"HTTP/1.1 503") and b"too many connections" in extra
    finally:
        for s in held:
            s.close()
    wait_for(lambda: raw_exchange(r.port, b"GET /-/healthy HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200"))
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
        # The answer is read only while bytes still come (one every 0.2 s, a deadline per read never fires):
        # a 408 here is the whole request's 1 s deadline, long before the 136 bytes run out (~27 s).
        answer = b""
        for byte in b"POST /webhook HTTP/1.1\r\nHost: x\r\n" * 4:  # a byte every 0.2 s: never a whole head
            try:
                s.sendall(bytes([byte]))
            except OSError:  # closed under us after the answer
                break
            s.settimeout(0.2)
            try:
                answer += s.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
    page = r.metrics()
    assert 'nvml_remediator_requests_refused_total{code="408"} 1.0' in page
    assert re.search(r'^nvml_remediator_requests_refused_total\{code="503"\} [1-9]', page, re.M)


@pytest.mark.parametrize("length", [b"-1", b"+5", b"7" * 5000, "\u00b2".encode("latin-1"), b"5, 5"])
def test_bad_content_length_is_a_400_not_a_read_to_the_end(workdir: Path, remediators: list[Remediator],
                                                           length: bytes) -> None:
    """M6: `Content-Length: -1` read to the end of the stream, past --web.max-request-bytes."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators)
    head = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Length: " + length + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
        s.sendall(head + b"x" * 65536)  # and it keeps coming; the answer must not wait for its end
        assert s.recv(65536).startswith(b"HTTP/1.1 400")
    assert r.post(payload(alert()))[0] == 200


def test_basic_auth_password_over_72_bytes_is_a_401(workdir: Path, remediators: list[Remediator]) -> None:
    """L1: a basic-auth password over 72 bytes (bcrypt refuses it) got no answer from the remediator."""
    hashed = bcrypt.hashpw(b"alertmanager-secret", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)
    (workdir / "web.yml").write_text(f"basic_auth_users:\n  am: '{hashed}'\n")
    policy(workdir, DRAIN_RULES)
    r = start_remediator(workdir, f"--web.config.file={workdir / 'web.yml'}", token=False)
    remediators.append(r)

    def basic(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"am:{password}".encode()).decode()}

    assert r.post(payload(alert()), token=None, headers=basic("x" * 100))[0] == 401
    assert r.post(payload(alert()), token=None, headers=basic("alertmanager-secret" + "x" * 60))[0] == 401
    assert r.post(payload(alert()), token=None, headers=basic("alertmanager-secret")) == (
        200, {"queued": 1, "skipped": {}})


def test_refused_body_is_never_read_as_the_next_request(workdir: Path, remediators: list[Remediator]) -> None:
    """L5: 401 and 413 were answered without reading the body, on a connection kept open: the body was
    then parsed as the next request (a request smuggled past the credentials check)."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--web.max-request-bytes=64")
    smuggled = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_exchange(r.port, webhook_head(len(smuggled), token="wrong-token-0123456789") + smuggled)
    assert answer.startswith(b"HTTP/1.1 401") and answer.count(b"HTTP/1.1 ") == 1, answer
    body = smuggled + b" " * (100 - len(smuggled))
    answer = raw_exchange(r.port, webhook_head(len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 413") and answer.count(b"HTTP/1.1 ") == 1, answer


def test_out_of_file_descriptors_it_waits_instead_of_spinning(workdir: Path, remediators: list[Remediator]) -> None:
    """M2: at the file-descriptor limit the remediator's accept loop spun at 99 % CPU and refused
    webhooks; now it pauses while accept() finds no descriptor (5 ms doubling up to 1 s), and serves again
    once some are free. Counted, not timed: its log says "cannot accept" once per 10 s, and the next such
    line counts the failed accept() calls held back in between (`suppressed`): a dozen or so when it
    pauses, millions when it spins (a slower machine only makes fewer)."""
    policy(workdir, DRAIN_RULES)
    r = run(workdir, remediators, "--web.max-connections=1000")
    resource.prlimit(r.proc.pid, resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    clients = [socket.create_connection(("127.0.0.1", r.port), timeout=10) for _ in range(60)]

    def refusals() -> list[str]:
        return [line for line in r.log().splitlines() if "cannot accept a connection" in line]

    try:
        lines = wait_for(lambda: len(refusals()) >= 2 and refusals(), timeout=40, interval=0.2)
    finally:
        for c in clients:
            c.close()
    assert isinstance(lines, list)
    held_back = re.search(r"\bsuppressed=(\d+)", lines[1])
    assert held_back and 1 <= int(held_back[1]) <= 40, lines[1]  # in 10 s of pauses that reach 1 s: ~16
    assert "pause_s=1.0" in lines[1]  # backed off to its cap
    wait_for(lambda: raw_exchange(r.port, b"GET /-/healthy HTTP/1.0\r\n\r\n").endswith(b"OK\n"), timeout=20)
    assert r.post(payload(alert())) == (200, {"queued": 1, "skipped": {}})
