"""
Tests of the test infrastructure itself: the foreign peers really say what
``peers`` claims they say, and ``tls13`` really decrypts what TLS stacks
nobody here wrote put on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from peers import (
    CertFiles,
    GnuTLSClient,
    GnuTLSServer,
    OpenSSLClient,
    OpenSSLServer,
    PySSLClient,
    PySSLServer,
)
from tls13 import (
    CONTENT_APPLICATION_DATA,
    CONTENT_HANDSHAKE,
    DecryptionError,
    Record,
    decrypt_record,
    decrypt_stream,
    derive_key_iv,
    hkdf_expand_label,
    key_updates_in,
    next_traffic_secret,
    parse_key_log,
    parse_records,
    read_key_log,
)

# -- tls13: published vectors (RFC 8448 §3, simple 1-RTT handshake) -----------

RFC8448_SERVER_HS_SECRET = bytes.fromhex(
    "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38"
)
RFC8448_SERVER_AP_SECRET = bytes.fromhex(
    "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"
)
RFC8448_CLIENT_AP_SECRET = bytes.fromhex(
    "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5"
)
# The application data both sides send: bytes 0x00..0x31.
RFC8448_PLAINTEXT = bytes(range(0x32))
RFC8448_SERVER_RECORD_SEQ1 = bytes.fromhex(
    "1703030043 2e937e11ef4ac740e538ad36005fc4a46932fc3225d05f82aa1b36e30efaf97d"
    "90e6dffc602dcb501a59a8fcc49c4bf2e5f0a21c0047c2abf332540dd032e167c2955d"
)
RFC8448_CLIENT_RECORD_SEQ0 = bytes.fromhex(
    "1703030043 a23f7054b62c94d0affafe8228ba55cbefacea42f914aa66bcab3f2b9819a8a5"
    "b46b395bd54a9a20441e2b62974e1f5a6292a2977014bd1e3deae63aeebb21694915e4"
)


def test_derive_key_iv_rfc8448() -> None:
    hs = derive_key_iv(RFC8448_SERVER_HS_SECRET, "TLS_AES_128_GCM_SHA256")
    assert hs.key.hex() == "3fce516009c21727d0f2e4e86ee403bc"
    assert hs.iv.hex() == "5d313eb2671276ee13000b30"
    ap = derive_key_iv(RFC8448_SERVER_AP_SECRET, 0x1301)
    assert ap.key.hex() == "9f02283b6c9c07efc26bb9f2ac92e356"
    assert ap.iv.hex() == "cf782b88dd83549aadf1e984"


def test_decrypt_record_rfc8448() -> None:
    suite = "TLS_AES_128_GCM_SHA256"
    server_keys = derive_key_iv(RFC8448_SERVER_AP_SECRET, suite)
    # seq 0 was the server's NewSessionTicket.
    assert decrypt_record(RFC8448_SERVER_RECORD_SEQ1, server_keys, 1, suite) == (
        CONTENT_APPLICATION_DATA,
        RFC8448_PLAINTEXT,
    )
    client_keys = derive_key_iv(RFC8448_CLIENT_AP_SECRET, suite)
    assert decrypt_record(RFC8448_CLIENT_RECORD_SEQ0, client_keys, 0, suite) == (
        CONTENT_APPLICATION_DATA,
        RFC8448_PLAINTEXT,
    )
    with pytest.raises(DecryptionError):
        decrypt_record(RFC8448_SERVER_RECORD_SEQ1, server_keys, 0, suite)
    tampered = bytearray(RFC8448_SERVER_RECORD_SEQ1)
    tampered[20] ^= 0x01
    with pytest.raises(DecryptionError):
        decrypt_record(bytes(tampered), server_keys, 1, suite)


def _independent_expand_label(
    secret: bytes, label: bytes, length: int, h: str
) -> bytes:
    # RFC 5869 HKDF-Expand written out with the standard library's HMAC only.
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), h).digest()
        out += block
        counter += 1
    return out[:length]


@pytest.mark.parametrize(
    ("suite", "hash_name"),
    [
        ("TLS_AES_128_GCM_SHA256", "sha256"),
        ("TLS_AES_256_GCM_SHA384", "sha384"),
        ("TLS_CHACHA20_POLY1305_SHA256", "sha256"),
    ],
)
def test_next_traffic_secret_independent(suite: str, hash_name: str) -> None:
    size = hashlib.new(hash_name).digest_size
    secret = hashlib.new(hash_name, b"some traffic secret").digest()
    expected = _independent_expand_label(secret, b"traffic upd", size, hash_name)
    assert next_traffic_secret(secret, suite) == expected
    assert len(expected) == size
    key_len = 16 if suite == "TLS_AES_128_GCM_SHA256" else 32
    keys = derive_key_iv(expected, suite)
    assert keys.key == _independent_expand_label(expected, b"key", key_len, hash_name)
    assert keys.iv == _independent_expand_label(expected, b"iv", 12, hash_name)


def test_next_traffic_secret_from_rfc8448() -> None:
    # No published KeyUpdate vector exists; chain two updates from the RFC's
    # secret and compare with the standard-library computation.
    first = next_traffic_secret(RFC8448_SERVER_AP_SECRET, "TLS_AES_128_GCM_SHA256")
    second = next_traffic_secret(first, "TLS_AES_128_GCM_SHA256")
    assert first == _independent_expand_label(
        RFC8448_SERVER_AP_SECRET, b"traffic upd", 32, "sha256"
    )
    assert second == _independent_expand_label(first, b"traffic upd", 32, "sha256")
    assert hkdf_expand_label(first, "traffic upd", b"", 32, _sha256()) == second


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def test_parse_records_partial() -> None:
    stream = RFC8448_SERVER_RECORD_SEQ1 + RFC8448_CLIENT_RECORD_SEQ0
    for cut in (0, 3, 5, 30, len(RFC8448_SERVER_RECORD_SEQ1), len(stream) - 1):
        records, rest = parse_records(stream[:cut])
        consumed = sum(5 + len(r.payload) for r in records)
        assert consumed + len(rest) == cut
        assert rest == stream[consumed:cut]
    records, rest = parse_records(stream)
    assert rest == b""
    assert [r.offset for r in records] == [0, len(RFC8448_SERVER_RECORD_SEQ1)]
    assert records[0].raw == RFC8448_SERVER_RECORD_SEQ1
    with pytest.raises(ValueError):
        parse_records(b"GET / HTTP/1.1\r\n")


def test_parse_key_log() -> None:
    random1, random2 = "11" * 32, "22" * 32
    log = parse_key_log(
        textwrap.dedent(f"""\
        # comment
        SERVER_HANDSHAKE_TRAFFIC_SECRET {random1} {"aa" * 32}
        CLIENT_TRAFFIC_SECRET_0 {random1} {"bb" * 48}
        SERVER_TRAFFIC_SECRET_0 {random1} {"cc" * 32}

        CLIENT_TRAFFIC_SECRET_0 {random2} {"dd" * 32}
        SERVER_TRAFFIC_SECRET_0 {random2} {"ee" * 3}""")
        + "f"
    )
    assert set(log.secrets) == {bytes.fromhex(random1), bytes.fromhex(random2)}
    assert log.client_traffic_secret(bytes.fromhex(random1)) == b"\xbb" * 48
    assert log.server_traffic_secret(bytes.fromhex(random1)) == b"\xcc" * 32
    # The truncated last line is ignored.
    assert "SERVER_TRAFFIC_SECRET_0" not in log.connection(bytes.fromhex(random2))
    with pytest.raises(KeyError):
        log.connection()


# -- tls13 against Python's ssl module ------------------------------------------


def _memory_pair(
    cert_files: CertFiles, keylog: Path
) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert_files.server_cert), str(cert_files.server_key))
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx = ssl.create_default_context(cafile=str(cert_files.ca_cert))
    client_ctx.keylog_filename = str(keylog)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="localhost")
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    return client, server, bios


def _pump(
    client: ssl.SSLObject, server: ssl.SSLObject, bios: list[ssl.MemoryBIO]
) -> tuple[bytes, bytes]:
    """Move bytes both ways until quiet; returns what each side wrote."""
    c_in, c_out, s_in, s_out = bios
    from_client, from_server = b"", b""
    for _ in range(20):
        moved = False
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        data = c_out.read()
        if data:
            from_client += data
            s_in.write(data)
            moved = True
        data = s_out.read()
        if data:
            from_server += data
            c_in.write(data)
            moved = True
        if not moved:
            break
    return from_client, from_server


def _read_all(obj: ssl.SSLObject) -> bytes:
    out = b""
    while True:
        try:
            out += obj.read(65536)
        except ssl.SSLWantReadError:
            return out


def test_decrypt_python_ssl_capture(cert_files: CertFiles, tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    client, server, bios = _memory_pair(cert_files, keylog)
    wire_c, wire_s = _pump(client, server, bios)
    messages = [b"first", b"second message", b"x" * 20000]
    for message in messages:
        client.write(message)
    server.write(b"pong")
    c_more, s_more = _pump(client, server, bios)
    wire_c += c_more
    wire_s += s_more
    assert _read_all(server) == b"".join(messages)
    assert _read_all(client) == b"pong"

    suite = client.cipher()[0]
    log = read_key_log(keylog)
    decrypted = decrypt_stream(wire_c, log.client_traffic_secret(), suite)
    app = [d.plaintext for d in decrypted if d.content_type == CONTENT_APPLICATION_DATA]
    assert b"".join(app) == b"".join(messages)
    # 20000 bytes do not fit one record: sequence numbers go on counting.
    assert [d.seq for d in decrypted] == list(range(len(decrypted)))
    assert len(decrypted) >= 4
    assert {d.generation for d in decrypted} == {0}

    # The server's side: handshake records are skipped, its NewSessionTickets
    # (handshake content) come first under the application secret.
    from_server = decrypt_stream(wire_s, log.server_traffic_secret(), suite)
    assert from_server[0].content_type == CONTENT_HANDSHAKE
    assert from_server[-1].plaintext == b"pong"

    records, rest = parse_records(wire_c)
    assert rest == b""
    first_app = decrypted[0].record
    skipped = [r for r in records if r.offset < first_app.offset]
    # ClientHello, ChangeCipherSpec, Finished (under the handshake secret).
    assert [r.content_type for r in skipped] == [22, 20, 23]

    tampered = bytearray(wire_c)
    tampered[decrypted[1].record.offset + 10] ^= 0x80
    with pytest.raises(DecryptionError):
        decrypt_stream(bytes(tampered), log.client_traffic_secret(), suite)
    with pytest.raises(DecryptionError):
        decrypt_stream(wire_c, log.server_traffic_secret(), suite)


def _capture_client(
    cert_files: CertFiles, port: int, keylog: Path
) -> tuple[ssl.SSLObject, socket.socket, list[ssl.MemoryBIO], bytearray]:
    """A Python ssl client over a real socket that keeps every byte it reads."""
    ctx = ssl.create_default_context(cafile=str(cert_files.ca_cert))
    ctx.keylog_filename = str(keylog)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return obj, sock, [incoming, outgoing], bytearray()


def _capture_until(
    obj: ssl.SSLObject,
    sock: socket.socket,
    bios: list[ssl.MemoryBIO],
    captured: bytearray,
    want: bytes,
) -> bytes:
    incoming, outgoing = bios
    got = b""
    while want not in got:
        try:
            if obj.version() is None:
                obj.do_handshake()
            while True:
                got += obj.read(65536)
        except ssl.SSLWantReadError:
            pass
        data = outgoing.read()
        if data:
            sock.sendall(data)
        if want in got:
            break
        chunk = sock.recv(65536)
        assert chunk, f"closed before {want!r}; got {got!r}"
        captured += chunk
        incoming.write(chunk)
    return got


@pytest.mark.parametrize(
    "suite",
    [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    ],
)
def test_decrypt_openssl_key_update(
    cert_files: CertFiles, tmp_path: Path, suite: str
) -> None:
    """s_server sends KeyUpdates; the records after each one open only under
    the next traffic secret, for all three suites."""
    keylog = tmp_path / "keys.log"
    with OpenSSLServer(cert_files, ciphersuites=suite, naccept=1) as server:
        obj, sock, bios, captured = _capture_client(cert_files, server.port, keylog)
        with sock:
            sock.settimeout(10)
            server.send_line("before")
            _capture_until(obj, sock, bios, captured, b"before\n")
            server.key_update()
            server.send_line("after one")
            _capture_until(obj, sock, bios, captured, b"after one\n")
            server.key_update(request_peer=True)
            server.send_line("after two")
            _capture_until(obj, sock, bios, captured, b"after two\n")
            assert obj.cipher()[0] == suite
            # Our client answers update_requested with its next write.
            obj.write(b"reply\n")
            sock.sendall(bios[1].read())
            server.expect_key_update(update_requested=False)
            server.expect(r"^reply$")

    secret = read_key_log(keylog).server_traffic_secret()
    decrypted = decrypt_stream(bytes(captured), secret, suite)
    app = [
        (d.generation, d.plaintext)
        for d in decrypted
        if d.content_type == CONTENT_APPLICATION_DATA
    ]
    assert app == [(0, b"before\n"), (1, b"after one\n"), (2, b"after two\n")]
    flags = [f for d in decrypted for f in key_updates_in(d)]
    assert flags == [False, True]
    # Without following the KeyUpdate the next record does not open.
    first_after = next(d for d in decrypted if d.generation == 1)
    with pytest.raises(DecryptionError):
        decrypt_record(
            first_after.record, derive_key_iv(secret, suite), first_after.seq, suite
        )


# -- foreign peers ------------------------------------------------------------------


def test_openssl_key_update_observed(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files) as server:
        with OpenSSLClient(cert_files, server.port) as client:
            assert client.version == "TLSv1.3"
            server.expect_handshake()
            client.send_line("hello from client")
            server.expect(r"^hello from client$")
            server.send_line("hello from server")
            client.expect(r"^hello from server$")

            client.key_update()
            assert server.expect_key_update() is False
            client.key_update(request_peer=True)
            assert server.expect_key_update() is True
            # The answer goes out with the server's next write, not before.
            client.expect_absent(r"<<< TLS 1\.3, Handshake .*KeyUpdate", wait=0.3)
            server.send_line("data")
            assert client.expect_key_update(update_requested=False) is False
            client.expect(r"^data$")

            server.key_update(request_peer=True)
            assert client.expect_key_update(update_requested=True)
            assert server.key_updates_received() == [False, True]


def test_openssl_renegotiation_observed(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.2") as server:
        with OpenSSLClient(cert_files, server.port, version="1.2") as client:
            server.expect_handshake()
            server.renegotiate()
            client.expect_hello_request()
            server.expect_renegotiation()
            # Refused by default when the client starts it.
            client.renegotiate()
            server.expect(r"warning no_renegotiation")
            client.expect(r"no renegotiation")

    with OpenSSLServer(cert_files, version="1.2", client_renegotiation=True) as server:
        with OpenSSLClient(cert_files, server.port, version="1.2") as client:
            server.expect_handshake()
            client.renegotiate()
            client.expect(r"^RENEGOTIATING")
            server.expect_renegotiation()
            client.send_line("still there")
            server.expect(r"^still there$")


def test_gnutls_echo_and_key_update(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files) as server:
        with GnuTLSClient(cert_files, server.port) as client:
            client.send_line("echo me")
            client.expect(r"^echo me$")
            client.key_update()
            client.expect(r"^- Rekey was completed")
            assert server.expect_key_update() is False
            client.key_update(request_peer=True)
            assert server.expect_key_update() is True
            client.send_line("again")
            # The echo carried the server's answer, just before the data.
            assert client.expect_key_update() is False
            client.expect(r"^again$")


def test_gnutls_client_flags_seen_by_openssl(cert_files: CertFiles) -> None:
    """GnuTLS's inline commands are named backwards; OpenSSL confirms which
    one sets update_requested."""
    with OpenSSLServer(cert_files) as server:
        with GnuTLSClient(cert_files, server.port) as client:
            client.key_update(request_peer=False)
            assert server.expect_key_update() is False
            client.key_update(request_peer=True)
            assert server.expect_key_update() is True
            server.key_update()
            assert client.expect_key_update() is False


def test_gnutls_server_with_openssl_client(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files) as server:
        with OpenSSLClient(cert_files, server.port) as client:
            client.send_line("through the relay")
            client.expect(r"^through the relay$")
            client.key_update()
            assert server.expect_key_update() is False


def test_gnutls_renegotiation(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files, version="1.2") as server:
        with GnuTLSClient(cert_files, server.port, version="1.2") as client:
            client.renegotiate()
            client.expect(r"^- ReHandshake was completed")
            server.expect_renegotiation()
        with OpenSSLClient(cert_files, server.port, version="1.2") as client:
            client.send(GnuTLSServer.REHANDSHAKE_COMMAND)
            client.expect_hello_request()


def test_gnutls_server_stop_leaves_nothing(cert_files: CertFiles) -> None:
    server = GnuTLSServer(cert_files).start()
    pgid = server.pid
    server.stop()
    assert server.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


def test_python_ssl_server_echo(cert_files: CertFiles) -> None:
    with PySSLServer(cert_files) as server:
        with OpenSSLClient(cert_files, server.port) as client:
            client.send_line("ping")
            client.expect(r"^ping$")
            client.key_update(request_peer=True)
            client.send_line("pong")
            client.expect(r"^pong$")
            # Python answered the request with the echo.
            assert client.expect_key_update() is False
        with PySSLClient(cert_files, server.port) as py_client:
            py_client.send(b"line\n")
            assert py_client.recv_until(b"\n") == b"line\n"
        server.wait_received(b"line\n")
    assert server.errors == []
    assert server.connections == 2


def test_python_ssl_client_with_gnutls(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files) as server:
        with PySSLClient(cert_files, server.port) as client:
            client.send(b"via python\n")
            assert client.recv_until(b"\n") == b"via python\n"


def test_ipv6_loopback(cert_files: CertFiles) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    with OpenSSLServer(cert_files, host="::1") as server:
        with OpenSSLClient(cert_files, server.port, host="::1") as client:
            client.send_line("six")
            server.expect(r"^six$")


def test_expect_failure_shows_output(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files) as server:
        with pytest.raises(AssertionError, match=r"(?s)not seen within.*ACCEPT"):
            server.expect(r"never printed", timeout=0.2)
    assert server.returncode is not None


def test_loopback_only(cert_files: CertFiles) -> None:
    with pytest.raises(ValueError):
        OpenSSLServer(cert_files, host="0.0.0.0")
    with pytest.raises(ValueError):
        PySSLServer(cert_files, host="::")


# -- the fixtures under pytest-twisted ------------------------------------------------


def test_contexts(make_context, server_context_tls12, client_context_tls13) -> None:
    from OpenSSL import SSL

    server = SSL.Connection(make_context("server", "1.3"))
    client = SSL.Connection(client_context_tls13)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert client.get_protocol_version_name() == "TLSv1.3"
    assert server.get_protocol_version_name() == "TLSv1.3"
    # A TLS 1.2-only server and a TLS 1.3-only client have no version in common.
    server = SSL.Connection(server_context_tls12)
    client = SSL.Connection(make_context("client", "1.3"))
    server.set_accept_state()
    client.set_connect_state()
    with pytest.raises(SSL.Error):
        for _ in range(10):
            for a, b in ((client, server), (server, client)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    pass


@pytest_twisted.inlineCallbacks
def test_twisted_client_against_openssl(cert_files: CertFiles):
    from twisted.internet import defer, endpoints, protocol, reactor
    from twisted.internet import ssl as tssl

    class Collect(protocol.Protocol):
        def connectionMade(self) -> None:
            self.received = b""
            self.lost = defer.Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: object) -> None:
            self.lost.callback(None)

    with OpenSSLServer(cert_files) as server:
        options = tssl.optionsForClientTLS(
            "127.0.0.1",
            trustRoot=tssl.Certificate.loadPEM(cert_files.ca_cert.read_bytes()),
        )
        endpoint = endpoints.wrapClientTLS(
            options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        )
        proto = yield endpoints.connectProtocol(endpoint, Collect())
        proto.transport.write(b"from twisted\n")
        yield server.when_seen(r"^from twisted$")
        server.key_update()
        server.send_line("from openssl")
        while b"from openssl\n" not in proto.received:
            yield _sleep(0.01)
        proto.transport.loseConnection()
        yield proto.lost


def _sleep(seconds: float):
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_ensure_deferred_with_fixtures(
    cert_files: CertFiles, logged_failures
) -> None:
    from twisted.logger import Logger
    from twisted.python.failure import Failure

    await _sleep(0.001)
    Logger().failure("expected", Failure(ZeroDivisionError()))
    assert len(logged_failures.flush(ZeroDivisionError)) == 1


def test_hygiene_fixtures_fail_dirty_tests(pytester: pytest.Pytester) -> None:
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    for name in ("peers.py",):
        (pytester.path / name).write_text((here / name).read_text())
    pytester.makepyfile(
        test_dirty="""
        import pytest_twisted
        from twisted.internet import reactor, protocol, defer
        from twisted.logger import Logger
        from twisted.python.failure import Failure

        def test_leaks_call():
            reactor.callLater(60, lambda: None)

        @pytest_twisted.inlineCallbacks
        def test_leaks_port():
            yield None
            reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")

        def test_logs_failure():
            Logger().failure("boom", Failure(KeyError("k")))

        def test_unhandled_deferred():
            defer.fail(ValueError("never handled"))

        def test_clean_after_dirty():
            assert not reactor.getDelayedCalls()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=5, errors=4)
    result.stdout.fnmatch_lines(
        [
            "*pending delayed calls*",
            "*open readers*",
            "*KeyError*",
            "*ValueError*never handled*",
        ],
        consecutive=False,
    )


def test_record_type_helpers() -> None:
    record = Record(23, 0x0303, b"\x00" * 17, 0)
    assert record.header == bytes.fromhex("1703030011")
