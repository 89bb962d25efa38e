"""
Rotation on a policy over real loopback sockets and the real reactor: a
connection that rotates every 100 ms while echoing delivers every byte, and
the peer (our own mixin, and ``openssl s_server``) saw each rotation.
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from peers import OpenSSLServer
from test_protocol import TIMEOUT, Peer
from twisted.internet import defer, protocol, task
from twisted.protocols.wire import Echo
from twistedharness import client_options, server_options

from twisted_rekey import RotatingFactory, RotationPolicy, rekeyableFor


def fast() -> RotationPolicy:
    return RotationPolicy(interval=0.2, min_interval=0.2, jitter=0.1)


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def until(check: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await sleep(0.01)


@pytest_twisted.ensureDeferred
async def test_rotating_every_200ms_while_echoing(cert_files: Any) -> None:
    from twisted.internet import reactor

    echoes: list[Echo] = []

    class Recorded(Echo):
        def connectionMade(self) -> None:
            echoes.append(self)

        def connectionLost(self, reason: Any = None) -> None:
            echoes.remove(self)

    factory = RotatingFactory(protocol.Factory.forProtocol(Recorded), fast())
    port = reactor.listenSSL(
        0, factory, server_options(cert_files, "1.3"), interface="127.0.0.1"
    )
    built: defer.Deferred[Peer] = defer.Deferred()

    class Client(Peer):
        onHandshake = built

    cf = protocol.ClientFactory.forProtocol(Client)
    reactor.connectSSL(
        "127.0.0.1", port.getHost().port, cf, client_options(cert_files), timeout=5
    )
    client = await built.addTimeout(TIMEOUT, reactor)
    try:
        (echo,) = echoes
        server: Any = rekeyableFor(echo)
        sent = bytearray()
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 3.0:
            chunk = (b"%06d:" % i) * 50  # 350 bytes, a few writes per tick
            client.transport.write(chunk)  # type: ignore[union-attr]
            sent += chunk
            i += 1
            await sleep(0.01)
        await until(lambda: len(client.received) >= len(sent), "the echo")
        assert bytes(client.received) == bytes(sent)
        schedule = server.rotationSchedule
        rotations = schedule.rotations
        # ~15 in 3 s; 200 ms timers on a busy machine come late, not early.
        assert 7 <= rotations <= 20
        assert server.rekeyStats.keyUpdatesSent == rotations
        # The rotation hook runs after the read that carried it.
        await until(
            lambda: len(client.updates) == rotations, "the client to see them all"
        )
        assert client.updates == [False] * rotations
        assert client.rekeyStats.keyUpdatesReceived == rotations
    finally:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.lostDeferred.addTimeout(TIMEOUT, reactor)
        await port.stopListening()
    await until(lambda: not echoes, "the server side to close")
    assert not [c for c in reactor.getDelayedCalls() if "RotationScheduler" in repr(c)]


class Lines(protocol.Protocol):
    def connectionMade(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest_twisted.ensureDeferred
async def test_openssl_server_logs_each_scheduled_rotation(cert_files: Any) -> None:
    # Not -rev: that mode of s_server stops answering after a KeyUpdate
    # ("read R BLOCK"), whoever sends it.  It prints what it reads instead.
    from twisted.internet import reactor

    with OpenSSLServer(cert_files, version="1.3") as peer:
        built: list[Lines] = []

        class Recorded(Lines):
            def connectionMade(self) -> None:
                super().connectionMade()
                built.append(self)

        factory = RotatingFactory(protocol.ClientFactory.forProtocol(Recorded), fast())
        reactor.connectSSL(
            peer.host, peer.port, factory, client_options(cert_files), timeout=5
        )
        await until(lambda: built, "the connection")
        (app,) = built
        wrapper: Any = rekeyableFor(app)
        await until(lambda: wrapper.rotationSchedule is not None, "the handshake")
        lines = [b"line %03d of the rotating client" % i for i in range(40)]
        for line in lines:
            app.transport.write(line + b"\n")
            await sleep(0.05)
        for line in lines:
            await peer.when_seen("^" + line.decode() + "$", reactor=reactor)
        rotations = wrapper.rotationSchedule.rotations
        # ~10 in 2 s at the 0.2 s floor.
        assert rotations >= 5
        # The foreign peer logged every one of them.
        await until(
            lambda: len(peer.key_updates_received()) >= rotations,
            "s_server to log the KeyUpdates",
        )
        assert peer.key_updates_received() == [False] * rotations
        # And its data still reaches us under the keys it has now.
        peer.send_line("reply from s_server")
        await until(lambda: b"reply from s_server\n" in app.received, "the reply")
        lost = app.transport
        lost.loseConnection()  # type: ignore[union-attr]
        await until(lambda: not lost.connected, "the close")  # type: ignore[union-attr]
    assert not [c for c in reactor.getDelayedCalls() if "RotationScheduler" in repr(c)]


@pytest_twisted.ensureDeferred
async def test_two_connections_events_name_their_connection(cert_files: Any) -> None:
    from twisted.internet import reactor
    from twisted.logger import formatEventAsClassicLogText, globalLogPublisher

    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "rekey_event" in event:
            events.append(event)

    factory = RotatingFactory(protocol.Factory.forProtocol(Echo), None)
    port = reactor.listenSSL(
        0, factory, server_options(cert_files, "1.3"), interface="127.0.0.1"
    )
    clients: list[Peer] = []
    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(2):
            built: defer.Deferred[Peer] = defer.Deferred()

            class Client(Peer):
                onHandshake = built

            reactor.connectSSL(
                "127.0.0.1",
                port.getHost().port,
                protocol.ClientFactory.forProtocol(Client),
                client_options(cert_files),
                timeout=5,
            )
            clients.append(await built.addTimeout(TIMEOUT, reactor))
        ports = [f"127.0.0.1:{c.transport.getHost().port}" for c in clients]  # type: ignore[union-attr]
        for client in clients:
            await client.keyUpdate(requestPeer=True, timeout=TIMEOUT)
    finally:
        globalLogPublisher.removeObserver(observe)
        for client in clients:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.lostDeferred.addTimeout(TIMEOUT, reactor)
        await port.stopListening()

    def server(name: str) -> list[dict[str, Any]]:
        return [
            e
            for e in events
            if e["rekey_event"] == name and not isinstance(e["log_source"], Peer)
        ]

    received = server("key_update_received")
    answered = server("key_update_answered")
    assert len(received) == len(answered) == 2
    # Two connections, two identities: the server's echo protocols, their
    # numbers and their peers (each client's own port).
    assert received[0]["log_source"] is not received[1]["log_source"]
    assert all(isinstance(e["log_source"], Echo) for e in received)
    assert received[0]["connection"] != received[1]["connection"]
    assert [e["peer"] for e in received] == ports
    for r, a in zip(received, answered):
        assert (a["connection"], a["peer"]) == (r["connection"], r["peer"])
        # In wire order: the peer's KeyUpdate, then our answer.
        assert events.index(r) < events.index(a)
        text = formatEventAsClassicLogText(r)
        assert text is not None and f"[Echo,{r['connection']},{r['peer']}]" in text
    # The clients' events name theirs too.
    mine = [e for e in events if e["rekey_event"] == "key_update_sent"]
    assert {e["log_source"] for e in mine} == set(clients)


class StartTLSEcho(Echo):
    """Echoes; turns TLS when the client says STARTTLS."""

    options: Any = None

    def dataReceived(self, data: bytes) -> None:
        if data == b"STARTTLS\n":
            self.transport.write(b"GO\n")  # type: ignore[union-attr]
            self.transport.startTLS(self.options)  # type: ignore[union-attr]
        else:
            super().dataReceived(data)


@pytest_twisted.ensureDeferred
async def test_starttls_and_wrapclienttls(cert_files: Any) -> None:
    from twisted.internet import endpoints, reactor

    StartTLSEcho.options = server_options(cert_files, "1.3")
    built: list[StartTLSEcho] = []

    class Recorded(StartTLSEcho):
        def connectionMade(self) -> None:
            built.append(self)

    port = reactor.listenTCP(
        0,
        RotatingFactory(protocol.Factory.forProtocol(Recorded), None),
        interface="127.0.0.1",
    )
    try:
        # startTLS: the rotation starts with the TLS handshake.
        handshake: defer.Deferred[Peer] = defer.Deferred()

        class Client(Peer):
            onHandshake = handshake

            def dataReceived(self, data: bytes) -> None:
                if data == b"GO\n":
                    self.transport.startTLS(client_options(cert_files))  # type: ignore[union-attr]
                else:
                    super().dataReceived(data)

        client = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
            Client(),
        )
        assert rekeyableFor(built[0]) is None  # not TLS yet
        client.transport.write(b"STARTTLS\n")  # type: ignore[union-attr]
        await handshake.addTimeout(TIMEOUT, reactor)
        # The server's rotation answers our request.
        await client.keyUpdate(requestPeer=True, timeout=TIMEOUT)
        rotation: Any = rekeyableFor(built[0])
        assert rotation.rekeyStats.keyUpdatesReceived == 1
        assert rotation.rekeyStats.keyUpdatesSent == 1
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.lostDeferred.addTimeout(TIMEOUT, reactor)
    finally:
        await port.stopListening()

    # wrapClientTLS, against openssl s_server: the client's own protocol,
    # rotating on its policy, and s_server reads each KeyUpdate.
    with OpenSSLServer(cert_files, version="1.3") as peer:
        endpoint = endpoints.wrapClientTLS(
            client_options(cert_files),
            endpoints.TCP4ClientEndpoint(reactor, peer.host, peer.port),
        )
        app = await endpoint.connect(
            RotatingFactory(protocol.Factory.forProtocol(Lines), fast())
        )
        assert type(app) is Lines
        wrapper: Any = rekeyableFor(app)
        # 1.6 s of lines: eight intervals of the 0.2 s floor.
        for i in range(32):
            app.transport.write(b"line %03d\n" % i)  # type: ignore[union-attr]
            await sleep(0.05)
        await peer.when_seen("^line 031$", reactor=reactor)
        rotations = wrapper.rotationSchedule.rotations
        assert rotations >= 5
        await until(lambda: len(peer.key_updates_received()) >= rotations, "s_server")
        lost = app.transport
        lost.loseConnection()  # type: ignore[union-attr]
        await until(lambda: not lost.connected, "the close")  # type: ignore[union-attr]
