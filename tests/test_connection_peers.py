"""
The pyOpenSSL layer against TLS stacks nobody here wrote: ``openssl
s_server``/``s_client`` (OpenSSL 3.0 CLI) and ``gnutls-serv`` (GnuTLS).  Each
rekey counts only when the *foreign* side reports it received it, and data
still flows both ways afterwards.
"""

from __future__ import annotations

import socket
import threading
from contextlib import AbstractContextManager

import pytest
from memorypair import blocking, connected, read_until, watch
from OpenSSL import SSL
from peers import (
    OPENSSL_HELLO_REQUEST_RECEIVED,
    OPENSSL_KEY_UPDATE_RECEIVED,
    CertFiles,
    GnuTLSClient,
    GnuTLSServer,
    OpenSSLClient,
    OpenSSLServer,
)

from twisted_rekey import (
    KeyUpdateType,
    PeerRefused,
    RekeyConnection,
    RenegotiationForbidden,
)

TIMEOUT = 10


def _connect(
    certs: CertFiles, address: tuple[str, int], version: int
) -> AbstractContextManager[RekeyConnection]:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.load_verify_locations(str(certs.ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER)
    return connected(ctx, address, seconds=TIMEOUT)


# -- openssl s_server receives ours ---------------------------------------------


@pytest.mark.parametrize("request_peer", [False, True])
def test_s_server_sees_our_key_update(
    cert_files: CertFiles, request_peer: bool
) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        with _connect(cert_files, server.address, SSL.TLS1_3_VERSION) as conn:
            server.expect_handshake()
            conn.key_update(request_peer)
            assert server.expect_key_update(request_peer) is request_peer
            conn.sendall(b"client data after update\n")
            server.expect(r"client data after update")
            server.send_line("server data after update")
            assert b"server data after update" in read_until(conn, b"update\n")
            # s_server answers a requested update with its next write.
            assert conn.seen.count("read server key update") == int(request_peer)


def test_s_server_sees_our_renegotiation(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.2", client_renegotiation=True) as server:
        with _connect(cert_files, server.address, SSL.TLS1_2_VERSION) as conn:
            server.expect_handshake()
            conn.renegotiate()
            server.expect_renegotiation()
            conn.sendall(b"after renegotiation\n")
            server.expect(r"after renegotiation")
            server.send_line("reply")
            assert b"reply" in read_until(conn, b"reply")
            assert not conn.renegotiate_pending()
            assert conn.total_renegotiations() == 1


def test_s_server_refuses_our_renegotiation_by_default(
    cert_files: CertFiles,
) -> None:
    with OpenSSLServer(cert_files, version="1.2") as server:
        with _connect(cert_files, server.address, SSL.TLS1_2_VERSION) as conn:
            server.expect_handshake()
            # A blocking socket: the whole handshake runs inside the call.
            with pytest.raises(PeerRefused, match="no renegotiation"):
                conn.renegotiate()
            server.expect(r"warning no_renegotiation")


def test_no_renegotiation_over_http2(cert_files: CertFiles) -> None:
    """
    HTTP/2 over TLS 1.2 forbids renegotiation (RFC 9113, section 9.2.1):
    with h2 picked by ALPN, renegotiate() and rekey() raise before anything
    is sent, and s_server (which would accept one) sees none.
    """
    with OpenSSLServer(
        cert_files, version="1.2", client_renegotiation=True, extra_args=["-alpn", "h2"]
    ) as server:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.load_verify_locations(str(cert_files.ca_cert))
        ctx.set_verify(SSL.VERIFY_PEER)
        ctx.set_alpn_protos([b"h2"])
        with connected(ctx, server.address, seconds=TIMEOUT) as conn:
            server.expect_handshake()
            assert conn.get_alpn_proto_negotiated() == b"h2"
            for call in (conn.renegotiate, conn.renegotiate_abbreviated, conn.rekey):
                with pytest.raises(RenegotiationForbidden, match="HTTP/2") as raised:
                    call()
                assert raised.value.protocol == b"h2"
            assert not conn.renegotiate_pending()
            conn.sendall(b"still talking\n")
            server.expect(r"still talking")
            server.send_line("reply")
            assert b"reply" in read_until(conn, b"reply")
            assert conn.total_renegotiations() == 0
            assert server.output.count(", ClientHello") == 1, server.output


# -- openssl s_server starts its own towards us --------------------------------


@pytest.mark.parametrize("request_peer", [False, True])
def test_s_server_key_update_reaches_us(
    cert_files: CertFiles, request_peer: bool
) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        with _connect(cert_files, server.address, SSL.TLS1_3_VERSION) as conn:
            server.expect_handshake()
            server.key_update(request_peer)
            server.expect(r"SSL_do_handshake -> 1")
            server.send_line("ping")
            assert b"ping" in read_until(conn, b"ping")
            assert conn.seen.count("read server key update") == 1
            pending = conn.get_key_update_type()
            if request_peer:
                # We owe an answer; send it without writing any data.
                assert pending is KeyUpdateType.NOT_REQUESTED
                conn.key_update(False)
                assert server.expect_key_update(False) is False
            else:
                assert pending is KeyUpdateType.NONE
                server.expect_absent(OPENSSL_KEY_UPDATE_RECEIVED)
            conn.sendall(b"pong\n")
            server.expect(r"pong")


def test_s_server_renegotiation_reaches_us(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.2") as server:
        with _connect(cert_files, server.address, SSL.TLS1_2_VERSION) as conn:
            server.expect_handshake()
            server.renegotiate()
            server.expect(r"SSL_do_handshake -> 1")
            server.send_line("ping")
            assert b"ping" in read_until(conn, b"ping")
            assert conn.seen.count("read hello request") == 1
            conn.sendall(b"pong\n")
            server.expect_renegotiation()
            server.expect(r"pong")
            assert conn.total_renegotiations() == 1


# -- openssl s_client against our server ---------------------------------------


class _Server:
    """A blocking RekeyConnection server that echoes lines, in a thread."""

    def __init__(
        self,
        certs: CertFiles,
        version: int,
        *,
        allow_reneg: bool,
        renegotiate_on: bytes | None = None,
        update_on: bytes | None = None,
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.use_certificate_chain_file(str(certs.server_cert))
        ctx.use_privatekey_file(str(certs.server_key))
        if allow_reneg:
            from twisted_rekey import allow_client_renegotiation

            allow_client_renegotiation(ctx)
        self.ctx = ctx
        # A line that makes it start a full renegotiation after its echo.
        self.renegotiate_on = renegotiate_on
        # A line that makes it send a KeyUpdate with update_requested after
        # its echo.  Only this thread touches the connection once it runs:
        # OpenSSL forbids two threads in one SSL object, and a KeyUpdate
        # sent from another thread while this one is in recv() can crash.
        self.update_on = update_on
        self.ready = threading.Event()
        self.conn: RekeyConnection | None = None
        self.states: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sock = None
        try:
            sock, _ = self.listener.accept()
            blocking(sock, TIMEOUT)
            conn = self.conn = RekeyConnection(self.ctx, sock)
            self.states = watch(conn).states
            conn.set_accept_state()
            conn.do_handshake()
            self.ready.set()
            while True:
                try:
                    data = conn.recv(65536)
                except (SSL.ZeroReturnError, SSL.SysCallError):
                    return
                if conn.get_key_update_type() is KeyUpdateType.NOT_REQUESTED:
                    conn.key_update(False)  # answer at once, before echoing
                conn.sendall(data)
                if self.renegotiate_on is not None and self.renegotiate_on in data:
                    # After the echo: GnuTLS and Go clients take data that
                    # follows a HelloRequest for a protocol error.
                    conn.renegotiate()
                if self.update_on is not None and self.update_on in data:
                    conn.key_update(True)
        except BaseException as e:
            self.error = e
        finally:
            self.ready.set()
            if sock is not None:
                sock.close()
            self.listener.close()

    def count(self, text: str) -> int:
        return sum(text in s for s in self.states)

    def join(self) -> None:
        self.thread.join(TIMEOUT + 5)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("request_peer", [False, True])
def test_s_client_key_update_reaches_our_server(
    cert_files: CertFiles, request_peer: bool
) -> None:
    server = _Server(cert_files, SSL.TLS1_3_VERSION, allow_reneg=False)
    with OpenSSLClient(cert_files, server.port, version="1.3") as client:
        assert server.ready.wait(TIMEOUT)
        client.send_line("hello")
        client.expect(r"^hello$")
        client.key_update(request_peer)
        client.expect(r"KEYUPDATE")
        client.send_line("after")
        client.expect(r"^after$")
        assert server.count("read client key update") == 1
        if request_peer:
            assert client.expect_key_update() is False
        else:
            assert client.key_updates_received() == []
        client.quit()
    server.join()
    assert server.error is None


def test_our_server_key_update_reaches_s_client(cert_files: CertFiles) -> None:
    server = _Server(
        cert_files, SSL.TLS1_3_VERSION, allow_reneg=False, update_on=b"rotate"
    )
    with OpenSSLClient(cert_files, server.port, version="1.3") as client:
        assert server.ready.wait(TIMEOUT)
        client.send_line("rotate")
        client.expect(r"^rotate$")
        assert client.expect_key_update(True) is True
        client.send_line("data")
        client.expect(r"^data$")
        # s_client's answer came with its data; our server read it.
        assert server.count("read client key update") == 1
        client.quit()
    server.join()
    assert server.error is None


def test_s_client_renegotiation_reaches_our_server(cert_files: CertFiles) -> None:
    server = _Server(cert_files, SSL.TLS1_2_VERSION, allow_reneg=True)
    with OpenSSLClient(cert_files, server.port, version="1.2") as client:
        assert server.ready.wait(TIMEOUT)
        client.renegotiate()
        client.expect(r"RENEGOTIATING")
        client.send_line("after")
        client.expect(r"^after$")
        assert server.count("read client hello") == 2
        client.quit()
    server.join()
    assert server.error is None


# -- GnuTLS ---------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["gnutls-cli", "s_client"])
def test_full_renegotiation_from_our_server(cert_files: CertFiles, stack: str) -> None:
    # pyOpenSSL's default server Context caches sessions and issues tickets:
    # the client offers its session again, and a full renegotiation must
    # neither resume it nor leave out the ticket a GnuTLS client waits for.
    server = _Server(
        cert_files,
        SSL.TLS1_2_VERSION,
        allow_reneg=False,
        renegotiate_on=b"please rotate",
    )
    client: GnuTLSClient | OpenSSLClient
    if stack == "gnutls-cli":
        client = GnuTLSClient(cert_files, server.port, version="1.2")
    else:
        client = OpenSSLClient(cert_files, server.port, version="1.2")
    with client:
        assert server.ready.wait(TIMEOUT)
        for round_ in range(2):
            client.send_line(f"please rotate {round_}")
            client.expect(f"^please rotate {round_}")
            if isinstance(client, GnuTLSClient):
                client.expect(r"\*\*\* Rehandshake was performed")
            else:
                client.expect(OPENSSL_HELLO_REQUEST_RECEIVED)
            client.send_line(f"after {round_}")
            client.expect(f"^after {round_}")
        # A new key exchange each time, as the client saw too.
        if isinstance(client, GnuTLSClient):
            assert client.count(r"CLIENT KEY EXCHANGE was queued") == 3
            assert "unexpected TLS packet" not in client.output
        else:
            assert (
                client.count(r">>> TLS 1\.2, Handshake \[length \w+\], ClientKey") == 3
            )
    server.join()
    assert server.error is None
    assert server.count("read client key exchange") == 3
    assert server.conn is not None and server.conn.total_renegotiations() == 2


@pytest.mark.parametrize("request_peer", [False, True])
def test_gnutls_sees_our_key_update(cert_files: CertFiles, request_peer: bool) -> None:
    with GnuTLSServer(cert_files, version="1.3") as server:
        with _connect(cert_files, server.address, SSL.TLS1_3_VERSION) as conn:
            conn.sendall(b"before\n")
            assert read_until(conn, b"before\n") == b"before\n"
            conn.key_update(request_peer)
            assert server.expect_key_update(request_peer) is request_peer
            conn.sendall(b"after\n")
            assert read_until(conn, b"after\n") == b"after\n"
            # GnuTLS answers a requested update with its echo.
            assert conn.seen.count("read server key update") == int(request_peer)


def test_gnutls_renegotiation_from_us(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files, version="1.2") as server:
        with _connect(cert_files, server.address, SSL.TLS1_2_VERSION) as conn:
            conn.sendall(b"before\n")
            read_until(conn, b"before\n")
            conn.renegotiate()
            conn.sendall(b"after\n")
            assert read_until(conn, b"after\n") == b"after\n"
            server.expect_renegotiation()
            assert not conn.renegotiate_pending()
