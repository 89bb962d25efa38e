"""
``twistd -n rekey-tunnel``: a TLS tunnel whose keys rotate by policy, so
that software which knows nothing of TLS or key rotation gets both.

Each connection accepted on ``--listen`` gets one connection to
``--connect``, and the bytes flow both ways.  Whichever side is an ``ssl:``
(or ``tls:``) endpoint speaks TLS and rotates its keys by the rotation
options: TLS in front of a plain service (``--listen ssl:... --connect
tcp:...``), or plain in and TLS out (``--listen tcp:... --connect
tls:...``), or both.  The listening side can require client certificates
(``--client-ca`` and allow-lists), the connecting side present one; on
SIGHUP the certificate, key and CA files are read again for new
connections, and the connections already open rotate their keys.

This module must never buffer without bound: each side is the producer of
the other side's transport (when one side's send buffer fills, the other
side stops being read), and until the outbound connection is ready the
inbound one is not read at all; what arrives before the relay is wired is
at most one read, and a side that overflows that bound is dropped, as is a
connection not relayed within ``SETUP_TIMEOUT`` seconds.  A plain side
whose far end half-closes (TCP FIN) has it passed on: a FIN to a plain
peer, a close_notify to a TLS one (which is still read until its own
close_notify); when a side goes altogether, the other is closed once what
it still has to send is sent.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional, cast

from OpenSSL import crypto
from twisted.application import service
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import (  # type: ignore[import-untyped]
    alsoProvides,
    implementer,
)

from twisted_rekey import (
    RekeyMetrics,
    RekeyProtocolMixin,
    RotationPolicy,
    protocol_version,
)

from ._common import (
    DEFAULT_MIN_INTERVAL,
    AllowList,
    CommandLineOptions,
    EndpointSpec,
    ListeningService,
    MetricsOptionsMixin,
    ReloadableServerTLS,
    RotationOptionsMixin,
    ServerCertificate,
    ServerCertificateMixin,
    TLSVersionMixin,
    checkCertificate,
    clientRefusal,
    describePeer,
    describePolicy,
    describeReason,
    describeStats,
    describeTLS,
    installOneLineErrors,
    loadCertificateAuthorities,
    metricsService,
    parseEndpoint,
    parseSeconds,
    requireClientCertificates,
)

__all__ = [
    "MAX_PENDING",
    "SETUP_TIMEOUT",
    "CertificateReloader",
    "Options",
    "RelayFactory",
    "RelaySide",
    "WatchFiles",
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


@implementer(IPushProducer, IHalfCloseableProtocol)
class RelaySide(RekeyProtocolMixin, Protocol):
    """
    One side of a relayed connection.  Over TLS it rotates by
    :attr:`rotationPolicy`; it is *ready* once connected (plain) or once its
    handshake completed (TLS).  It is the producer of its peer's transport,
    so that a peer that cannot send fast enough stops this side's reading.

    Over plain TCP it takes a half-close (Twisted calls
    :meth:`readConnectionLost`; a TLS transport never does, since Twisted's
    TLS ends the whole connection at the peer's close_notify).
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
    # The far end of this side sent its last byte (a TCP FIN).
    readClosed = False
    # This side was told that nothing more comes for it: FIN or close_notify
    # sent after what it still has to send.
    writeClosed = False
    # The factory that keeps the open sides (for reloads and metrics).
    relay: Optional[RelayFactory] = None
    #: ``listen`` or ``connect``.
    role = "?"

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.pendingSize = 0

    # -- readiness

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.name = describePeer(self.transport.getPeer())
        if not self.isTLS:
            _keepHalfClose(self, self.transport)
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
        if self.readClosed:
            peer.endWriting(self)

    # -- half-close

    def readConnectionLost(self) -> None:
        """The far end of this (plain) side half-closed: pass it on."""
        if self.readClosed:
            return
        self.readClosed = True
        peer = self.peer
        if self.relaying and peer is not None:
            peer.endWriting(self)
        elif self.orphaned and self.transport is not None:
            self.transport.loseConnection()
        # Not wired yet: relayTo passes it on after what this side holds.
        self.closeIfDone()

    def writeConnectionLost(self) -> None:
        """Our FIN went out (IHalfCloseableProtocol)."""
        self.closeIfDone()

    def endWriting(self, source: RelaySide) -> None:
        """
        *source*, this side's peer, will send nothing more: after what this
        side still has to send, say so to its far end.
        """
        transport = self.transport
        if self.writeClosed or self.lost or transport is None:
            return
        self.writeClosed = True
        if source.producerRegistered:
            # Nothing more to produce; and a TLS transport does not shut
            # down while a producer is registered.
            source.producerRegistered = False
            transport.unregisterProducer()
        _log.info(
            "{command}: {source} half-closed; passing it on to {peer}",
            command=COMMAND,
            source=source.name,
            peer=self.name,
        )
        if self.isTLS:
            # Twisted's TLS sends close_notify after what is buffered and
            # goes on reading until the peer's own close_notify.
            transport.loseConnection()
        else:
            transport.loseWriteConnection()
        self.closeIfDone()

    def closeIfDone(self) -> None:
        """A plain side half-closed both ways is closed."""
        if (
            self.readClosed
            and self.writeClosed
            and not self.isTLS
            and self.transport is not None
            and not self.lost
        ):
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self.relay is not None:
            self.relay.sides.discard(self)
        if self.isTLS and not self.ready:
            self.logHandshakeFailure(reason)
        elif self.isTLS:
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
                # (A plain socket that saw its FIN would only see it again.)
                if not peer.readClosed:
                    transport.resumeProducing()
                # After what it still has to send (loseConnection flushes).
                transport.loseConnection()
        self.relaying = False
        onReady, self.onReady = self.onReady, None
        if onReady is not None:
            onReady.errback(reason)

    def logHandshakeFailure(self, reason: Failure) -> None:
        """Say why a TLS side went before its handshake completed."""
        getHandle = getattr(self.transport, "getHandle", None)
        refusal = clientRefusal(getHandle()) if getHandle is not None else None
        if refusal is not None:
            _log.warn(
                "{command}: {peer}: client certificate refused: {refusal}",
                command=COMMAND,
                peer=self.name,
                refusal=refusal,
                rekey_event="client_certificate_refused",
            )
            return
        _log.warn(
            "{command}: {peer}: TLS handshake failed: {reason}",
            command=COMMAND,
            peer=self.name,
            reason=reason.getErrorMessage(),
        )

    # -- IPushProducer, for the peer's transport

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None and not self.readClosed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def _keepHalfClose(protocol: RelaySide, transport: Any) -> None:
    """
    Make sure a plain TCP transport hands *protocol* its half-close.

    A client endpoint puts its own wrapping protocol between the transport
    and ours, and that wrapper (Twisted's ``endpoints._WrappingProtocol``, up
    to 26.x) declares each interface of ours with ``directlyProvides`` in
    turn, so that only the last one (``IHandshakeListener``, which the
    mixin provides) is kept: the transport then sees no
    ``IHalfCloseableProtocol`` and turns a FIN into a full close.  The
    wrapper does forward ``readConnectionLost``; declare what it forwards.
    """
    outer = getattr(transport, "protocol", None)
    if (
        outer is not None
        and outer is not protocol
        and getattr(outer, "_wrappedProtocol", None) is protocol
        and hasattr(outer, "readConnectionLost")
        and not IHalfCloseableProtocol.providedBy(outer)
    ):
        alsoProvides(outer, IHalfCloseableProtocol)


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
        metrics: Optional[RekeyMetrics] = None,
    ) -> None:
        # Replaced by a certificate reload: the next connections use it.
        self.connector = connector
        self.connectDescription = connectDescription
        self.inboundTLS = inboundTLS
        self.outboundTLS = outboundTLS
        self.policy = policy
        self.metrics = metrics
        #: The sides open now (both roles).
        self.sides: set[RelaySide] = set()

    def keep(self, side: RelaySide, role: str) -> None:
        """Count *side* among the open ones (and in the metrics, if TLS)."""
        side.relay = self
        side.role = role
        self.sides.add(side)
        if side.isTLS and self.metrics is not None:
            self.metrics.track(side, role)

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        inbound = super().buildProtocol(addr)
        assert isinstance(inbound, InboundSide)
        inbound.isTLS = self.inboundTLS
        if self.inboundTLS:
            inbound.rotationPolicy = self.policy
        self.keep(inbound, "listen")
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
                factory.keep(side, "connect")
                side.onReady = Deferred()
                side.onReady.addCallbacks(inbound.outboundReady, inbound.outboundFailed)
                return side

        return OutboundFactory()


class CertificateReloader:
    """
    Reads the certificate, key and CA files again (on SIGHUP): new
    connections use what was read at once, connections already open keep
    running and rotate their traffic keys.  Files that do not load are
    refused with one log line, and the ones in force stay.

    :param options: the parsed :class:`Options` (the files are named there).
    :param relay: the tunnel's factory (its connector is replaced, its open
        sides rotate).
    :param serverTLS: the listening side's connection creator, if TLS.
    """

    def __init__(
        self,
        options: Options,
        relay: RelayFactory,
        serverTLS: Optional[ReloadableServerTLS],
        makeConnector: Callable[[Any], Any],
    ) -> None:
        self.options = options
        self.relay = relay
        self.serverTLS = serverTLS
        self.makeConnector = makeConnector
        self.reloads = 0

    def reload(self) -> bool:
        """Reload now; ``True`` if the new files are in force."""
        options = self.options
        try:
            server = options.serverTLS() if self.serverTLS is not None else None
            client = (
                options.clientOptions(options["connectSpec"], options["versions"])
                if self.relay.outboundTLS
                else None
            )
        except usage.UsageError as e:
            _log.error(
                "{command}: certificate reload refused; the certificates in "
                "force stay: {error}",
                command=COMMAND,
                error=str(e),
                rekey_event="certificate_reload_refused",
            )
            return False
        if server is not None:
            assert self.serverTLS is not None
            self.serverTLS.replace(server[0])
        if client is not None:
            self.relay.connector = self.makeConnector(client)
        self.reloads += 1
        what = []
        if server is not None:
            what.append(f"certificate {server[1].certPath} ({server[1].fingerprint})")
        if options["client-ca"]:
            what.append(f"client CAs {options['client-ca']}")
        if client is not None:
            what.append("the --connect side's trust and certificate")
        _log.info(
            "{command}: certificates reloaded, new connections use them: {what}",
            command=COMMAND,
            what="; ".join(what),
            rekey_event="certificate_reloaded",
        )
        self.rotateOpenConnections()
        return True

    def rotateOpenConnections(self) -> None:
        """
        Rotate the traffic keys of every open TLS side, after a reload; but
        not a side whose keys changed less than the policy's
        ``min_interval`` ago (reloads in a row must not become a burst of
        KeyUpdates: GnuTLS drops a peer at the 9th within a second).
        """
        policy = self.relay.policy
        floor = policy.min_interval if policy is not None else DEFAULT_MIN_INTERVAL
        for side in list(self.relay.sides):
            if not (side.isTLS and side.ready) or side.lost or side.writeClosed:
                continue
            if side.rekeyStats.secondsSinceRotation < floor:
                _log.info(
                    "{command}: {peer}: not rotated after the reload (its keys "
                    "changed less than {floor:g} s ago)",
                    command=COMMAND,
                    peer=side.name,
                    floor=floor,
                )
                continue
            conn = side.transport.getHandle() if side.transport is not None else None
            if conn is None:
                continue
            if (
                side.role == "connect"
                and protocol_version(conn) != "TLSv1.3"
                and not side.renegotiateAsClient
            ):
                # A TLS 1.2 client's renegotiation is refused by most
                # servers, and the refusal ends the connection.
                _log.info(
                    "{command}: {peer}: not rotated after the reload "
                    "(a TLS 1.2 client side)",
                    command=COMMAND,
                    peer=side.name,
                )
                continue
            d = side.rekey()
            d.addCallbacks(
                self._rotated,
                self._notRotated,
                callbackArgs=(side.name,),
                errbackArgs=(side.name,),
            )

    def _rotated(self, _: object, peer: str) -> None:
        _log.info(
            "{command}: {peer}: keys rotated after the certificate reload",
            command=COMMAND,
            peer=peer,
            rekey_event="reload_rotation",
        )

    def _notRotated(self, failure: Failure, peer: str) -> None:
        _log.warn(
            "{command}: {peer}: could not rotate keys after the certificate "
            "reload: {error}",
            command=COMMAND,
            peer=peer,
            error=failure.getErrorMessage(),
            rekey_event="reload_rotation_failed",
        )


class WatchFiles(service.Service):
    """
    Calls *reload* when one of the files *paths* names changes (its
    modification time, size or inode), checked every *interval* seconds.
    """

    def __init__(
        self,
        reload: Callable[[], object],
        paths: Callable[[], list[str]],
        interval: float,
        clock: Any = None,
    ) -> None:
        self.reload = reload
        self.paths = paths
        self.interval = interval
        self.clock = clock
        self.loop: Any = None
        self.seen: dict[str, Optional[tuple[int, int, int]]] = {}

    def state(self) -> dict[str, Optional[tuple[int, int, int]]]:
        found: dict[str, Optional[tuple[int, int, int]]] = {}
        for path in self.paths():
            try:
                st = os.stat(path)
            except OSError:
                found[path] = None
            else:
                found[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return found

    def check(self) -> None:
        now = self.state()
        if now != self.seen:
            changed = sorted(p for p in now if now[p] != self.seen.get(p))
            self.seen = now
            _log.info(
                "{command}: {files} changed; reloading",
                command=COMMAND,
                files=", ".join(changed),
            )
            self.reload()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        from twisted.internet.task import LoopingCall

        self.seen = self.state()
        self.loop = LoopingCall(self.check)
        if self.clock is not None:
            self.loop.clock = self.clock
        self.loop.start(self.interval, now=False)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()  # type: ignore[no-untyped-call]
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.loop = None


class ReloadOnSignal(service.Service):
    """Calls *reload* on SIGHUP, from the reactor, while the service runs."""

    def __init__(self, reload: Callable[[], object], signum: int) -> None:
        self.reload = reload
        self.signum = signum
        self.previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        from twisted.internet import reactor

        reactorAny: Any = reactor

        def handler(signum: int, frame: object) -> None:
            # Out of the signal handler: the reactor runs it next.
            reactorAny.callFromThread(self.reload)

        self.previous = signal.signal(self.signum, handler)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()  # type: ignore[no-untyped-call]
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None


class Options(
    MetricsOptionsMixin,
    TLSVersionMixin,
    RotationOptionsMixin,
    ServerCertificateMixin,
    CommandLineOptions,
):
    """The options of ``twistd rekey-tunnel``."""

    commandName = COMMAND
    synopsis = "--listen ENDPOINT --connect ENDPOINT [options]"
    longdesc = (
        "Relay each connection accepted on --listen to --connect, with TLS on "
        "whichever side is an ssl: (or tls:) endpoint; its keys rotate by the "
        "rotation options.  TLS in front of a plain service: --listen "
        "ssl:8443:interface=127.0.0.1 --connect tcp:127.0.0.1:8080.  Plain in, "
        "TLS out: --listen tcp:8080:interface=127.0.0.1 --connect "
        "tls:example.com:443.  The TLS server side takes --cert/--key (default: "
        "the self-signed localhost certificate) and --client-ca with "
        "--allow-dns/--allow-uri/--allow-cn, the TLS client side --cafile, "
        "--servername, --client-cert and --client-key.  SIGHUP reads the "
        "certificate, key and CA files again."
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
        [
            "client-cert",
            None,
            None,
            "TLS client side: PEM certificate (chain) to present to the server.",
        ],
        [
            "client-key",
            None,
            None,
            "TLS client side: its PEM private key (default: in --client-cert's file).",
        ],
        [
            "client-ca",
            None,
            None,
            "TLS server side: require a client certificate issued by a CA in "
            "this PEM file (mutual TLS).",
        ],
        [
            "watch-files",
            None,
            None,
            "Also reload (as on SIGHUP) when a certificate, key or CA file "
            "changes, checked every this many seconds.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["allow-dns"], self["allow-uri"], self["allow-cn"] = [], [], []

    def opt_allow_dns(self, name: str) -> None:
        """With --client-ca: allow clients with this DNS SAN (repeatable)."""
        self["allow-dns"].append(name)

    def opt_allow_uri(self, uri: str) -> None:
        """With --client-ca: allow clients with this URI SAN (repeatable)."""
        self["allow-uri"].append(uri)

    def opt_allow_cn(self, name: str) -> None:
        """With --client-ca: allow clients with this subject CN (repeatable)."""
        self["allow-cn"].append(name)

    def postOptions(self) -> None:
        for name in ("listen", "connect"):
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        listen = parseEndpoint("--listen", self["listen"], server=True)
        connect = parseEndpoint("--connect", self["connect"], server=False)
        if not (listen.tls or connect.tls):
            raise usage.UsageError(
                "neither --listen nor --connect is an ssl: or tls: endpoint: "
                "there would be no TLS to rotate"
            )
        self["listenSpec"], self["connectSpec"] = listen, connect
        self["policy"] = self.makePolicy()
        self["versions"] = versions = self.tlsVersions()
        self["allow"] = AllowList(
            tuple(self["allow-dns"]), tuple(self["allow-uri"]), tuple(self["allow-cn"])
        )
        self["certificate"] = None
        if listen.tls:
            self["certificate"] = self.loadCertificate(listen.tlsArguments)
            self.clientAuthorities()
        else:
            for option in ("cert", "key", "client-ca"):
                if self[option]:
                    raise usage.UsageError(
                        f"--{option} is for an ssl: or tls: --listen"
                    )
        if self["allow"] and not self["client-ca"]:
            raise usage.UsageError(
                "--allow-dns, --allow-uri and --allow-cn need --client-ca"
            )
        self["clientOptions"] = None
        if connect.tls:
            self["clientOptions"] = self.clientOptions(connect, versions)
        else:
            for option in ("cafile", "servername", "client-cert", "client-key"):
                if self[option]:
                    raise usage.UsageError(
                        f"--{option} is for an ssl: or tls: --connect"
                    )
        self.checkMetrics()
        self["watchInterval"] = None
        if self["watch-files"] is not None:
            self["watchInterval"] = parseSeconds("--watch-files", self["watch-files"])

    def watchedFiles(self) -> list[str]:
        """The files a reload reads."""
        found = [str(c.certPath) for c in [self["certificate"]] if c is not None]
        found += [str(c.keyPath) for c in [self["certificate"]] if c is not None]
        connect: EndpointSpec = self["connectSpec"]
        for option in ("client-ca", "cafile", "client-cert", "client-key"):
            if self[option]:
                found.append(self[option])
        for key in ("certKey", "certificate", "privateKey"):
            if key in connect.tlsArguments:
                found.append(connect.tlsArguments[key])
        return sorted(set(found))

    def clientAuthorities(self) -> Optional[list[Any]]:
        """The CA certificates of ``--client-ca``, read now."""
        if not self["client-ca"]:
            return None
        return loadCertificateAuthorities("--client-ca", self["client-ca"])

    def serverTLS(self) -> tuple[Any, ServerCertificate]:
        """
        Read the listening side's files (again) and make its TLS
        configuration: a new Context, for the connections to come.

        :raises usage.UsageError: if a file does not load.
        """
        listen: EndpointSpec = self["listenSpec"]
        certificate = self.loadCertificate(listen.tlsArguments)
        authorities = self.clientAuthorities()
        tls: Any = certificate.options(self["versions"])
        context = tls.getContext()
        self.limitMaximum(context)
        if authorities is not None:
            requireClientCertificates(context, authorities, self["allow"])
        return tls, certificate

    def clientOptions(self, connect: EndpointSpec, versions: dict[str, Any]) -> Any:
        servername = self["servername"] or connect.host
        if not servername:
            raise usage.UsageError(
                f"--connect {connect.description}: give --servername too"
            )
        trust = None
        if self["cafile"]:
            authorities = loadCertificateAuthorities("--cafile", self["cafile"])
            trust = ssl.trustRootFromCertificates(
                [
                    ssl.Certificate(crypto.X509.from_cryptography(c))  # type: ignore[no-untyped-call]
                    for c in authorities
                ]
            )
        extra = dict(versions)
        clientCertificate = None
        certPath, certOption = self["client-cert"], "--client-cert"
        keyPath, keyOption = self["client-key"], "--client-key"
        for key in ("certKey", "certificate"):
            if key in connect.tlsArguments:
                if certPath is not None:
                    raise usage.UsageError(
                        f"give --client-cert or {key}= in the endpoint string, not both"
                    )
                certPath, certOption = connect.tlsArguments[key], f"{key}="
        if "privateKey" in connect.tlsArguments:
            if keyPath is not None:
                raise usage.UsageError(
                    "give --client-key or privateKey= in the endpoint string, not both"
                )
            keyPath, keyOption = connect.tlsArguments["privateKey"], "privateKey="
        if keyPath is not None and certPath is None:
            raise usage.UsageError(f"{keyOption} needs --client-cert too")
        if certPath is not None:
            if keyPath is None:
                keyPath, keyOption = certPath, certOption
            mine = checkCertificate(certOption, certPath, keyOption, keyPath, None)
            clientCertificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(
                ssl.Certificate(crypto.X509.from_cryptography(mine.chain[0])),  # type: ignore[no-untyped-call]
                ssl.KeyPair(crypto.PKey.from_cryptography_key(mine.key)),  # type: ignore[no-untyped-call]
            )
            extra["extraCertChain"] = [
                crypto.X509.from_cryptography(c) for c in mine.chain[1:]
            ]
        try:
            client: Any = ssl.optionsForClientTLS(
                servername,
                trustRoot=trust,
                clientCertificate=clientCertificate,
                extraCertificateOptions=extra,
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
    if options["client-ca"]:
        allow: AllowList = options["allow"]
        _log.info(
            "{command}: client certificates required, issued by {ca}{allow}",
            command=COMMAND,
            ca=options["client-ca"],
            allow=f", {allow.describe()}" if allow else " (any name)",
        )
    _log.info("{command}: {policy}", command=COMMAND, policy=describePolicy(policy))
    # Any: Twisted's interfaces are not types to mypy without zope's plugin.
    endpointsAny: Any = endpoints
    plainConnector = endpointsAny.clientFromString(reactor, connect.plain)

    def makeConnector(clientOptions: Any) -> Any:
        return endpointsAny.wrapClientTLS(clientOptions, plainConnector)

    connector = plainConnector
    if connect.tls:
        connector = makeConnector(options["clientOptions"])
    metrics = options.makeMetrics()
    relay = RelayFactory(
        connector, connect.description, listen.tls, connect.tls, policy, metrics
    )
    factory: Any = relay
    serverTLS: Optional[ReloadableServerTLS] = None
    if listen.tls:
        serverTLS = ReloadableServerTLS(options.serverTLS()[0])
        factory = TLSMemoryBIOFactory(cast(Any, serverTLS), False, factory)
    # Any: twisted.application is not typed.
    top: Any = cast(Any, service).MultiService()
    listening: Any = ListeningService(
        COMMAND,
        listen.description,
        endpointsAny.serverFromString(reactor, listen.plain),
        factory,
        f"tunnel to {connect.description}",
    )
    listening.setServiceParent(top)
    reloader = CertificateReloader(options, relay, serverTLS, makeConnector)
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None:  # not on Windows: --watch-files instead
        reloading: Any = ReloadOnSignal(reloader.reload, hangup)
        reloading.setServiceParent(top)
    if options["watchInterval"] is not None:
        watching: Any = WatchFiles(
            reloader.reload, options.watchedFiles, options["watchInterval"]
        )
        watching.setServiceParent(top)
    if metrics is not None:
        serving: Any = metricsService(COMMAND, options["metricsSpec"], metrics)
        serving.setServiceParent(top)
    return cast(service.IService, top)
