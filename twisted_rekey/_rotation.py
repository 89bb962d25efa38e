"""
Rotate the keys of Twisted TLS connections by themselves, on a
:class:`~twisted_rekey.RotationPolicy`: the reactor-driven adapter around
the sans-IO :class:`~twisted_rekey.RotationSchedule`.

:class:`RotationDriver` (one per connection, made when the handshake of a
:class:`~twisted_rekey.RekeyProtocolMixin` with a ``rotationPolicy``
completes) feeds the schedule what the connection sends and what the peer
rotates, files the schedule's next deadline with the reactor's shared
:class:`~twisted_rekey.RotationScheduler`, and performs the actions the
schedule returns.  :class:`RotatingFactory` gives any existing protocol
factory such a policy without changing its protocol class.

This module decides nothing about *when* to rotate (that is the policy's
job), arms no delayed call of its own (only the shared scheduler does, and
it leaves none behind once every connection is gone), never lets a
Deferred's error go unhandled, and never imports the reactor at module
level.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import (  # type: ignore[import-untyped]
    directlyProvides,
    implementer,
    providedBy,
)

from ._connection import protocol_version, secure_renegotiation_support
from ._policy import (
    RotationAction,
    RotationPolicy,
    RotationSchedule,
    client_renegotiation_refusal,
)
from ._protocol import RekeyProtocolMixin
from ._scheduler import RotationScheduler, schedulerFor
from ._twistedtls import countReceived, findTLS, webConnection
from .exceptions import (
    ConnectionStateError,
    FunctionUnavailable,
    PeerRefused,
    RekeyTimeout,
)

if TYPE_CHECKING:
    from ._protocol import _Watcher

__all__ = ["RotatingFactory", "RotatingProtocol", "RotationDriver", "rekeyableFor"]

_log = Logger()

#: Bucket widths a derived granularity is picked from, so that policies
#: with nearby floors share one scheduler (and one pending call).
_GRANULARITIES = (1.0, 0.5, 0.25, 0.1, 0.05, 0.025)

#: How long a renegotiation of ours may take before the policy hears it
#: failed and tries again later.
RENEGOTIATION_TIMEOUT = 30.0


def granularityFor(policy: RotationPolicy) -> float:
    """
    The timer bucket width that suits *policy*: one second, or less when
    its shortest timed interval is below four seconds, so that rounding a
    deadline up stays within a quarter of that interval.

    :param policy: the policy.
    :returns: a bucket width in seconds.
    """
    timed = [
        x for x in (policy.interval, policy.request_peer_interval) if x is not None
    ]
    target = min([1.0, *(x / 4 for x in timed)])
    for width in _GRANULARITIES:
        if width <= target:
            return width
    return _GRANULARITIES[-1]


class RotationDriver:
    """
    Applies a :class:`~twisted_rekey.RotationPolicy` to one connection of a
    :class:`~twisted_rekey.RekeyProtocolMixin`.

    The mixin makes one when the initial handshake completes (if its
    ``rotationPolicy`` is set) and tells it every application write, every
    rotation of the peer and the loss of the connection; applications only
    read its :attr:`schedule` (through the mixin's ``rotationSchedule``).
    """

    __slots__ = (
        "__weakref__",
        "_armed",
        "_clock",
        "_inFlight",
        "_log",
        "_owner",
        "_pending",
        "_scheduler",
        "_stopped",
        "_timer",
        "schedule",
    )

    def __init__(
        self,
        owner: RekeyProtocolMixin,
        clock: Any,
        scheduler: RotationScheduler,
        schedule: RotationSchedule,
        log: Logger | None = None,
    ) -> None:
        self._owner = owner
        # The connection's logger, so that every event names it.
        self._log = _log if log is None else log
        # Any: IReactorTime's methods are declared without self.
        self._clock: Any = clock
        self._scheduler = scheduler
        #: The policy's state for this connection.
        self.schedule = schedule
        # The one bound method filed with the scheduler: equal to itself, so
        # that it can be rescheduled and cancelled by key.
        self._timer = self._fired
        self._armed: float | None = None
        self._inFlight: RotationAction | None = None
        # A rotation a write made due, performed once that write returned.
        self._pending: Any = None
        self._stopped = schedule.disabled_reason is not None

    @classmethod
    def forWatcher(cls, watcher: _Watcher) -> RotationDriver | None:
        """
        Start the policy of *watcher*'s protocol on its just-completed
        handshake.  Never raises: a failure is logged and leaves the
        connection without rotation.
        """
        owner = watcher.owner
        policy = owner.rotationPolicy
        if policy is None:
            return None
        try:
            return cls._start(watcher, owner, policy)
        except Exception:
            watcher.log.failure(
                "could not start key rotation for this connection",
                rekey_event="rotation_error",
            )
            return None

    @classmethod
    def _start(
        cls, watcher: _Watcher, owner: RekeyProtocolMixin, policy: RotationPolicy
    ) -> RotationDriver:
        if not isinstance(policy, RotationPolicy):
            raise TypeError(
                f"rotationPolicy must be a RotationPolicy, not {type(policy).__name__}"
            )
        conn = watcher.conn
        version = protocol_version(conn)
        secure: bool | None = None
        if version != "TLSv1.3":
            try:
                secure = secure_renegotiation_support(conn)
            except FunctionUnavailable:
                secure = None  # unknown: the policy then leaves TLS 1.2 alone
        cipher = conn.get_cipher_name()
        clock: Any = watcher.clock
        schedule = policy.start(
            clock.seconds(),
            protocol=version,
            cipher=None if cipher is None else str(cipher),
            secure_renegotiation=secure,
        )
        granularity = owner.rotationGranularity or granularityFor(policy)
        driver = cls(
            owner, clock, schedulerFor(clock, granularity), schedule, watcher.log
        )
        reason = schedule.disabled_reason
        if reason is None:
            reason = client_renegotiation_refusal(
                schedule,
                is_client=watcher.isClient,
                allowed=owner.renegotiateAsClient,
                option="renegotiateAsClient",
            )
            if reason is not None:
                driver._stopped = True
        if reason is not None:
            driver._log.info(
                "key rotation disabled for this connection: {reason}",
                rekey_event="rotation_disabled",
                reason=reason,
            )
        else:
            driver._arm()
        return driver

    # -- what the mixin tells us

    def dataSent(self, nbytes: int) -> None:
        """Application bytes were handed to TLS."""
        if self._stopped or not nbytes:
            return
        try:
            self._counted(self.schedule.data_sent(self._clock.seconds(), nbytes))
        except Exception:
            self._crashed()

    def dataReceived(self, nbytes: int) -> None:
        """
        Application bytes arrived under the peer's key: the sum of one read
        from the transport (not one call per record).
        """
        if self._stopped or not nbytes:
            return
        try:
            self._counted(self.schedule.data_received(self._clock.seconds(), nbytes))
        except Exception:
            self._crashed()

    def _counted(self, action: RotationAction | None) -> None:
        if action is not None:
            # Not from inside the write or read: a rotation flushes the
            # writes Twisted still buffers, and the one running now may be
            # Twisted's own flush, which would then send its data twice.
            self._inFlight = action
            self._disarm()
            self._pending = self._clock.callLater(0, self._performPending, action)
        elif self._armed is None:
            # Idle until now (skip_idle): a timed rotation may be due again.
            self._arm()

    def peerRotated(self, requested: bool) -> None:
        """A KeyUpdate from the peer was read."""
        if self._stopped:
            return
        try:
            self.schedule.peer_rotated(self._clock.seconds(), requested=requested)
            self._arm()
        except Exception:
            self._crashed()

    def keyUpdateSent(self, requested: bool) -> None:
        """
        A KeyUpdate went out.  One the policy did not ask for (the
        application's own ``keyUpdate()``) is a new key all the same: the
        schedule starts again from it, instead of rotating again soon after.
        """
        if self._stopped or self._inFlight is not None:
            return  # ours: _perform reports it
        try:
            self.schedule.rotated(self._clock.seconds(), requested_peer=requested)
            self._arm()
        except Exception:
            self._crashed()

    def renegotiated(self) -> None:
        """A renegotiation completed, whoever started it."""
        if self._stopped or self._inFlight is not None:
            # Ours: its Deferred reports it.
            return
        try:
            self.schedule.peer_rotated(self._clock.seconds(), requested=True)
            self._arm()
        except Exception:
            self._crashed()

    def stop(self) -> None:
        """The connection is gone: forget its deadline, ignore what follows."""
        self._stopped = True
        self._disarm()
        pending, self._pending = self._pending, None
        if pending is not None and pending.active():
            pending.cancel()

    # -- timers

    def _arm(self) -> None:
        if self._stopped:
            return
        deadline = self.schedule.get_timer()
        if deadline is None:
            self._disarm()
        elif deadline != self._armed:
            self._armed = deadline
            self._scheduler.schedule(self._timer, deadline)

    def _disarm(self) -> None:
        if self._armed is not None:
            self._armed = None
            self._scheduler.cancel(self._timer)

    def _fired(self, now: float) -> None:
        self._armed = None
        if self._stopped:
            return
        try:
            action = self.schedule.handle_timer(now)
            if action is None:
                self._arm()
            else:
                self._perform(action, now)
        except Exception:
            self._crashed()

    # -- actions

    def _performPending(self, action: RotationAction) -> None:
        self._pending = None
        if self._stopped:
            return
        try:
            self._perform(action, self._clock.seconds())
        except Exception:
            self._crashed()

    def _perform(self, action: RotationAction, now: float) -> None:
        self._inFlight = action
        self._disarm()
        renegotiation = action.method == "renegotiation"
        reason = f"policy: {action.reason}"
        timeout = RENEGOTIATION_TIMEOUT if renegotiation else None
        watcher = self._owner._rekeyWatcher
        if watcher is None:  # pragma: no cover - the watcher made this driver
            d = self._owner._rekeyNow(action.request_peer, reason, timeout)
        else:
            # A KeyUpdate that waits for no answer is done (or failed) when
            # rotate() returns: settled at once, without a Deferred.
            try:
                rotating = watcher.rotate(action.request_peer, timeout, reason)
            except Exception:
                self._settled(Failure(), action, [])  # type: ignore[no-untyped-call]
                return
            if rotating is None:
                self._settled(None, action, [])
                return
            d = rotating
        settled: list[object] = []
        d.addBoth(self._settled, action, settled)
        if not settled and not renegotiation:
            # A KeyUpdate asking the peer to answer: ours was sent, the
            # Deferred waits for the answer, which peerRotated() reports.
            settled.append(None)
            self._inFlight = None
            self.schedule.rotated(now, requested_peer=action.request_peer)
            self._arm()

    def _settled(
        self, result: object, action: RotationAction, settled: list[object]
    ) -> None:
        first = not settled
        settled.append(result)
        if self._stopped:
            return None  # lost while waiting: nothing left to tell the policy
        now = self._clock.seconds()
        if isinstance(result, Failure):
            if not first:
                # The answer to an update request never came (the
                # connection went, or timed out): the request stays
                # outstanding in the policy, as it does on the connection.
                self._log.info(
                    "the peer did not answer a KeyUpdate request: {error}",
                    rekey_event="rotation_request_unanswered",
                    error=result.getErrorMessage(),
                )
                return None
            self._inFlight = None
            self._failed(action, result, now)
            return None
        if first:
            self._inFlight = None
            self.schedule.rotated(now, requested_peer=action.request_peer)
            self._arm()
        return None

    def _failed(self, action: RotationAction, failure: Failure, now: float) -> None:
        # A renegotiation the peer never took up (RFC 5246 lets a client
        # ignore a HelloRequest) stays pending in OpenSSL, which starts no
        # other: asking again would only wait on it again.
        ignored = action.method == "renegotiation" and failure.check(  # type: ignore[no-untyped-call]
            RekeyTimeout
        )
        if ignored or failure.check(  # type: ignore[no-untyped-call]
            PeerRefused, FunctionUnavailable, ConnectionStateError
        ):
            # Asking again would meet the same answer (or the connection is
            # closing): stop for good.
            self.schedule.rotation_failed(now)
            self.stop()
            self._log.warn(
                "key rotation disabled for this connection: {error}",
                rekey_event="rotation_disabled",
                reason=failure.getErrorMessage(),
                error=failure.getErrorMessage(),
            )
            return
        self.schedule.rotation_failed(now)
        self._log.warn(
            "a scheduled {method} failed ({error}); retrying later",
            rekey_event="rotation_failed",
            method=action.method,
            reason=action.reason,
            error=failure.getErrorMessage(),
        )
        self._arm()

    def _crashed(self) -> None:
        self.stop()
        self._log.failure(
            "key rotation stopped for this connection after an internal error",
            rekey_event="rotation_error",
        )


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

    def _rekeyCountReceived(self, watcher: _Watcher) -> None:
        # Count on the TLS side, where the bytes leave OpenSSL, so that
        # nothing is set on the application's protocol (which may be a
        # proxy that swaps what it forwards to, as Site's HTTP/2 switch).
        countReceived(watcher.conn, watcher)


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
