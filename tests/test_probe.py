"""
``twisted-rekey probe`` against real servers nobody here wrote: ``openssl
s_server``, ``gnutls-serv``, and echo servers on Go's ``crypto/tls``, Node's
``tls`` and Java's JSSE (``tests/drivers/``).  Each test compares the probe's
verdict with what that stack is documented (or was measured here) to do, and,
where the server can say so, with what it printed about the messages it
received, so that a probe that only believed itself would fail.

Every ``--json`` output is validated against the probe's published JSON
Schema.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from foreign import ForeignPeer
from OpenSSL import SSL
from peers import (
    OPENSSL_CLIENT_HELLO_RECEIVED,
    OPENSSL_RENEGOTIATION_REFUSED,
    CertFiles,
    GnuTLSServer,
    OpenSSLServer,
)

from twisted_rekey import MIN_INTERVAL_LOWEST, RekeyConnection, capabilities
from twisted_rekey.apps.probe import (
    FINDINGS,
    LIMITS_MAX,
    RENEGOTIATIONS_MAX,
    REPORT_SCHEMA,
    SCHEMA_VERSION,
    batch_exit_code,
    parse_target,
)

pytestmark = pytest.mark.skipif(
    not capabilities().key_update, reason="key update is not available in this build"
)

_RUN_TIMEOUT = 60
_VALIDATOR = jsonschema.Draft202012Validator(REPORT_SCHEMA)
_PAYLOAD = b"twisted-rekey probe\n"


def run_probe(*args: str, tty: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "twisted_rekey", "probe", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_RUN_TIMEOUT)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def probe(
    port: int, *args: str, cafile: Any = None, host: str = "127.0.0.1"
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the probe with --json; the process and its output, validated."""
    argv = [f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"]
    if cafile is not None:
        argv += ["--cafile", str(cafile)]
    done = run_probe(*argv, "--json", *args)
    data = json.loads(done.stdout)
    _VALIDATOR.validate(data)
    assert data["exit_code"] == done.returncode
    return done, data


def version(data: dict[str, Any], wanted: str) -> dict[str, Any]:
    (result,) = [r for r in data["results"] if r["version"] == wanted]
    return result


def findings(data: dict[str, Any], wanted: str) -> dict[str, dict[str, Any]]:
    result = version(data, wanted)
    assert result["status"] == "connected", result
    return {f["name"]: f for f in result["findings"]}


# -- openssl s_server ----------------------------------------------------------------


def test_openssl_sees_both_key_updates(cert_files: CertFiles) -> None:
    """
    s_server (no echo) prints both KeyUpdates with their flag and reads our
    data after them; it never answers the requested one, since it writes
    nothing (OpenSSL sends that answer with its next SSL_write only).
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
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["status"] == "probed"
    assert data["verification"] == {"certificate": True, "name": "127.0.0.1"}
    assert version(data, "1.3")["protocol"] == "TLSv1.3"
    found = findings(data, "1.3")
    assert found["certificate"]["result"] == "verified"
    assert found["baseline"]["result"] == "silent"
    assert found["key_update"]["result"] == "accepted"
    assert found["key_update"]["severity"] == "ok"
    assert found["key_update_requested"]["result"] == "silent"
    assert found["key_update_requested"]["detail"]["answered"] is False


def test_openssl_rev_answers_only_on_our_write(cert_files: CertFiles) -> None:
    """
    s_server -rev answers each line (reversed), and sends its answer to
    update_requested only with that write: while we are idle, nothing.  The
    human output grades it a note.
    """
    with OpenSSLServer(cert_files, version="1.3", rev=True) as server:
        done = run_probe(
            f"localhost:{server.port}",
            "--tls-version",
            "1.3",
            "--cafile",
            str(cert_files.ca_cert),
            "--timeout",
            "4",
            "--wait",
            "0.5",
            "--send",
            "ping\n",
        )
        assert server.expect_key_update() is False
        assert server.expect_key_update() is True
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"target: localhost:{server.port} "
        "(verifying the certificate and name: localhost)"
    )
    assert lines[1].startswith("TLS 1.3: negotiated TLSv1.3 ")
    assert "TLS 1.3: [ok]     certificate verified for localhost" in lines
    assert "TLS 1.3: [info]   the server answers 5 bytes to our 5" in lines
    assert (
        "TLS 1.3: [ok]     KeyUpdate accepted: the server answered our 5 bytes "
        "as before"
    ) in lines
    (answer,) = [x for x in lines if "requested KeyUpdate" in x]
    assert answer.startswith("TLS 1.3: [note]   requested KeyUpdate answered only")
    assert "none within 0.5 s while idle" in answer
    assert lines[-1] == "verdict: probed: no exposure found; exit code 0"
    assert not any("TLS 1.2" in line for line in lines)


def test_openssl_refuses_client_renegotiation(cert_files: CertFiles) -> None:
    """
    OpenSSL 3 refuses a client's renegotiation unless told
    -client_renegotiation (SSL_OP_ALLOW_CLIENT_RENEGOTIATION, SSL_CTX_set_options
    man page) with a warning no_renegotiation alert: not an exposure, exit 0.
    """
    with OpenSSLServer(cert_files, version="1.2") as server:
        done, data = probe(
            server.port, "--tls1_2", "--wait", "0.3", cafile=cert_files.ca_cert
        )
        # The initial handshake's ClientHello, then the renegotiation's.
        server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect(OPENSSL_RENEGOTIATION_REFUSED)
    assert done.returncode == 0, done.stderr
    found = findings(data, "1.2")
    assert found["secure_renegotiation"]["result"] == "supported"
    refused = found["client_renegotiation"]
    assert refused["result"] == "refused"
    assert refused["severity"] == "ok"
    assert refused["detail"]["alert"] == "no_renegotiation"


def test_openssl_allowing_client_renegotiation_is_an_exposure(
    cert_files: CertFiles,
) -> None:
    """
    With -client_renegotiation s_server renegotiates as often as asked: the
    denial-of-service finding sslyze and testssl.sh report, graded medium,
    exit 6.  s_server saw every ClientHello we sent.
    """
    with OpenSSLServer(cert_files, version="1.2", client_renegotiation=True) as server:
        done, data = probe(
            server.port, "--tls1_2", "--wait", "0.3", cafile=cert_files.ca_cert
        )
        for _ in range(1 + RENEGOTIATIONS_MAX):
            server.expect(OPENSSL_CLIENT_HELLO_RECEIVED)
        server.expect_absent(OPENSSL_RENEGOTIATION_REFUSED, wait=0.1)
    assert done.returncode == 6, done.stderr
    allowed = findings(data, "1.2")["client_renegotiation"]
    assert allowed["result"] == "allowed"
    assert allowed["severity"] == "medium"
    assert allowed["detail"]["count"] == RENEGOTIATIONS_MAX
    assert data["worst_severity"] == "medium"


def test_tls13_only_server(cert_files: CertFiles) -> None:
    """A TLS 1.3-only s_server answers a TLS 1.2 ClientHello with a
    protocol_version alert: "not offered", a fact, not a failure."""
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe(
            server.port, "--wait", "0.3", "--send", "", cafile=cert_files.ca_cert
        )
    assert done.returncode == 0, done.stderr
    assert [r["version"] for r in data["results"]] == ["1.3", "1.2"]
    assert version(data, "1.2")["status"] == "not_offered"
    assert "protocol version" in version(data, "1.2")["error"]
    assert findings(data, "1.3")["key_update"]["result"] == "accepted"


def test_tls12_only_server(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.2") as server:
        done, data = probe(
            server.port, "--wait", "0.3", "--send", "", cafile=cert_files.ca_cert
        )
    assert done.returncode == 0, done.stderr
    assert version(data, "1.3")["status"] == "not_offered"
    assert findings(data, "1.2")["client_renegotiation"]["result"] == "refused"


def test_url_target(cert_files: CertFiles) -> None:
    """An https:// URL names the host (checked in the certificate) and port."""
    with OpenSSLServer(cert_files, version="1.3") as server:
        done = run_probe(
            f"https://localhost:{server.port}/some/path?q=1",
            "--cafile",
            str(cert_files.ca_cert),
            "--tls1_3",
            "--wait",
            "0.3",
            "--send",
            "",
            "--json",
        )
        server.expect_handshake()
    data = json.loads(done.stdout)
    _VALIDATOR.validate(data)
    assert done.returncode == 0, done.stderr
    assert data["target"] == {
        "input": f"https://localhost:{server.port}/some/path?q=1",
        "host": "localhost",
        "port": server.port,
    }
    assert data["verification"]["name"] == "localhost"


def test_parse_target() -> None:
    assert parse_target("example.test:443") == ("example.test", 443)
    assert parse_target("[::1]:8443") == ("::1", 8443)
    assert parse_target("https://example.test/") == ("example.test", 443)
    assert parse_target("https://example.test:8443/x") == ("example.test", 8443)
    assert parse_target("https://[::1]:19001/") == ("::1", 19001)
    assert parse_target("https://[::1]/") == ("::1", 443)
    assert parse_target("HTTPS://user@example.test:1/") == ("example.test", 1)
    assert parse_target("ldaps://example.test") == ("example.test", 636)
    with pytest.raises(ValueError, match="not a TLS URL scheme: http://"):
        parse_target("http://example.test/")
    with pytest.raises(ValueError, match="between 1 and 65535"):
        parse_target("https://example.test:0/")
    with pytest.raises(ValueError, match="brackets"):
        parse_target("::1:443")


# -- certificate checks ------------------------------------------------------------


def test_untrusted_certificate_fails(cert_files: CertFiles) -> None:
    """Without --cafile the system store does not know the test CA."""
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe(server.port, "--tls1_3", "--timeout", "2")
    assert done.returncode == 3
    assert data["status"] == "certificate_failed"
    assert version(data, "1.3")["error"].startswith("certificate verification failed")
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
    assert "not valid for 'other.example'" in version(data, "1.3")["error"]


def test_insecure_does_not_claim_a_checked_name(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        done = run_probe(
            f"127.0.0.1:{server.port}",
            "--insecure",
            "--tls1_3",
            "--wait",
            "0.3",
            "--send",
            "",
        )
        assert server.expect_key_update() is False
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"target: 127.0.0.1:{server.port} (SNI 127.0.0.1; certificate and name NOT "
        "verified)"
    )
    assert "verifying" not in done.stdout
    assert "WARNING: certificate verification is disabled (--insecure)" in lines
    assert "TLS 1.3: [warn]   certificate and name NOT verified (--insecure)" in lines


# -- gnutls-serv -----------------------------------------------------------------------


def test_gnutls_answers_only_on_our_write(cert_files: CertFiles) -> None:
    """
    GnuTLS, like OpenSSL, answers update_requested only with its next write:
    idle, nothing; after our data, the KeyUpdate comes with the echo.
    """
    with GnuTLSServer(cert_files, version="1.3") as server:
        done, data = probe(
            server.port, "--tls1_3", "--wait", "0.5", cafile=cert_files.ca_cert
        )
        assert server.expect_key_update() is False
        assert server.expect_key_update() is True
    assert done.returncode == 0, done.stderr
    found = findings(data, "1.3")
    assert found["baseline"]["result"] == "echo"
    assert found["key_update"]["detail"]["reply"] == "same"
    requested = found["key_update_requested"]
    assert requested["result"] == "answered_on_our_write"
    assert requested["severity"] == "note"
    assert requested["detail"]["on_our_write"] is True
    assert found["after_key_update"]["result"] == "same"


def test_gnutls_allows_client_renegotiation(cert_files: CertFiles) -> None:
    """gnutls-serv honours a safe client renegotiation (GnuTLS's default):
    the DoS finding, every rehandshake seen by the server."""
    with GnuTLSServer(cert_files, version="1.2") as server:
        done, data = probe(
            server.port, "--tls1_2", "--wait", "0.5", cafile=cert_files.ca_cert
        )
        server.expect_renegotiation()
    assert done.returncode == 6, done.stderr
    found = findings(data, "1.2")
    assert found["secure_renegotiation"]["result"] == "supported"
    assert found["client_renegotiation"]["result"] == "allowed"
    assert found["after_renegotiation"]["result"] == "same"
    assert server.count(r"\*\*\* Received hello message") == RENEGOTIATIONS_MAX


def test_gnutls_without_safe_renegotiation(cert_files: CertFiles) -> None:
    """
    %DISABLE_SAFE_RENEGOTIATION: GnuTLS sends no renegotiation_info (RFC
    5746).  The probe connects all the same and reports it as sslyze does,
    graded high, and never renegotiates insecurely.
    """
    with GnuTLSServer(
        cert_files,
        priority="NORMAL:-VERS-ALL:+VERS-TLS1.2:%DISABLE_SAFE_RENEGOTIATION",
    ) as server:
        done, data = probe(
            server.port, "--tls1_2", "--wait", "0.5", cafile=cert_files.ca_cert
        )
        server.expect_absent(r"\*\*\* Received hello message", wait=0.1)
    assert done.returncode == 6, done.stderr
    found = findings(data, "1.2")
    assert found["secure_renegotiation"]["result"] == "not_supported"
    assert found["secure_renegotiation"]["severity"] == "high"
    assert found["client_renegotiation"]["result"] == "not_tried"


# -- Go, Node, Java ------------------------------------------------------------------


def test_go_answers_at_once_and_refuses_renegotiation(cert_files: CertFiles) -> None:
    """
    Go's crypto/tls writes its answer to update_requested inside the read
    that took the request (handleKeyUpdate), and its server never
    renegotiates: it answers a ClientHello with an unexpected_message alert.
    """
    with ForeignPeer("go", "server", cert_files, accept=2) as server:
        done, data = probe(server.port, "--wait", "0.5", cafile=cert_files.ca_cert)
        server.expect(r"unexpected handshake message of type \*tls\.clientHelloMsg")
    assert done.returncode == 0, done.stderr
    tls13 = findings(data, "1.3")
    assert tls13["key_update"]["result"] == "accepted"
    assert tls13["key_update_requested"]["result"] == "answered"
    assert tls13["key_update_requested"]["detail"]["on_our_write"] is False
    refused = findings(data, "1.2")["client_renegotiation"]
    assert refused["result"] == "refused"
    assert refused["detail"]["alert"] == "unexpected_message"
    assert server.handshakes() == ["TLS1.3", "TLS1.2"]


def test_node_limits_client_renegotiations(cert_files: CertFiles) -> None:
    """
    Node's tls allows 3 client renegotiations per 10 minutes
    (tls.CLIENT_RENEG_LIMIT, CLIENT_RENEG_WINDOW) and then destroys the
    socket ("TLS session renegotiation attack detected"): a limited
    exposure.  Node (OpenSSL inside) answers update_requested only with its
    next write.
    """
    with ForeignPeer("node", "server", cert_files, accept=2) as server:
        done, data = probe(server.port, "--wait", "0.5", cafile=cert_files.ca_cert)
        server.expect("TLS session renegotiation attack detected")
    assert done.returncode == 0, done.stderr
    tls13 = findings(data, "1.3")
    assert tls13["key_update_requested"]["result"] == "answered_on_our_write"
    limited = findings(data, "1.2")["client_renegotiation"]
    assert limited["result"] == "limited"
    assert limited["severity"] == "low"
    assert limited["detail"]["count"] == 3
    # The initial handshake and three renegotiations, seen by Node.
    assert server.handshakes()[-4:] == ["TLSv1.2"] * 4


def test_java_answers_at_once_and_allows_renegotiation(cert_files: CertFiles) -> None:
    """
    JSSE answers update_requested at once, and accepts client-initiated
    renegotiation unless jdk.tls.rejectClientInitiatedRenegotiation is set
    (its default is false): the DoS finding, exit 6.
    """
    with ForeignPeer("java", "server", cert_files, accept=2) as server:
        done, data = probe(
            server.port, "--wait", "0.5", "--timeout", "10", cafile=cert_files.ca_cert
        )
        server.expect(rf"^HANDSHAKE n={1 + RENEGOTIATIONS_MAX} version=TLSv1\.2")
    assert done.returncode == 6, done.stderr
    tls13 = findings(data, "1.3")
    assert tls13["key_update_requested"]["result"] == "answered"
    allowed = findings(data, "1.2")["client_renegotiation"]
    assert allowed["result"] == "allowed"
    assert allowed["detail"]["count"] == RENEGOTIATIONS_MAX


# -- servers that misbehave, and no server at all ------------------------------------


class _Listener:
    """A loopback listener whose connections *handle* serves in a thread."""

    def __init__(self, handle: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.handle = handle
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            with raw:
                raw.settimeout(10)
                try:
                    self.handle(raw, self.stop)
                except (OSError, SSL.Error, ssl.SSLError):
                    pass

    def __enter__(self) -> _Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


def _pyopenssl_server(cert_files: CertFiles, raw: socket.socket) -> RekeyConnection:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate_chain_file(str(cert_files.server_cert))
    ctx.use_privatekey_file(str(cert_files.server_key))
    # Blocking (pyOpenSSL turns a socket timeout into WantReadError); the
    # probe's own deadlines end each conversation, and its close ends ours.
    raw.settimeout(None)
    conn = RekeyConnection(ctx, raw)
    conn.set_accept_state()
    return conn


def test_server_dropping_on_key_update(cert_files: CertFiles) -> None:
    """A broken peer that drops the connection at a KeyUpdate: exit 1."""

    def hater(raw: socket.socket, stop: threading.Event) -> None:
        conn = _pyopenssl_server(cert_files, raw)
        while not conn.key_updates_received:
            data = conn.recv(65536)
            if not conn.key_updates_received:
                conn.sendall(data)

    with _Listener(hater) as server:
        done, data = probe(
            server.port, "--tls1_3", "--timeout", "2", cafile=cert_files.ca_cert
        )
    assert done.returncode == 1, done.stderr
    found = findings(data, "1.3")
    assert found["baseline"]["result"] == "echo"
    assert found["key_update"]["result"] == "rejected"
    assert found["key_update"]["severity"] == "fail"
    assert "key_update_requested" not in found


def test_renegotiation_refused_by_silence(cert_files: CertFiles) -> None:
    """
    A Python ssl server that echoes once and then never reads again: our
    renegotiation gets no answer at all.  A refusal (by silence), bounded by
    --timeout, not a broken connection.
    """

    def deaf(raw: socket.socket, stop: threading.Event) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_files.server_cert), str(cert_files.server_key))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with context.wrap_socket(raw, server_side=True) as conn:
            conn.sendall(conn.recv(65536))
            stop.wait(10)

    with _Listener(deaf) as server:
        done, data = probe(
            server.port, "--tls1_2", "--timeout", "1", cafile=cert_files.ca_cert
        )
    assert done.returncode == 0, done.stderr
    ignored = findings(data, "1.2")["client_renegotiation"]
    assert ignored["result"] == "ignored"
    assert ignored["severity"] == "ok"
    assert "no answer within 1 s" in ignored["text"]


def test_plain_tcp_echo_is_not_tls() -> None:
    def echo(raw: socket.socket, stop: threading.Event) -> None:
        while data := raw.recv(65536):
            raw.sendall(data)

    with _Listener(echo) as server:
        done, data = probe(server.port, "--timeout", "2")
    assert done.returncode == 3
    assert data["status"] == "not_tls"
    assert "our ClientHello back" in version(data, "1.3")["error"]
    assert "no handshake succeeded" in done.stderr


def test_plain_http_is_not_tls() -> None:
    def http(raw: socket.socket, stop: threading.Event) -> None:
        raw.recv(65536)
        raw.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with _Listener(http) as server:
        done, data = probe(server.port, "--timeout", "2")
    assert done.returncode == 3
    assert data["status"] == "not_tls"
    assert [r["status"] for r in data["results"]] == ["not_tls", "not_tls"]
    assert "not TLS: the server sent 'HTTP/1.1 400 Bad Request" in data["error"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_closed_port() -> None:
    port = _closed_port()
    done, data = probe(port, "--timeout", "2")
    assert done.returncode == 3
    assert data["status"] == "refused"
    assert data["results"][0]["status"] == "refused"
    assert data["error"] == f"cannot connect to 127.0.0.1:{port}: Connection refused"


def test_unresolved_name() -> None:
    # .invalid never resolves (RFC 6761).
    done = run_probe("https://no-such-host.invalid/", "--json", "--timeout", "2")
    data = json.loads(done.stdout)
    _VALIDATOR.validate(data)
    assert done.returncode == data["exit_code"] == 3
    assert (data["status"], data["results"]) == ("unresolved", [])
    assert data["target"]["port"] == 443


def test_batch_exit_code() -> None:
    """Of many targets, the code that matters most wins."""
    assert batch_exit_code([0, 6, 4]) == 6
    assert batch_exit_code([6, 1, 0]) == 1
    assert batch_exit_code([1, 3]) == 3
    assert batch_exit_code([4, 0]) == 4
    assert batch_exit_code([0, 0]) == 0


def test_handshake_timeout() -> None:
    """Accepted by the kernel, never answered: a timeout per version."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        done, data = probe(listener.getsockname()[1], "--timeout", "0.5")
    assert done.returncode == 3
    assert data["status"] == "timeout"
    assert [r["status"] for r in data["results"]] == ["timeout", "timeout"]


# -- KeyUpdate limits --------------------------------------------------------------


def probe_limits(
    port: int, cert_files: CertFiles
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    return probe(
        port, "--tls1_3", "--limits", "--wait", "0.3", cafile=cert_files.ca_cert
    )


def limits(data: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    found = findings(data, "1.3")
    return tuple(
        found[name]
        for name in ("key_updates_per_second", "key_updates_in_a_row", "rotation_floor")
    )


def test_limits_gnutls_eight_per_second(cert_files: CertFiles) -> None:
    """
    GnuTLS 3.7 closes the connection at the 9th KeyUpdate within one second
    (measured here, DESIGN.md); with our echoed data between them the count
    is exact.  Spaced below that rate it takes LIMITS_MAX in a row.  The
    floor keeps a margin over 1/8 s, as measured necessary.
    """
    with GnuTLSServer(cert_files, version="1.3") as server:
        done, data = probe_limits(server.port, cert_files)
        # GnuTLS's own words (lib/tls13/key_update.c, at -d 2 and up).
        server.expect(
            r"reached maximum number of key updates per 1000 milliseconds \(8\)"
        )
    assert done.returncode == 0, done.stderr
    assert data["limits_measured"] is True
    rate, row, floor = limits(data)
    assert rate["result"] == "limit"
    assert rate["detail"]["limit"] == 8
    assert rate["detail"]["exact"] is True
    assert "the 9th" in rate["text"]
    assert row["result"] == "no_limit"
    assert row["detail"]["sent"] == LIMITS_MAX
    assert floor["detail"]["min_interval"] == pytest.approx(0.2)
    assert floor["detail"]["skip_idle_required"] is False
    # GnuTLS took the main probe's two, 8 of the burst (the 9th is refused
    # before it is logged as received), then all of the paced ones.
    assert len(server.key_updates_received()) == 2 + 8 + LIMITS_MAX


def test_limits_openssl_none(cert_files: CertFiles) -> None:
    """OpenSSL has no cap on KeyUpdates received: s_server takes all of them
    (and prints each), up to the documented maximum."""
    with OpenSSLServer(cert_files, version="1.3") as server:
        done, data = probe_limits(server.port, cert_files)
        server.expect_absent(r"Alert.*fatal", wait=0.1)
    assert done.returncode == 0, done.stderr
    rate, row, floor = limits(data)
    assert rate["result"] == "no_limit"
    assert rate["detail"]["exact"] is False
    assert row["result"] == "no_limit"
    assert row["detail"]["sent"] == LIMITS_MAX
    # No limit: the lowest floor a policy accepts.
    assert floor["detail"]["min_interval"] == pytest.approx(MIN_INTERVAL_LOWEST)
    assert len(server.key_updates_received()) == 2 + rate["detail"]["sent"] + LIMITS_MAX


def test_limits_go_none(cert_files: CertFiles) -> None:
    """
    Go's crypto/tls counts "non-advancing" records (maxUselessRecords, 16),
    but a record that carries a KeyUpdate resets that count in
    readRecordOrCCS: no limit on KeyUpdates in their own records.
    """
    with ForeignPeer("go", "server", cert_files, accept=3) as server:
        done, data = probe_limits(server.port, cert_files)
        server.expect(r"^CLOSED n=3 ")
    assert done.returncode == 0, done.stderr
    rate, row, floor = limits(data)
    assert (rate["result"], rate["detail"]["exact"]) == ("no_limit", True)
    assert (row["result"], row["detail"]["sent"]) == ("no_limit", LIMITS_MAX)
    assert floor["detail"]["skip_idle_required"] is False


_IN_A_ROW = 32


@pytest.mark.parametrize("echo", [True, False])
def test_limits_in_a_row(cert_files: CertFiles, echo: bool) -> None:
    """
    A peer that counts KeyUpdates with no application data between them and
    drops the connection at the 33rd, as rustls and BoringSSL do (kMaxKeyUpdates
    = 32): the probe finds exactly 32, and says skip_idle must stay on.
    Without an echo the first burst cannot keep the in-a-row count down:
    its drop at the same count is not reported as a per-second limit.
    """

    def strict(raw: socket.socket, stop: threading.Event) -> None:
        conn = _pyopenssl_server(cert_files, raw)
        seen = 0

        def info(conn: SSL.Connection, where: int, ret: int) -> None:
            nonlocal seen
            if b"read client key update" in conn.get_state_string():
                seen += 1
                if seen > _IN_A_ROW:
                    raw.shutdown(socket.SHUT_RDWR)

        conn.set_info_callback(info)
        while True:
            data = conn.recv(65536)
            seen = 0
            if echo:
                conn.sendall(data)

    with _Listener(strict) as server:
        done, data = probe_limits(server.port, cert_files)
    assert done.returncode == 0, done.stderr
    rate, row, floor = limits(data)
    if echo:
        # Our data between the first burst's KeyUpdates reset the count.
        assert rate["result"] == "no_limit"
        assert rate["detail"]["exact"] is True
    else:
        assert rate["result"] == "not_measured"
        assert "in-a-row limit" in rate["text"]
    assert row["result"] == "limit"
    assert row["detail"]["limit"] == _IN_A_ROW
    assert floor["detail"]["skip_idle_required"] is True
    assert floor["detail"]["in_a_row_limit"] == _IN_A_ROW
    assert floor["detail"]["per_second_limit"] is None
    assert "keep skip_idle=True" in floor["text"]


# -- many targets ------------------------------------------------------------------


def test_targets_file(cert_files: CertFiles, tmp_path: Path) -> None:
    """Targets from a file, two at a time: one report each, in input order,
    then a summary table; the exit code is the one that matters most."""
    closed = _closed_port()
    with OpenSSLServer(cert_files, version=None) as openssl_server:
        targets = tmp_path / "targets.txt"
        targets.write_text(
            "# servers to check\n"
            f"127.0.0.1:{openssl_server.port}\n"
            "\n"
            f"https://localhost:{openssl_server.port}/  # by URL\n"
            f"127.0.0.1:{closed}\n"
        )
        common = ["--cafile", str(cert_files.ca_cert), "--wait", "0.3", "--send", ""]
        done = run_probe("--targets", str(targets), "--jobs", "2", *common, "--json")
        human = run_probe("--targets", str(targets), "--jobs", "2", *common)
    data = json.loads(done.stdout)
    _VALIDATOR.validate(data)
    assert done.returncode == human.returncode == data["exit_code"] == 3
    assert [r["target"]["input"] for r in data["reports"]] == [
        f"127.0.0.1:{openssl_server.port}",
        f"https://localhost:{openssl_server.port}/",
        f"127.0.0.1:{closed}",
    ]
    assert [r["status"] for r in data["reports"]] == ["probed", "probed", "refused"]
    # Not a terminal: no progress line.
    assert done.stderr == human.stderr == ""
    table = human.stdout.split("\n\n")[-1].splitlines()
    assert table[0].split() == [
        "TARGET",
        "STATUS",
        "TLS",
        "1.3",
        "KEYUPDATE",
        "TLS",
        "1.2",
        "RENEGOTIATION",
        "EXIT",
    ]
    assert table[1].split() == [
        f"127.0.0.1:{openssl_server.port}",
        "probed",
        "accepted,silent",
        "supported,refused",
        "0",
    ]
    assert table[2].split()[0] == f"localhost:{openssl_server.port}"
    assert table[3].split() == [f"127.0.0.1:{closed}", "refused", "refused", "-", "3"]


def test_targets_progress_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, stderr carries one rewritten progress line."""
    targets = tmp_path / "targets.txt"
    targets.write_text(f"127.0.0.1:{_closed_port()}\n127.0.0.1:{_closed_port()}\n")
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "twisted_rekey", "probe", "--targets", str(targets)],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=_RUN_TIMEOUT,
        )
        os.close(slave)
        slave = -1
        output = b""
        while select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 3
    assert b"\r\x1b[Kprobed 1/2: 127.0.0.1:" in output
    assert b"\r\x1b[Kprobed 2/2: 127.0.0.1:" in output
    assert output.endswith(b"\r\x1b[K")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("# nothing\n\n", "no targets in it"),
        ("127.0.0.1:1\nnot-a-target\n", "line 2: expected HOST:PORT"),
    ],
)
def test_bad_targets_file(tmp_path: Path, content: str, message: str) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text(content)
    done = run_probe("--targets", str(targets))
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert done.stdout == ""


# -- the schema ----------------------------------------------------------------------


def test_schema_command_prints_the_schema() -> None:
    done = run_probe("--schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == REPORT_SCHEMA
    assert schema["$id"].endswith(f":{SCHEMA_VERSION}")


def test_schema_rejects_what_it_does_not_describe() -> None:
    """The schema is strict enough to catch a renamed field or result."""
    finding = {
        "name": "client_renegotiation",
        "result": "allowed",
        "severity": "medium",
        "text": "x",
        "detail": {},
    }
    item = REPORT_SCHEMA["$defs"]["finding"]
    jsonschema.validate(finding, item)
    for broken in (
        {**finding, "result": "ok"},
        {**finding, "result": "echo"},
        {**finding, "severity": "critical"},
        {**finding, "ok": True},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, item)


def test_docs_name_every_finding() -> None:
    text = (Path(__file__).parent.parent / "docs" / "cli.rst").read_text()
    for name, results in FINDINGS.items():
        assert f"``{name}``" in text, name
        for result in results:
            assert f"``{result}``" in text, (name, result)


# -- IPv6 ------------------------------------------------------------------------------


@pytest.fixture
def ipv6_loopback() -> Iterator[None]:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    yield


def test_ipv6_target(cert_files: CertFiles, ipv6_loopback: None) -> None:
    with OpenSSLServer(cert_files, version="1.3", host="::1") as server:
        done, data = probe(
            server.port,
            "--tls1_3",
            "--wait",
            "0.3",
            "--send",
            "",
            host="::1",
            cafile=cert_files.ca_cert,
        )
    assert done.returncode == 0, done.stderr
    assert data["target"]["host"] == "::1"
    assert findings(data, "1.3")["certificate"]["result"] == "verified"
