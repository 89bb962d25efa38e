"""
A Deferred waiting on the peer (its KeyUpdate, or the end of a
renegotiation), with its optional timeout: what the Twisted layer hands to
the callers of ``keyUpdate(requestPeer=True)`` and ``renegotiate()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from .exceptions import PeerRefused, RekeyTimeout

__all__ = ["MAX_WAITERS"]

#: The most calls that wait together for one answer of the peer (its
#: KeyUpdate, or the end of a renegotiation); one more fails with
#: AlreadyInProgress.
MAX_WAITERS = 8


class _Waiter:
    """One Deferred waiting on the peer, with its optional timeout."""

    __slots__ = ("deferred", "log", "queue", "timer")

    def __init__(
        self,
        watcher: Any,
        queue: list[_Waiter],
        timeout: float | None,
        what: str,
    ) -> None:
        self.queue = queue
        #: The connection's logger (a twisted.logger Logger).
        self.log: Any = watcher.log
        self.deferred: Deferred[None] = Deferred(self.cancel)
        self.timer: Any = None
        if timeout is not None:
            self.timer = watcher.clock.callLater(timeout, self.timedOut, timeout, what)
        queue.append(self)

    def cancel(self, _: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self in self.queue:
            self.queue.remove(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def timedOut(self, timeout: float, what: str) -> None:
        self.timer = None
        self.stop()
        self.log.warn(
            "gave up waiting for {what} after {timeout} s",
            rekey_event="rekey_timeout",
            what=what,
            timeout=timeout,
        )
        self.deferred.errback(RekeyTimeout(f"{what} did not arrive within {timeout} s"))

    def succeed(self) -> None:
        self.stop()
        self.deferred.callback(None)

    def fail(self, error: Exception) -> None:
        self.stop()
        self.deferred.errback(error)


def failAll(
    waiters: Sequence[_Waiter], message: str, cause: BaseException | None
) -> None:
    """
    The connection is gone: fail each of *waiters* with
    ``PeerRefused(message)``, caused by *cause*.
    """
    for waiter in list(waiters):
        error = PeerRefused(message)
        error.__cause__ = cause
        waiter.fail(error)
