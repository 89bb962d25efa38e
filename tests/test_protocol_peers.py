"""
The Twisted protocol mixin against TLS stacks nobody here wrote: ``openssl
s_server``/``s_client`` (OpenSSL 3.0 CLI) and ``gnutls-serv``/``gnutls-cli``
(GnuTLS), each initiating towards us and receiving from us, on TLS 1.3 and
TLS 1.2.

Each rekey counts only when the *foreign* side reports what it received, and
data still flows both ways afterwards.  A peer that requests an update and
then stays idle gets our answer within the reactor turn that read the
request, without the application writing anything.  Everything runs on the real reactor
(pytest-twisted): waits on a peer's output use :meth:`PeerProcess.when_seen`,
or a thread for the calls that would otherwise block the reactor (a client
peer's ``start()`` waits for a handshake only the reactor can complete).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Callable

import pytest
import pytest_twisted
from peers import (
    GNUTLS_KEY_UPDATE_RECEIVED,
    GNUTLS_RENEGOTIATION_RECEIVED,
    OPENSSL_CLIENT_HELLO_RECEIVED,
    OPENSSL_KEY_UPDATE_RECEIVED,
    OPENSSL_RENEGOTIATION_REFUSED,
    CertFiles,
    GnuTLSClient,
    GnuTLSServer,
    OpenSSLClient,
    OpenSSLServer,
    PeerProcess,
)
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twistedharness import Events, client_options, server_options
from zope.interface import implementer

from twisted_rekey import (
    KeyUpdateFlood,
    PeerRefused,
    RekeyConnection,
    RekeyProtocolMixin,
    RenegotiationForbidden,
    RenegotiationRateLimited,
    protocol_version,
)

TIMEOUT = 10.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def _within(d: defer.Deferred[Any], timeout: float = TIMEOUT) -> Any:
    return await d.addTimeout(timeout, _reactor())


class Watched(RekeyProtocolMixin, protocol.Protocol):
    """Records what the mixin reports; writes nothing unless told to."""

    factory: _Factory

    def connectionMade(self) -> None:
        self.received = bytearray()
        self.updates: list[bool] = []
        self.renegotiationsSeen = 0
        self.lost: Failure | None = None
        self.lostDeferred: defer.Deferred[None] = defer.Deferred()
        self.waiting: list[tuple[bytes, defer.Deferred[None]]] = []
        self.renegotiated: defer.Deferred[None] = defer.Deferred()
        self.updated: defer.Deferred[bool] = defer.Deferred()
        self.factory.built.append(self)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        if not self.factory.handshaken.called:
            self.factory.handshaken.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for wanted, d in list(self.waiting):
            if wanted in self.received:
                self.waiting.remove((wanted, d))
                d.callback(None)

    def waitFor(self, data: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((data, d))
        self.dataReceived(b"")
        return d

    def keyUpdateReceived(self, updateRequested: bool) -> None:
        self.updates.append(updateRequested)
        if not self.updated.called:
            self.updated.callback(updateRequested)

    def renegotiationCompleted(self) -> None:
        self.renegotiationsSeen += 1
        if not self.renegotiated.called:
            self.renegotiated.callback(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason
        self.lostDeferred.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    @property
    def version(self) -> str | None:
        return protocol_version(self.transport.getHandle())  # type: ignore[union-attr]


class _Factory(protocol.ClientFactory):
    def __init__(self, cls: type[Watched]) -> None:
        self.protocol = cls
        self.built: list[Watched] = []
        self.handshaken: defer.Deferred[Watched] = defer.Deferred()


async def _tell(command: Callable[..., None], *args: Any) -> None:
    """
    Give a peer a command or a line, in a thread: the call returns only once
    the peer has read it, and a peer in the middle of a handshake reads
    nothing until the reactor has answered.
    """
    await _within(deferToThread(command, *args))


async def _flag(peer: PeerProcess, pattern: str) -> bool:
    """The update_requested flag of the next KeyUpdate *peer* reports."""
    match = await peer.when_seen(pattern)
    return bool(match.group("requested") == "1")


async def _serverHandshake(server: OpenSSLServer) -> None:
    """Wait for s_server's end of the handshake; later searches start after."""
    match = await server.when_seen(r"^CIPHER is \S+")
    # The initial ClientHello is not a renegotiation.
    server.skip_to(match.end())


async def _stopped(peer: PeerProcess, ours: list[Watched]) -> None:
    """Stop *peer*, then wait until our side of every connection is gone."""
    peer.stop()
    for proto in ours:
        await _within(proto.lostDeferred)


# -- our client ------------------------------------------------------------------


@asynccontextmanager
async def _ourClient(
    peer: Any, certs: CertFiles, cls: type[Watched] = Watched, how: str = "connectSSL"
) -> AsyncIterator[Watched]:
    """Our client connected to a started server *peer*, handshake done."""
    reactor = _reactor()
    factory = _Factory(cls)
    if how == "connectSSL":
        reactor.connectSSL(
            "127.0.0.1", peer.port, factory, client_options(certs), timeout=5
        )
    else:
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", peer.port, timeout=5)
        await endpoints.wrapClientTLS(client_options(certs), tcp).connect(factory)
    try:
        proto = await _within(factory.handshaken)
        yield proto
    finally:
        await _stopped(peer, factory.built)


# -- our server ------------------------------------------------------------------


@asynccontextmanager
async def _ourServer(
    make: Any, certs: CertFiles, cls: type[Watched] = Watched, options: Any = None
) -> AsyncIterator[tuple[Any, Watched]]:
    """
    Our server on a free loopback port, and the client peer ``make(port)``
    connected to it (started in a thread: its ``start()`` waits for the
    handshake, which needs the reactor).
    """
    reactor = _reactor()
    factory = _Factory(cls)
    if options is None:
        options = server_options(certs)
    port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    peer = make(port.getHost().port)
    try:
        await _within(deferToThread(peer.start))
        proto = await _within(factory.handshaken)
        yield peer, proto
    finally:
        try:
            await _stopped(peer, factory.built)
        finally:
            await port.stopListening()


# == openssl s_server receives ours ==================================================


@pytest.mark.parametrize("how", ["connectSSL", "wrapClientTLS"])
@pytest_twisted.ensureDeferred
async def test_s_server_sees_our_key_update(cert_files: CertFiles, how: str) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        async with _ourClient(server, cert_files, how=how) as us:
            assert us.version == "TLSv1.3"
            await _within(us.keyUpdate())
            assert await _flag(server, OPENSSL_KEY_UPDATE_RECEIVED) is False
            us.send(b"client-after\n")
            await server.when_seen(r"client-after")
            await _tell(server.send_line, "server-after")
            await _within(us.waitFor(b"server-after\n"))
            assert server.key_updates_received() == [False]
            assert us.rekeyStats.keyUpdatesSent == 1
            assert us.updates == []


@pytest_twisted.ensureDeferred
async def test_request_unanswered_when_s_server_goes_fails_with_the_loss(
    cert_files: CertFiles,
) -> None:
    """
    s_server read our update_requested and owes the answer (it writes only
    when given a line); it goes away instead.  The caller's Deferred fails
    with PeerRefused, caused by the connection's loss, and nothing is left
    waiting.
    """
    with OpenSSLServer(cert_files, version="1.3") as server:
        async with _ourClient(server, cert_files) as us:
            done = us.keyUpdate(requestPeer=True, timeout=TIMEOUT)
            assert await _flag(server, OPENSSL_KEY_UPDATE_RECEIVED) is True
            assert not done.called
            server.stop()
            with pytest.raises(PeerRefused, match="lost before the rekey") as raised:
                await _within(done)
            assert isinstance(raised.value.__cause__, ConnectionClosed)
            await _within(us.lostDeferred)
            assert us.updates == []
            assert us.rekeyStats.keyUpdatesRequested == 1


@pytest_twisted.ensureDeferred
async def test_s_server_answers_our_request_with_its_next_write(
    cert_files: CertFiles,
) -> None:
    with OpenSSLServer(cert_files, version="1.3") as server:
        async with _ourClient(server, cert_files) as us:
            done = us.keyUpdate(requestPeer=True, timeout=TIMEOUT)
            assert await _flag(server, OPENSSL_KEY_UPDATE_RECEIVED) is True
            # s_server owes an answer but writes only when given a line.
            assert not done.called
            await _tell(server.send_line, "server-line")
            await _within(done)
            await _within(us.waitFor(b"server-line\n"))
            assert us.updates == [False]
            us.send(b"client-after\n")
            await server.when_seen(r"client-after")
            stats = us.rekeyStats
            assert (stats.keyUpdatesRequested, stats.keyUpdatesReceived) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_s_server_sees_our_renegotiation(cert_files: CertFiles) -> None:
    with OpenSSLServer(cert_files, version="1.2", client_renegotiation=True) as server:
        async with _ourClient(server, cert_files) as us:
            assert us.version == "TLSv1.2"
            await _serverHandshake(server)
            await _within(us.renegotiate(timeout=TIMEOUT))
            await server.when_seen(OPENSSL_CLIENT_HELLO_RECEIVED)
            us.send(b"client-after\n")
            await server.when_seen(r"client-after")
            await _tell(server.send_line, "server-after")
            await _within(us.waitFor(b"server-after\n"))
            assert us.renegotiationsSeen == us.rekeyStats.renegotiations == 1


@pytest_twisted.ensureDeferred
async def test_s_server_refuses_our_renegotiation_by_default(
    cert_files: CertFiles, events: Events
) -> None:
    with OpenSSLServer(cert_files, version="1.2") as server:
        async with _ourClient(server, cert_files) as us:
            await _serverHandshake(server)
            with pytest.raises(PeerRefused, match="no_renegotiation"):
                await _within(us.renegotiate(timeout=TIMEOUT))
            await server.when_seen(OPENSSL_RENEGOTIATION_REFUSED)
            assert events.named("renegotiation_refused")
            # OpenSSL's client side ends the connection on that alert.
            await _within(us.lostDeferred)


# == openssl s_server starts its own towards us ======================================


def _traceWire(us: Watched, trace: list[tuple[Any, ...]]) -> None:
    """
    Record, in order, every read our TLS protocol gets (with a
    ``callLater(0)`` marker for the reactor turn after it), every write it
    hands to the TCP transport, and every write that reaches the socket.
    """
    reactor = _reactor()
    tls: Any = us.transport
    tcp = tls.transport
    inner, write, writeSome = tls.dataReceived, tcp.write, tcp.writeSomeData

    def dataReceived(data: bytes) -> None:
        reads = sum(1 for e in trace if e[0] == "read")
        reactor.callLater(
            0, lambda: trace.append(("next turn", reads, time.perf_counter()))
        )
        trace.append(("read", len(data), time.perf_counter()))
        inner(data)
        trace.append(("read end", reads, time.perf_counter()))

    def transportWrite(data: bytes) -> None:
        trace.append(("handed", len(data), time.perf_counter()))
        write(data)

    def writeSomeData(data: bytes) -> Any:
        trace.append(("socket", len(data), time.perf_counter()))
        return writeSome(data)

    tls.dataReceived = dataReceived
    tcp.write = transportWrite
    tcp.writeSomeData = writeSomeData


class Hooked(Watched):
    """Notes, inside the hook, whether the answer already went out."""

    trace: list[tuple[Any, ...]]

    def keyUpdateReceived(self, updateRequested: bool) -> None:
        self.trace.append(("hook", updateRequested, self.rekeyStats.keyUpdatesSent))
        super().keyUpdateReceived(updateRequested)


@pytest.mark.parametrize("request_peer", [False, True], ids=["k", "K"])
@pytest_twisted.ensureDeferred
async def test_s_server_key_update_reaches_us(
    cert_files: CertFiles, request_peer: bool
) -> None:
    """
    The idle peer test: s_server requests an update (``K``) and writes
    nothing else; we write nothing either, yet our answer is handed to the
    TCP transport inside the read that carried the request, and s_server
    logs it.
    """
    with OpenSSLServer(cert_files, version="1.3") as server:
        async with _ourClient(server, cert_files, Hooked) as us:
            await _serverHandshake(server)
            trace = us.trace = []
            _traceWire(us, trace)
            sentBefore = us.rekeyStats.bytesSent
            await _tell(server.key_update, request_peer)
            assert await _within(us.updated) is request_peer
            if request_peer:
                assert await _flag(server, OPENSSL_KEY_UPDATE_RECEIVED) is False
                # Not one application byte was written to carry it.
                assert us.rekeyStats.bytesSent == sentBefore == 0
                assert us.rekeyStats.keyUpdatesSent == 1
                _assertAnsweredInTheSameRead(trace)
            us.send(b"client-after\n")
            await server.when_seen(r"client-after")
            await _tell(server.send_line, "server-after")
            await _within(us.waitFor(b"server-after\n"))
            assert server.key_updates_received() == ([False] if request_peer else [])
            assert us.updates == [request_peer]
            # Session tickets read and KeyUpdates both ways: none of it is a
            # handshake to OpenSSL, so no renegotiation state was made.
            assert us._rekeyWatcher is not None
            assert us._rekeyWatcher.reneg is None


def _assertAnsweredInTheSameRead(trace: list[tuple[Any, ...]]) -> None:
    """
    The answer was handed to the TCP transport inside the read that carried
    the request (before the hook, before that read returned, before the
    reactor's next turn), and reached the socket before any other read.
    """
    names = [e[0] for e in trace]
    hook = names.index("hook")
    _, requested, sentInHook = trace[hook]
    assert requested is True and sentInHook == 1, trace
    # The read that ran the hook: the last "read" before it.
    read = max(i for i in range(hook) if names[i] == "read")
    end = names.index("read end", hook)
    nextTurn = names.index("next turn", read)
    handed = [i for i in range(read, end) if names[i] == "handed"]
    # TLS 1.3 KeyUpdate record: 5 header + 5 message + 1 type + 16 tag.
    assert [trace[i][1] for i in handed] == [27], trace
    assert handed[0] < hook < end < nextTurn, trace
    # The kernel got it at the reactor's next write opportunity, before we
    # read anything else.
    socket = names.index("socket", end)
    assert "read" not in names[end:socket], trace


@pytest_twisted.ensureDeferred
async def test_s_server_renegotiation_reaches_us(cert_files: CertFiles) -> None:
    with OpenSSLServer(
        cert_files, version="1.2", no_resumption_on_reneg=True
    ) as server:
        async with _ourClient(server, cert_files) as us:
            await _serverHandshake(server)
            await _tell(server.renegotiate)
            await _within(us.renegotiated)
            await server.when_seen(OPENSSL_CLIENT_HELLO_RECEIVED)
            us.send(b"client-after\n")
            await server.when_seen(r"client-after")
            await _tell(server.send_line, "server-after")
            await _within(us.waitFor(b"server-after\n"))
            assert us.renegotiationsSeen == 1


# == openssl s_client against our server ============================================


def _sClient(certs: CertFiles, version: str = "1.3") -> Any:
    return lambda port: OpenSSLClient(certs, port, version=version)


async def _dataBothWays(client: Any, us: Watched, tag: str) -> None:
    await _tell(client.send_line, f"{tag}-from-client")
    await _within(us.waitFor(f"{tag}-from-client\n".encode()))
    us.send(f"{tag}-from-server\n".encode())
    await client.when_seen(rf"{tag}-from-server")


@pytest.mark.parametrize("request_peer", [False, True], ids=["k", "K"])
@pytest_twisted.ensureDeferred
async def test_s_client_key_update_reaches_our_server(
    cert_files: CertFiles, request_peer: bool
) -> None:
    async with _ourServer(_sClient(cert_files), cert_files) as (client, us):
        await _tell(client.key_update, request_peer)
        assert await _within(us.updated) is request_peer
        if request_peer:
            # Our answer, while our server writes nothing at all.
            assert await _flag(client, OPENSSL_KEY_UPDATE_RECEIVED) is False
            assert us.rekeyStats.bytesSent == 0
        await _dataBothWays(client, us, "after")
        assert client.key_updates_received() == ([False] if request_peer else [])
        # What s_client sent, counted as the Connection's recv returned it.
        assert bytes(us.received) == b"after-from-client\n"
        assert us.rekeyStats.bytesReceived == len(us.received)
        # Tickets sent and KeyUpdates both ways made no renegotiation state.
        assert us._rekeyWatcher is not None
        assert us._rekeyWatcher.reneg is None


@pytest_twisted.ensureDeferred
async def test_our_server_key_update_reaches_s_client(cert_files: CertFiles) -> None:
    async with _ourServer(_sClient(cert_files), cert_files) as (client, us):
        done = us.keyUpdate(requestPeer=True, timeout=TIMEOUT)
        assert await _flag(client, OPENSSL_KEY_UPDATE_RECEIVED) is True
        assert not done.called
        # s_client answers with its next write.
        await _tell(client.send_line, "client-line")
        await _within(done)
        await _dataBothWays(client, us, "after")
        assert us.updates == [False]


@implementer(IOpenSSLServerConnectionCreator)
class _RekeyConnections:
    """Our server's connections are :class:`RekeyConnection` objects."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.made: list[RekeyConnection] = []

    def serverConnectionForTLS(self, tlsProtocol: Any) -> RekeyConnection:
        conn = RekeyConnection(self.options.getContext(), None)
        self.made.append(conn)
        return conn


@pytest_twisted.ensureDeferred
async def test_rekey_connection_under_the_mixin_both_count(
    cert_files: CertFiles,
) -> None:
    """
    A :class:`RekeyConnection` run by Twisted under the mixin: both watch
    through the one info callback, so the connection's counters and the
    mixin's agree on what s_client sent and what we sent.
    """
    creator = _RekeyConnections(server_options(cert_files))
    async with _ourServer(_sClient(cert_files), cert_files, options=creator) as (
        client,
        us,
    ):
        [conn] = creator.made
        assert us.transport.getHandle() is conn  # type: ignore[union-attr]
        await _tell(client.key_update, False)
        assert await _within(us.updated) is False
        await _within(us.keyUpdate())
        assert await _flag(client, OPENSSL_KEY_UPDATE_RECEIVED) is False
        await _dataBothWays(client, us, "after")
        assert us.updates == [False]
        assert conn.key_updates_received == 1
        assert conn.key_update_requests_received == 0
        assert us.rekeyStats.keyUpdatesSent == conn.key_updates_sent == 1
        assert conn.rotation_error is None
        # Counting what recv() returns made it a subclass of its own class.
        assert isinstance(conn, RekeyConnection)
        assert type(conn).__mro__[1] is RekeyConnection
        assert us.rekeyStats.bytesReceived > 0
        assert us.rekeyStats.bytesReceived == len(us.received)


@pytest_twisted.ensureDeferred
async def test_s_client_renegotiation_refused_by_default(
    cert_files: CertFiles, events: Events
) -> None:
    async with _ourServer(_sClient(cert_files, "1.2"), cert_files) as (client, us):
        assert us.version == "TLSv1.2"
        await _tell(client.renegotiate)
        await client.when_seen(
            r"<<< TLS 1\.2, Alert \[length 0002\], warning no_renegotiation"
        )
        # OpenSSL's client takes the warning as fatal and ends the connection.
        await client.when_seen(r"no renegotiation")
        await _within(us.lostDeferred)
        assert events.named("client_renegotiation_refused")
        assert us.renegotiationsSeen == us.rekeyStats.renegotiations == 0


class AllowingServer(Watched):
    allowClientRenegotiation = True


@pytest_twisted.ensureDeferred
async def test_s_client_renegotiation_allowed(cert_files: CertFiles) -> None:
    make = _sClient(cert_files, "1.2")
    async with _ourServer(make, cert_files, AllowingServer) as (client, us):
        await _tell(client.renegotiate)
        await client.when_seen(r"RENEGOTIATING")
        await _within(us.renegotiated)
        await _dataBothWays(client, us, "after")
        assert us.rekeyStats.renegotiations == 1


@pytest_twisted.ensureDeferred
async def test_s_client_http2_never_renegotiates(
    cert_files: CertFiles, events: Events
) -> None:
    """
    HTTP/2 over TLS 1.2 forbids renegotiation (RFC 9113, section 9.2.1):
    once ALPN picked h2, our renegotiate() fails without a HelloRequest,
    and the client's renegotiation is refused, even by a server that
    allows them.
    """
    pem = cert_files.server.private_key_and_cert_chain_pem.bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        acceptableProtocols=[b"h2", b"http/1.1"],
    )

    def make(port: int) -> Any:
        return OpenSSLClient(
            cert_files, port, version="1.2", extra_args=["-alpn", "h2"]
        )

    async with _ourServer(make, cert_files, AllowingServer, options) as (client, us):
        assert us.version == "TLSv1.2"
        assert us.transport.negotiatedProtocol == b"h2"  # type: ignore[union-attr]
        with pytest.raises(RenegotiationForbidden) as raised:
            await _within(us.renegotiate())
        assert raised.value.protocol == b"h2"
        await _dataBothWays(client, us, "after")
        assert "HelloRequest" not in client.output
        await _tell(client.renegotiate)
        await client.when_seen(
            r"<<< TLS 1\.2, Alert \[length 0002\], warning no_renegotiation"
        )
        await _within(us.lostDeferred)
        (refused,) = events.named("client_renegotiation_refused")
        assert "HTTP/2" in refused["why"]
        assert us.renegotiationsSeen == us.rekeyStats.renegotiations == 0


class LimitedServer(AllowingServer):
    clientRenegotiationLimit = (2, 60.0)


@pytest_twisted.ensureDeferred
async def test_s_client_renegotiating_too_often_is_dropped(
    cert_files: CertFiles, events: Events
) -> None:
    make = _sClient(cert_files, "1.2")
    async with _ourServer(make, cert_files, LimitedServer) as (client, us):
        for n in range(2):
            await _tell(client.renegotiate)
            await client.when_seen(r"RENEGOTIATING")
            await _dataBothWays(client, us, f"reneg{n}")
        assert us.rekeyStats.renegotiations == 2
        await _tell(client.renegotiate)
        await _within(us.lostDeferred)
        # Dropped mid-handshake: s_client's next write meets a reset.
        await client.when_seen(r"(?:read|write):errno=104")
        assert us.lost is not None and us.lost.check(RenegotiationRateLimited)
        [event] = events.named("client_renegotiation_rate_limited")
        assert event["reason"] == (
            "3 client-initiated renegotiations within 60.0 s (limit 2)"
        )


class FloodGuarded(Watched):
    keyUpdateFloodLimit = 3


@pytest_twisted.ensureDeferred
async def test_s_client_key_update_flood_dropped(
    cert_files: CertFiles, events: Events
) -> None:
    async with _ourServer(_sClient(cert_files), cert_files, FloodGuarded) as (
        client,
        us,
    ):
        # With data between them, any number is fine.
        for n in range(3):
            await _tell(client.key_update, False)
            await _tell(client.key_update, False)
            await _dataBothWays(client, us, f"round{n}")
        assert us.lost is None
        for _ in range(4):
            await _tell(client.key_update, False)
        await _within(us.lostDeferred)
        await client.when_seen(r"(?:read|write):errno=104")
        assert us.lost is not None and us.lost.check(KeyUpdateFlood)
        [event] = events.named("key_update_flood")
        assert event["reason"] == (
            "4 KeyUpdates in a row without application data (limit 3)"
        )
        assert us.rekeyStats.keyUpdatesReceived == 10


# == GnuTLS ===========================================================================


@pytest.mark.parametrize("request_peer", [False, True])
@pytest_twisted.ensureDeferred
async def test_gnutls_serv_sees_our_key_update(
    cert_files: CertFiles, request_peer: bool
) -> None:
    with GnuTLSServer(cert_files, version="1.3") as server:
        async with _ourClient(server, cert_files, how="wrapClientTLS") as us:
            us.send(b"before\n")
            await _within(us.waitFor(b"before\n"))
            done = us.keyUpdate(requestPeer=request_peer, timeout=TIMEOUT)
            assert await _flag(server, GNUTLS_KEY_UPDATE_RECEIVED) is request_peer
            # gnutls-serv answers a request with its next write: the echo.
            us.send(b"after\n")
            await _within(done)
            await _within(us.waitFor(b"before\nafter\n"))
            assert us.updates == ([False] if request_peer else [])
            assert server.key_updates_received() == [request_peer]


@pytest_twisted.ensureDeferred
async def test_gnutls_serv_sees_our_renegotiation(cert_files: CertFiles) -> None:
    with GnuTLSServer(cert_files, version="1.2") as server:
        async with _ourClient(server, cert_files, how="wrapClientTLS") as us:
            assert us.version == "TLSv1.2"
            us.send(b"before\n")
            await _within(us.waitFor(b"before\n"))
            await _within(us.renegotiate(timeout=TIMEOUT))
            await server.when_seen(GNUTLS_RENEGOTIATION_RECEIVED)
            us.send(b"after\n")
            await _within(us.waitFor(b"before\nafter\n"))
            assert us.renegotiationsSeen == 1


def _gnutlsCli(certs: CertFiles, version: str = "1.3") -> Any:
    return lambda port: GnuTLSClient(certs, port, version=version)


@pytest.mark.parametrize("request_peer", [False, True], ids=["rekey1", "rekey"])
@pytest_twisted.ensureDeferred
async def test_gnutls_cli_key_update_reaches_our_server(
    cert_files: CertFiles, request_peer: bool
) -> None:
    async with _ourServer(_gnutlsCli(cert_files), cert_files) as (client, us):
        await _tell(client.key_update, request_peer)
        await client.when_seen(r"- Rekey was completed")
        assert await _within(us.updated) is request_peer
        if request_peer:
            # Our answer, while our server writes nothing at all.
            assert await _flag(client, GNUTLS_KEY_UPDATE_RECEIVED) is False
            assert us.rekeyStats.bytesSent == 0
        await _dataBothWays(client, us, "after")
        assert client.count(GNUTLS_KEY_UPDATE_RECEIVED) == int(request_peer)


@pytest.mark.parametrize("allowed", [False, True], ids=["refused", "allowed"])
@pytest_twisted.ensureDeferred
async def test_gnutls_cli_renegotiation(
    cert_files: CertFiles, allowed: bool, events: Events
) -> None:
    cls = AllowingServer if allowed else Watched
    async with _ourServer(_gnutlsCli(cert_files, "1.2"), cert_files, cls) as (
        client,
        us,
    ):
        assert us.version == "TLSv1.2"
        await _tell(client.renegotiate)
        if allowed:
            await client.when_seen(r"- ReHandshake was completed")
            await _within(us.renegotiated)
            await _dataBothWays(client, us, "after")
        else:
            # gnutls-cli takes the warning as non-fatal and tries again,
            # and again: the fourth attempt within 600 s is one too many.
            for _ in range(3):
                await client.when_seen(
                    r"Received alert \[100\]: No renegotiation is allowed"
                )
            await _within(us.lostDeferred)
            assert us.lost is not None and us.lost.check(RenegotiationRateLimited)
            assert len(events.named("client_renegotiation_refused")) == 3
            assert us.renegotiationsSeen == us.rekeyStats.renegotiations == 0
