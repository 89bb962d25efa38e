"""
``twistd -n rekey-tunnel``: a TLS tunnel whose keys rotate by policy, so
that software which knows nothing of TLS or key rotation gets both.

Each connection accepted on ``--listen`` gets one connection to
``--connect``, and the bytes flow both ways.  Whichever side is an ``ssl:``
endpoint speaks TLS and rotates its keys by the rotation options: TLS in
front of a plain service (``--listen ssl:... --connect tcp:...``), or plain
in and TLS out (``--listen tcp:... --connect ssl:...``), or both.

This module must never buffer without bound: each side is the producer of
the other side's transport (when one side's send buffer fills, the other
side stops being read), and until the outbound connection is ready the
inbound one is not read at all; what arrives before the relay is wired is
at most one read, and a side that overflows that bound is dropped, as is a
connection not relayed within ``SETUP_TIMEOUT`` seconds.  It never
half-closes: when either side goes, the other is closed once what it still
has to send is sent.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from twisted.application import service
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from ._echo import describePeer, describeReason, describeStats, describeTLS
from ._policy import RotationPolicy
from ._protocol import RekeyProtocolMixin
from ._tap import (
    CommandLineOptions,
    EndpointSpec,
    ListeningService,
    RotationOptionsMixin,
    ServerCertificate,
    ServerCertificateMixin,
    TLSVersionMixin,
    describePolicy,
    installOneLineErrors,
    parseEndpoint,
)

__all__ = [
    "MAX_PENDING",
    "SETUP_TIMEOUT",
    "Options",
    "RelayFactory",
    "RelaySide",
    "makeService",
]

_log = Logger()

COMMAND = "rekey-tunnel"

#: The most bytes held for one side before the relay is wired (the other
#: side is then being connected or is handshaking, and this side is paused:
#: at most one read arrives).  A side sending more is dropped.
MAX_PENDING = 1 << 20

#: The most seconds from accepting a connection to relaying it: connecting
#: out and the TLS handshakes of both sides.  Past it both sides are dropped,
#: so that a service that accepts and never answers the handshake, or a
#: client that never starts its own, does not hold two connections for good.
SETUP_TIMEOUT = 30.0


@implementer(IPushProducer)
class RelaySide(RekeyProtocolMixin, Protocol):
    """
    One side of a relayed connection.  Over TLS it rotates by
    :attr:`rotationPolicy`; it is *ready* once connected (plain) or once its
    handshake completed (TLS).  It is the producer of its peer's transport,
    so that a peer that cannot send fast enough stops this side's reading.
    """

    # Any: Twisted's interfaces declare their methods without self, which
    # mypy cannot call without zope's plugin.
    transport: Any
    peer: Optional[RelaySide] = None
    name = "?"
    lost = False
    # The other side is gone: what still arrives has nowhere to go.
    orphaned = False
    # This side is registered as the producer of its peer's transport.
    producerRegistered = False
    isTLS = False
    ready = False
    relaying = False
    onReady: Optional[Deferred[RelaySide]] = None

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.pendingSize = 0

    # -- readiness

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.name = describePeer(self.transport.getPeer())
        if not self.isTLS:
            self.becomeReady()

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self.becomeReady()

    def becomeReady(self) -> None:
        if self.ready:
            return
        self.ready = True
        onReady, self.onReady = self.onReady, None
        if onReady is not None:
            onReady.callback(self)

    # -- relaying

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if self.relaying and peer is not None and peer.transport is not None:
            peer.transport.write(data)
            return
        if self.orphaned:
            return
        self.pending.append(data)
        self.pendingSize += len(data)
        if self.pendingSize > MAX_PENDING:
            _log.warn(
                "{command}: {peer} sent more than {limit} bytes before the "
                "tunnel was ready; dropping it",
                command=COMMAND,
                peer=self.name,
                limit=MAX_PENDING,
            )
            assert self.transport is not None
            self.transport.abortConnection()

    def relayTo(self, peer: RelaySide) -> None:
        """
        Wire this side to *peer*: each becomes the producer of the other's
        transport, and what this side holds is sent on.
        """
        assert self.transport is not None and peer.transport is not None
        self.peer = peer
        peer.transport.registerProducer(self, True)
        self.producerRegistered = True
        self.relaying = True
        pending, self.pending, self.pendingSize = self.pending, [], 0
        if pending:
            peer.transport.writeSequence(pending)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self.isTLS:
            _log.info(
                "{command}: {peer} closed: {stats}; {why}",
                command=COMMAND,
                peer=self.name,
                stats=describeStats(self),
                why=describeReason(reason),
            )
        peer, self.peer = self.peer, None
        if peer is not None and peer.peer is self:
            peer.peer = None
            peer.relaying = False
            peer.orphaned = True
            transport = peer.transport
            if transport is not None and not peer.lost:
                # This side was the producer of the peer's transport: a TLS
                # transport does not shut down while one is registered.
                if self.producerRegistered:
                    transport.unregisterProducer()
                # The peer may be paused because this side could not keep
                # up; it must read again to see the close (TLS close_notify).
                transport.resumeProducing()
                # After what it still has to send (loseConnection flushes).
                transport.loseConnection()
        self.relaying = False
        onReady, self.onReady = self.onReady, None
        if onReady is not None:
            onReady.errback(reason)

    # -- IPushProducer, for the peer's transport

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class InboundSide(RelaySide):
    """An accepted connection: not read until its outbound side is ready."""

    factory: RelayFactory
    # Its outbound side, once the outbound connection is made.
    outbound: Optional[RelaySide] = None
    # Drops both sides if they are not relaying within SETUP_TIMEOUT.
    setupTimer: Any = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        super().connectionMade()
        self.transport.pauseProducing()
        clock = self.factory.clock
        if clock is None:
            from twisted.internet import reactor as clock
        self.setupTimer = clock.callLater(SETUP_TIMEOUT, self.setupTimedOut)
        outbound = self.factory.outbound(self)
        self.connecting = self.factory.connector.connect(outbound)
        self.connecting.addErrback(self.outboundFailed)

    def outboundReady(self, outbound: RelaySide) -> None:
        """
        The outbound side connected (and handshook): hold its reading until
        this side is ready too, then start reading this side.
        """
        assert outbound.transport is not None
        if self.lost or self.transport is None:
            outbound.transport.loseConnection()
            return
        outbound.peer = self
        outbound.transport.pauseProducing()
        if self.ready:
            self.wire(outbound)
        else:
            self.onReady = Deferred()
            self.onReady.addCallback(lambda _: self.wire(outbound))
            self.onReady.addErrback(lambda _: None)
        self.transport.resumeProducing()

    def wire(self, outbound: RelaySide) -> None:
        assert outbound.transport is not None
        if outbound.peer is not self:  # the outbound side went meanwhile
            return
        self.stopSetupTimer()
        _log.info(
            "{command}: relaying {inbound} ({inTLS}) <-> {outbound} ({outTLS})",
            command=COMMAND,
            inbound=self.name,
            inTLS=describeTLS(self.transport) if self.isTLS else "plain",
            outbound=outbound.name,
            outTLS=describeTLS(outbound.transport) if outbound.isTLS else "plain",
        )
        self.relayTo(outbound)
        outbound.relayTo(self)
        outbound.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.stopSetupTimer()
        connecting = getattr(self, "connecting", None)
        if connecting is not None and not connecting.called:
            connecting.cancel()
        outbound = self.outbound
        if (
            outbound is not None
            and not outbound.orphaned
            and not outbound.lost
            and outbound.transport is not None
        ):
            # Not wired yet (handshaking, or waiting for this side's
            # handshake): nothing it holds or will read has anywhere to go.
            outbound.orphaned = True
            outbound.transport.abortConnection()

    def stopSetupTimer(self) -> None:
        timer, self.setupTimer = self.setupTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def setupTimedOut(self) -> None:
        self.setupTimer = None
        if self.lost or self.transport is None:
            return
        _log.warn(
            "{command}: {peer}: not relaying after {timeout} s (connecting to "
            "{where}, or a TLS handshake, did not finish); dropping it",
            command=COMMAND,
            peer=self.name,
            timeout=SETUP_TIMEOUT,
            where=self.factory.connectDescription,
        )
        # Its outbound side goes with it (connectionLost).
        self.transport.abortConnection()

    def outboundFailed(self, failure: Failure) -> None:
        if self.lost:
            return
        _log.warn(
            "{command}: {peer}: cannot reach {where}: {reason}",
            command=COMMAND,
            peer=self.name,
            where=self.factory.connectDescription,
            reason=failure.getErrorMessage(),
        )
        if self.transport is not None:
            self.transport.loseConnection()


class RelayFactory(Factory):
    """
    Accepts inbound connections and connects each to *connector*.

    :param connector: the outbound endpoint (TLS already wrapped around it
        when the outbound side is TLS).
    :param inboundPolicy: the rotation policy of the inbound side, if TLS.
    :param outboundPolicy: the rotation policy of the outbound side, if TLS.
    """

    protocol = cast(Any, InboundSide)
    noisy = False
    #: The IReactorTime of the setup timeout (None: the reactor).
    clock: Any = None

    def __init__(
        self,
        connector: Any,
        connectDescription: str,
        inboundTLS: bool,
        outboundTLS: bool,
        policy: Optional[RotationPolicy],
    ) -> None:
        self.connector = connector
        self.connectDescription = connectDescription
        self.inboundTLS = inboundTLS
        self.outboundTLS = outboundTLS
        self.policy = policy

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        inbound = super().buildProtocol(addr)
        assert isinstance(inbound, InboundSide)
        inbound.isTLS = self.inboundTLS
        if self.inboundTLS:
            inbound.rotationPolicy = self.policy
        return inbound

    def outbound(self, inbound: InboundSide) -> Any:
        """The factory of *inbound*'s outbound connection."""
        factory = self

        class OutboundFactory(Factory):
            noisy = False

            def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
                side = RelaySide()
                side.factory = self
                inbound.outbound = side
                side.isTLS = factory.outboundTLS
                if factory.outboundTLS:
                    side.rotationPolicy = factory.policy
                side.onReady = Deferred()
                side.onReady.addCallbacks(inbound.outboundReady, inbound.outboundFailed)
                return side

        return OutboundFactory()


class Options(
    TLSVersionMixin, RotationOptionsMixin, ServerCertificateMixin, CommandLineOptions
):
    """The options of ``twistd rekey-tunnel``."""

    commandName = COMMAND
    synopsis = "--listen ENDPOINT --connect ENDPOINT [options]"
    longdesc = (
        "Relay each connection accepted on --listen to --connect, with TLS on "
        "whichever side is an ssl: endpoint; its keys rotate by the rotation "
        "options.  TLS in front of a plain service: --listen "
        "ssl:8443:interface=127.0.0.1 --connect tcp:127.0.0.1:8080.  Plain in, "
        "TLS out: --listen tcp:8080:interface=127.0.0.1 --connect "
        "ssl:example.com:443.  The TLS server side takes --cert/--key (default: "
        "the self-signed localhost certificate), the TLS client side --cafile "
        "and --servername."
    )
    optParameters: list[Any] = [
        ["listen", "l", None, "Where to accept connections: an endpoint string."],
        ["connect", "c", None, "Where to relay them: a client endpoint string."],
        [
            "cafile",
            None,
            None,
            "TLS client side: PEM file of the certificates to trust "
            "(default: the system's trust store).",
        ],
        [
            "servername",
            None,
            None,
            "TLS client side: the name to send (SNI) and to verify in the "
            "server's certificate (default: the --connect host).",
        ],
    ]

    def postOptions(self) -> None:
        for name in ("listen", "connect"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        listen = parseEndpoint("--listen", self["listen"], server=True)
        connect = parseEndpoint("--connect", self["connect"], server=False)
        if not (listen.tls or connect.tls):
            raise usage.UsageError(
                "neither --listen nor --connect is an ssl: endpoint: "
                "there would be no TLS to rotate"
            )
        self["listenSpec"], self["connectSpec"] = listen, connect
        self["policy"] = self.makePolicy()
        self["versions"] = versions = self.tlsVersions()
        self["certificate"] = None
        if listen.tls:
            self["certificate"] = self.loadCertificate(listen.tlsArguments)
        elif self["cert"] or self["key"]:
            raise usage.UsageError("--cert and --key are for an ssl: --listen")
        self["clientOptions"] = None
        if connect.tls:
            self["clientOptions"] = self.clientOptions(connect, versions)
        elif self["cafile"] or self["servername"]:
            raise usage.UsageError(
                "--cafile and --servername are for an ssl: --connect"
            )

    def clientOptions(self, connect: EndpointSpec, versions: dict[str, Any]) -> Any:
        servername = self["servername"] or connect.host
        if not servername:
            raise usage.UsageError(
                f"--connect {connect.description}: give --servername too"
            )
        trust = None
        if self["cafile"]:
            try:
                with open(self["cafile"], "rb") as f:
                    data = f.read()
            except OSError as e:
                raise usage.UsageError(
                    f"--cafile {self['cafile']}: {e.strerror}"
                ) from None
            try:
                trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(data)]  # type: ignore[no-untyped-call]
                )
            except Exception:
                raise usage.UsageError(
                    f"--cafile {self['cafile']}: no PEM certificate in this file"
                ) from None
        try:
            client: Any = ssl.optionsForClientTLS(
                servername, trustRoot=trust, extraCertificateOptions=versions
            )
        except Exception as e:
            raise usage.UsageError(f"--servername {servername}: {e}") from None
        return self.limitClientMaximum(client)


def makeService(options: Options) -> service.IService:
    """The ``rekey-tunnel`` service: listen, connect, relay, rotate."""
    from twisted.internet import endpoints, reactor

    installOneLineErrors(COMMAND)
    listen: EndpointSpec = options["listenSpec"]
    connect: EndpointSpec = options["connectSpec"]
    certificate: Optional[ServerCertificate] = options["certificate"]
    policy: Optional[RotationPolicy] = options["policy"]
    if certificate is not None:
        certificate.logStartup(COMMAND)
    _log.info("{command}: {policy}", command=COMMAND, policy=describePolicy(policy))
    # Any: Twisted's interfaces are not types to mypy without zope's plugin.
    endpointsAny: Any = endpoints
    connector = endpointsAny.clientFromString(reactor, connect.plain)
    if connect.tls:
        connector = endpointsAny.wrapClientTLS(options["clientOptions"], connector)
    relay = RelayFactory(
        connector, connect.description, listen.tls, connect.tls, policy
    )
    factory: Any = relay
    if listen.tls:
        assert certificate is not None
        tls: Any = certificate.options(options["versions"])
        options.limitMaximum(tls.getContext())
        factory = TLSMemoryBIOFactory(tls, False, factory)
    listening: Any = ListeningService(
        COMMAND,
        listen.description,
        endpointsAny.serverFromString(reactor, listen.plain),
        factory,
        f"tunnel to {connect.description}",
    )
    return cast(service.IService, listening)
