"""
RotatingFactory inside the frameworks people run, over real loopback
sockets and endpoint strings: twisted.web's ``Site`` fetched by ``curl``
(its defaults: ALPN on) and by ``httpx`` over HTTP/2, an Autobahn WebSocket
server with a ``websockets`` client, AMP through
``clientFromString(...).connect(...)``, and Perspective Broker.  Each
checks every byte, and that the rotations happened where the other side
had to follow them.

The foreign clients (curl, httpx, websockets) run as subprocesses, so that
the reactor under test never blocks on them.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from peers import require_tool
from test_rotation_loopback import sleep, until
from twisted.internet import endpoints, protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.web import resource, server
from twistedharness import Events

from twisted_rekey import (
    RekeyProtocolMixin,
    RotatingFactory,
    RotationPolicy,
    rekeyableFor,
)
from twisted_rekey.exceptions import RenegotiationForbidden

TIMEOUT = 30.0

#: The response body: 64 chunks of 16 KiB, each different.
CHUNKS = 64
CHUNK = 16384


def body() -> bytes:
    return b"".join(chunkFor(i) for i in range(CHUNKS))


def chunkFor(i: int) -> bytes:
    return hashlib.sha256(b"%d" % i).digest() * (CHUNK // 32)


def fast(requestPeer: bool = False) -> RotationPolicy:
    return RotationPolicy(
        interval=0.2,
        min_interval=0.2,
        jitter=0.1,
        request_peer_interval=0.4 if requestPeer else None,
    )


def serverEndpoint(cert_files: Any) -> Any:
    from twisted.internet import reactor

    return endpoints.serverFromString(
        reactor,
        f"ssl:0:interface=127.0.0.1:privateKey={cert_files.server_key}"
        f":certKey={cert_files.server_cert}",
    )


def clientEndpoint(cert_files: Any, port: int, tmp_path: Path) -> Any:
    """A ``tls:`` client endpoint string that trusts the test CA only."""
    from twisted.internet import reactor

    roots = tmp_path / "roots"
    roots.mkdir(exist_ok=True)
    (roots / "ca.pem").write_bytes(cert_files.ca_cert.read_bytes())
    return endpoints.clientFromString(
        reactor, f"tls:host=127.0.0.1:port={port}:trustRoots={roots}"
    )


async def run(executable: str, *args: str) -> tuple[str, str, int]:
    from twisted.internet import reactor

    out, err, code = await getProcessOutputAndValue(
        executable, args, env={"PATH": "/usr/bin:/bin"}, reactor=reactor
    ).addTimeout(TIMEOUT + 10, reactor)
    return out.decode(), err.decode(), code


async def runPython(cert_files: Any, script: str, url: str) -> str:
    """Run a client *script* (argv: url, CA file, timeout); its output."""
    out, err, code = await run(
        sys.executable, "-c", script, url, str(cert_files.ca_cert), str(TIMEOUT)
    )
    assert code == 0, err
    return out


# -- twisted.web ---------------------------------------------------------------


class Streamed(resource.Resource):
    """Writes the body a chunk at a time, so that rotations fall inside it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        #: rekeyableFor(request.channel) of each request.
        self.rotations: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        from twisted.internet import reactor

        self.rotations.append(rekeyableFor(request.channel))

        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % (CHUNKS * CHUNK))

        def step(i: int) -> None:
            if request.finished or request._disconnected:
                return
            request.write(chunkFor(i))
            if i + 1 == CHUNKS:
                request.finish()
            else:
                reactor.callLater(0.02, step, i + 1)

        step(0)
        return server.NOT_DONE_YET


class RecordingSite(server.Site):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.built: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        built = super().buildProtocol(addr)
        self.built.append(built)
        return built


async def listenSite(cert_files: Any, policy: RotationPolicy | None) -> Any:
    site = RecordingSite(Streamed())
    factory: Any = site if policy is None else RotatingFactory(site, policy)
    port = await serverEndpoint(cert_files).listen(factory)
    return site, port


def curlArgs(cert_files: Any, *args: str) -> list[str]:
    return [
        "--silent",
        "--show-error",
        "--verbose",
        "--max-time",
        str(TIMEOUT),
        "--cacert",
        str(cert_files.ca_cert),
        *args,
    ]


async def curlFetch(
    cert_files: Any, factory: Any, saved: Path, *args: str
) -> tuple[str, int]:
    """
    Serve *factory* over TLS on loopback and fetch ``/`` into *saved* with
    curl and *args*: curl's verbose log and exit code.
    """
    curl = require_tool("curl")
    port = await serverEndpoint(cert_files).listen(factory)
    try:
        url = f"https://127.0.0.1:{port.getHost().port}/"
        _, err, code = await run(
            curl, *curlArgs(cert_files, *args, "-o", str(saved), url)
        )
    finally:
        await port.stopListening()
    return err, code


def rotationsOf(site: RecordingSite) -> list[Any]:
    return [rekeyableFor(p).rekeyStats for p in site.built]  # type: ignore[union-attr]


async def closed(site: RecordingSite) -> None:
    """Wait until the server side of each wrapped connection is gone."""
    tls = [rekeyableFor(p).transport for p in site.built]  # type: ignore[union-attr]
    await until(lambda: not any(t.connected for t in tls), "the server to close")


@pytest.mark.parametrize(
    "version, using",
    [((), r"HTTP/2"), (("--http1.1",), r"HTTP/1\.[1x]")],
    ids=["defaults", "http1.1"],
)
@pytest_twisted.ensureDeferred
async def test_site_with_curl(
    cert_files: Any, tmp_path: Path, version: tuple[str, ...], using: str
) -> None:
    site = RecordingSite(Streamed())
    saved = tmp_path / "body"
    err, code = await curlFetch(
        cert_files, RotatingFactory(site, fast()), saved, *version
    )
    assert code == 0, err
    # curl offered ALPN (its default), and the wrapped Site answered it:
    # with h2 (Site's first choice) unless curl was told HTTP/1.1.
    assert "ALPN: offers" in err, err
    assert re.search(f"using {using}", err), err
    assert saved.read_bytes() == body()
    await closed(site)
    (stats,) = rotationsOf(site)
    # A resource reaches its connection's rotation through the channel.
    (rotation,) = site.resource.rotations
    assert rotation is rekeyableFor(site.built[0])
    # curl read each of these KeyUpdates (its own log says so) and
    # decrypted every record after them.
    seen = err.count("(IN), TLS handshake, Key update")
    # The last may have gone out after the body, once curl stopped reading.
    assert 5 <= seen and stats.keyUpdatesSent - 1 <= seen <= stats.keyUpdatesSent
    assert stats.bytesSent > CHUNKS * CHUNK


class Renegotiating(Streamed):
    """
    Streamed, and the resource itself renegotiates (TLS 1.2) before every
    sixteenth chunk: that chunk is written right after the HelloRequest,
    so it is held, with the channel paused as its producer, until the
    client's ClientHello arrives.
    """

    def __init__(self) -> None:
        super().__init__()
        self.results: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        write = request.write
        rotation = rekeyableFor(request.channel)
        sent = [0]

        def renegotiatingWrite(data: bytes) -> None:
            if sent[0] % 16 == 0:
                rotation.renegotiate(timeout=TIMEOUT).addBoth(self.results.append)  # type: ignore[union-attr]
            sent[0] += 1
            write(data)

        request.write = renegotiatingWrite
        return super().render_GET(request)


@pytest_twisted.ensureDeferred
async def test_site_renegotiates_under_curl_on_tls12(
    cert_files: Any, tmp_path: Path
) -> None:
    """
    TLS 1.2 (HTTP/1.1: HTTP/2 forbids renegotiation): the application
    renegotiates in the middle of a streamed response, whose next write is
    held from the HelloRequest on, with the HTTP channel (the producer of
    its connection) paused meanwhile.  The channel must still read the
    ClientHello: curl follows every renegotiation and reads the whole body
    in order.
    """
    site = RecordingSite(Renegotiating())
    saved = tmp_path / "body"
    err, code = await curlFetch(
        cert_files, RotatingFactory(site, None), saved, "--http1.1", "--tls-max", "1.2"
    )
    assert code == 0, err
    assert re.search(r"SSL connection using TLSv1\.2", err), err
    assert saved.read_bytes() == body()
    await closed(site)
    (stats,) = rotationsOf(site)
    assert site.resource.results == [None] * (CHUNKS // 16)
    assert stats.renegotiations == CHUNKS // 16
    # curl read each HelloRequest; a renegotiation completes only with its
    # Finished.
    assert err.count("(IN), TLS handshake, Hello request") == CHUNKS // 16, err


@pytest.mark.parametrize("policy", [True, False], ids=["policy", "asked"])
@pytest_twisted.ensureDeferred
async def test_site_never_renegotiates_http2_on_tls12(
    cert_files: Any, tmp_path: Path, events: Events, policy: bool
) -> None:
    """
    HTTP/2 over TLS 1.2 forbids renegotiation (RFC 9113, section 9.2.1: a
    client treats one as a connection error).  With curl over h2 and TLS
    1.2, neither the policy nor the application's own renegotiate() sends
    a HelloRequest: the policy stays off and says why, the call fails with
    RenegotiationForbidden, and curl reads the whole body.
    """
    resource = Renegotiating() if not policy else Streamed()
    site = RecordingSite(resource)
    factory = RotatingFactory(site, fast() if policy else None)
    saved = tmp_path / "body"
    err, code = await curlFetch(
        cert_files, factory, saved, "--http2", "--tls-max", "1.2"
    )
    assert code == 0, err
    assert re.search(r"SSL connection using TLSv1\.2", err), err
    assert re.search(r"using HTTP/2", err), err
    assert saved.read_bytes() == body()
    await closed(site)
    (stats,) = rotationsOf(site)
    assert stats.renegotiations == 0
    assert "Hello request" not in err, err
    if policy:
        (disabled,) = events.named("rotation_disabled")
        assert "HTTP/2" in disabled["reason"], disabled
    else:
        results = resource.results  # type: ignore[attr-defined]
        assert len(results) == CHUNKS // 16
        for result in results:
            assert isinstance(result, Failure), result
            assert result.check(RenegotiationForbidden), result
            assert "HTTP/2" in result.getErrorMessage()


HTTPX_CLIENT = """
import hashlib, ssl, sys
import httpx
context = ssl.create_default_context(cafile=sys.argv[2])
with httpx.Client(http2=True, verify=context, timeout=float(sys.argv[3])) as c:
    r = c.get(sys.argv[1])
    print(r.http_version, r.status_code, len(r.content),
          hashlib.sha256(r.content).hexdigest())
"""


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
@pytest_twisted.ensureDeferred
async def test_site_negotiates_http2_with_httpx(cert_files: Any, wrapped: bool) -> None:
    from twisted.web import http

    # Twisted serves HTTP/2 only with h2 installed (the tests extra has it).
    assert http.H2_ENABLED
    site, port = await listenSite(
        cert_files, fast(requestPeer=True) if wrapped else None
    )
    try:
        url = f"https://127.0.0.1:{port.getHost().port}/"
        out = await runPython(cert_files, HTTPX_CLIENT, url)
    finally:
        await port.stopListening()
    assert out.split() == [
        "HTTP/2",
        "200",
        str(CHUNKS * CHUNK),
        hashlib.sha256(body()).hexdigest(),
    ]
    if wrapped:
        await closed(site)
        (stats,) = rotationsOf(site)
        assert stats.keyUpdatesSent >= 5, stats
        # httpx (Python's ssl, OpenSSL) answered our update requests: it
        # followed the rotations, and its own new keys decrypted here.
        assert stats.keyUpdatesReceived >= 1, stats


# -- AMP through endpoint strings ----------------------------------------------


class Echo(amp.Command):
    arguments = [(b"data", amp.String())]
    response = [(b"data", amp.String())]


class Sum(amp.Command):
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class AMPServer(amp.AMP):
    connected: list[AMPServer] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected.append(self)

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


async def serverReadAll(rotation: Any, least: int) -> Any:
    """
    Check that the client's *rotation* sent at least *least* KeyUpdates, and
    that the AMP server read them all; the server's rotation.
    """
    sent = rotation.rekeyStats.keyUpdatesSent
    assert sent >= least, rotation.rekeyStats
    (peer,) = AMPServer.connected
    serverSide: Any = rekeyableFor(peer)
    await until(lambda: serverSide.rekeyStats.keyUpdatesReceived == sent, "all")
    return serverSide


async def closeAMP(client: amp.AMP, port: Any) -> None:
    client.transport.loseConnection()  # type: ignore[union-attr]
    await port.stopListening()
    # AMP drops its transport once the connection is lost.
    await until(
        lambda: AMPServer.connected[0].transport is None and client.transport is None,
        "the close at both ends",
    )


@pytest_twisted.ensureDeferred
async def test_amp_over_endpoints(cert_files: Any, tmp_path: Path) -> None:
    from twisted.internet import reactor

    AMPServer.connected = []
    serverFactory = RotatingFactory(protocol.Factory.forProtocol(AMPServer), None)
    port = await serverEndpoint(cert_files).listen(serverFactory)
    endpoint = clientEndpoint(cert_files, port.getHost().port, tmp_path)
    client = await endpoint.connect(
        RotatingFactory(protocol.Factory.forProtocol(amp.AMP), fast())
    ).addTimeout(TIMEOUT, reactor)
    try:
        # The application's own protocol, on Twisted's own TLS transport.
        assert type(client) is amp.AMP
        assert isinstance(client.transport, TLSMemoryBIOProtocol)
        rotation: Any = rekeyableFor(client)
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 1.5:
            data = hashlib.sha256(b"%d" % i).digest() * 100
            answer = await client.callRemote(Echo, data=data)
            assert answer == {"data": data}
            total = await client.callRemote(Sum, a=i, b=1000)
            assert total == {"total": i + 1000}
            i += 1
            await sleep(0.02)
        # The server read every one of them, and answered every call.
        serverSide = await serverReadAll(rotation, 5)
        assert serverSide.rekeyStats.bytesReceived == rotation.rekeyStats.bytesSent
    finally:
        await closeAMP(client, port)


class RekeyingAMP(RekeyProtocolMixin, amp.AMP):
    """A protocol of one's own can carry the mixin, for connectProtocol."""

    rotationPolicy = fast()


@pytest_twisted.ensureDeferred
async def test_amp_mixin_through_connect_protocol(
    cert_files: Any, tmp_path: Path
) -> None:
    from twisted.internet import reactor

    AMPServer.connected = []
    port = await serverEndpoint(cert_files).listen(
        RotatingFactory(protocol.Factory.forProtocol(AMPServer), None)
    )
    endpoint = clientEndpoint(cert_files, port.getHost().port, tmp_path)
    client = await endpoints.connectProtocol(endpoint, RekeyingAMP()).addTimeout(
        TIMEOUT, reactor
    )
    try:
        assert rekeyableFor(client) is client
        for i in range(40):
            data = b"%d" % i * 1000
            assert await client.callRemote(Echo, data=data) == {"data": data}
            await sleep(0.02)
        await serverReadAll(client, 3)
    finally:
        await closeAMP(client, port)


# -- Perspective Broker --------------------------------------------------------


class Root(pb.Root):
    def remote_echo(self, data: bytes) -> bytes:
        return data


class RecordingServerFactory(pb.PBServerFactory):
    def buildProtocol(self, addr: Any) -> Any:
        built = super().buildProtocol(addr)
        self.built = built
        return built


@pytest_twisted.ensureDeferred
async def test_perspective_broker(cert_files: Any, tmp_path: Path) -> None:
    from twisted.internet import reactor

    serverFactory = RecordingServerFactory(Root())
    port = await serverEndpoint(cert_files).listen(
        RotatingFactory(serverFactory, fast())
    )
    clientFactory = pb.PBClientFactory()
    endpoint = clientEndpoint(cert_files, port.getHost().port, tmp_path)
    broker = await endpoint.connect(RotatingFactory(clientFactory, fast())).addTimeout(
        TIMEOUT, reactor
    )
    try:
        assert isinstance(broker, pb.Broker)
        assert isinstance(broker.transport, TLSMemoryBIOProtocol)
        root = await clientFactory.getRootObject().addTimeout(TIMEOUT, reactor)
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 1.5:
            data = hashlib.sha256(b"pb %d" % i).digest() * 50
            assert await root.callRemote("echo", data) == data
            i += 1
            await sleep(0.02)
        ours: Any = rekeyableFor(broker)
        theirs: Any = rekeyableFor(serverFactory.built)
        assert ours.rekeyStats.keyUpdatesSent >= 5
        assert theirs.rekeyStats.keyUpdatesSent >= 5
        await until(
            lambda: (
                theirs.rekeyStats.keyUpdatesReceived == ours.rekeyStats.keyUpdatesSent
            ),
            "the server to read every KeyUpdate",
        )
        await until(
            lambda: (
                ours.rekeyStats.keyUpdatesReceived == theirs.rekeyStats.keyUpdatesSent
            ),
            "the client to read every KeyUpdate",
        )
    finally:
        clientFactory.disconnect()
        await port.stopListening()
    await until(
        lambda: broker.disconnected and serverFactory.built.disconnected,
        "the close at both ends",
    )


# -- Autobahn with a websockets client -----------------------------------------

#: websockets' asyncio client: one thread owns the TLS socket.  Its sync
#: client reads in a background thread while the caller's thread writes, so
#: two threads enter one OpenSSL ``SSL`` object at once, which OpenSSL
#: forbids; a KeyUpdate arriving then can corrupt the client's records
#: (docs/troubleshooting.rst, "Clients that share a TLS socket between
#: threads").
WEBSOCKETS_CLIENT = """
import asyncio, hashlib, ssl, sys, time
from websockets.asyncio.client import connect

async def main():
    context = ssl.create_default_context(cafile=sys.argv[2])
    timeout = float(sys.argv[3])
    count = 0
    async with connect(sys.argv[1], ssl=context, open_timeout=timeout) as ws:
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            message = hashlib.sha256(b"ws %d" % count).digest() * 64
            await ws.send(message)
            answer = await asyncio.wait_for(ws.recv(), timeout)
            assert answer == message, count
            count += 1
            await asyncio.sleep(0.02)
    print("OK", count)

asyncio.run(main())
"""


@pytest_twisted.ensureDeferred
async def test_autobahn_websocket_server_with_websockets_client(
    cert_files: Any,
) -> None:
    from autobahn.twisted.websocket import (
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )

    connected: list[Any] = []

    class EchoSocket(WebSocketServerProtocol):  # type: ignore[misc]
        def onConnect(self, request: Any) -> None:
            # Autobahn asks the transport for its TLS channel id: it must
            # be Twisted's own TLS protocol.
            connected.append(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory()
    factory.protocol = EchoSocket
    port = await serverEndpoint(cert_files).listen(
        RotatingFactory(factory, fast(requestPeer=True))
    )
    try:
        url = f"wss://127.0.0.1:{port.getHost().port}/"
        out = await runPython(cert_files, WEBSOCKETS_CLIENT, url)
    finally:
        await port.stopListening()
    verdict, count = out.split()
    assert verdict == "OK" and int(count) >= 20
    (socket,) = connected
    assert isinstance(socket.transport, TLSMemoryBIOProtocol)
    stats: Any = rekeyableFor(socket)
    assert stats.rekeyStats.keyUpdatesSent >= 5, stats.rekeyStats
    # The client answered our requests: it followed our rotations.
    assert stats.rekeyStats.keyUpdatesReceived >= 1, stats.rekeyStats
    await until(lambda: not socket.transport.connected, "the close")
