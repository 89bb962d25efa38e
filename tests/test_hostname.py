"""
Host name verification survives the mixin.

The mixin installs a per-connection info callback, which OpenSSL calls
*instead of* the Context's.  Twisted before 24 verifies host names in the
Context's info callback, Twisted 26 in a per-connection verify callback: both
must still reject a certificate for the wrong host.  Run this file with the
oldest supported versions too::

    /tmp/venv-old/bin/python -m pytest tests/test_hostname.py -p no:cacheprovider
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twistedharness import client_options, server_options
from zope.interface import implementer

import twisted
from twisted_rekey import RekeyProtocolMixin

TIMEOUT = 10.0


class Plain(protocol.Protocol):
    def connectionMade(self) -> None:
        self.received = bytearray()
        self.lost: Failure | None = None
        self.lostDeferred: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason
        self.lostDeferred.callback(None)


class Rekeying(RekeyProtocolMixin, Plain):
    pass


def _connect(cert_files: Any, host: str, cls: type[Plain]) -> tuple[Any, Any, Any]:
    clock = task.Clock()
    sf = TLSMemoryBIOFactory(
        server_options(cert_files), False, protocol.Factory.forProtocol(Plain), clock
    )
    cf = TLSMemoryBIOFactory(
        client_options(cert_files, host),
        True,
        protocol.Factory.forProtocol(cls),
        clock,
    )
    built: dict[str, Any] = {}

    def build(name: str, factory: Any) -> Any:
        tls = factory.buildProtocol(None)
        # Twisted drops wrappedProtocol on connection loss: keep our own.
        built[name] = tls.wrappedProtocol
        return tls

    _, _, pump = iosim.connectedServerAndClient(
        lambda: build("server", sf), lambda: build("client", cf), clock=clock
    )
    pump.flush()
    return built["client"], built["server"], pump


def _is_verification_error(failure: Failure | None) -> bool:
    from service_identity.exceptions import VerificationError

    return failure is not None and failure.check(VerificationError) is not None


@pytest.mark.parametrize("cls", [Plain, Rekeying], ids=["plain", "mixin"])
def test_wrong_host_rejected(cert_files: Any, cls: type[Plain]) -> None:
    client, server, pump = _connect(cert_files, "wrong.example", cls)
    assert _is_verification_error(client.lost), (twisted.__version__, client.lost)
    client.transport.write(b"secret")
    pump.flush()
    assert bytes(server.received) == b""


@pytest.mark.parametrize("cls", [Plain, Rekeying], ids=["plain", "mixin"])
def test_right_host_accepted(cert_files: Any, cls: type[Plain]) -> None:
    client, server, pump = _connect(cert_files, "localhost", cls)
    assert client.lost is None
    if isinstance(client, Rekeying):
        done: list[Any] = []
        client.keyUpdate().addBoth(done.append)
        pump.flush()
        assert done == [None]
    client.transport.write(b"data")
    pump.flush()
    assert bytes(server.received) == b"data"


@pytest_twisted.ensureDeferred
async def test_wrong_host_rejected_over_sockets(cert_files: Any) -> None:
    from twisted.internet import reactor

    made: defer.Deferred[Rekeying] = defer.Deferred()

    class Client(Rekeying):
        def connectionMade(self) -> None:
            super().connectionMade()
            made.callback(self)

    port = reactor.listenSSL(
        0,
        protocol.Factory.forProtocol(Plain),
        server_options(cert_files),
        interface="127.0.0.1",
    )
    try:
        reactor.connectSSL(
            "127.0.0.1",
            port.getHost().port,
            protocol.ClientFactory.forProtocol(Client),
            client_options(cert_files, "wrong.example"),
            timeout=5,
        )
        client = await made.addTimeout(TIMEOUT, reactor)
        await client.lostDeferred.addTimeout(TIMEOUT, reactor)
        assert _is_verification_error(client.lost)
    finally:
        await port.stopListening()


def test_context_info_callback_still_runs(cert_files: Any) -> None:
    """Whatever the application put on the Context keeps being called."""
    seen: list[int] = []

    class Options:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
            conn = self.inner.clientConnectionForTLS(tlsProtocol)
            return conn

    clock = task.Clock()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.load_verify_locations(str(cert_files.ca_cert))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    ctx.set_info_callback(lambda conn, where, ret: seen.append(where))

    # Declared, as Twisted asks of a context factory (an undeclared one
    # works through a deprecated path, with a LegacyContextFactoryWarning).
    @implementer(IOpenSSLContextFactory)
    class ContextFactory:
        def getContext(self) -> Any:
            return ctx

    sf = TLSMemoryBIOFactory(
        server_options(cert_files), False, protocol.Factory.forProtocol(Plain), clock
    )
    cf = TLSMemoryBIOFactory(
        ContextFactory(),
        True,
        protocol.Factory.forProtocol(Rekeying),
        clock,
    )
    c, _, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(None), lambda: cf.buildProtocol(None), clock=clock
    )
    pump.flush()
    client = c.wrappedProtocol
    assert client.lost is None
    assert seen and any(w & SSL.SSL_CB_HANDSHAKE_DONE for w in seen)
    before = len(seen)
    done: list[Any] = []
    client.keyUpdate().addBoth(done.append)
    pump.flush()
    assert done == [None]
    # Post-handshake messages reach the Context's callback too.
    assert len(seen) > before
