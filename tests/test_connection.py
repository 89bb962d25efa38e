"""
The pyOpenSSL layer: key update and renegotiation on plain
:class:`OpenSSL.SSL.Connection` objects, over memory BIOs and over real
loopback sockets, with the *peer* observing every rekey and data flowing both
ways afterwards.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st
from memorypair import (
    blocking,
    client_context,
    connected,
    make_pair,
    server_context,
    watch,
)
from OpenSSL import SSL

import twisted_rekey
from twisted_rekey import (
    AlreadyInProgress,
    ConnectionStateError,
    InvalidUpdateType,
    KeyUpdateType,
    NotAConnection,
    PeerRefused,
    RekeyConnection,
    RekeyMethod,
    WrongProtocolVersion,
)
from twisted_rekey._binding import lib

TLS13 = SSL.TLS1_3_VERSION
TLS12 = SSL.TLS1_2_VERSION
ROLES = [("client", "server"), ("server", "client")]


def assert_error_queue_empty() -> None:
    assert lib.ERR_peek_error() == 0


# -- TLS 1.3 KeyUpdate over memory BIOs -----------------------------------------


@pytest.mark.parametrize(("us", "peer"), ROLES)
def test_key_update_seen_by_peer_and_data_flows(us: str, peer: str) -> None:
    pair = make_pair()
    ours, theirs = getattr(pair, us), getattr(pair, peer)
    peer_seen = getattr(pair, f"{peer}_seen")

    twisted_rekey.key_update(ours)
    pair.pump()

    assert peer_seen.count(f"read {us} key update") == 1
    # Not requested: the peer owes no answer.
    assert twisted_rekey.get_key_update_type(theirs) is KeyUpdateType.NONE
    ours.sendall(b"after the update")
    theirs.sendall(b"and back")
    pair.pump()
    assert pair.take(peer) == b"after the update"
    assert pair.take(us) == b"and back"


@pytest.mark.parametrize(("us", "peer"), ROLES)
def test_requested_update_is_answered_by_peer(us: str, peer: str) -> None:
    pair = make_pair()
    ours, theirs = getattr(pair, us), getattr(pair, peer)
    our_seen = getattr(pair, f"{us}_seen")
    peer_seen = getattr(pair, f"{peer}_seen")

    ours.key_update(request_peer=True)
    pair.pump()

    assert peer_seen.count(f"read {us} key update") == 1
    # The peer now owes an update of its own, and OpenSSL holds it back
    # until the peer writes.
    assert theirs.get_key_update_type() is KeyUpdateType.NOT_REQUESTED
    assert our_seen.count(f"read {peer} key update") == 0

    theirs.sendall(b"reply")
    pair.pump()
    assert our_seen.count(f"read {peer} key update") == 1
    assert pair.take(us) == b"reply"
    assert theirs.get_key_update_type() is KeyUpdateType.NONE


def test_idle_peer_answer_can_be_forced() -> None:
    """key_update(conn, False) sends exactly the answer the peer asked for."""
    pair = make_pair()
    pair.client.key_update(True)
    pair.pump()
    assert pair.server.get_key_update_type() is KeyUpdateType.NOT_REQUESTED

    pair.server.key_update(False)
    pair.pump()

    assert pair.client_seen.count("read server key update") == 1
    assert pair.server_seen.count("write server key update") == 1
    assert pair.server.get_key_update_type() is KeyUpdateType.NONE


def test_many_updates_keep_data_intact() -> None:
    pair = make_pair()
    sent = b""
    for i in range(20):
        chunk = bytes([i]) * (1000 + i)
        pair.client.key_update(i % 2 == 0)
        pair.client.sendall(chunk)
        pair.server.sendall(chunk[::-1])
        sent += chunk
        pair.pump()
    assert pair.server_seen.count("read client key update") == 20
    assert pair.take("server") == sent
    assert len(pair.take("client")) == len(sent)


def test_rekey_picks_key_update_on_tls13() -> None:
    pair = make_pair()
    assert twisted_rekey.rekey(pair.client) is RekeyMethod.KEY_UPDATE
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1


# -- TLS 1.2 renegotiation over memory BIOs -------------------------------------


def test_server_renegotiation_full_and_abbreviated() -> None:
    pair = make_pair(TLS12)
    assert lib.SSL_session_reused(pair.client._ssl) == 0

    twisted_rekey.renegotiate(pair.server)
    assert twisted_rekey.renegotiate_pending(pair.server)
    pair.pump()
    assert not twisted_rekey.renegotiate_pending(pair.server)
    assert twisted_rekey.total_renegotiations(pair.server) == 1
    assert pair.client_seen.count("read hello request") == 1
    # A full renegotiation makes a new session.
    assert lib.SSL_session_reused(pair.client._ssl) == 0

    twisted_rekey.renegotiate_abbreviated(pair.server)
    pair.pump()
    assert twisted_rekey.total_renegotiations(pair.server) == 2
    assert lib.SSL_session_reused(pair.client._ssl) == 1

    pair.client.sendall(b"ping")
    pair.server.sendall(b"pong")
    pair.pump()
    assert pair.take("server") == b"ping"
    assert pair.take("client") == b"pong"


def test_client_renegotiation_allowed_by_server() -> None:
    pair = make_pair(TLS12, allow_client_reneg=True)
    server_hellos = pair.server_seen.count("read client hello")

    pair.client.renegotiate()
    pair.pump()
    assert pair.server_seen.count("read client hello") == server_hellos + 1
    assert lib.SSL_session_reused(pair.client._ssl) == 0

    pair.client.renegotiate_abbreviated()
    pair.pump()
    assert lib.SSL_session_reused(pair.client._ssl) == 1
    assert pair.client.total_renegotiations() == 2

    pair.client.sendall(b"still here")
    pair.pump()
    assert pair.take("server") == b"still here"


def test_client_renegotiation_refused_by_default() -> None:
    """OpenSSL 3 servers answer a client's renegotiation with an alert."""
    pair = make_pair(TLS12)
    pair.client.renegotiate()
    with pytest.raises(SSL.Error, match="no renegotiation"):
        pair.pump()


def test_rekey_picks_renegotiation_on_tls12() -> None:
    pair = make_pair(TLS12)
    assert twisted_rekey.rekey(pair.server) is RekeyMethod.RENEGOTIATION
    pair.pump()
    assert pair.server.total_renegotiations() == 1


def test_secure_renegotiation_reported() -> None:
    pair = make_pair(TLS12)
    assert twisted_rekey.secure_renegotiation_support(pair.client) is True
    assert twisted_rekey.secure_renegotiation_support(pair.server) is True


# -- bad input ------------------------------------------------------------------


@given(st.one_of(st.integers().filter(lambda i: i not in (0, 1)), st.text(), st.none()))
def test_invalid_update_types_rejected(bad: object) -> None:
    pair = _shared_tls13_pair()
    with pytest.raises(InvalidUpdateType):
        twisted_rekey.key_update(pair.client, bad)  # type: ignore[arg-type]
    assert_error_queue_empty()


_PAIR: list[object] = []


def _shared_tls13_pair():  # type: ignore[no-untyped-def]
    # One handshake for every hypothesis example: the check happens before
    # anything touches the connection.
    if not _PAIR:
        _PAIR.append(make_pair())
    return _PAIR[0]


@pytest.mark.parametrize("valid", [False, True, 0, 1, KeyUpdateType.REQUESTED])
def test_valid_update_types_accepted(valid: object) -> None:
    pair = make_pair()
    twisted_rekey.key_update(pair.client, valid)  # type: ignore[arg-type]
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1


def test_key_update_before_handshake() -> None:
    conn = RekeyConnection(client_context(TLS13), None)
    conn.set_connect_state()
    with pytest.raises(ConnectionStateError, match="handshake has not completed"):
        conn.key_update()
    assert_error_queue_empty()


def test_key_update_on_tls12() -> None:
    pair = make_pair(TLS12)
    with pytest.raises(WrongProtocolVersion) as info:
        pair.client.key_update()
    assert info.value.version == "TLSv1.2"
    assert_error_queue_empty()


def test_renegotiate_on_tls13() -> None:
    pair = make_pair()
    for call in (twisted_rekey.renegotiate, twisted_rekey.renegotiate_abbreviated):
        with pytest.raises(WrongProtocolVersion):
            call(pair.server)
    assert_error_queue_empty()
    assert pair.server.total_renegotiations() == 0


def test_key_update_after_shutdown() -> None:
    pair = make_pair()
    pair.client.shutdown()
    with pytest.raises(ConnectionStateError, match="shut down"):
        pair.client.key_update()
    pair.pump()
    with pytest.raises(ConnectionStateError, match="shut down"):
        pair.server.key_update()
    assert_error_queue_empty()


def test_second_renegotiation_while_pending() -> None:
    pair = make_pair(TLS12)
    pair.server.renegotiate()
    with pytest.raises(AlreadyInProgress):
        pair.server.renegotiate()
    pair.pump()
    assert pair.server.total_renegotiations() == 1
    assert_error_queue_empty()


def test_renegotiation_switched_off_by_application() -> None:
    pair = make_pair(TLS12)
    lib.SSL_set_options(pair.server._ssl, SSL.OP_NO_RENEGOTIATION)
    with pytest.raises(PeerRefused, match="switched off"):
        pair.server.renegotiate()
    assert_error_queue_empty()


@pytest.mark.parametrize(
    "call",
    [
        twisted_rekey.key_update,
        twisted_rekey.get_key_update_type,
        twisted_rekey.renegotiate,
        twisted_rekey.renegotiate_abbreviated,
        twisted_rekey.renegotiate_pending,
        twisted_rekey.total_renegotiations,
        twisted_rekey.rekey,
        twisted_rekey.secure_renegotiation_support,
        twisted_rekey.handshake_complete,
        twisted_rekey.protocol_version,
    ],
)
@pytest.mark.parametrize("bad", [None, 3, "conn", object(), socket.socket])
def test_not_a_connection(call, bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotAConnection):
        call(bad)
    # A TypeError, for code that catches the built-in.
    with pytest.raises(TypeError):
        call(bad)


def test_allow_client_renegotiation_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        twisted_rekey.allow_client_renegotiation(object())  # type: ignore[arg-type]


def test_allow_client_renegotiation_on_a_used_context() -> None:
    """pyOpenSSL's own rule: a Context in use cannot change."""
    ctx = server_context(TLS12)
    SSL.Connection(ctx, None)
    try:
        twisted_rekey.allow_client_renegotiation(ctx)
    except ValueError:
        pass  # pyOpenSSL >= 25 refuses: documented.
    conn = SSL.Connection(ctx, None)
    twisted_rekey.allow_client_renegotiation(conn)
    assert lib.SSL_get_options(conn._ssl) & twisted_rekey.OP_ALLOW_CLIENT_RENEGOTIATION


# -- real loopback sockets ------------------------------------------------------


class _EchoServer:
    """A blocking pyOpenSSL echo server in a thread, recording what it read."""

    def __init__(self, version: int, *, allow_client_reneg: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.ctx = server_context(version, allow_client_reneg=allow_client_reneg)
        self.states: list[str] = []
        self.conn: RekeyConnection | None = None
        self.error: BaseException | None = None
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sock = None
        try:
            sock, _ = self.listener.accept()
            blocking(sock)
            conn = self.conn = RekeyConnection(self.ctx, sock)
            self.states = watch(conn).states
            conn.set_accept_state()
            conn.do_handshake()
            while True:
                try:
                    data = conn.recv(65536)
                except SSL.ZeroReturnError:
                    return
                if data.startswith(b"REKEY"):
                    conn.rekey(request_peer=data == b"REKEY!")
                    conn.sendall(b"REKEYED")
                else:
                    conn.sendall(data)
        except BaseException as e:
            self.error = e
        finally:
            if sock is not None:
                sock.close()
            self.listener.close()

    def stop(self) -> None:
        # The client's close_notify ends the loop; the socket timeout bounds it.
        self.thread.join(15)
        assert not self.thread.is_alive(), "echo server did not stop"


@contextmanager
def _client(version: int, server: _EchoServer) -> Iterator[RekeyConnection]:
    address = ("127.0.0.1", server.port)
    try:
        with connected(
            client_context(version), address, servername=b"localhost"
        ) as conn:
            yield conn
    finally:
        server.stop()


def _echo(conn: RekeyConnection, data: bytes) -> bytes:
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        got += conn.recv(65536)
    return got


@pytest.mark.parametrize("request_peer", [False, True])
def test_socket_client_key_update(request_peer: bool) -> None:
    server = _EchoServer(TLS13)
    with _client(TLS13, server) as conn:
        assert _echo(conn, b"before") == b"before"
        conn.key_update(request_peer)
        payload = bytes(range(256)) * 64
        assert _echo(conn, payload) == payload
        assert server.states.count("TLSv1.3 read client key update") == 1
        # The echo server writes after reading our request, which carries
        # its answer: we read its KeyUpdate only if we asked for one.
        assert conn.seen.count("TLSv1.3 read server key update") == int(request_peer)
    assert server.error is None


@pytest.mark.parametrize("request_peer", [False, True])
def test_socket_server_key_update(request_peer: bool) -> None:
    server = _EchoServer(TLS13)
    with _client(TLS13, server) as conn:
        conn.sendall(b"REKEY!" if request_peer else b"REKEY")
        assert conn.recv(100) == b"REKEYED"
        assert conn.seen.count("TLSv1.3 read server key update") == 1
        assert _echo(conn, b"after") == b"after"
        assert server.states.count("TLSv1.3 read client key update") == int(
            request_peer
        )
    assert server.error is None


def test_socket_server_renegotiation() -> None:
    server = _EchoServer(TLS12)
    with _client(TLS12, server) as conn:
        conn.sendall(b"REKEY")
        assert conn.recv(100) == b"REKEYED"
        assert _echo(conn, b"after") == b"after"
        assert conn.seen.count("SSLv3/TLS read hello request") == 1
        assert conn.total_renegotiations() == 1
    assert server.error is None


def test_socket_client_renegotiation() -> None:
    server = _EchoServer(TLS12, allow_client_reneg=True)
    with _client(TLS12, server) as conn:
        assert _echo(conn, b"before") == b"before"
        conn.renegotiate()
        assert _echo(conn, b"after") == b"after"
        assert not conn.renegotiate_pending()
        assert server.states.count("SSLv3/TLS read client hello") == 2
    assert server.error is None


# -- RekeyConnection's own watcher ------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_counters_follow_both_directions(
    shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Each side counts the KeyUpdates it sent and received, through either
    trampoline: every Connection's info callback goes through one, which
    finds the Connection through pyOpenSSL's map from ``SSL`` pointers; a
    pyOpenSSL without that map gives each Connection one of its own.
    """
    from twisted_rekey import _infocallback

    if not shared:
        monkeypatch.setattr(_infocallback, "_connections", None)
    pair = make_pair()
    for conn in (pair.client, pair.server):
        callback = _infocallback.infoCallbackFor(conn).callback
        assert (callback is _infocallback._trampoline) is shared
    pair.client.key_update()
    pair.client.key_update(request_peer=True)
    pair.pump()
    pair.server.sendall(b"carries the answer")
    pair.pump()
    assert pair.client.key_updates_sent == 2
    assert pair.server.key_updates_received == 2
    assert pair.server.key_update_requests_received == 1
    assert pair.server.key_updates_sent == 1
    assert pair.client.key_updates_received == 1
    assert pair.client.key_update_requests_received == 0


def test_context_info_callback_still_runs() -> None:
    """The per-connection watcher chains to the Context's info callback."""
    seen: list[int] = []
    ctx = client_context(TLS13)
    ctx.set_info_callback(lambda conn, where, ret: seen.append(where))
    conn = RekeyConnection(ctx, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    assert seen, "the Context's info callback never ran"


def test_info_callback_errors_surface_after_openssl_returns() -> None:
    pair = make_pair()

    def broken(conn: SSL.Connection, where: int, ret: int) -> None:
        raise ZeroDivisionError("from the application's callback")

    pair.server.set_info_callback(broken)
    pair.client.key_update()
    with pytest.raises(ZeroDivisionError, match="application's callback"):
        pair.pump()
    # The watcher itself still counted, and the next call is clean.
    assert pair.server.key_updates_received == 1
    pair.client.sendall(b"more")
    pair.pump()
    assert pair.take("server") == b"more"


def _handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    for _ in range(20):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if data:
                dst.bio_write(data)
                moved = True
        if not moved:
            return
    raise AssertionError("the handshake did not settle in 20 rounds")


def test_set_max_proto_version_caps_one_connection() -> None:
    # Both Contexts allow TLS 1.3; only the capped client connection stops
    # at 1.2, and another connection of the same Context does not.
    client_ctx = client_context(TLS13)
    client_ctx.set_min_proto_version(TLS12)
    server_ctx = server_context(TLS13)
    server_ctx.set_min_proto_version(TLS12)
    negotiated = []
    for cap in (TLS12, None):
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        if cap is not None:
            twisted_rekey.set_max_proto_version(client, cap)
        _handshake(client, server)
        negotiated.append(client.get_protocol_version_name())
    assert negotiated == ["TLSv1.2", "TLSv1.3"]


def test_set_max_proto_version_refuses_what_openssl_refuses() -> None:
    conn = SSL.Connection(client_context(TLS13), None)
    with pytest.raises(twisted_rekey.OpenSSLCallError):
        twisted_rekey.set_max_proto_version(conn, 0x7777)
    with pytest.raises(twisted_rekey.NotAConnection):
        twisted_rekey.set_max_proto_version(object(), TLS12)  # type: ignore[arg-type]


def test_verify_cert_error_string() -> None:
    # X509_V_ERR_CERT_HAS_EXPIRED is 10 in every OpenSSL since 0.9.
    assert twisted_rekey.verify_cert_error_string(10) == "certificate has expired"
    assert twisted_rekey.verify_cert_error_string(0) == "ok"
