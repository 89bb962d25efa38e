"""
Backpressure, in process, on real loopback sockets and the real reactor: the
echo server and the tunnel stop reading a peer whose data they cannot pass
on, hold a bounded number of bytes meanwhile, and lose none of them once
the far end reads again.

"Stopped reading" is shown three ways: the count of bytes the protocol was
given stays far below what the peer wrote and stops growing, its TCP
transport is no longer among the reactor's readers, and (tunnel) the side
was paused as the producer of its peer's transport.  "Bounded" is the bytes
held by the process for the connection: Twisted's TLS layer (data waiting
for the handshake, small-write aggregation) plus the TCP transport's send
buffer, sampled throughout the stalled period.

The end that does not read gets a small fixed receive buffer, so that what
the kernel absorbs does not depend on autotuning.  Every wait is bounded.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twistedharness import client_options, server_options
from zope.interface import implementer

from twisted_rekey.apps import tunnel
from twisted_rekey.apps.echo import EchoFactory, EchoProtocol
from twisted_rekey.apps.tunnel import MAX_PENDING, InboundSide, RelayFactory, RelaySide

#: What the writing end sends in one go.
TOTAL = 32 << 20
#: The bound on each wait.
WAIT = 5.0
#: SO_RCVBUF of the end that stops reading (the kernel doubles it).
RCVBUF = 64 << 10
#: Twisted stops the producer above 64 KiB in a transport's send buffer; one
#: read (64 KiB) may still be written through, the TLS layer aggregates up
#: to 64 kB of small writes, and records add a little.
HELD_BOUND = 256 << 10
#: How long a stall is watched once the counts stopped growing.
OBSERVE = 1.0


def payload(size: int, seed: int) -> bytes:
    """Bytes that show a loss, a duplicate or a reordering."""
    return random.Random(seed).randbytes(size)


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def until(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s: {what}"
        await sleep(0.01)


def tcpOf(transport: Any) -> Any:
    """The TCP transport under a TLS one (or the transport itself)."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport.transport
    return transport


def held(transport: Any) -> int:
    """
    Bytes waiting to be sent in *transport*: Twisted's TLS layer (application
    data buffered until the handshake, and the small-write aggregator of
    Twisted >= 24.7), then the TCP transport's buffer (``dataBuffer`` past
    ``offset``, plus ``_tempDataBuffer``, counted by ``_tempDataLen``: the
    same names in Twisted 23.10 and today).
    """
    total = 0
    if isinstance(transport, TLSMemoryBIOProtocol):
        total += sum(len(b) for b in getattr(transport, "_appSendBuffer", ()))
        aggregator = getattr(transport, "_aggregator", None)
        total += sum(len(b) for b in getattr(aggregator, "_buffer", ()))
        transport = transport.transport
    if transport is None:
        return total
    unsent = len(transport.dataBuffer) - transport.offset
    return total + unsent + transport._tempDataLen


def reading(transport: Any) -> bool:
    from twisted.internet import reactor

    return tcpOf(transport) in reactor.getReaders()


async def stall(
    count: Callable[[], int], holding: Callable[[], int]
) -> tuple[int, int]:
    """
    Wait (bounded) until *count* stops growing, then watch it for
    :data:`OBSERVE` seconds more: it must not move.  Returns the count and
    the most *holding* returned at any sample.
    """
    peak = holding()
    deadline = time.monotonic() + WAIT
    last, since = count(), time.monotonic()
    while time.monotonic() - since < 0.3:
        assert time.monotonic() < deadline, f"still reading after {WAIT} s"
        await sleep(0.01)
        peak = max(peak, holding())
        if count() != last:
            last, since = count(), time.monotonic()
    end = time.monotonic() + OBSERVE
    while time.monotonic() < end:
        await sleep(0.01)
        peak = max(peak, holding())
        assert count() == last, "read again while the far end still did not read"
    return last, peak


def firstMismatch(got: bytes | bytearray, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes arrived, {len(want)} were sent"
    for offset in range(0, len(want), 1 << 16):
        if got[offset : offset + (1 << 16)] != want[offset : offset + (1 << 16)]:
            return f"the bytes differ within [{offset}, {offset + (1 << 16)})"
    return "equal"


# -- the ends of the traffic ------------------------------------------------------


@implementer(IHandshakeListener)
class End(protocol.Protocol):
    """
    A client or a service of the test: ready once connected (plain) or
    handshaken (TLS); then it may stop reading and may write its data.
    Records what it reads.
    """

    def __init__(
        self, tls: bool, pauseWhenReady: bool, toWrite: bytes, stall: bool
    ) -> None:
        self.tls = tls
        self.stall = stall
        self.pauseWhenReady = pauseWhenReady
        self.toWrite = toWrite
        self.received = bytearray()
        self.ready: defer.Deferred[End] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.isReady = False
        self.isLost = False

    def connectionMade(self) -> None:
        if self.stall:
            # Not even the TLS handshake: its TCP transport is not read.
            tcpOf(self.transport).pauseProducing()
        if self.pauseWhenReady:
            sock = tcpOf(self.transport).getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        if not self.tls:
            self.becomeReady()

    def handshakeCompleted(self) -> None:
        self.becomeReady()

    def becomeReady(self) -> None:
        transport: Any = self.transport
        self.isReady = True
        if self.pauseWhenReady:
            transport.pauseProducing()
        if self.toWrite:
            transport.write(self.toWrite)
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.isLost = True
        self.lost.callback(None)


class Ends(protocol.ClientFactory):
    """Makes :class:`End` instances and keeps them."""

    noisy = False

    def __init__(
        self,
        tls: bool,
        pauseWhenReady: bool = False,
        toWrite: bytes = b"",
        stall: bool = False,
    ) -> None:
        self.tls = tls
        self.pauseWhenReady = pauseWhenReady
        self.toWrite = toWrite
        self.stall = stall
        self.built: list[End] = []

    def buildProtocol(self, addr: Any) -> End:
        end = End(self.tls, self.pauseWhenReady, self.toWrite, self.stall)
        end.factory = self
        self.built.append(end)
        return end

    async def one(self) -> End:
        await until(lambda: self.built, "a connection")
        (end,) = self.built
        return end


class Network:
    """Listeners and connections of one test, all closed by :meth:`close`."""

    def __init__(self, cert_files: Any) -> None:
        self.cert_files = cert_files
        self.ports: list[Any] = []
        self.ends: list[End] = []
        self.others: list[Any] = []

    def listen(self, factory: Any, tls: bool) -> int:
        from twisted.internet import reactor

        if tls:
            options = server_options(self.cert_files, "1.3")
            factory = TLSMemoryBIOFactory(options, False, factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return int(port.getHost().port)

    def connect(self, factory: Any, port: int, tls: bool) -> None:
        from twisted.internet import reactor

        if tls:
            options = client_options(self.cert_files)
            factory = TLSMemoryBIOFactory(options, True, factory)
        reactor.connectTCP("127.0.0.1", port, factory, timeout=WAIT)

    def connector(self, port: int, tls: bool) -> Any:
        from twisted.internet import reactor

        endpoint: Any = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port, timeout=WAIT
        )
        if tls:
            wrap: Any = endpoints.wrapClientTLS
            endpoint = wrap(client_options(self.cert_files), endpoint)
        return endpoint

    async def close(self) -> None:
        for end in self.ends:
            if not end.isLost and end.transport is not None:
                end.transport.abortConnection()  # type: ignore[attr-defined]
        for other in self.others:
            if not getattr(other, "lost", True) and other.transport is not None:
                other.transport.abortConnection()
        for end in self.ends:
            await until(lambda end=end: end.isLost, "an end to close")  # type: ignore[misc]
        for other in self.others:
            await until(lambda o=other: getattr(o, "lost", True), "a side to close")  # type: ignore[misc]
        for port in self.ports:
            await port.stopListening()
        # Let the closes finish (TLS shutdowns, connectionLost callLater(0)).
        await sleep(0.05)


# -- rekey-echo --------------------------------------------------------------------


class CountingEcho(EchoProtocol):
    bytesRead = 0
    lost = False

    def dataReceived(self, data: bytes) -> None:
        self.bytesRead += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        super().connectionLost(reason)


class CountingEchoFactory(EchoFactory):
    protocol = CountingEcho

    def __init__(self) -> None:
        super().__init__(None)
        self.built: list[CountingEcho] = []

    def buildProtocol(self, addr: Any) -> Any:
        echo = super().buildProtocol(addr)
        self.built.append(echo)  # type: ignore[arg-type]
        return echo


@pytest_twisted.ensureDeferred
async def test_echo_stops_reading_a_client_that_does_not_read(cert_files: Any) -> None:
    net = Network(cert_files)
    data = payload(TOTAL, 1)
    try:
        echo = CountingEchoFactory()
        port = net.listen(echo, tls=True)
        clients = Ends(tls=True)
        net.connect(clients, port, tls=True)
        client = await clients.one()
        net.ends.append(client)
        await client.ready.addTimeout(WAIT, _reactor())
        await until(lambda: echo.built, "the server side")
        (server,) = echo.built
        net.others.append(server)

        # The client stops reading, then writes everything at once.
        tcpOf(client.transport).getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF
        )
        client.transport.pauseProducing()  # type: ignore[union-attr]
        client.transport.write(data)  # type: ignore[union-attr]

        read, peak = await stall(
            lambda: server.bytesRead, lambda: held(server.transport)
        )
        serverTCP = tcpOf(server.transport)
        print(
            f"\necho: client wrote {TOTAL}, server read {read} "
            f"({read / TOTAL:.1%}); server held at most {peak} bytes; "
            f"client received {len(client.received)}"
        )
        assert read < TOTAL // 4
        assert peak <= HELD_BOUND
        assert not reading(serverTCP), "the server still reads the client"
        assert serverTCP.producerPaused, "the server's send buffer did not fill"
        assert server.rekeyStats.bytesReceived == read

        # The client reads again: every byte comes back, in order.
        client.transport.resumeProducing()  # type: ignore[union-attr]
        await until(lambda: len(client.received) >= TOTAL, "the whole echo", 8.0)
        assert client.received == data, firstMismatch(client.received, data)
        assert server.bytesRead == TOTAL
        assert reading(serverTCP)

        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.lost.addTimeout(WAIT, _reactor())
        await until(lambda: server.lost, "the server side to close")
    finally:
        await net.close()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- rekey-tunnel ------------------------------------------------------------------


class RecordingRelay(RelayFactory):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.built: list[InboundSide] = []

    def buildProtocol(self, addr: Any) -> Any:
        inbound = super().buildProtocol(addr)
        self.built.append(inbound)  # type: ignore[arg-type]
        return inbound

    async def one(self) -> InboundSide:
        await until(lambda: self.built, "the tunnel to accept")
        (inbound,) = self.built
        return inbound


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Each relay side counts the bytes it is given (``bytesRead``) and how
    often its peer's transport paused it as its producer (``pauses``).
    """
    dataReceived = RelaySide.dataReceived
    pauseProducing = RelaySide.pauseProducing

    def countingDataReceived(self: Any, data: bytes) -> None:
        self.bytesRead = getattr(self, "bytesRead", 0) + len(data)
        dataReceived(self, data)

    def countingPauseProducing(self: Any) -> None:
        self.pauses = getattr(self, "pauses", 0) + 1
        pauseProducing(self)

    monkeypatch.setattr(RelaySide, "dataReceived", countingDataReceived)
    monkeypatch.setattr(RelaySide, "pauseProducing", countingPauseProducing)


def tunnelHeld(inbound: InboundSide, outbound: RelaySide) -> int:
    return (
        held(inbound.transport)
        + held(outbound.transport)
        + inbound.pendingSize
        + outbound.pendingSize
    )


@pytest.mark.parametrize(
    "inTLS,outTLS",
    [(False, True), (True, False)],
    ids=["plain-in-tls-out", "tls-in-plain-out"],
)
@pytest.mark.parametrize("towards", ["service", "client"])
@pytest_twisted.ensureDeferred
async def test_tunnel_stops_reading_what_the_far_end_does_not_read(
    cert_files: Any, counted: None, inTLS: bool, outTLS: bool, towards: str
) -> None:
    """
    One end writes 32 MiB through the tunnel, the other does not read: the
    tunnel side facing the writer is paused and stops reading, the tunnel
    holds a bounded number of bytes; once the reader reads, all arrive.
    """
    net = Network(cert_files)
    data = payload(TOTAL, 2)
    toService = towards == "service"
    try:
        services = Ends(
            tls=outTLS, pauseWhenReady=toService, toWrite=b"" if toService else data
        )
        servicePort = net.listen(services, outTLS)
        relay = RecordingRelay(
            net.connector(servicePort, outTLS), "the service", inTLS, outTLS, None
        )
        tunnelPort = net.listen(relay, inTLS)
        clients = Ends(
            tls=inTLS, pauseWhenReady=not toService, toWrite=data if toService else b""
        )
        net.connect(clients, tunnelPort, inTLS)

        client = await clients.one()
        net.ends.append(client)
        inbound = await relay.one()
        net.others.append(inbound)
        await until(lambda: inbound.relaying, "the tunnel to relay")
        outbound = inbound.peer
        assert outbound is not None
        net.others.append(outbound)
        service = await services.one()
        net.ends.append(service)

        writer, reader = (client, service) if toService else (service, client)
        facing, other = (inbound, outbound) if toService else (outbound, inbound)
        read, peak = await stall(
            lambda: getattr(facing, "bytesRead", 0),
            lambda: tunnelHeld(inbound, outbound),
        )
        print(
            f"\ntunnel {'TLS' if inTLS else 'plain'} in, "
            f"{'TLS' if outTLS else 'plain'} out, towards the {towards}: "
            f"{TOTAL} written, the tunnel read {read} ({read / TOTAL:.1%}), "
            f"held at most {peak} bytes; paused {getattr(facing, 'pauses', 0)} "
            f"time(s); the reader has {len(reader.received)}"
        )
        assert read < TOTAL // 4
        assert peak <= HELD_BOUND
        assert getattr(facing, "pauses", 0) >= 1, "the side was never paused"
        assert not reading(facing.transport), "the tunnel still reads the writer"
        assert reading(other.transport)  # it waits for the reader's close

        reader.transport.resumeProducing()  # type: ignore[union-attr]
        await until(lambda: len(reader.received) >= TOTAL, "all the data", 8.0)
        assert reader.received == data, firstMismatch(reader.received, data)
        assert facing.bytesRead == TOTAL  # type: ignore[attr-defined]

        # The writer closes: the tunnel closes the other end after it.
        writer.transport.loseConnection()  # type: ignore[union-attr]
        await reader.lost.addTimeout(WAIT, _reactor())
        await until(lambda: inbound.lost and outbound.lost, "the tunnel to close")
    finally:
        await net.close()


# -- before the relay is wired -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tunnel_reads_nothing_until_the_outbound_handshake(
    cert_files: Any, counted: None
) -> None:
    """
    A client that sends more than :data:`MAX_PENDING` while the outbound
    TLS handshake has not finished: the tunnel reads none of it (the kernel
    holds it), and relays all of it once the service answers.
    """
    net = Network(cert_files)
    data = payload(4 * MAX_PENDING, 3)
    try:
        # A TLS service that does not read yet: the tunnel's handshake waits.
        services = Ends(tls=True, stall=True)
        servicePort = net.listen(services, tls=True)
        relay = RecordingRelay(
            net.connector(servicePort, True), "the service", False, True, None
        )
        tunnelPort = net.listen(relay, tls=False)
        clients = Ends(tls=False, toWrite=data)
        net.connect(clients, tunnelPort, tls=False)
        client = await clients.one()
        net.ends.append(client)
        inbound = await relay.one()
        net.others.append(inbound)
        await until(lambda: services.built, "the tunnel to connect out")
        (service,) = services.built
        net.ends.append(service)

        read, peak = await stall(
            lambda: getattr(inbound, "bytesRead", 0),
            lambda: inbound.pendingSize + held(inbound.transport),
        )
        print(
            f"\nbefore the outbound handshake: client wrote {len(data)}, "
            f"the tunnel read {read}, held {peak}"
        )
        assert read == 0 and peak == 0
        assert not reading(inbound.transport)
        assert not inbound.relaying and not inbound.lost and not client.isLost

        # The service answers: the handshake completes and everything flows.
        tcpOf(service.transport).resumeProducing()
        await until(lambda: len(service.received) >= len(data), "all the data")
        assert service.received == data, firstMismatch(service.received, data)
        assert inbound.pendingSize == 0

        client.transport.loseConnection()  # type: ignore[union-attr]
        await service.lost.addTimeout(WAIT, _reactor())
    finally:
        await net.close()


async def _stalledTunnel(
    net: Network, inTLS: bool
) -> tuple[RecordingRelay, InboundSide, End, End]:
    """
    A tunnel to a TLS service that accepted the TCP connection and never
    answers the handshake, and a client connected to the tunnel.
    """
    services = Ends(tls=False, stall=True)
    servicePort = net.listen(services, tls=False)
    relay = RecordingRelay(
        net.connector(servicePort, True), "the service", inTLS, True, None
    )
    tunnelPort = net.listen(relay, inTLS)
    clients = Ends(tls=False)
    net.connect(clients, tunnelPort, tls=False)
    client = await clients.one()
    net.ends.append(client)
    inbound = await relay.one()
    net.others.append(inbound)
    service = await services.one()
    net.ends.append(service)
    # The tunnel's ClientHello is on its way and will not be answered.
    await sleep(0.1)
    return relay, inbound, client, service


async def _outboundClosed(inbound: InboundSide, service: End) -> None:
    """The tunnel closed its outbound side, and the service sees it."""
    await until(
        lambda: inbound.outbound is not None and inbound.outbound.lost,
        "the tunnel to close its outbound connection",
    )
    # The service reads again: the tunnel's ClientHello, then the close.
    tcpOf(service.transport).resumeProducing()
    await service.lost.addTimeout(WAIT, _reactor())


@pytest_twisted.ensureDeferred
async def test_tunnel_drops_a_side_over_the_pending_bound(
    cert_files: Any, logged_failures: Any
) -> None:
    """
    The bound itself: a side given more than :data:`MAX_PENDING` bytes
    before the relay is wired is dropped, and so is its outbound connection
    (here still in its handshake).  No read from a socket can exceed the
    bound while the side is paused, so the bytes are handed to it directly.
    """
    net = Network(cert_files)
    try:
        _, inbound, client, service = await _stalledTunnel(net, inTLS=False)
        inbound.dataReceived(b"x" * MAX_PENDING)
        assert not inbound.lost and inbound.pendingSize == MAX_PENDING
        inbound.dataReceived(b"x")
        await client.lost.addTimeout(WAIT, _reactor())
        await until(lambda: inbound.lost, "the tunnel to drop the side")
        await _outboundClosed(inbound, service)
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_tunnel_drops_a_connection_whose_outbound_handshake_stalls(
    cert_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunnel, "SETUP_TIMEOUT", 0.5)
    net = Network(cert_files)
    try:
        started = time.monotonic()
        _, inbound, client, service = await _stalledTunnel(net, inTLS=False)
        await client.lost.addTimeout(WAIT, _reactor())
        assert inbound.lost
        await _outboundClosed(inbound, service)
        assert time.monotonic() - started >= 0.5
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_tunnel_closes_the_outbound_side_when_the_client_leaves_first(
    cert_files: Any,
) -> None:
    """
    TLS in, plain out: the outbound side is connected, the client goes away
    before its own handshake: the outbound connection is closed too.
    """
    net = Network(cert_files)
    try:
        services = Ends(tls=False)
        servicePort = net.listen(services, tls=False)
        relay = RecordingRelay(
            net.connector(servicePort, False), "the service", True, False, None
        )
        tunnelPort = net.listen(relay, tls=True)
        # A TCP client that never starts its handshake.
        clients = Ends(tls=False)
        net.connect(clients, tunnelPort, tls=False)
        client = await clients.one()
        net.ends.append(client)
        inbound = await relay.one()
        net.others.append(inbound)
        service = await services.one()
        net.ends.append(service)
        await until(lambda: reading(inbound.transport), "the tunnel to read it")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await until(lambda: inbound.lost, "the tunnel to see the close")
        await service.lost.addTimeout(WAIT, _reactor())
    finally:
        await net.close()


@pytest_twisted.ensureDeferred
async def test_tunnel_drops_a_client_that_never_starts_its_handshake(
    cert_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunnel, "SETUP_TIMEOUT", 0.5)
    net = Network(cert_files)
    try:
        services = Ends(tls=False)
        servicePort = net.listen(services, tls=False)
        relay = RecordingRelay(
            net.connector(servicePort, False), "the service", True, False, None
        )
        tunnelPort = net.listen(relay, tls=True)
        started = time.monotonic()
        clients = Ends(tls=False)  # TCP only: no ClientHello ever comes
        net.connect(clients, tunnelPort, tls=False)
        client = await clients.one()
        net.ends.append(client)
        inbound = await relay.one()
        net.others.append(inbound)
        service = await services.one()
        net.ends.append(service)
        await client.lost.addTimeout(WAIT, _reactor())
        await service.lost.addTimeout(WAIT, _reactor())
        assert inbound.lost and not inbound.relaying
        assert time.monotonic() - started >= 0.5
    finally:
        await net.close()
