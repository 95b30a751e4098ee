"""HTTPS: the server serves TLS, records an https URL, and the CLI verifies its certificate."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from serverproc import ServerProcess
from typer.testing import CliRunner

from engram.cli.main import app
from engram.datadir import read_owner

TOKEN = "tls-token-41f0"
runner = CliRunner()


def cli(*args: str, env: dict[str, str | None] | None = None) -> Any:
    base: dict[str, str | None] = {
        "ENGRAM_TOKEN": None,
        "ENGRAM_ADMIN_TOKEN": None,
        "ENGRAM_CACERT": None,
    }
    return runner.invoke(app, list(args), env={**base, **(env or {})})


class Pki:
    """A private CA and a server certificate it signed for the loopback addresses."""

    def __init__(self, root: Path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
        root.mkdir()
        self.ca = root / "ca.pem"
        self.cert = root / "server.pem"
        self.key = root / "server.key"
        ca.cert_pem.write_to_path(str(self.ca))
        cert.private_key_pem.write_to_path(str(self.key))
        with open(self.cert, "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        self.key.chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki") / "pki")


@pytest.fixture
def tls_server(start_server: Any, pki: Pki, tmp_path: Path) -> ServerProcess:
    srv: ServerProcess = start_server(
        tmp_path / "data", token=TOKEN, tls=(pki.cert, pki.key), cacert=pki.ca
    )
    return srv


def test_serves_https_and_records_an_https_url(tls_server: ServerProcess, pki: Pki) -> None:
    owner = read_owner(tls_server.data_dir)
    assert owner is not None and str(owner["url"]).startswith("https://127.0.0.1:")
    assert owner["url"] == tls_server.url
    with tls_server.client() as c:
        r = c.post("/v1/memories", json={"content": "over tls"})
        assert r.status_code == 201, r.text
    # Without the private CA the certificate does not verify: the token is never sent.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/v1/stats", headers=tls_server.headers())
    # Plain HTTP to the same port gets no answer that a client could take for one.
    port = int(str(tls_server.url).rsplit(":", 1)[1])
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5)


def test_the_handshake_speaks_tls(tls_server: ServerProcess, pki: Pki) -> None:
    port = int(str(tls_server.url).rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_cli_verifies_the_certificate(tls_server: ServerProcess, pki: Pki, tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    base = ("--data-dir", str(tls_server.data_dir), "--token-file", str(tf))
    res = cli("status", *base, "--cacert", str(pki.ca), "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["server"]["url"] == tls_server.url
    # ENGRAM_CACERT, or --cacert, serves every command that may talk to a server.
    res = cli("put", *base, "--content", "via env", "--json", env={"ENGRAM_CACERT": str(pki.ca)})
    assert res.exit_code == 0, res.stderr
    res = cli("put", *base, "--content", "via option", "--cacert", str(pki.ca))
    assert res.exit_code == 0, res.stderr
    res = cli("stats", *base, "--json", "--cacert", str(pki.ca))
    assert res.exit_code == 0 and json.loads(res.stdout)["memories"] == 2, res.stderr
    res = cli("export", *base, "--output", "-", "--cacert", str(pki.ca))
    assert res.exit_code == 0 and res.stdout.count("create_memory") == 2, res.stderr
    res = cli("stats", *base)
    assert res.exit_code == 1 and "--cacert" in res.stderr, res.stderr
    # Without the CA: a one-line error naming the way out, never a silent downgrade.
    res = cli("status", *base)
    assert res.exit_code == 1
    assert "certificate" in res.stderr and "--cacert" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # A CA that did not sign it does not verify it either.
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    res = cli("status", *base, "--cacert", str(other))
    assert res.exit_code == 1 and "certificate" in res.stderr, res.stderr
    res = cli("status", *base, "--cacert", str(tmp_path / "missing.pem"))
    assert res.exit_code == 2 and "cannot read --cacert" in res.stderr, res.stderr


def test_non_loopback_bind_needs_tls(start_server: Any, pki: Pki, tmp_path: Path) -> None:
    srv = start_server(tmp_path / "plain", host="0.0.0.0", token=TOKEN, wait=None)
    assert srv.wait_exit() == 2
    assert "refusing to serve on 0.0.0.0 without TLS" in srv.log()
    # --insecure allows it, knowingly.
    srv = start_server(
        tmp_path / "insecure", host="0.0.0.0", token=TOKEN, extra_args=("--insecure",), wait=None
    )
    srv.wait_for("live")
    # With a token and TLS it serves; the recorded URL is the loopback one, over https.
    srv = start_server(
        tmp_path / "tls", host="0.0.0.0", token=TOKEN, tls=(pki.cert, pki.key), cacert=pki.ca
    )
    assert str(srv.url).startswith("https://127.0.0.1:")
    with srv.client() as c:
        assert c.get("/v1/stats").status_code == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-cert", "CERT"), "--tls-cert and --tls-key go together"),
        (("--tls-cert", "CERT", "--tls-key", "MISSING"), "cannot read --tls-key"),
        (("--tls-cert", "KEY", "--tls-key", "KEY"), "are not a PEM certificate chain"),
        (("--tls-cert", "CERT", "--tls-key", "CA"), "are not a PEM certificate chain"),
    ],
)
def test_bad_tls_options_are_one_line_usage_errors(
    start_server: Any, pki: Pki, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    names = {"CERT": pki.cert, "KEY": pki.key, "CA": pki.ca, "MISSING": tmp_path / "nope"}
    argv = tuple(str(names.get(a, a)) for a in args)
    srv = start_server(tmp_path / "data", extra_args=argv, wait=None)
    assert srv.wait_exit() == 2
    errors = [x for x in srv.log().splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], srv.log()
    assert "Traceback" not in srv.log()
