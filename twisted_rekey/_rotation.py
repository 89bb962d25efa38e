"""
Give any existing Twisted protocol factory a
:class:`~twisted_rekey.RotationPolicy` without changing its protocol class.

:class:`RotatingFactory` returns the factory's own protocol, on Twisted's own
TLS transport, and binds a :class:`~twisted_rekey.RekeyProtocolMixin` to
that transport (:func:`rekeyableFor` reaches it); the mixin's connection
then applies the policy through :mod:`twisted_rekey._driver`.
:class:`RotatingProtocol` is the older wrapper, kept for its users.

This module never imports the reactor at module level.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, cast

from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import (  # type: ignore[import-untyped]
    directlyProvides,
    implementer,
    providedBy,
)

from ._policy import RotationPolicy
from ._protocol import RekeyProtocolMixin
from ._twistedtls import findTLS, webConnection

__all__ = ["RotatingFactory", "RotatingProtocol", "rekeyableFor"]

_log = Logger()


class RotatingProtocol(RekeyProtocolMixin, ProtocolWrapper):
    """
    A :class:`~twisted.protocols.policies.ProtocolWrapper` with
    :class:`~twisted_rekey.RekeyProtocolMixin`, between the TLS transport
    and the application's own protocol, which it leaves unchanged.  Its
    ``keyUpdate()``, ``rekey()`` and ``rekeyStats`` work as the mixin's; the
    wrapped protocol is :attr:`wrappedProtocol`.

    .. versionadded:: 0.1.0
    .. deprecated:: 0.2.0
       :class:`RotatingFactory` no longer builds it: it returns the
       application's own protocol, whose rotation :func:`rekeyableFor`
       reaches.  A wrapper hides the wrapped protocol from
       ``endpoint.connect()`` and the TLS transport from frameworks that
       look for it (Autobahn).
    """

    def handshakeCompleted(self) -> None:
        """Note the handshake, then tell the wrapped protocol if it listens."""
        super().handshakeCompleted()
        wrapped = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()


class _ConnectionRekeyer(RekeyProtocolMixin):
    """
    The rotation of one connection whose protocol is the application's own
    (made by :class:`RotatingFactory`): the mixin's API and watcher, bound
    to the connection's TLS transport instead of mixed into the protocol.
    """

    def __init__(
        self,
        protocol: object,
        tls: TLSMemoryBIOProtocol,
        factory: RotatingFactory,
    ) -> None:
        #: The application's protocol, told of rotations if it has the hooks.
        self.protocol = protocol
        self.transport: Any = tls
        self.rotationPolicy = factory.policy
        self.rotationGranularity = factory.granularity
        self.allowClientRenegotiation = factory.allowClientRenegotiation
        self.renegotiateAsClient = factory.renegotiateAsClient
        if factory.clock is not None:
            self.clock = factory.clock

    def __repr__(self) -> str:
        return f"<rotation of {self.protocol!r}>"

    def _rekeyApplication(self) -> object:
        return self.protocol

    def keyUpdateReceived(self, updateRequested: bool) -> None:
        """Tell the application's protocol, if it has this hook."""
        hook = getattr(self.protocol, "keyUpdateReceived", None)
        if hook is not None:
            hook(updateRequested)

    def renegotiationCompleted(self) -> None:
        """Tell the application's protocol, if it has this hook."""
        hook = getattr(self.protocol, "renegotiationCompleted", None)
        if hook is not None:
            hook()


def rekeyableFor(protocolOrTransport: object) -> RekeyProtocolMixin | None:
    """
    The key rotation API of one TLS connection: ``keyUpdate()``,
    ``renegotiate()``, ``rekey()``, ``rekeyStats`` and
    ``rotationSchedule``, as :class:`~twisted_rekey.RekeyProtocolMixin`
    has them.

    For a protocol built by :class:`RotatingFactory` it returns the object
    that rotates that protocol's connection; for a protocol that mixes in
    :class:`~twisted_rekey.RekeyProtocolMixin` it returns the protocol
    itself.  A transport is accepted as well as a protocol, and so is
    what leads to one: in a twisted.web resource, ``request.channel`` (an
    HTTP/1.1 channel, or an HTTP/2 stream) reaches its connection's.

    :param protocolOrTransport: a protocol (the one ``endpoint.connect()``
        fired with, or ``buildProtocol`` returned), or its transport.
    :returns: the provider of :class:`~twisted_rekey.IRekeyable`, or
        ``None`` when the connection has none (not TLS, not yet TLS before
        ``startTLS``, or not made by a rekeying factory or protocol).

    .. versionadded:: 0.2.0
    """
    if isinstance(protocolOrTransport, RekeyProtocolMixin):
        return protocolOrTransport
    try:
        ref = _owners.get(protocolOrTransport)
    except TypeError:  # not weakly referenceable
        ref = None
    owner = None if ref is None else ref()
    if owner is not None:
        return owner
    # A transport, or a protocol whose transport leads to the TLS one.
    candidate = protocolOrTransport
    for _ in range(3):
        tls = findTLS(candidate)
        if tls is not None:
            found = tls.__dict__.get("_rekeyOwner")
            if found is not None:
                return cast(RekeyProtocolMixin, found)
            if isinstance(tls.wrappedProtocol, RekeyProtocolMixin):
                return tls.wrappedProtocol
            return None
        following = getattr(candidate, "transport", None)
        if following is None:
            # twisted.web's HTTP/2 streams (a request's channel) have no
            # transport of their own: their connection has it.
            following = webConnection(candidate)
        if following is None:
            break
        candidate = following
    return None


# The protocols RotatingFactory built, to their connection's rotation: the
# TLS transport holds the rotation, this only finds it (a proxy such as
# Site's HTTP/1.1-HTTP/2 switch has no transport of its own).
_owners: weakref.WeakKeyDictionary[object, weakref.ref[_ConnectionRekeyer]] = (
    weakref.WeakKeyDictionary()
)


@implementer(IProtocolFactory)
class RotatingFactory:
    """
    Give every connection of an existing protocol factory a key rotation
    policy, without changing the factory or its protocol class::

        factory = RotatingFactory(Site(root), RotationPolicy(interval=3600))
        endpoint = serverFromString(reactor, "ssl:8443:privateKey=key.pem")
        endpoint.listen(factory)

    Nothing stands between the application's protocol and its transport:
    :meth:`buildProtocol` returns what the wrapped factory built (so
    ``endpoint.connect()`` fires with the application's own protocol), and
    its ``transport`` is the TLS transport Twisted made.  The rotation
    attaches to that transport when the connection is made;
    :func:`rekeyableFor` reaches it from the protocol.  Every other
    attribute is the wrapped factory's (read and written through), and so
    are the interfaces it provides: ALPN through
    :class:`~twisted.internet.interfaces.IProtocolNegotiationFactory`
    (twisted.web's ``Site`` keeps its HTTP/2), ``doStart``/``doStop``,
    ``logPrefix``, ``noisy``, a client factory's ``clientConnectionFailed``
    and ``clientConnectionLost``.

    It works wherever a factory does over TLS: ``listenSSL`` and
    ``connectSSL``, ``ssl:`` and ``tls:`` endpoints, ``wrapClientTLS``,
    and a protocol that calls ``startTLS`` itself (rotation then starts
    with the TLS handshake).  Over plain TCP it changes nothing.

    A protocol that has ``keyUpdateReceived(updateRequested)`` or
    ``renegotiationCompleted()`` methods has them called as
    :class:`~twisted_rekey.RekeyProtocolMixin` calls its own.  A protocol
    that already mixes in :class:`~twisted_rekey.RekeyProtocolMixin` is
    given the policy as its ``rotationPolicy`` instead.

    :param wrappedFactory: the application's factory.
    :param policy: when to rotate; ``None`` rotates only when asked
        (through :func:`rekeyableFor`).
    :param clock: the time provider of the rotation timers and timeouts;
        ``None`` uses the TLS transport's clock, else the global reactor.
    :param granularity: the width of a timer bucket in seconds; ``None``
        derives it from the policy (one second unless its interval is below
        four seconds).
    :param allowClientRenegotiation: as a server, accept the
        renegotiations clients start (TLS 1.2), as
        :attr:`RekeyProtocolMixin.allowClientRenegotiation
        <twisted_rekey.RekeyProtocolMixin.allowClientRenegotiation>`.
    :param renegotiateAsClient: let a TLS 1.2 client's policy renegotiate,
        as :attr:`RekeyProtocolMixin.renegotiateAsClient
        <twisted_rekey.RekeyProtocolMixin.renegotiateAsClient>`.

    On TLS 1.2 a rotation is a renegotiation, and a client's is refused by
    OpenSSL 3 servers unless they allow it: the connection would then fail
    ("no renegotiation").  So a client-side policy leaves TLS 1.2
    connections alone (logged once) unless *renegotiateAsClient*; rotate
    TLS 1.2 from the server side.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0
       Returns the application's own protocol instead of a
       :class:`RotatingProtocol` wrapper, and provides what the wrapped
       factory provides.
    """

    _own = frozenset(
        {
            "wrappedFactory",
            "policy",
            "clock",
            "granularity",
            "allowClientRenegotiation",
            "renegotiateAsClient",
        }
    )

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        policy: Optional[RotationPolicy],
        clock: Optional[IReactorTime] = None,
        granularity: Optional[float] = None,
        *,
        allowClientRenegotiation: bool = False,
        renegotiateAsClient: bool = False,
    ) -> None:
        if policy is not None and not isinstance(policy, RotationPolicy):
            raise TypeError(
                f"policy must be a RotationPolicy, not {type(policy).__name__}"
            )
        if granularity is not None and not granularity > 0:
            raise ValueError(f"granularity must be > 0, not {granularity}")
        # Any: IProtocolFactory's methods are declared without self.
        self.wrappedFactory: Any = wrappedFactory
        self.policy = policy
        self.clock = clock
        self.granularity = granularity
        self.allowClientRenegotiation = allowClientRenegotiation
        self.renegotiateAsClient = renegotiateAsClient
        # Whatever the wrapped factory provides (IProtocolNegotiationFactory
        # above all: Twisted offers ALPN protocols only to a factory that
        # provides it), this one provides too.
        directlyProvides(self, providedBy(wrappedFactory))

    def __getattr__(self, name: str) -> Any:
        if name == "wrappedFactory" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self.wrappedFactory, name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._own or name.startswith("__"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.wrappedFactory, name, value)

    def __repr__(self) -> str:
        return f"<RotatingFactory of {self.wrappedFactory!r}>"

    def buildProtocol(self, addr: Any) -> Any:
        """
        The wrapped factory's protocol, unchanged, made to rotate its keys
        once it is connected over TLS (``None`` if the wrapped factory
        returned ``None``).
        """
        built: Any = self.wrappedFactory.buildProtocol(addr)
        if built is None:
            return None
        if isinstance(built, RekeyProtocolMixin):
            # It watches its own connection: only give it the policy.
            built.rotationPolicy = self.policy
            built.rotationGranularity = self.granularity
            if self.clock is not None:
                built.clock = self.clock
            # Only to switch on: a protocol's own class may have them set.
            if self.allowClientRenegotiation:
                built.allowClientRenegotiation = True
            if self.renegotiateAsClient:
                built.renegotiateAsClient = True
            return built
        _watchWhenConnected(built, self)
        return built


def _watchWhenConnected(protocol: Any, factory: RotatingFactory) -> None:
    """
    Attach *factory*'s rotation to *protocol*'s TLS transport once Twisted
    connects them, by shadowing ``makeConnection`` on this one instance for
    that one call (the protocol's class is left alone).
    """
    try:
        original = protocol.makeConnection
    except AttributeError:
        return
    if "makeConnection" in getattr(protocol, "__dict__", {}):
        # Someone else shadows it already: wrapping it could not be undone.
        _refuse(protocol, "its makeConnection is an instance attribute")
        return

    def makeConnection(transport: Any) -> None:
        try:
            del protocol.makeConnection
        except AttributeError:  # pragma: no cover - set just above
            pass
        # Before the application's connectionMade, so that what it writes
        # there is counted.
        _attach(protocol, transport, factory)
        original(transport)

    try:
        protocol.makeConnection = makeConnection
    except (AttributeError, TypeError):
        _refuse(protocol, "it takes no instance attributes (__slots__?)")


def _refuse(protocol: object, why: str) -> None:
    _log.warn(
        "no key rotation for {protocol}: {why}",
        rekey_event="rotation_unavailable",
        protocol=protocol,
        why=why,
    )


def _attach(protocol: Any, transport: Any, factory: RotatingFactory) -> None:
    try:
        tls = findTLS(transport)
        if tls is None:
            startTLS = getattr(transport, "startTLS", None)
            if startTLS is not None:
                _watchStartTLS(protocol, transport, startTLS, factory)
            return
        owner = _ConnectionRekeyer(protocol, tls, factory)
        if owner._rekeyAttach() is not None:
            tls._rekeyOwner = owner  # type: ignore[attr-defined]
            try:
                _owners[protocol] = weakref.ref(owner)
            except TypeError:  # not weakly referenceable: found by transport
                pass
    except Exception:
        _log.failure(
            "could not start key rotation for this connection",
            rekey_event="rotation_error",
        )


def _watchStartTLS(
    protocol: Any, transport: Any, startTLS: Any, factory: RotatingFactory
) -> None:
    # A plain TCP connection that may turn TLS: attach once it does, by
    # shadowing startTLS on this one transport.
    def startTLSAndWatch(*args: Any, **kwargs: Any) -> Any:
        try:
            del transport.startTLS
        except AttributeError:  # pragma: no cover - set just below
            pass
        result = startTLS(*args, **kwargs)
        if findTLS(transport) is not None:
            _attach(protocol, transport, factory)
        return result

    try:
        transport.startTLS = startTLSAndWatch
    except (AttributeError, TypeError):
        _refuse(protocol, "its transport's startTLS cannot be watched")
