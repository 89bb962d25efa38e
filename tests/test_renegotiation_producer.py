"""
A server streaming through a producer while it renegotiates, against
clients no one here wrote (Python's ``ssl``; OpenSSL's ``s_client``).

From our HelloRequest to the end of the new handshake, OpenSSL takes no
application data: Twisted's TLS buffer holds it.  The application's
producer must be paused meanwhile, as Twisted pauses it for a handshake of
its own, or a fast producer pours everything it has into that buffer (here
it was all 7 MiB left of an 8 MiB stream, and the six renegotiations asked
for after the first one joined it instead of following it); and the pause
must not stop the connection's reading, or the handshake never ends.  Proven on the
wire: the client reads every byte in order (SHA-256) and took part in each
renegotiation (a renegotiation completes only with the client's Finished).
"""

from __future__ import annotations

import hashlib
import random
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from peers import CertFiles, PeerProcess, require_tool
from test_backpressure import HELD_BOUND, held
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twistedharness import server_options
from zope.interface import implementer

from twisted_rekey import PeerRefused, RekeyProtocolMixin

TOTAL = 8 << 20
#: A renegotiation is asked for after every so many bytes written.
EVERY = 1 << 20
CHUNK = 64 << 10
#: Our renegotiations' own deadline: past every wait of these tests.
TIMEOUT = 120.0
#: What each wait of these tests allows.
WAIT = 60.0
STACKS = ["python-ssl", "openssl"]

READER = Path(__file__).parent / "drivers" / "tls_reader.py"
DATA = random.Random(7).randbytes(TOTAL)


@implementer(IPushProducer)
class Streamer(RekeyProtocolMixin, protocol.Protocol):
    """
    Writes the factory's data as a streaming producer, asking for a
    renegotiation after every ``factory.every`` bytes.
    """

    factory: Any

    def connectionMade(self) -> None:
        self.data: bytes = self.factory.data
        self.sent = 0
        self.paused = True
        self.peak = 0
        self.results: list[Any] = []
        self.reason: Any = None
        self.factory.made.callback(self)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        every = self.factory.every
        while not self.paused and self.sent < len(self.data):
            chunk = self.data[self.sent : self.sent + CHUNK]
            self.transport.write(chunk)  # type: ignore[union-attr]
            self.sent += len(chunk)
            self.peak = max(self.peak, held(self.transport))
            if self.sent % every == 0 and self.sent < len(self.data):
                d = self.renegotiate(timeout=TIMEOUT)
                d.addBoth(self.results.append)
        if self.sent >= len(self.data) and self.transport is not None:
            self.done()

    def done(self) -> None:
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.factory.lost.callback(None)


class ReadPausingStreamer(Streamer):
    """
    Also stops reading while it is paused, as protocols do that must not
    take in more than they can send (an echo; Twisted's HTTP channel
    between requests).
    """

    def pauseProducing(self) -> None:
        super().pauseProducing()
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]
        super().resumeProducing()

    def done(self) -> None:
        # No producer any more, so nothing would resume reading the
        # client's close.
        self.transport.resumeProducing()  # type: ignore[union-attr]
        super().done()


def _client(stack: str, certs: CertFiles, port: int, refuse: bool) -> PeerProcess:
    if stack == "python-ssl":
        argv = [sys.executable, str(READER), "--port", str(port)]
        argv += ["--ca", str(certs.ca_cert), "--bytes", str(TOTAL), "--timeout", "50"]
        if refuse:
            argv.append("--refuse-renegotiation")
        peer = PeerProcess(argv)
    else:
        openssl = require_tool("openssl")
        # s_client hands what it decrypts to stdout: hashed by sha256sum,
        # its own chatter (stderr) left out.
        command = (
            f"{shlex.quote(openssl)} s_client -connect 127.0.0.1:{port} -tls1_2 "
            f"-CAfile {shlex.quote(str(certs.ca_cert))} -quiet "
            + ("-no_renegotiation " if refuse else "")
            + f"</dev/null 2>/dev/null | head -c {TOTAL} | sha256sum"
        )
        peer = PeerProcess(["sh", "-c", command])
    peer.name = stack
    return peer


async def _stream(
    certs: CertFiles,
    stack: str,
    every: int,
    refuse: bool = False,
    kind: type[Streamer] = Streamer,
) -> tuple[Streamer, PeerProcess]:
    """
    Stream TOTAL bytes to *stack*'s client, renegotiating every *every*
    bytes, until the connection is lost and the client has exited.
    """
    from twisted.internet import reactor

    factory = protocol.Factory.forProtocol(kind)
    factory.data = DATA  # type: ignore[attr-defined]
    factory.every = every  # type: ignore[attr-defined]
    factory.made = defer.Deferred()  # type: ignore[attr-defined]
    factory.lost = defer.Deferred()  # type: ignore[attr-defined]
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0, factory, server_options(certs, "1.2"), interface="127.0.0.1"
    )
    client = _client(stack, certs, port.getHost().port, refuse)
    try:
        client.start()
        made = factory.made  # type: ignore[attr-defined]
        server: Streamer = await made.addTimeout(WAIT, reactor)
        await factory.lost.addTimeout(WAIT, reactor)  # type: ignore[attr-defined]
        # The reader's verdict, or sha256sum's once s_client has exited.
        await client.when_seen(r"^(RESULT|ERROR) |^[0-9a-f]{64}", WAIT)
    finally:
        client.stop()
        await port.stopListening()
    return server, client


@pytest.mark.parametrize("kind", [Streamer, ReadPausingStreamer])
@pytest.mark.parametrize("stack", STACKS)
@pytest_twisted.ensureDeferred
async def test_producer_paused_while_our_renegotiation_runs(
    cert_files: CertFiles, stack: str, kind: type[Streamer]
) -> None:
    """
    Paused, and (for ReadPausingStreamer) its own pause of the connection's
    reading not let through: the ClientHello is read all the same.
    """
    server, client = await _stream(cert_files, stack, EVERY, kind=kind)
    assert server.sent == TOTAL, server.reason
    digest = hashlib.sha256(DATA).hexdigest()
    if stack == "python-ssl":
        assert f"RESULT bytes={TOTAL} sha256={digest}" in client.output
    else:
        assert digest in client.output, client.output
    # Each renegotiation asked for ran to its end, one after another: the
    # producer waited for each instead of writing past it.
    expected = TOTAL // EVERY - 1
    assert server.results == [None] * expected
    assert server.rekeyStats.renegotiations == expected
    assert server.peak <= HELD_BOUND, server.peak


@pytest.mark.parametrize("stack", STACKS)
@pytest_twisted.ensureDeferred
async def test_paused_producer_and_a_client_that_refuses(
    cert_files: CertFiles, stack: str
) -> None:
    """
    The client answers our HelloRequest with a no_renegotiation alert.
    OpenSSL ends a server's connection then (handshake_failure: an
    application that asked to renegotiate "expects it to succeed"): the
    producer paused behind the HelloRequest is stopped with the connection,
    the renegotiation fails with PeerRefused, nothing hangs, and what the
    client read before it is the stream's beginning.
    """
    server, client = await _stream(cert_files, stack, TOTAL // 2, refuse=True)
    [refused] = server.results
    assert refused.check(PeerRefused), refused
    assert server.reason is not None and not server.reason.check(ConnectionDone)
    assert server.rekeyStats.renegotiations == 0
    assert server.peak <= HELD_BOUND, server.peak
    if stack == "python-ssl":
        match = re.search(r"^ERROR .* after (\d+) bytes", client.output, re.M)
        assert match is not None, client.output
        assert int(match[1]) >= TOTAL // 2 - CHUNK, client.output
