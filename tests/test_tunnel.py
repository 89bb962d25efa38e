"""
``twistd -n rekey-tunnel`` for production: ``tls:`` endpoints on both
sides, half-closes relayed, mutual TLS with allow-lists, certificates
reloaded on SIGHUP under open connections, and Prometheus metrics (also of
``rekey-echo``).

As in ``test_plugins.py``, each twistd is a real subprocess on loopback,
port 0, stopped by its pid; every wait is bounded.  The other ends are
stacks nobody here wrote where it matters: Python's ``ssl`` module,
``openssl s_server``/``s_client`` (which report the KeyUpdates they
receive), and ``prometheus_client``'s own parser for the scrapes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from peers import CertFiles, OpenSSLClient, OpenSSLServer
from test_plugins import (
    assert_one_line_error,
    plain_echo_server,
    rekey_echo,
    run_twistd,
    twistd,
)
from twisted.python import usage

WAIT = 20.0
FAST = ["--interval", "1", "--min-interval", "0.5"]


def _loggedKeyUpdates(log: str, reason: str) -> int:
    """
    The KeyUpdates of ours a log reports for *reason*: one per
    ``sent a KeyUpdate`` event, N per ``sent N KeyUpdates`` event.
    """
    why = re.escape(reason)
    single = re.findall(
        rf"sent a KeyUpdate \(update_requested=\w+, reason: {why}\)", log
    )
    counted = re.findall(
        rf"sent (\d+) KeyUpdates \(update_requested=\w+\) since the last such "
        rf"event, the last one's reason: {why}",
        log,
    )
    return len(single) + sum(int(n) for n in counted)


# -- certificates ------------------------------------------------------------------


def _uri_cert(ca: trustme.CA, uri: str, cn: str) -> tuple[bytes, bytes]:
    """A client certificate whose only name is the URI *uri* (trustme has no
    URI names), signed by *ca*."""
    caKey = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    caCert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())  # type: ignore[arg-type]
    )
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), keyPEM


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """
    One CA with a server certificate (twice: for reloads), clients ``alice``
    (DNS name), ``carol`` (URI name), ``dave`` (common name only) and
    ``bob`` (on no allow-list); ``mallory`` is from another CA.
    """
    where = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    files: dict[str, Path] = {"ca": where / "ca.pem"}

    def write(name: str, leaf: Any) -> None:
        files[name] = where / f"{name}.pem"
        files[f"{name}-key"] = where / f"{name}.key"
        files[name].write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(files[f"{name}-key"]))

    write("server", ca.issue_cert("localhost", "127.0.0.1"))
    write("server2", ca.issue_cert("localhost", "127.0.0.1"))
    write("alice", ca.issue_cert("alice.test", common_name="alice"))
    write("bob", ca.issue_cert("bob.test", common_name="bob"))
    write("dave", ca.issue_cert(common_name="dave"))
    write("mallory", other.issue_cert("alice.test", common_name="alice"))
    cert, key = _uri_cert(ca, "spiffe://test/carol", "carol")
    files["carol"], files["carol-key"] = where / "carol.pem", where / "carol.key"
    files["carol"].write_bytes(cert)
    files["carol-key"].write_bytes(key)
    (where / "junk.pem").write_text("not a certificate\n")
    files["junk"] = where / "junk.pem"
    return files


def cert_files(pki: dict[str, Path], client: str) -> CertFiles:
    """The files as tests/peers.py's OpenSSL peers take them."""
    return CertFiles(
        ca=None,
        directory=pki["ca"].parent,
        ca_cert=pki["ca"],
        server_cert=pki["server"],
        server_key=pki["server-key"],
        client_cert=pki[client],
        client_key=pki[f"{client}-key"],
    )


def client_context(pki: dict[str, Path], client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if client is not None:
        context.load_cert_chain(str(pki[client]), str(pki[f"{client}-key"]))
    return context


@contextmanager
def tls_client(
    port: int, context: ssl.SSLContext, servername: str = "localhost"
) -> Iterator[ssl.SSLSocket]:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname=servername) as s:
            yield s


@contextmanager
def tls_tunnel(
    tmp_path: Path,
    backend: int,
    cert: Path,
    key: Path,
    *args: str,
) -> Iterator[Any]:
    """``rekey-tunnel`` with TLS (*cert*, *key*) in front of *backend*."""
    with twistd(
        tmp_path,
        "rekey-tunnel",
        "--listen",
        "ssl:0:interface=127.0.0.1",
        "--connect",
        f"tcp:127.0.0.1:{backend}",
        "--cert",
        str(cert),
        "--key",
        str(key),
        *args,
    ) as tunnel:
        yield tunnel


def recv_exactly(s: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = s.recv(min(65536, size - len(got)))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def recv_to_eof(s: socket.socket) -> bytes:
    got = bytearray()
    while chunk := s.recv(65536):
        got += chunk
    return bytes(got)


def echoes(port: int, context: ssl.SSLContext, data: bytes) -> bool:
    """Whether *data* comes back through the tunnel on a new connection
    (``False`` when the handshake or the first read is refused)."""
    try:
        with tls_client(port, context) as s:
            s.sendall(data)
            return recv_exactly(s, len(data)) == data
    except (ssl.SSLError, ConnectionError):
        return False


# -- options: every endpoint string, one line each -----------------------------


def check(*args: str) -> Any:
    from twisted_rekey.apps.tunnel import Options

    options = Options()
    options.check(list(args))
    return options


def test_tls_endpoint_strings_are_tls(pki: dict[str, Path]) -> None:
    options = check(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--connect",
        f"tls:localhost:1:certificate={pki['alice']}:privateKey={pki['alice-key']}",
        "--cafile",
        str(pki["ca"]),
    )
    spec = options["connectSpec"]
    assert spec.tls and spec.plain == "tcp:localhost:1" and spec.host == "localhost"
    assert spec.tlsArguments["certificate"] == str(pki["alice"])
    assert options["clientOptions"] is not None
    options = check(
        "--listen",
        f"tls:0:interface=127.0.0.1:certKey={pki['server']}:"
        f"privateKey={pki['server-key']}",
        "--connect",
        "tcp:127.0.0.1:1",
    )
    assert options["listenSpec"].tls
    assert options["listenSpec"].plain == "tcp:0:interface=127.0.0.1"
    assert options["certificate"].certPath == pki["server"]
    options = check(
        "--listen",
        "tcp:0",
        "--connect",
        "tls:localhost:1:endpoint=unix\\:/nonexistent/s",
        "--cafile",
        str(pki["ca"]),
    )
    assert options["connectSpec"].plain == "unix:/nonexistent/s"


BAD = [
    (["--listen", " ", "--connect", "tcp:h:1"], "an empty endpoint string"),
    (["--listen", "tcp:0", "--connect", "tcp:h:1"], "no TLS to rotate"),
    (["--listen", "tcp:0", "--connect", "tls:localhost"], "not a valid endpoint"),
    (["--listen", "tcp:0", "--connect", "nosuch:h:1"], "not a valid endpoint"),
    (["--listen", "tls:notaport", "--connect", "tcp:h:1"], "not a valid endpoint"),
    (
        ["--listen", "tcp:0", "--connect", "tls:h:1:trustRoots=/etc/ssl"],
        "trustRoots= is not supported here (use --cafile)",
    ),
    (
        ["--listen", "tcp:0", "--connect", "tls:h:1:certificate={alice}:certKey=x"],
        "two keys for --client-cert",
    ),
    (
        ["--listen", "tcp:0", "--connect", "tls:h:1:bogus=1"],
        "not a valid endpoint",
    ),
    (
        ["--listen", "tcp:0", "--connect", "tls:h:1", "--client-key", "{alice-key}"],
        "--client-key needs --client-cert too",
    ),
    (
        [
            "--listen",
            "tcp:0",
            "--connect",
            "tls:h:1",
            "--client-cert",
            "{alice}",
            "--client-key",
            "{bob-key}",
        ],
        "does not match the certificate",
    ),
    (
        ["--listen", "tcp:0", "--connect", "tls:h:1", "--client-cert", "{junk}"],
        "no PEM certificate",
    ),
    (
        ["--listen", "tcp:0", "--connect", "tls:h:1", "--client-ca", "{ca}"],
        "--client-ca is for an ssl: or tls: --listen",
    ),
    (
        ["--listen", "ssl:0", "--connect", "tcp:h:1", "--client-cert", "{alice}"],
        "--client-cert is for an ssl: or tls: --connect",
    ),
    (
        ["--listen", "ssl:0", "--connect", "tcp:h:1", "--allow-cn", "alice"],
        "need --client-ca",
    ),
    (
        ["--listen", "ssl:0", "--connect", "tcp:h:1", "--client-ca", "{junk}"],
        "--client-ca {junk}: no PEM certificate",
    ),
    (
        ["--listen", "ssl:0", "--connect", "tcp:h:1", "--client-ca", "{missing}"],
        "No such file or directory",
    ),
    (
        ["--listen", "ssl:0", "--connect", "tcp:h:1", "--metrics", "ssl:0"],
        "metrics are served over plain HTTP",
    ),
    (
        ["--listen", "ssl:0", "--connect", "tcp:h:1", "--metrics", "nosuch:0"],
        "--metrics nosuch:0: not a valid endpoint",
    ),
]


@pytest.mark.parametrize(
    ("args", "fragment"),
    BAD,
    ids=lambda x: " ".join(x) if isinstance(x, list) else "",
)
def test_bad_input_in_process(
    tmp_path: Path, pki: dict[str, Path], args: list[str], fragment: str
) -> None:
    files = {name: str(path) for name, path in pki.items()}
    files["missing"] = str(tmp_path / "missing.pem")
    args = [a.format(**files) for a in args]
    with pytest.raises(usage.UsageError) as raised:
        check("--state-dir", str(tmp_path), *args)
    assert fragment.format(**files) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_bad_input_is_one_line(tmp_path: Path, pki: dict[str, Path]) -> None:
    done = run_twistd(
        tmp_path,
        "rekey-tunnel",
        "--listen",
        "tcp:0",
        "--connect",
        "tls:h:1:trustRoots=/etc/ssl",
    )
    line = assert_one_line_error(done, "trustRoots= is not supported here")
    assert line.startswith("twistd rekey-tunnel: error: --connect tls:h:1")


# -- tls: --connect rotates, with a client certificate -------------------------


def test_plain_in_tls_out_rotates_and_presents_a_client_certificate(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """
    ``--listen tcp: --connect tls:...:certificate=...:privateKey=...`` to an
    ``openssl s_server`` that requires a client certificate: it verifies
    ours, sees the tunnel's KeyUpdates, and data flows both ways after them.
    """
    certs = cert_files(pki, "alice")
    with OpenSSLServer(certs, extra_args=["-Verify", "1"]) as server:
        with twistd(
            tmp_path,
            "rekey-tunnel",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            f"tls:127.0.0.1:{server.port}:certificate={pki['alice']}:"
            f"privateKey={pki['alice-key']}",
            "--servername",
            "localhost",
            "--cafile",
            str(pki["ca"]),
            *FAST,
        ) as tunnel:
            with socket.create_connection(("127.0.0.1", tunnel.port), WAIT) as s:
                s.sendall(b"first line from the client\n")
                server.expect(r"first line from the client")
                server.expect(r"CN\s*=\s*alice")
                for n in range(2):
                    server.expect_key_update(False, timeout=WAIT)
                    s.sendall(f"after rotation {n}\n".encode())
                    server.expect(f"after rotation {n}")
                    server.send(f"answer {n}\n".encode())
                    assert recv_exactly(s, 9) == f"answer {n}\n".encode()
            assert "(TLSv1.3" in tunnel.wait_for(r"relaying .*").group(0)
            # Rotations less than a second apart share one event, which
            # counts them; the ones still held back are reported as the
            # connection closes, before its "closed:" line.
            closed = tunnel.wait_for(r"closed: KeyUpdates sent (\d+)", timeout=WAIT)
            reported = _loggedKeyUpdates(tunnel.log, "policy: interval")
            assert reported == int(closed.group(1)) >= 2, tunnel.log


# -- half-close ------------------------------------------------------------------


class PySSLHalfCloseServer:
    """
    A Python ``ssl`` server that reads to the end (the client's close_notify),
    then answers with the SHA-256 of what it read, and closes.
    """

    def __init__(self, pki: dict[str, Path]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(pki["server"]), str(pki["server-key"]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT)
        self.port = self.listener.getsockname()[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
            raw.settimeout(WAIT)
            with self.context.wrap_socket(raw, server_side=True) as s:
                read = recv_to_eof(s)
                s.sendall(hashlib.sha256(read).hexdigest().encode() + b"\n")
                s.unwrap()
        except BaseException as e:
            self.error = e

    def close(self) -> None:
        self.thread.join(WAIT)
        self.listener.close()


def test_half_close_from_the_client_is_relayed(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """
    A plain client sends, then half-closes (FIN): the tunnel passes it on
    to the TLS service as close_notify and still relays the service's
    answer, which only comes after the end of the request.
    """
    data = os.urandom(3_000_000)
    server = PySSLHalfCloseServer(pki)
    try:
        with twistd(
            tmp_path,
            "rekey-tunnel",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            f"tls:127.0.0.1:{server.port}",
            "--servername",
            "localhost",
            "--cafile",
            str(pki["ca"]),
        ) as tunnel:
            with socket.create_connection(("127.0.0.1", tunnel.port), WAIT) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                answer = recv_to_eof(s)
            assert answer == hashlib.sha256(data).hexdigest().encode() + b"\n"
            tunnel.wait_for(r"half-closed; passing it on")
    finally:
        server.close()
    assert server.error is None, server.error


def test_half_close_from_the_service_is_relayed(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """
    A plain service sends, then half-closes (FIN): the TLS client reads
    everything and then the end (close_notify), and what it still sends
    afterwards reaches the service.
    """
    greeting = os.urandom(1_000_000)
    request = os.urandom(2_000_000)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    got: dict[str, bytes] = {}

    def service() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(greeting)
            conn.shutdown(socket.SHUT_WR)
            got["request"] = recv_to_eof(conn)

    thread = threading.Thread(target=service, daemon=True)
    thread.start()
    try:
        with twistd(
            tmp_path,
            "rekey-tunnel",
            "--listen",
            f"ssl:0:interface=127.0.0.1:certKey={pki['server']}:"
            f"privateKey={pki['server-key']}",
            "--connect",
            f"tcp:127.0.0.1:{listener.getsockname()[1]}",
        ) as tunnel:
            with tls_client(tunnel.port, client_context(pki, None)) as s:
                assert recv_to_eof(s) == greeting  # to the close_notify
                s.sendall(request)
                s.unwrap()
            thread.join(WAIT)
            tunnel.wait_for(r"half-closed; passing it on")
    finally:
        listener.close()
    assert got.get("request") == request


# -- mutual TLS ------------------------------------------------------------------


def test_mutual_tls_with_allow_lists(tmp_path: Path, pki: dict[str, Path]) -> None:
    data = os.urandom(200_000)
    with (
        plain_echo_server() as backend,
        tls_tunnel(
            tmp_path,
            backend,
            pki["server"],
            pki["server-key"],
            "--client-ca",
            str(pki["ca"]),
            "--allow-dns",
            "ALICE.test",
            "--allow-uri",
            "spiffe://test/carol",
            "--allow-cn",
            "dave",
        ) as tunnel,
    ):
        port = tunnel.port
        tunnel.wait_for(r"client certificates required, issued by .*DNS:ALICE\.test")
        for accepted in ("alice", "carol", "dave"):
            assert echoes(port, client_context(pki, accepted), data), accepted
        assert not echoes(port, client_context(pki, "bob"), data)
        tunnel.wait_for(
            r"client certificate refused: CN=bob.*\(DNS:bob\.test, CN=bob\) "
            r"is not on the allow-list"
        )
        assert not echoes(port, client_context(pki, "mallory"), data)
        tunnel.wait_for(
            r"client certificate refused: certificate verification failed at "
            r"depth 0: unable to get local issuer certificate"
        )
        assert not echoes(port, client_context(pki, None), data)
        tunnel.wait_for(r"TLS handshake failed: .*peer did not return a certificate")

        # A foreign client: openssl s_client, with and without an allowed cert.
        with OpenSSLClient(
            cert_files(pki, "alice"), port, servername="localhost", client_cert=True
        ) as client:
            client.send_line("hello from s_client")
            client.expect(r"^hello from s_client", timeout=WAIT)
        with OpenSSLClient(
            cert_files(pki, "bob"), port, servername="localhost", client_cert=True
        ) as client:
            # TLS 1.3: the client's handshake is done when the server reads
            # its certificate, and refuses it with an alert.
            client.expect(r"SSL alert number \d+", timeout=WAIT)
        assert tunnel.count("is not on the allow-list") == 2
        # Still serving, and nothing crashed.
        assert echoes(port, client_context(pki, "alice"), data)
        assert tunnel.process.poll() is None
        assert "Traceback" not in tunnel.log and "Unhandled" not in tunnel.log


# -- certificates reloaded on SIGHUP -------------------------------------------


def der(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def served_certificate(port: int, pki: dict[str, Path]) -> bytes:
    with tls_client(port, client_context(pki, "alice")) as s:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        peer = s.getpeercert(binary_form=True)
        assert peer is not None
        return peer


def test_sighup_reloads_certificates_under_open_connections(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """
    SIGHUP with a connection open (``openssl s_client``, which reports the
    KeyUpdates it receives): the connection goes on, with new keys right
    after the reload; new connections get the new certificate at once; a
    broken file is refused with a log line, and the certificate in force
    stays.
    """
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    cert.write_bytes(pki["server"].read_bytes())
    key.write_bytes(pki["server-key"].read_bytes())
    with (
        plain_echo_server() as backend,
        tls_tunnel(
            tmp_path,
            backend,
            cert,
            key,
            "--client-ca",
            str(pki["ca"]),
            "--interval",
            "off",
            "--min-interval",
            "0.2",
        ) as tunnel,
    ):
        port = tunnel.port
        assert served_certificate(port, pki) == der(pki["server"])
        before, after = os.urandom(500_000), os.urandom(500_000)
        with (
            tls_client(port, client_context(pki, "alice")) as python,
            OpenSSLClient(
                cert_files(pki, "alice"), port, servername="localhost", client_cert=True
            ) as client,
        ):
            python.sendall(before)
            assert recv_exactly(python, len(before)) == before
            client.send_line("before the reload")
            client.expect(r"^before the reload", timeout=WAIT)
            assert client.key_updates_received() == []

            cert.write_bytes(pki["server2"].read_bytes())
            key.write_bytes(pki["server2-key"].read_bytes())
            time.sleep(0.3)  # keys older than --min-interval: rotated
            os.kill(tunnel.process.pid, signal.SIGHUP)
            tunnel.wait_for(r"certificates reloaded, new connections use them")
            client.expect_key_update(False, timeout=WAIT)
            tunnel.wait_for(r"keys rotated after the certificate reload")
            client.send_line("after the reload")
            client.expect(r"^after the reload", timeout=WAIT)
            python.sendall(after)  # every byte, on the same connection
            assert recv_exactly(python, len(after)) == after
            assert python.getpeercert(binary_form=True) == der(pki["server"])
            assert served_certificate(port, pki) == der(pki["server2"])

            # A broken file: refused, the new certificate stays in force.
            cert.write_text("not a certificate\n")
            os.kill(tunnel.process.pid, signal.SIGHUP)
            tunnel.wait_for(
                r"certificate reload refused; the certificates in force stay: "
                r"--cert \S+cert\.pem: no PEM certificate"
            )
            assert served_certificate(port, pki) == der(pki["server2"])
            client.send_line("after the refused reload")
            client.expect(r"^after the refused reload", timeout=WAIT)
            assert len(client.key_updates_received()) == 1
        assert tunnel.process.poll() is None
        assert tunnel.count("certificates reloaded") == 1
        # Both open connections rotated once, after the one good reload.
        assert tunnel.count("keys rotated after the certificate reload") == 2


def test_sighup_renegotiates_open_tls12_connections(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """On TLS 1.2 the rotation after a reload is a renegotiation, which the
    open ``openssl s_client`` connection takes (a HelloRequest), and data
    flows after it."""
    with (
        plain_echo_server() as backend,
        tls_tunnel(
            tmp_path,
            backend,
            pki["server"],
            pki["server-key"],
            "--tls-max",
            "1.2",
            "--interval",
            "off",
            "--min-interval",
            "0.2",
        ) as tunnel,
    ):
        with OpenSSLClient(
            cert_files(pki, "alice"), tunnel.port, version="1.2", servername="localhost"
        ) as client:
            client.send_line("before the reload")
            client.expect(r"^before the reload", timeout=WAIT)
            time.sleep(0.3)  # keys older than --min-interval: rotated
            os.kill(tunnel.process.pid, signal.SIGHUP)
            client.expect_hello_request(timeout=WAIT)
            tunnel.wait_for(r"keys rotated after the certificate reload")
            tunnel.wait_for(r"renegotiation completed \(TLSv1\.2\)")
            client.send_line("after the reload")
            client.expect(r"^after the reload", timeout=WAIT)


# -- metrics ---------------------------------------------------------------------


def scrape(port: int) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample and all(
                s.labels.get(k) == v for k, v in labels.items()
            ):
                return float(s.value)
    raise AssertionError(f"no sample {sample} {labels}")


def metrics_port(server: Any) -> int:
    return int(
        server.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(Prometheus").group(1)
    )


def test_tunnel_metrics_scraped_and_parsed(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    data = os.urandom(300_000)
    with (
        plain_echo_server() as backend,
        tls_tunnel(
            tmp_path,
            backend,
            pki["server"],
            pki["server-key"],
            "--client-ca",
            str(pki["ca"]),
            "--allow-cn",
            "alice",
            "--metrics",
            "tcp:0:interface=127.0.0.1",
            *FAST,
        ) as tunnel,
    ):
        port, metrics = tunnel.port, metrics_port(tunnel)
        with tls_client(port, client_context(pki, "alice")) as s:
            for _ in range(3):  # a few seconds of traffic: rotations
                s.sendall(data)
                assert recv_exactly(s, len(data)) == data
                time.sleep(0.7)
            tunnel.wait_for(r"reason: policy: interval")
            families = scrape(metrics)
            assert value(families, "twisted_rekey_connections_open", side="listen") == 1
            assert value(
                families, "twisted_rekey_bytes_received_total", side="listen"
            ) == 3 * len(data)
            assert value(families, "twisted_rekey_seconds_since_rotation_gcount") == 1
            # The one open connection: its keys changed within the last day.
            for bound, count in (("86400.0", 1), ("+Inf", 1)):
                assert (
                    value(
                        families,
                        "twisted_rekey_seconds_since_rotation_bucket",
                        le=bound,
                    )
                    == count
                )
            assert families["twisted_rekey_seconds_since_rotation"].type in (
                "histogram",
                "gaugehistogram",
            )
        assert not echoes(port, client_context(pki, "bob"), data)
        tunnel.wait_for(r"closed: .*bytes received 900000, sent 900000")
        tunnel.wait_for(r"is not on the allow-list")
        families = scrape(metrics)
        sent = tunnel.count("sent a KeyUpdate")
        assert sent >= 1
        assert value(families, "twisted_rekey_connections_open", side="listen") == 0
        assert value(families, "twisted_rekey_connections_total", side="listen") == 2
        assert value(
            families, "twisted_rekey_bytes_sent_total", side="listen"
        ) == 3 * len(data)
        assert (
            value(families, "twisted_rekey_key_updates_sent_total", side="listen")
            == sent
        )
        assert value(families, "twisted_rekey_client_certificates_refused_total") == 1
        assert (
            value(families, "twisted_rekey_guard_trips_total", guard="key_update_flood")
            == 0
        )


def test_echo_metrics(tmp_path: Path) -> None:
    with rekey_echo(
        tmp_path, "--metrics", "tcp:0:interface=127.0.0.1", *FAST
    ) as server:
        port, metrics = server.port, metrics_port(server)
        context = ssl.create_default_context(
            cafile=str(tmp_path / "state" / "localhost.pem")
        )
        with tls_client(port, context) as s:
            s.sendall(b"hello")
            assert recv_exactly(s, 5) == b"hello"
            families = scrape(metrics)
            assert value(families, "twisted_rekey_connections_open", side="listen") == 1
        server.wait_for(r"closed: .*bytes received 5, sent 5")
        families = scrape(metrics)
        assert value(families, "twisted_rekey_connections_open", side="listen") == 0
        assert value(families, "twisted_rekey_bytes_received_total", side="listen") == 5
        assert "GET /metrics" not in server.log  # scrapes are not logged


def test_log_events_counted_for_any_protocol() -> None:
    """The counters fed by ``rekey_event`` log events, on their own."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.logger import Logger, LogPublisher

    from twisted_rekey._metrics import RekeyMetrics

    publisher = LogPublisher()
    metrics = RekeyMetrics()
    metrics.startObserving(publisher)
    log = Logger(observer=publisher)
    for event in ("key_update_flood", "rotation_failed", "rotation_failed"):
        log.warn("x", rekey_event=event)
    log.info("not counted")
    metrics.stopObserving()
    log.warn("x", rekey_event="rotation_failed")  # after stopping: not counted
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert (
        value(families, "twisted_rekey_guard_trips_total", guard="key_update_flood")
        == 1
    )
    assert (
        value(families, "twisted_rekey_rotation_failures_total", kind="rotation_failed")
        == 2
    )


def test_watch_files_reloads_on_change(tmp_path: Path) -> None:
    """--watch-files: a change of a watched file (or its disappearance and
    return) calls the reload, once per change; no change, no reload."""
    from twisted.internet import task

    from twisted_rekey.apps.tunnel import WatchFiles

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("one")
    key.write_text("one")
    calls: list[int] = []
    clock = task.Clock()
    watch = WatchFiles(
        lambda: calls.append(1), lambda: [str(cert), str(key)], 5.0, clock
    )
    watch.startService()
    try:
        clock.advance(5)
        assert calls == []
        key.write_text("two, longer")
        clock.advance(5)
        assert calls == [1]
        clock.advance(5)
        assert calls == [1]
        cert.unlink()
        clock.advance(5)
        cert.write_text("three")
        clock.advance(5)
        assert calls == [1, 1, 1]
    finally:
        watch.stopService()
    assert not clock.getDelayedCalls()


def test_echo_takes_tls_endpoint_strings(tmp_path: Path) -> None:
    from twisted_rekey.apps.echo import Options

    options = Options()
    options.check(
        ["--state-dir", str(tmp_path), "--endpoint", "tls:0:interface=\\:\\:1"]
    )
    assert options["endpointSpec"].tls
    assert options["endpointSpec"].plain == "tcp:0:interface=\\:\\:1"


def test_reload_of_the_connect_side(tmp_path: Path, pki: dict[str, Path]) -> None:
    """
    A reload reads the --connect side's CA and client certificate again: new
    outbound connections get a new connector; a client certificate that no
    longer loads is refused and the connector in force stays.
    """
    from twisted.logger import globalLogPublisher

    from twisted_rekey.apps.tunnel import CertificateReloader, RelayFactory

    cert = tmp_path / "client.pem"
    cert.write_bytes(pki["alice"].read_bytes())
    options = check(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--connect",
        "tls:localhost:1",
        "--cafile",
        str(pki["ca"]),
        "--client-cert",
        str(cert),
        "--client-key",
        str(pki["alice-key"]),
    )
    relay = RelayFactory(object(), "tls:localhost:1", False, True, None)
    made: list[Any] = []

    def makeConnector(clientOptions: Any) -> Any:
        made.append(clientOptions)
        return ("connector", len(made))

    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    try:
        reloader = CertificateReloader(options, relay, None, makeConnector)
        assert reloader.reload()
        assert relay.connector == ("connector", 1)
        cert.write_bytes(pki["bob"].read_bytes())  # no longer matches the key
        assert not reloader.reload()
        assert relay.connector == ("connector", 1)
    finally:
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
    outcomes = [e["rekey_event"] for e in events if "rekey_event" in e]
    assert outcomes == ["certificate_reloaded", "certificate_reload_refused"]
    (refused,) = [e for e in events if e.get("rekey_event", "").endswith("refused")]
    assert "--client-key" in refused["error"] and "does not match" in refused["error"]


def test_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_twistd(
            tmp_path,
            "rekey-tunnel",
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--connect",
            "tcp:127.0.0.1:1",
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics",
            f"tcp:{port}:interface=127.0.0.1",
        )
    line = assert_one_line_error(done, "Address already in use")
    assert line == (
        f"twistd rekey-tunnel: error: cannot listen on "
        f"tcp:{port}:interface=127.0.0.1: Address already in use"
    )


def test_reload_does_not_rotate_keys_that_just_changed() -> None:
    """Reloads in a row are no burst of KeyUpdates: a side whose keys
    changed within the policy's min_interval is left alone."""
    from types import SimpleNamespace

    from twisted.internet.defer import succeed

    from twisted_rekey import RotationPolicy
    from twisted_rekey.apps.tunnel import CertificateReloader, RelayFactory

    class Side:
        def __init__(self, **attributes: Any) -> None:
            self.__dict__.update(attributes)

        def rekey(self) -> Any:
            self.rekeyed += 1
            return succeed(None)

    relay = RelayFactory(None, "tcp:h:1", True, False, RotationPolicy(min_interval=1.0))
    fresh, old = (
        Side(
            isTLS=True,
            ready=True,
            lost=False,
            writeClosed=False,
            role="listen",
            name=name,
            transport=SimpleNamespace(getHandle=lambda: object()),
            rekeyStats=SimpleNamespace(secondsSinceRotation=age),
            rekeyed=0,
        )
        for name, age in (("fresh", 0.2), ("old", 10.0))
    )
    relay.sides.update({fresh, old})  # type: ignore[arg-type]
    CertificateReloader(None, relay, None, lambda c: c).rotateOpenConnections()  # type: ignore[arg-type]
    assert (fresh.rekeyed, old.rekeyed) == (0, 1)
