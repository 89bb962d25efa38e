"""
One connection's TLS 1.2 renegotiations, for the Twisted layer: ours (the
HelloRequest or ClientHello, its deadline, the writes held until the client
answers, the wait for a quiet client), the peer's (counted against the
client-renegotiation limit), refusals either way, and the callers waiting
for the new handshake.

The watcher (``_protocol._Watcher``) makes one :class:`_Renegotiation` the
first time a connection renegotiates or is asked to, so that a TLS 1.3
connection never carries this state.  The info callback records into it
(never raising, never calling back into OpenSSL); :meth:`process` acts once
the read that carried the events has returned.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail

from ._binding import lib
from ._connection import (
    application_protocol,
    handshake_complete,
    protocol_version,
    renegotiate,
    renegotiate_abbreviated,
    renegotiate_pending,
)
from ._policy import KeyUpdateCounter, renegotiation_forbidden
from ._twistedtls import (
    bufferApplicationData,
    hasBufferedApplicationData,
    unbufferApplicationData,
)
from ._waiter import MAX_WAITERS, _Waiter
from .exceptions import (
    AlreadyInProgress,
    ConnectionStateError,
    RekeyTimeout,
    RenegotiationRateLimited,
)

__all__ = ["RENEGOTIATION_DEADLINE"]

#: How long a renegotiation of ours may run, when its caller gave no
#: timeout, before the connection is closed as stuck (seconds).
RENEGOTIATION_DEADLINE = 30.0

#: OpenSSL before 3.0 accepts client-initiated renegotiation by default.
_OPENSSL_BEFORE_3 = lib.OpenSSL_version_num() < 0x30000000


class _Renegotiation:
    """The renegotiation state of one connection, made on first need."""

    __slots__ = (
        "abuseReason",
        "clientRenegotiations",
        "deadline",
        "done",
        "holding",
        "inProgress",
        "ours",
        "policy",
        "quietTimer",
        "refused",
        "refusedByUs",
        "refusedLogged",
        "refusing",
        "starts",
        "waiters",
        "watcher",
    )

    def __init__(self, watcher: Any) -> None:
        #: The connection's ``_protocol._Watcher`` (which imports this
        #: module, not the other way round).
        self.watcher = watcher
        # A handshake after the initial one is running (ours or the peer's).
        self.inProgress = False
        # ... and this side started it.
        self.ours = False
        # The renegotiation running is one the rotation policy asked for
        # (or joined): its driver hears of it from its Deferred.
        self.policy = False
        # A server's own writes wait from its HelloRequest until the
        # client's ClientHello: see holdWrite().
        self.holding = False
        # Closes the connection if a renegotiation of ours never completes.
        self.deadline: Any = None
        # A policy renegotiation waiting for the client to be quiet.
        self.quietTimer: Any = None
        # Recorded by the info callback, acted on by process().
        self.starts = 0
        self.done = 0
        # The peer's no_renegotiation alert arrived (and was logged).
        self.refused = False
        self.refusedLogged = False
        # Ours went out: a client's renegotiation we did not allow.
        self.refusedByUs = False
        # ... in the handshake now running.
        self.refusing = False
        self.waiters: list[_Waiter] | tuple[()] = ()
        # The client's renegotiations, against clientRenegotiationLimit.
        self.clientRenegotiations: KeyUpdateCounter | None = None
        # Why the client is to be dropped (a guard tripped).
        self.abuseReason: str | None = None

    # -- inside OpenSSL (from the watcher's info callback): record only

    def started(self) -> None:
        """A handshake message began a handshake after the initial one."""
        self.inProgress = True
        if not self.ours:
            self.starts += 1
            if self.watcher.isClient is False:
                # Checked per message too: a client renegotiating in a loop
                # is cut before OpenSSL reads its next attempt.
                self.noteClientRenegotiation()

    def finished(self, conn: Any) -> None:
        """A handshake after the initial one reported itself done."""
        if self.refusing:
            # A refused renegotiation also ends with "done": but the keys
            # did not change.
            self.refusing = False
            self.inProgress = False
        # TLS 1.2 reports a finished handshake after a server's
        # HelloRequest too; the renegotiation is still pending then.
        elif not renegotiate_pending(conn):
            self.done += 1

    def alerted(self, byPeer: bool) -> None:
        """A no_renegotiation alert was read (*byPeer*) or sent."""
        if byPeer:
            self.refused = True
        else:
            self.refusedByUs = True
            self.refusing = True

    def noteClientRenegotiation(self) -> None:
        counter = self.clientRenegotiations
        watcher = self.watcher
        if counter is None:
            counter = self.clientRenegotiations = KeyUpdateCounter(
                watcher.owner.clientRenegotiationLimit,
                None,
                events="client-initiated renegotiations",
            )
        reason = counter.add(watcher.clock.seconds())
        if reason is not None and self.abuseReason is None:
            self.abuseReason = reason
            watcher.trip()

    # -- after the read

    def readDone(self) -> None:
        """The TLS protocol's read returned: a completed renegotiation of
        ours needs no deadline any more."""
        deadline = self.deadline
        if deadline is not None and not renegotiate_pending(self.watcher.conn):
            deadline.cancel()
            self.deadline = None

    def discard(self) -> str | None:
        """A guard tripped: forget what the read recorded; why, if this
        side's guard it was."""
        self.starts = self.done = 0
        abuse, self.abuseReason = self.abuseReason, None
        return abuse

    def process(self) -> bool:
        """
        Act on what the info callback recorded: log, drop an abusive
        client, complete the waiters.

        :returns: whether the connection is being dropped.
        """
        watcher = self.watcher
        log = watcher.log
        starts, self.starts = self.starts, 0
        for _ in range(starts):
            if (
                watcher.isClient is False
                and not watcher.owner.allowClientRenegotiation
                and _OPENSSL_BEFORE_3
            ):
                # OpenSSL 3 refuses these itself; older ones accept them.
                self.abuseReason = (
                    "a client-initiated renegotiation, which this server "
                    "does not allow (allowClientRenegotiation is off)"
                )
            log.info(
                "peer started a renegotiation",
                rekey_event="renegotiation_started_by_peer",
            )

        if self.abuseReason is not None and not watcher.lost:
            reason, self.abuseReason = self.abuseReason, None
            self.dropRenegotiator(reason)
            return True

        if self.refusedByUs:
            self.refusedByUs = False
            why = renegotiation_forbidden(application_protocol(watcher.conn))
            log.info(
                "refused a client-initiated renegotiation ({why})",
                rekey_event="client_renegotiation_refused",
                why="not allowed" if why is None else why,
            )
        if self.refused and not self.refusedLogged:
            self.refusedLogged = True
            log.warn(
                "the peer refused to renegotiate",
                rekey_event="renegotiation_refused",
            )

        done, self.done = self.done, 0
        for _ in range(done):
            self.inProgress = False
            self.ours = False
            policy, self.policy = self.policy, False
            count = watcher.renegotiated()
            log.info(
                "renegotiation completed ({version})",
                rekey_event="renegotiation_completed",
                version=protocol_version(watcher.conn),
                count=count,
            )
            rotation = watcher.rotation
            if rotation is not None and not policy:
                # The policy's own renegotiation is reported by its
                # Deferred; anyone else's, before the waiters, from here.
                rotation.renegotiated()
            waiters, self.waiters = self.waiters, ()
            watcher.callHook(watcher.owner.renegotiationCompleted)
            for waiter in list(waiters):
                waiter.succeed()
        return False

    def dropRenegotiator(self, reason: str) -> None:
        self.watcher.log.warn(
            "dropping a client that renegotiates too often: {reason}",
            rekey_event="client_renegotiation_rate_limited",
            reason=reason,
        )
        self.watcher.drop(RenegotiationRateLimited(reason))

    def stop(self) -> None:
        """The connection is lost: no timer of ours may fire."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.cancelQuietWait()

    # -- our writes while ours runs

    def holdWrite(self, data: bytes) -> bool:
        """
        Keep *data* back while our HelloRequest waits for its ClientHello.

        Between the two, OpenSSL would send it, and a client that is then
        in its handshake may take application data for a protocol error (Go's
        crypto/tls does: unexpected_message).  Once the ClientHello is read,
        OpenSSL itself takes no data until the handshake ends.  Held bytes go
        to Twisted's buffer, so they keep their order and come back here after
        the next read; a refusal, the end of the renegotiation or its deadline
        lets them go.

        :returns: whether *data* was held.
        """
        watcher = self.watcher
        conn = watcher.conn
        if (
            watcher.lost
            or self.refused
            or not renegotiate_pending(conn)
            or not handshake_complete(conn)
        ):
            self.holding = False
            return False
        bufferApplicationData(watcher.tls, data)
        return True

    def expired(self, timeout: float) -> None:
        self.deadline = None
        watcher = self.watcher
        if watcher.lost or not renegotiate_pending(watcher.conn):
            return
        if handshake_complete(watcher.conn):
            # The client never answered our HelloRequest (RFC 5246 lets it
            # ignore one): the connection itself is fine.  Our writes go out.
            self.holding = False
            if hasBufferedApplicationData(watcher.tls):
                unbufferApplicationData(watcher.tls)
            return
        watcher.log.error(
            "the renegotiation did not complete within {timeout} s; "
            "closing the connection",
            rekey_event="renegotiation_stuck",
            timeout=timeout,
        )
        watcher.drop(
            RekeyTimeout(f"the renegotiation did not complete within {timeout} s")
        )

    # -- starting one

    def whenQuiet(
        self, quiet: float, timeout: float | None, reason: str
    ) -> Deferred[None]:
        """
        :meth:`renegotiate`, once the client has sent nothing for *quiet*
        seconds.  A client whose application keeps writing while our
        renegotiation runs can put its data between our ServerHello and its
        Finished, which OpenSSL rejects ("unexpected record"), and Java's
        JSSE does; OpenSSL, GnuTLS, Go and Node clients hold their writes
        themselves.  Fails with :class:`RekeyTimeout` if the client is never
        quiet that long within *timeout*; the renegotiation then has
        *timeout* of its own.
        """
        watcher = self.watcher
        clock = watcher.clock
        deadline = RENEGOTIATION_DEADLINE if timeout is None else timeout
        start = clock.seconds()
        result: Deferred[None] = Deferred(lambda _: self.cancelQuietWait())
        # Polled a few times per period (the data path keeps no clock), so
        # that the renegotiation starts soon after the quiet period, not as
        # late as the client's next burst.
        step = quiet / 4
        mark = watcher.bytesReceived
        lastData = start

        def check() -> None:
            nonlocal mark, lastData
            self.quietTimer = None
            now = clock.seconds()
            if watcher.bytesReceived != mark:
                mark = watcher.bytesReceived
                lastData = now
            if watcher.closing():
                result.errback(
                    ConnectionStateError("the connection closed before it was quiet")
                )
            elif now - lastData >= quiet:
                self.renegotiate(False, timeout, reason, policy=True).chainDeferred(
                    result
                )
            elif now - start + quiet > deadline:
                result.errback(
                    RekeyTimeout(
                        f"the peer was never quiet for {quiet} s within "
                        f"{deadline} s: not renegotiating under its traffic"
                    )
                )
            else:
                self.quietTimer = clock.callLater(step, check)

        self.quietTimer = clock.callLater(step, check)
        return result

    def cancelQuietWait(self) -> None:
        if self.quietTimer is not None and self.quietTimer.active():
            self.quietTimer.cancel()
        self.quietTimer = None

    def renegotiate(
        self,
        abbreviated: bool,
        timeout: float | None,
        reason: str,
        policy: bool = False,
    ) -> Deferred[None]:
        """
        Start a renegotiation, or wait for the one running.  With *policy*,
        the rotation driver asked for it: its completion is not reported
        to the driver (the Deferred is).
        """
        watcher = self.watcher
        if watcher.closing():
            return fail(
                ConnectionStateError(
                    "renegotiate() after loseConnection() or connection loss"
                )
            )
        if not (self.inProgress or renegotiate_pending(watcher.conn)):
            try:
                watcher.flushApplication()
                self.ours = True
                if abbreviated:
                    renegotiate_abbreviated(watcher.conn)
                else:
                    renegotiate(watcher.conn)
                self.inProgress = True
                # From the HelloRequest on (a client is in its handshake at
                # once, where OpenSSL holds its writes itself).
                self.holding = watcher.isClient is False
                watcher.flush()
            except Exception:
                self.ours = False
                self.holding = False
                return fail()
            if self.deadline is not None:
                self.deadline.cancel()
            deadline = RENEGOTIATION_DEADLINE if timeout is None else timeout
            self.deadline = watcher.clock.callLater(deadline, self.expired, deadline)
            watcher.log.info(
                "started a renegotiation (abbreviated={abbreviated}, reason: {reason})",
                rekey_event="renegotiation_started",
                abbreviated=abbreviated,
                reason=reason,
            )
        elif len(self.waiters) >= MAX_WAITERS:
            # Calls in a loop must not grow memory.
            return fail(
                AlreadyInProgress(
                    f"{MAX_WAITERS} calls already wait for the running "
                    "renegotiation: wait for one of their Deferreds"
                )
            )
        # A renegotiation already running (ours or the peer's) gives new
        # keys both ways when it completes: wait for that one.
        if policy:
            self.policy = True
        if not isinstance(self.waiters, list):
            self.waiters = []
        return _Waiter(watcher, self.waiters, timeout, "the renegotiation").deferred
