"""
Rotation timers for many connections on one reactor, with one pending call.

:class:`RotationScheduler` keeps the deadlines of every connection in a
:class:`~twisted_rekey._wheel.TimerWheel` and arms a single
``IReactorTime.callLater`` for the earliest bucket, so that 10,000
connections whose keys rotate every minute wake the reactor about once a
second rather than 10,000 times a minute.

This module only adapts the wheel to a reactor: it decides nothing about
when to rotate (that is :mod:`twisted_rekey._policy`), never imports the
global reactor at import time, and leaves no delayed call behind once no
deadline remains.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._wheel import TimerWheel

__all__ = ["RotationScheduler", "TimerCallback", "schedulerFor"]

_log = Logger()

TimerCallback = Callable[[float], object]
"""
What :meth:`RotationScheduler.schedule` calls when a deadline passes: any
callable taking the current time (``clock.seconds()``).  It is also the key
the deadline is filed under, so pass the same object (a bound method
compares equal to itself: ``self.rotationTimerFired``) to cancel it.
"""


class _DelayedCall(Protocol):
    # The part of IDelayedCall used here, for mypy without the zope plugin.
    def getTime(self) -> float: ...
    def cancel(self) -> None: ...
    def reset(self, secondsFromNow: float) -> None: ...
    def active(self) -> bool: ...


class _Clock(Protocol):
    # The part of IReactorTime used here.
    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> _DelayedCall: ...


# Per clock, the schedulers connections share: under ``None`` the one
# forReactor() hands out, under a granularity the others schedulerFor() made.
_shared: weakref.WeakKeyDictionary[
    object, dict[float | None, weakref.ref[RotationScheduler]]
] = weakref.WeakKeyDictionary()


def _registered(
    clock: object, key: float | None, make: Callable[[], RotationScheduler]
) -> RotationScheduler:
    byKey = _shared.setdefault(clock, {})
    ref = byKey.get(key)
    scheduler = ref() if ref is not None else None
    if scheduler is None:
        scheduler = make()
        byKey[key] = weakref.ref(scheduler)
    return scheduler


def schedulerFor(clock: IReactorTime, granularity: float) -> RotationScheduler:
    """
    The scheduler shared by every connection of *clock* that rotates at
    *granularity*: :meth:`RotationScheduler.forReactor` when its
    granularity matches, else one more per (clock, granularity).
    """
    shared = RotationScheduler.forReactor(clock, granularity)
    if shared.granularity == granularity:
        return shared
    return _registered(
        clock, granularity, lambda: RotationScheduler(clock, granularity)
    )


def _delayUntil(now: float, when: float) -> float:
    # The reactor computes now + delay; make sure that sum does not land a
    # rounding error before the bucket time, or the wake-up finds nothing due.
    delay = max(0.0, when - now)
    while now + delay < when:
        delay = math.nextafter(delay, math.inf)
    return delay


class RotationScheduler:
    """
    Calls a callback when its deadline passes, for any number of callbacks,
    with at most one pending delayed call on the reactor.

    Deadlines are absolute times on *clock* (``clock.seconds()``), rounded up
    to *granularity*: a callback never runs before its deadline, and may run
    up to *granularity* seconds after it.  Callbacks due together run in the
    order they were scheduled; one that raises is logged and does not stop
    the others.

    Most code wants the one scheduler shared by all connections of a
    reactor: :meth:`forReactor`.

    :param clock: the reactor's time provider; ``None`` uses the global
        reactor, looked up when first needed.
    :param granularity: the width of a bucket, in seconds (``1.0`` in
        production; tests may use ``0.05``).
    :raises ValueError: if *granularity* is not a finite number > 0.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, clock: IReactorTime | None = None, granularity: float = 1.0
    ) -> None:
        self._clock: _Clock | None = cast("_Clock | None", clock)
        self._wheel: TimerWheel[TimerCallback] = TimerWheel(granularity)
        self._call: _DelayedCall | None = None
        self._callTarget = 0.0
        # Keys popped as due and not yet run; cancel() and schedule() take
        # keys out of it, so that a callback can cancel another due one.
        self._firing: dict[TimerCallback, None] = {}
        self._running = False
        self._now = 0.0
        self._wakeUps = 0

    @classmethod
    def forReactor(
        cls, clock: IReactorTime | None = None, granularity: float = 1.0
    ) -> RotationScheduler:
        """
        The scheduler shared by every connection of one reactor.

        It lives as long as someone holds it or a deadline is pending, and
        a new one is made after that.

        :param clock: the reactor (or a :class:`twisted.internet.task.Clock`);
            ``None`` means the global reactor, imported now.
        :param granularity: used only when a new scheduler has to be made.
        :returns: the shared scheduler of *clock*.

        .. versionadded:: 0.1.0
        """
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        reactor = clock
        return _registered(reactor, None, lambda: cls(reactor, granularity))

    @property
    def clock(self) -> IReactorTime:
        """The time provider, resolved to the global reactor if none was given."""
        return cast(IReactorTime, self._getClock())

    @property
    def granularity(self) -> float:
        """The width of a bucket, in seconds."""
        return self._wheel.granularity

    @property
    def wakeUps(self) -> int:
        """How many times the pending delayed call has fired so far."""
        return self._wakeUps

    def __len__(self) -> int:
        return len(self._wheel) + len(self._firing)

    def __contains__(self, callback: object) -> bool:
        return callback in self._wheel or callback in self._firing

    def _getClock(self) -> _Clock:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast(_Clock, reactor)
        return self._clock

    def schedule(self, callback: TimerCallback, deadline: float) -> float:
        """
        Call *callback* once at *deadline* (rounded up), replacing any
        deadline it had.

        :param callback: called with the current time; also the key the
            deadline is filed under.
        :param deadline: an absolute time on the clock, in seconds.  A
            deadline already past is due at once; but one set by a callback
            while callbacks run waits for the next bucket, so that a
            callback rescheduling itself in the past cannot spin the reactor.
        :returns: the rounded time at which it will be called.
        :raises ValueError: if *deadline* is not finite.

        .. versionadded:: 0.1.0
        """
        self._firing.pop(callback, None)
        if self._running and deadline <= self._now:
            deadline = math.nextafter(self._now, math.inf)
        when = self._wheel.add(callback, deadline)
        if not self._running:
            self._rearm()
        return when

    def cancel(self, callback: TimerCallback) -> bool:
        """
        Forget the deadline of *callback*.  Cancelling one that is not
        scheduled does nothing.

        :param callback: the callback given to :meth:`schedule`.
        :returns: whether it was scheduled.

        .. versionadded:: 0.1.0
        """
        removed = self._wheel.remove(callback)
        if not removed and callback in self._firing:
            del self._firing[callback]
            removed = True
        if removed and not self._running:
            self._rearm()
        return removed

    def getDeadline(self, callback: TimerCallback) -> float | None:
        """
        :param callback: a callback given to :meth:`schedule`.
        :returns: the rounded time at which it will be called, or ``None``.

        .. versionadded:: 0.1.0
        """
        return self._wheel.deadline(callback)

    def _rearm(self) -> None:
        when = self._wheel.next_deadline()
        call = self._call
        if when is None:
            if call is not None:
                self._call = None
                call.cancel()
            return
        if call is not None and self._callTarget == when:
            return
        clock = self._getClock()
        delay = _delayUntil(clock.seconds(), when)
        self._callTarget = when
        if call is not None:
            call.reset(delay)
        else:
            self._call = clock.callLater(delay, self._wakeUp)

    def _wakeUp(self) -> None:
        self._call = None
        self._wakeUps += 1
        now = self._now = self._getClock().seconds()
        firing = self._firing
        firing.update(dict.fromkeys(self._wheel.pop_due(now)))
        self._running = True
        try:
            for callback in list(firing):
                if callback not in firing:
                    continue  # cancelled or rescheduled by an earlier callback
                del firing[callback]
                try:
                    callback(now)
                except Exception:
                    _log.failure(
                        "Rotation timer callback {callback!r} raised",
                        callback=callback,
                    )
        finally:
            self._running = False
            # Only a BaseException leaves keys here; keep them due.
            for callback in firing:
                self._wheel.add(callback, now)
            firing.clear()
            self._rearm()
