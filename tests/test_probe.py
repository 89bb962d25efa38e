"""
``twisted-rekey probe`` against real servers nobody here wrote: ``openssl
s_server`` (TLS 1.3 and 1.2, refusing and allowing client renegotiation) and
``gnutls-serv --echo``.  Each test checks what the probe reports *and* what the
foreign server printed about the messages it received, so that a probe that
only believed itself would fail.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from OpenSSL import SSL
from peers import (
    OPENSSL_CLIENT_HELLO_RECEIVED,
    OPENSSL_RENEGOTIATION_REFUSED,
    CertFiles,
    GnuTLSServer,
    OpenSSLServer,
)

from twisted_rekey import RekeyConnection, capabilities

pytestmark = pytest.mark.skipif(
    not capabilities().key_update, reason="key update is not available in this build"
)

_RUN_TIMEOUT = 30


def probe(
    port: int, *args: str, cafile: Any = None, host: str = "127.0.0.1"
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the probe with --json; returns the process and its parsed output."""
    argv = [sys.executable, "-m", "twisted_rekey", "probe", f"{host}:{port}"]
    if cafile is not None:
        argv += ["--cafile", str(cafile)]
    done = subprocess.run(
        [*argv, "--json", *args], capture_output=True, text=True, timeout=_RUN_TIMEOUT
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done, json.loads(done.stdout)


def findings(data: dict[str, Any], version: str) -> dict[str, dict[str, Any]]:
    (result,) = [r for r in data["results"] if r["version"] == version]
    assert result["connected"], result
    return {f["name"]: f for f in result["findings"]}


# -- openssl s_server, TLS 1.3 -----------------------------------------------------


def test_openssl_sees_both_key_updates(cert_files: CertFiles) -> None:
    """
    s_server (no echo) prints both KeyUpdates with their flag; it reads our
    data after them (printed on its stdout) and never answers the requested
    one, since it writes nothing.
    """
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe(
            server.port, "--tls1_3", "--wait", "0.3", cafile=cert_files.ca_cert
        )
        assert server.expect_key_update() is False
        assert server.expect_key_update() is True
        server.expect(r"twisted-rekey probe\n")
        server.expect_absent(r"Alert.*fatal", wait=0.1)
    assert done.returncode == 0, done.stderr
    assert server.key_updates_received() == [False, True]
    assert server.output.count("twisted-rekey probe") == 3
    found = findings(data, "1.3")
    assert found["negotiated"]["protocol"] == "TLSv1.3"
    assert found["certificate"]["verified"] is True
    assert found["key_update"]["ok"] is True
    assert found["key_update_requested"]["answered"] is False


def test_openssl_rev_answers_requested_key_update(cert_files: CertFiles) -> None:
    """
    s_server -rev answers each line (reversed): its answer to update_requested
    goes out with that write.  (-rev sleeps a second after a read that returned
    no data, as a KeyUpdate read does, so the answer takes about 1000 ms.)
    Human output this time.
    """
    with OpenSSLServer(cert_files, version="1.3", rev=True) as server:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted_rekey",
                "probe",
                f"localhost:{server.port}",
                "--tls-version",
                "1.3",
                "--cafile",
                str(cert_files.ca_cert),
                "--timeout",
                "4",
                "--send",
                "ping\n",
            ],
            capture_output=True,
            text=True,
            timeout=_RUN_TIMEOUT,
        )
        assert server.expect_key_update() is False
        assert server.expect_key_update() is True
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == f"target: localhost:{server.port} (name checked: localhost)"
    assert "TLS 1.3: negotiated TLSv1.3 " in lines[1]
    assert "TLS 1.3: certificate verified for localhost" in lines
    assert "TLS 1.3: KeyUpdate accepted: the server answered our 5 bytes as before" in (
        lines
    )
    assert "TLS 1.3: the server answers 5 bytes to our 5" in lines
    answered = [x for x in lines if x.startswith("TLS 1.3: requested KeyUpdate")]
    assert len(answered) == 1, lines
    ms = float(answered[0].split(" answered in ")[1].removesuffix(" ms"))
    assert 0 < ms < 4000
    after = "TLS 1.3: after both key changes: the server answered our 5 bytes"
    assert f"{after} as before" in lines
    assert not any("TLS 1.2" in line for line in lines)


# -- openssl s_server, TLS 1.2 -----------------------------------------------------


def test_openssl_refuses_client_renegotiation(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.2") as server:
        done, data = probe(
            server.port, "--tls1_2", "--wait", "0.3", cafile=cert_files.ca_cert
        )
        # The initial handshake's ClientHello, then the renegotiation's.
        server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect(OPENSSL_RENEGOTIATION_REFUSED)
    # A refusal is the server's policy, not a failure of the probe.
    assert done.returncode == 0, done.stderr
    found = findings(data, "1.2")
    assert found["negotiated"]["protocol"] == "TLSv1.2"
    assert found["secure_renegotiation"]["supported"] is True
    assert found["client_renegotiation"]["allowed"] is False
    assert "refused" in found["client_renegotiation"]["text"]


def test_openssl_allows_client_renegotiation(cert_files: CertFiles) -> None:
    with OpenSSLServer(
        cert_files, version="1.2", client_renegotiation=True, rev=True
    ) as server:
        done, data = probe(
            server.port, "--tls1_2", "--timeout", "4", cafile=cert_files.ca_cert
        )
        # The initial handshake's ClientHello, then the renegotiation's.
        server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect_absent(OPENSSL_RENEGOTIATION_REFUSED, wait=0.1)
    assert done.returncode == 0, done.stderr
    found = findings(data, "1.2")
    assert found["client_renegotiation"]["allowed"] is True
    assert found["after_renegotiation"]["reply"] == "same"


def test_both_versions_by_default(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version=None) as server:
        done, data = probe(server.port, "--wait", "0.3", cafile=cert_files.ca_cert)
        assert server.expect_key_update() is False
    assert done.returncode == 0, done.stderr
    assert [r["version"] for r in data["results"]] == ["1.3", "1.2"]
    assert findings(data, "1.3")["negotiated"]["protocol"] == "TLSv1.3"
    assert findings(data, "1.2")["negotiated"]["protocol"] == "TLSv1.2"
    assert findings(data, "1.2")["client_renegotiation"]["allowed"] is False


def test_one_version_not_offered(cert_files: CertFiles) -> None:
    """A TLS 1.3-only server: the 1.2 connection fails, the probe still ran."""
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe(
            server.port, "--wait", "0.3", "--send", "", cafile=cert_files.ca_cert
        )
    assert done.returncode == 0, done.stderr
    tls12 = next(r for r in data["results"] if r["version"] == "1.2")
    assert tls12["connected"] is False
    assert "handshake failed" in tls12["error"]
    assert findings(data, "1.3")["key_update"]["ok"] is True


# -- certificate checks -------------------------------------------------------------


def test_untrusted_certificate_fails(cert_files: CertFiles) -> None:
    """Without --cafile the system store does not know the test CA."""
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe(server.port, "--tls1_3", "--timeout", "2")
    assert done.returncode == 3
    assert data["results"][0]["error"].startswith("certificate verification failed")
    assert "no handshake succeeded" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_wrong_servername_fails(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe(
            server.port,
            "--tls1_3",
            "--servername",
            "other.example",
            cafile=cert_files.ca_cert,
        )
        # SNI carried the name we were told to check.
        server.expect_handshake()
    assert done.returncode == 3
    assert "not valid for 'other.example'" in data["results"][0]["error"]


def test_insecure_is_flagged(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted_rekey",
                "probe",
                f"127.0.0.1:{server.port}",
                "--insecure",
                "--tls1_3",
                "--wait",
                "0.3",
                "--send",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=_RUN_TIMEOUT,
        )
        assert server.expect_key_update() is False
    assert done.returncode == 0, done.stderr
    assert "WARNING: certificate verification is disabled (--insecure)" in done.stdout
    assert "TLS 1.3: certificate NOT verified (--insecure)" in done.stdout


# -- gnutls-serv --------------------------------------------------------------------


def test_gnutls_echo_tls13(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files, version="1.3") as server:
        done, data = probe(
            server.port, "--tls1_3", "--timeout", "4", cafile=cert_files.ca_cert
        )
        assert server.expect_key_update() is False
        assert server.expect_key_update() is True
    assert done.returncode == 0, done.stderr
    assert server.key_updates_received() == [False, True]
    found = findings(data, "1.3")
    assert found["baseline"]["received"] == len(b"twisted-rekey probe\n")
    assert found["key_update"]["reply"] == "same"
    assert found["key_update_requested"]["answered"] is True
    # An echo server answers at once; the bound is generous for slow machines.
    assert found["key_update_requested"]["ms"] < 2000
    assert found["after_key_update"]["reply"] == "same"


def test_gnutls_renegotiation_tls12(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files, version="1.2") as server:
        done, data = probe(
            server.port, "--tls1_2", "--timeout", "4", cafile=cert_files.ca_cert
        )
        server.expect_renegotiation()
    assert done.returncode == 0, done.stderr
    found = findings(data, "1.2")
    assert found["secure_renegotiation"]["supported"] is True
    assert found["client_renegotiation"]["allowed"] is True
    assert found["after_renegotiation"]["reply"] == "same"


# -- a server that breaks on KeyUpdate -------------------------------------------


@pytest.fixture
def key_update_hater(cert_files: CertFiles) -> Iterator[int]:
    """
    A pyOpenSSL echo server that drops the connection as soon as it reads a
    KeyUpdate: what a broken peer does.  Yields its port.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            # Blocking: the probe's own --timeout bounds this conversation.
            raw.settimeout(None)
            ctx = SSL.Context(SSL.TLS_METHOD)
            ctx.use_certificate_chain_file(str(cert_files.server_cert))
            ctx.use_privatekey_file(str(cert_files.server_key))
            conn = RekeyConnection(ctx, raw)
            conn.set_accept_state()
            try:
                while True:
                    data = conn.recv(65536)
                    if conn.key_updates_received:
                        break
                    conn.sendall(data)
            except (SSL.Error, OSError):
                pass
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert not thread.is_alive()


def test_server_dropping_on_key_update(
    cert_files: CertFiles, key_update_hater: int
) -> None:
    done, data = probe(
        key_update_hater, "--tls1_3", "--timeout", "2", cafile=cert_files.ca_cert
    )
    assert done.returncode == 1, done.stderr
    found = findings(data, "1.3")
    assert found["baseline"]["received"] == len(b"twisted-rekey probe\n")
    assert found["key_update"]["ok"] is False
    assert "REJECTED" in found["key_update"]["text"]
    assert "key_update_requested" not in found
