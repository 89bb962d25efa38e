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
from test_protocol import TIMEOUT, Peer, _client_options, _server_options
from twisted.internet import defer, protocol, task
from twisted.protocols.wire import Echo

from twisted_rekey import RotatingFactory, RotationPolicy


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

    factory = RotatingFactory(protocol.Factory.forProtocol(Echo), fast())
    port = reactor.listenSSL(
        0, factory, _server_options(cert_files, "1.3"), interface="127.0.0.1"
    )
    built: defer.Deferred[Peer] = defer.Deferred()

    class Client(Peer):
        onHandshake = built

    cf = protocol.ClientFactory.forProtocol(Client)
    reactor.connectSSL(
        "127.0.0.1", port.getHost().port, cf, _client_options(cert_files), timeout=5
    )
    client = await built.addTimeout(TIMEOUT, reactor)
    try:
        (server,) = factory.protocols
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
    await until(lambda: not factory.protocols, "the server side to close")
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
        factory = RotatingFactory(protocol.ClientFactory.forProtocol(Lines), fast())
        reactor.connectSSL(
            peer.host, peer.port, factory, _client_options(cert_files), timeout=5
        )
        await until(lambda: factory.protocols, "the connection")
        (wrapper,) = factory.protocols
        await until(lambda: wrapper.rotationSchedule is not None, "the handshake")
        app = wrapper.wrappedProtocol
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
        wrapper.transport.loseConnection()
        await until(lambda: not factory.protocols, "the close")
    assert not [c for c in reactor.getDelayedCalls() if "RotationScheduler" in repr(c)]
