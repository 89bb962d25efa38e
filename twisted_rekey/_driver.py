"""
Apply a :class:`~twisted_rekey.RotationPolicy` to one Twisted connection:
the reactor-driven adapter around the sans-IO
:class:`~twisted_rekey.RotationSchedule`.

:class:`RotationDriver` feeds the schedule what the connection carries and
what others rotate, files the schedule's next deadline with the reactor's
shared :class:`~twisted_rekey.RotationScheduler`, and performs the actions
the schedule returns through a :class:`Rotator`: the one thing it knows of
the connection.  The Twisted layer (:mod:`twisted_rekey._protocol`) makes
one per connection with :func:`startRotation` and tells it only of the
rotations it did not start itself; nothing here imports that layer.

This module decides nothing about *when* to rotate (that is the policy's
job), arms no delayed call of its own beyond one ``callLater(0)`` for a
rotation a write made due (only the shared scheduler times deadlines), never
lets a Deferred's error go unhandled, and never imports the reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from ._connection import start_schedule
from ._policy import (
    RotationAction,
    RotationPolicy,
    RotationSchedule,
    client_renegotiation_refusal,
)
from ._scheduler import RotationScheduler, schedulerFor
from .exceptions import (
    ConnectionStateError,
    FunctionUnavailable,
    PeerRefused,
    RekeyTimeout,
)

if TYPE_CHECKING:
    from OpenSSL import SSL
    from twisted.internet.defer import Deferred

__all__ = [
    "RENEGOTIATION_TIMEOUT",
    "RotationDriver",
    "Rotator",
    "granularityFor",
    "startRotation",
]

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


class Rotator(Protocol):
    """
    What a :class:`RotationDriver` drives: one connection's rotation.
    """

    def rotate(
        self, requestPeer: bool, timeout: float | None, reason: str
    ) -> Deferred[None] | None:
        """
        Rotate now: a KeyUpdate on TLS 1.3, a renegotiation on TLS 1.2.

        A rotation made here is the driver's own: it must not come back to
        the driver as :meth:`RotationDriver.keyUpdateSent` or
        :meth:`RotationDriver.renegotiated`.

        :returns: ``None`` when the rotation is complete on return (a
            KeyUpdate that waits for no answer); otherwise a Deferred that
            fires once it is (a renegotiation, the peer's answer to
            ``update_requested``).
        :raises Exception: what the Deferred would have failed with, for a
            rotation that returns ``None``.
        """


def startRotation(
    rotator: Rotator,
    conn: SSL.Connection,
    clock: Any,
    policy: object,
    *,
    isClient: bool | None,
    renegotiateAsClient: bool,
    granularity: float | None,
    log: Logger,
) -> RotationDriver | None:
    """
    Start *policy* on *conn*, whose handshake has just completed.  Never
    raises: a failure is logged and leaves the connection without rotation.

    :param rotator: performs the rotations.
    :param conn: the connection, for its protocol version and cipher.
    :param clock: an ``IReactorTime``.
    :param policy: a :class:`~twisted_rekey.RotationPolicy` (anything else
        is logged as an error).
    :param isClient: this side's role, ``None`` if unknown.
    :param renegotiateAsClient: whether a TLS 1.2 client renegotiates.
    :param granularity: the timer bucket width; ``None`` derives it from
        the policy.
    :param log: the connection's logger.
    :returns: the driver, or ``None`` if the policy could not start.
    """
    try:
        if not isinstance(policy, RotationPolicy):
            raise TypeError(
                f"rotationPolicy must be a RotationPolicy, not {type(policy).__name__}"
            )
        schedule = start_schedule(policy, conn, clock.seconds())
        scheduler = schedulerFor(clock, granularity or granularityFor(policy))
        driver = RotationDriver(rotator, clock, scheduler, schedule, log)
        reason = schedule.disabled_reason
        if reason is None:
            reason = client_renegotiation_refusal(
                schedule,
                is_client=isClient,
                allowed=renegotiateAsClient,
                option="renegotiateAsClient",
            )
            if reason is not None:
                driver._stopped = True
        if reason is not None:
            log.info(
                "key rotation disabled for this connection: {reason}",
                rekey_event="rotation_disabled",
                reason=reason,
            )
        else:
            driver._arm()
        return driver
    except Exception:
        log.failure(
            "could not start key rotation for this connection",
            rekey_event="rotation_error",
        )
        return None


class RotationDriver:
    """
    Applies a :class:`~twisted_rekey.RotationPolicy` to one connection.

    Its owner tells it every application write and read, every rotation of
    the peer, the rotations of ours it did not ask for, and the loss of the
    connection; applications only read its :attr:`schedule` (through the
    mixin's ``rotationSchedule``).
    """

    __slots__ = (
        "__weakref__",
        "_armed",
        "_clock",
        "_log",
        "_pending",
        "_rotator",
        "_scheduler",
        "_stopped",
        "schedule",
    )

    def __init__(
        self,
        rotator: Rotator,
        clock: Any,
        scheduler: RotationScheduler,
        schedule: RotationSchedule,
        log: Logger | None = None,
    ) -> None:
        self._rotator = rotator
        # The connection's logger, so that every event names it.
        self._log = _log if log is None else log
        # Any: IReactorTime's methods are declared without self.
        self._clock: Any = clock
        self._scheduler = scheduler
        #: The policy's state for this connection.
        self.schedule = schedule
        self._armed: float | None = None
        # A rotation a write made due, performed once that write returned.
        self._pending: Any = None
        self._stopped = schedule.disabled_reason is not None

    # -- what the connection tells us

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
        A KeyUpdate the policy did not ask for went out (the application's
        own ``keyUpdate()``): a new key all the same, from which the
        schedule starts again instead of rotating again soon after.
        """
        if self._stopped or self._pending is not None:
            return  # the policy's own rotation is about to follow
        try:
            self.schedule.rotated(self._clock.seconds(), requested_peer=requested)
            self._arm()
        except Exception:
            self._crashed()

    def renegotiated(self) -> None:
        """A renegotiation the policy did not ask for completed."""
        if self._stopped or self._pending is not None:
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
            self._scheduler.schedule(self, deadline)

    def _disarm(self) -> None:
        if self._armed is not None:
            self._armed = None
            self._scheduler.cancel(self)

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

    # What the scheduler calls: the driver itself is the key it files, and
    # no bound method per connection is kept for it.
    __call__ = _fired

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
        self._disarm()
        renegotiation = action.method == "renegotiation"
        timeout = RENEGOTIATION_TIMEOUT if renegotiation else None
        try:
            rotating = self._rotator.rotate(
                action.request_peer, timeout, f"policy: {action.reason}"
            )
        except Exception:
            self._failed(action, Failure(), now)  # type: ignore[no-untyped-call]
            return
        if rotating is None:
            # A KeyUpdate that waits for no answer: done on return, without
            # a Deferred (this runs N/interval times a second).
            self._rotated(action, now)
        elif renegotiation or rotating.called:
            rotating.addCallbacks(
                self._settled,
                self._settledFailed,
                callbackArgs=(action,),
                errbackArgs=(action,),
            )
        else:
            # A KeyUpdate asking the peer to answer: ours went out, the
            # Deferred waits for the answer, which peerRotated() reports.
            self._rotated(action, now)
            rotating.addErrback(self._unanswered)

    def _rotated(self, action: RotationAction, now: float) -> None:
        self.schedule.rotated(now, requested_peer=action.request_peer)
        self._arm()

    def _settled(self, result: object, action: RotationAction) -> None:
        if self._stopped:
            return  # lost while waiting: nothing left to tell the policy
        try:
            self._rotated(action, self._clock.seconds())
        except Exception:
            self._crashed()

    def _settledFailed(self, failure: Failure, action: RotationAction) -> None:
        if self._stopped:
            return
        try:
            self._failed(action, failure, self._clock.seconds())
        except Exception:
            self._crashed()

    def _unanswered(self, failure: Failure) -> None:
        # The answer to an update request never came (the connection went,
        # or timed out): the request stays outstanding in the policy, as it
        # does on the connection.
        if not self._stopped:
            self._log.info(
                "the peer did not answer a KeyUpdate request: {error}",
                rekey_event="rotation_request_unanswered",
                error=failure.getErrorMessage(),
            )

    def _failed(self, action: RotationAction, failure: Failure, now: float) -> None:
        self.schedule.rotation_failed(now)
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
            self.stop()
            self._log.warn(
                "key rotation disabled for this connection: {error}",
                rekey_event="rotation_disabled",
                reason=failure.getErrorMessage(),
                error=failure.getErrorMessage(),
            )
            return
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
