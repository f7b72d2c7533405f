"""TLS and basic auth from --web.config.file, with certificates made here by openssl."""

from __future__ import annotations

import base64
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import require_tool
from tests.fakenvml.scenario import FakeNvml


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_tls_and_basic_auth(tmp_path: Path, fake: FakeNvml, start_exporter) -> None:
    cert, key = make_cert(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert.name}\n  key_file: {key.name}\n"
                      f"basic_auth_users:\n  prometheus: '{hashed}'\n"
                      "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    ctx = ssl.create_default_context(cafile=str(cert))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
    exp = start_exporter(fake, f"--web.config.file={config}", scheme="https", opener=opener,
                         wait_healthy=False)

    def healthy() -> bool:
        try:
            return exp.get("/-/healthy", basic("prometheus", "s3cret"), timeout=2)[0] == 200
        except OSError:
            return False

    from tests.conftest import wait_for
    wait_for(healthy)
    status, body = exp.get("/metrics", basic("prometheus", "s3cret"))
    assert status == 200 and "nvidia_gpu_up" in body
    assert exp.get("/metrics", basic("prometheus", "wrong"))[0] == 401
    assert exp.get("/metrics", basic("nobody", "s3cret"))[0] == 401
    assert exp.get("/metrics")[0] == 401
    try:
        exp.opener.open(exp.url + "/metrics", timeout=5)
    except urllib.error.HTTPError as e:
        assert e.code == 401 and e.headers["WWW-Authenticate"] == 'Basic realm="nvml-exporter"'
        assert e.headers["X-Frame-Options"] == "deny"
    # plain HTTP to the TLS port gets no metrics
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=5).read()
    # a client that does not trust the certificate is refused
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(exp.url + "/metrics", timeout=5)


@pytest.mark.parametrize(("config", "message"), [
    ("basic_auth_users:\n  admin: plaintext\n", "must be a bcrypt hash"),
    ("basic_auth_users:\n  admin: '$2y$10$tooshort'\n", "must be a bcrypt hash"),  # else a 500 on each check
    ("basic_auth_users:\n  admin: '$2y$99$" + "a" * 53 + "'\n", "must be a bcrypt hash"),  # cost out of range
    ("tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n", "cannot read cert_file"),
    ("tls_server_config:\n  cert_file: web.yml\n", "key_file is required"),
    ("basic_auth_user:\n  admin: x\n", "unknown field(s) basic_auth_user"),
    ("tls_server_config: [\n", "not valid YAML"),
])
def test_bad_web_config_exits_2_with_one_line(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(config)
    result = subprocess.run([sys.executable, "-m", "nvml_exporter", f"--web.config.file={path}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_missing_web_config_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "nvml_exporter", f"--web.config.file={tmp_path}/none.yml"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot read" in result.stderr
