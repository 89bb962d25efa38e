"""
``twistd -n rekey-echo``: a TLS echo server whose connections rotate their
keys by policy, logging every rotation.

With no options it listens on ``127.0.0.1:8443`` with a self-signed
certificate for localhost (made once, kept in a per-user state directory)
and rotates every 5 seconds while data flows.  It is the server the example
client (``examples/echo_client.py``) talks to, and a peer to try a policy
against other TLS stacks (``openssl s_client``, ``gnutls-cli``).

This module must never listen anywhere but loopback by default, and never
buffer more than one read per connection: a client that does not read what
it is sent stops being read from.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from twisted.application import service
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from twisted_rekey import RekeyProtocolMixin, RotationPolicy

from ._common import (
    CommandLineOptions,
    ListeningService,
    MetricsOptionsMixin,
    RotationOptionsMixin,
    ServerCertificate,
    ServerCertificateMixin,
    TLSVersionMixin,
    describePeer,
    describePolicy,
    describeReason,
    describeStats,
    describeTLS,
    installOneLineErrors,
    metricsService,
    parseEndpoint,
    parseSeconds,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "EchoFactory",
    "EchoProtocol",
    "Options",
    "describeReason",
    "makeService",
]

_log = Logger()

COMMAND = "rekey-echo"
DEFAULT_ENDPOINT = "ssl:8443:interface=127.0.0.1"


class EchoProtocol(RekeyProtocolMixin, Protocol):
    """
    Echoes every byte; its keys rotate by :attr:`rotationPolicy` (set by
    :class:`EchoFactory`).
    """

    peerName = "?"

    def connectionMade(self) -> None:
        # Any: Twisted's interfaces declare their methods without self.
        transport: Any = self.transport
        self.peerName = describePeer(transport.getPeer())
        # Its own producer: when the client does not read and our send
        # buffer fills, stop reading from it, rather than buffer its echo.
        # (Echo writes kept back during a renegotiation do not pause it: the
        # mixin keeps the socket read until the handshake ends.)
        transport.registerProducer(transport, True)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        _log.info(
            "{command}: {peer} connected ({tls})",
            command=COMMAND,
            peer=self.peerName,
            tls=describeTLS(self.transport),
        )

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        _log.info(
            "{command}: {peer} closed: {stats}; {why}",
            command=COMMAND,
            peer=self.peerName,
            stats=describeStats(self),
            why=describeReason(reason),
        )


class EchoFactory(Factory):
    """
    Makes :class:`EchoProtocol` instances that rotate by *policy*.

    :param allowClientRenegotiation: accept renegotiations the client starts
        (TLS 1.2; rate-limited by the mixin).
    :param renegotiationQuietPeriod: see
        :attr:`~twisted_rekey.RekeyProtocolMixin.renegotiationQuietPeriod`.
    """

    protocol = EchoProtocol
    noisy = False

    def __init__(
        self,
        policy: Optional[RotationPolicy],
        allowClientRenegotiation: bool = False,
        renegotiationQuietPeriod: Optional[float] = (
            RekeyProtocolMixin.renegotiationQuietPeriod
        ),
    ) -> None:
        self.policy = policy
        self.allowClientRenegotiation = allowClientRenegotiation
        self.renegotiationQuietPeriod = renegotiationQuietPeriod

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        protocol = super().buildProtocol(addr)
        assert isinstance(protocol, EchoProtocol)
        protocol.rotationPolicy = self.policy
        protocol.allowClientRenegotiation = self.allowClientRenegotiation
        protocol.renegotiationQuietPeriod = self.renegotiationQuietPeriod
        return protocol


class Options(
    MetricsOptionsMixin,
    TLSVersionMixin,
    RotationOptionsMixin,
    ServerCertificateMixin,
    CommandLineOptions,
):
    """The options of ``twistd rekey-echo``."""

    commandName = COMMAND
    synopsis = "[options]"
    longdesc = (
        "A TLS echo server whose connections rotate their keys (TLS 1.3 "
        "KeyUpdate, TLS 1.2 renegotiation) by policy, logging each rotation.  "
        "With no options: 127.0.0.1:8443, a self-signed certificate for "
        "localhost, a rotation every 5 seconds while data flows."
    )
    optParameters: list[Any] = [
        [
            "endpoint",
            "e",
            DEFAULT_ENDPOINT,
            "Where to listen: an ssl: endpoint string (such as "
            "ssl:8443:interface=\\:\\:1, or ssl:0:interface=127.0.0.1 for "
            "any free port, logged at start-up).",
        ],
        [
            "renegotiation-quiet",
            None,
            "0.25",
            "TLS 1.2: renegotiate only once the client has sent nothing for "
            "this many seconds (0: at once; Java clients that write during "
            "a renegotiation fail then).",
        ],
    ]
    optFlags: list[Any] = [
        [
            "allow-client-renegotiation",
            None,
            "Accept renegotiations a TLS 1.2 client starts (at most 3 per "
            "10 minutes); refused by default.",
        ],
    ]

    def postOptions(self) -> None:
        spec = parseEndpoint("--endpoint", self["endpoint"], server=True)
        if not spec.tls:
            raise usage.UsageError(
                f"--endpoint {spec.description}: rekey-echo serves TLS: "
                "give an ssl: endpoint string (or tls:)"
            )
        self["endpointSpec"] = spec
        quiet = self["renegotiation-quiet"]
        self["quiet"] = (
            None
            if quiet.strip() in ("0", "0.0")
            else parseSeconds("--renegotiation-quiet", quiet)
        )
        self["policy"] = self.makePolicy()
        self["versions"] = self.tlsVersions()
        self["certificate"] = self.loadCertificate(spec.tlsArguments)
        self.checkMetrics()


def makeService(options: Options) -> service.IService:
    """The ``rekey-echo`` service: listen, echo, rotate."""
    from twisted.internet import endpoints, reactor

    installOneLineErrors(COMMAND)
    spec = options["endpointSpec"]
    certificate: ServerCertificate = options["certificate"]
    certificate.logStartup(COMMAND)
    policy: Optional[RotationPolicy] = options["policy"]
    _log.info("{command}: {policy}", command=COMMAND, policy=describePolicy(policy))
    echo = EchoFactory(
        policy, bool(options["allow-client-renegotiation"]), options["quiet"]
    )
    # Any: Twisted's interfaces are not types to mypy without zope's plugin.
    tls: Any = certificate.options(options["versions"])
    options.limitMaximum(tls.getContext())
    factory = TLSMemoryBIOFactory(tls, False, cast(Any, echo))
    parse: Any = endpoints.serverFromString
    endpoint = parse(reactor, spec.plain)
    listening: Any = ListeningService(
        COMMAND, spec.description, endpoint, factory, "TLS echo"
    )
    metrics = options.makeMetrics()
    if metrics is None:
        return cast(service.IService, listening)
    metrics.trackFactory(echo, "listen")
    # Any: twisted.application is not typed.
    top: Any = cast(Any, service).MultiService()
    listening.setServiceParent(top)
    serving: Any = metricsService(COMMAND, options["metricsSpec"], metrics)
    serving.setServiceParent(top)
    return cast(service.IService, top)
