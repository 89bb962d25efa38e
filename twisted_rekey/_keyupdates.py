"""
One connection's TLS 1.3 KeyUpdates, for the Twisted layer: ours (sent at
once, or held until the sending rate peers accept allows one, and the wait
for the peer's answer to update_requested), the peer's (recorded as each is
read, counted against the flood guard, answered when asked, logged at a
bounded rate), and the callers waiting on the peer.

The watcher (``_protocol._Watcher``) makes one :class:`_KeyUpdates` the
first time a KeyUpdate is sent, read or asked for, so that a connection
that never rotates (and every TLS 1.2 one) carries none of this state.  The
info callback records into it (never raising, never calling back into
OpenSSL); :meth:`process` acts once the read that carried the KeyUpdates
has returned.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from ._connection import KeyUpdateType, get_key_update_type, key_update
from ._policy import KeyUpdateCounter
from ._waiter import MAX_WAITERS, _Waiter, failAll
from .exceptions import (
    AlreadyInProgress,
    ConnectionStateError,
    FunctionUnavailable,
    KeyUpdateFlood,
    PeerRefused,
    RekeyError,
    RotationRateLimited,
)

__all__ = ["LOG_INTERVAL"]

#: At most one event of each kind about the peer's KeyUpdates per this many
#: seconds and connection; the events between are counted in the next one.
LOG_INTERVAL = 1.0

_NOT_REQUESTED = KeyUpdateType.NOT_REQUESTED


class _Throttle:
    """
    Lets one log event through per :data:`LOG_INTERVAL`, counting the ones
    held back, so that no peer can make the log grow faster than that.
    """

    __slots__ = ("held", "last")

    def __init__(self) -> None:
        #: Counted and not reported yet.
        self.held = 0
        self.last = -LOG_INTERVAL

    def due(self, now: float, n: int = 1) -> bool:
        """Count *n* events; whether to report :attr:`held` now."""
        self.held += n
        if now - self.last < LOG_INTERVAL:
            return False
        self.last = now
        return True


class _KeyUpdates:
    """The KeyUpdate state of one connection, made on first need."""

    __slots__ = (
        "answerDue",
        "answeredLog",
        "bytesAtLastSent",
        "bytesAtLastUpdate",
        "floodReason",
        "heldUpdates",
        "inbound",
        "lastReason",
        "lastRequested",
        "outbound",
        "peerUpdates",
        "peerWaiters",
        "received",
        "receivedLog",
        "requestOutstanding",
        "requested",
        "requestsUnlogged",
        "sent",
        "sentLog",
        "watcher",
    )

    def __init__(self, watcher: Any) -> None:
        #: The connection's ``_protocol._Watcher`` (which imports this
        #: module, not the other way round): its clock, logger, byte counts
        #: and flushes.
        self.watcher = watcher
        #: KeyUpdates sent (answers included), read, and sent with
        #: update_requested: the connection's figures.
        self.sent = 0
        self.received = 0
        self.requested = 0
        # Read by the info callback, acted on by process(): whether each
        # asked for an answer.
        self.peerUpdates: list[bool] | tuple[()] = ()
        # Our update_requested is unanswered: a second request would rotate
        # our keys again and wait for the same answer.
        self.requestOutstanding = False
        # The answer to our own update_requested is still to come: asked
        # for, so never counted by the guard.
        self.answerDue = False
        # The lists below are made on first use, empty tuples until then.
        self.peerWaiters: list[_Waiter] | tuple[()] = ()
        # The application's KeyUpdates waiting for the sending rate.
        self.heldUpdates: list[tuple[Any, Deferred[None]]] | tuple[()] = ()
        # The flood guard: the peer's unasked KeyUpdates, checked as each
        # one is read.  Made with the first one it counts.
        self.inbound: KeyUpdateCounter | None = None
        # Every KeyUpdate of ours on the wire, answers included: what peers
        # accept bounds it.
        self.outbound: KeyUpdateCounter | None = None
        # The watcher's bytesReceived (bytesSent) when the last KeyUpdate
        # was read (sent): the data path keeps one counter only, the
        # KeyUpdate path compares.
        self.bytesAtLastUpdate = 0
        self.bytesAtLastSent = 0
        self.floodReason: str | None = None
        self.receivedLog = _Throttle()
        self.answeredLog = _Throttle()
        # Our unrequested KeyUpdates: one event per LOG_INTERVAL, which
        # counts the ones between and names the last one's reason.
        self.sentLog = _Throttle()
        self.lastReason = ""
        self.requestsUnlogged = 0
        self.lastRequested = False

    # -- inside OpenSSL: record only, never raise, never call SSL_* that
    # -- could re-enter the state machine.

    def read(self) -> None:
        """The peer's KeyUpdate was just read."""
        watcher = self.watcher
        # Right after reading it, a pending update_not_requested on our
        # side means the peer asked us to answer.
        try:
            requested = get_key_update_type(watcher.conn) == _NOT_REQUESTED
        except FunctionUnavailable:
            # Unknown in this build; OpenSSL still answers a request with
            # our next write.
            requested = False
        updates = self.peerUpdates
        if isinstance(updates, list):
            updates.append(requested)
        else:
            self.peerUpdates = [requested]
        watcher.dirty = True
        if self.answerDue:
            # The answer to our request: asked for, not counted.
            self.answerDue = False
        else:
            self.checkRate()

    def wrote(self) -> None:
        """One KeyUpdate of ours was just written."""
        watcher = self.watcher
        self.sent += 1
        sent = watcher.bytesSent
        watcher.bytesSentMark = sent
        now = watcher.clock.seconds()
        watcher.lastRotation = now
        outbound = self.outbound
        if outbound is None:
            outbound = self.outbound = KeyUpdateCounter.for_sending()
        if sent != self.bytesAtLastSent:
            self.bytesAtLastSent = sent
            outbound.data()
        outbound.add(now)

    def checkRate(self) -> None:
        """
        Count one unasked KeyUpdate from the peer; past a bound, stop
        reading from it at once.
        """
        watcher = self.watcher
        inbound = self.inbound
        if inbound is None:
            owner = watcher.owner
            inbound = self.inbound = KeyUpdateCounter(
                owner.keyUpdateRateLimit, owner.keyUpdateFloodLimit
            )
        if watcher.bytesReceived != self.bytesAtLastUpdate:
            self.bytesAtLastUpdate = watcher.bytesReceived
            inbound.data()
        reason = inbound.add(watcher.clock.seconds())
        if reason is not None and self.floodReason is None:
            self.floodReason = reason
            watcher.trip()

    # -- after the read: act on what the callback recorded

    def discard(self) -> str | None:
        """
        A guard tripped: forget what the read recorded (counted, never
        answered or reported), and say whether it was ours and why.
        """
        self.received += len(self.peerUpdates)
        self.peerUpdates = ()
        flood, self.floodReason = self.floodReason, None
        return flood

    def dropFlooder(self, reason: str) -> None:
        watcher = self.watcher
        watcher.log.warn(
            "dropping a peer that floods KeyUpdates: {reason}",
            rekey_event="key_update_flood",
            reason=reason,
        )
        watcher.drop(KeyUpdateFlood(reason))

    def process(self, answer: bool) -> None:
        """
        The peer's KeyUpdates of the read that just returned: logged,
        answered (with *answer*), reported to the policy and the
        application, and the callers waiting on them told.
        """
        updates, self.peerUpdates = self.peerUpdates, ()
        if not updates:
            return
        watcher = self.watcher
        clock = watcher.clock
        # Logged in wire order, what the peer sent before our answer;
        # throttled, with the counts of what was not logged one by one.
        self.requestsUnlogged += sum(updates)
        self.lastRequested = updates[-1]
        if self.receivedLog.due(clock.seconds(), len(updates)):
            self.logReceived(self.received + len(updates))
        if answer and any(updates) and not watcher.closing():
            self.answer()
        fire: list[_Waiter] = []
        hook = watcher.owner.keyUpdateReceived
        for requested in updates:
            self.received += 1
            watcher.bytesReceivedMark = watcher.bytesReceived
            watcher.lastRotation = clock.seconds()
            if watcher.rotation is not None:
                watcher.rotation.peerRotated(requested)
            if self.requestOutstanding:
                self.requestOutstanding = False
                fire += self.peerWaiters
                self.peerWaiters = ()
            watcher.callHook(hook, requested)
        # After every hook: code waiting on the Deferred must find the
        # application's own bookkeeping of these updates done, and a new
        # request it sends must not be "answered" by an older update of
        # this same read.
        for waiter in fire:
            waiter.succeed()

    def answer(self) -> None:
        """
        Send the answer the peer asked for, unless an application write in
        the same read already carried it.
        """
        watcher = self.watcher
        try:
            if get_key_update_type(watcher.conn) != _NOT_REQUESTED:
                return
        except FunctionUnavailable:
            return  # nor can we send it; OpenSSL answers with our next write
        try:
            key_update(watcher.conn, False)
        except (RekeyError, SSL.Error):
            watcher.log.failure(
                "could not answer the peer's KeyUpdate",
                rekey_event="key_update_answer_failed",
            )
            return
        watcher.flush()
        if self.answeredLog.due(watcher.clock.seconds()):
            self.logAnswered()

    def logReceived(self, count: int) -> None:
        # Throttled: one event for what arrived since the last one.
        held, self.receivedLog.held = self.receivedLog.held, 0
        requests, self.requestsUnlogged = self.requestsUnlogged, 0
        self.watcher.log.info(
            "peer sent {updates} KeyUpdate(s), {requests} with update_requested",
            rekey_event="key_update_received",
            requested=self.lastRequested,
            updates=held,
            requests=requests,
            count=count,
        )

    def logAnswered(self) -> None:
        held, self.answeredLog.held = self.answeredLog.held, 0
        self.watcher.log.info(
            "answered {answers} KeyUpdate request(s) of the peer",
            rekey_event="key_update_answered",
            answers=held,
        )

    def logSent(
        self, requested: bool, waitingForPeer: bool, reason: str, updates: int
    ) -> None:
        if updates == 1:
            format = "sent a KeyUpdate (update_requested={requested}, reason: {reason})"
        else:
            format = (
                "sent {updates} KeyUpdates (update_requested={requested}) since "
                "the last such event, the last one's reason: {reason}"
            )
        self.watcher.log.info(
            format,
            rekey_event="key_update_sent",
            requested=requested,
            waitingForPeer=waitingForPeer,
            reason=reason,
            updates=updates,
        )

    def logHeld(self) -> None:
        """What the throttled events held back, so that the log adds up."""
        if self.receivedLog.held:
            self.logReceived(self.received)
        if self.answeredLog.held:
            self.logAnswered()
        held, self.sentLog.held = self.sentLog.held, 0
        if held:
            self.logSent(False, False, self.lastReason, held)

    def lost(self, message: str, reason: Failure) -> None:
        """The connection is gone: fail every caller still waiting."""
        waiters, self.peerWaiters = self.peerWaiters, ()
        failAll(waiters, message, reason.value)
        held, self.heldUpdates = self.heldUpdates, ()
        for call, deferred in held:
            if call.active():
                call.cancel()
            error = PeerRefused("the connection was lost before the KeyUpdate was sent")
            error.__cause__ = reason.value
            deferred.errback(error)

    # -- ours

    def keyUpdate(
        self,
        requestPeer: bool,
        timeout: float | None,
        reason: str,
        policy: bool = False,
    ) -> Deferred[None]:
        """
        Send a KeyUpdate, or hold it until the sending rate allows it.
        With *policy*, the rotation driver asked for it: it is not told.
        """
        if requestPeer and len(self.peerWaiters) >= MAX_WAITERS:
            # Calls in a loop must not grow memory: a few callers share
            # the outstanding answer, the rest are told to wait for it.
            return fail(
                AlreadyInProgress(
                    f"{MAX_WAITERS} calls already wait for the peer's answer "
                    "to our KeyUpdate request: wait for one of their Deferreds"
                )
            )
        try:
            if self.watcher.closing():
                raise ConnectionStateError(
                    "keyUpdate() after loseConnection() or connection loss"
                )
            delay = self.sendDelay()
            if delay > 0:
                return self.hold(delay, requestPeer, timeout, reason, policy)
            self.send(requestPeer, reason, policy)
        except Exception:
            return fail()
        if not requestPeer:
            return succeed(None)
        if not isinstance(self.peerWaiters, list):
            self.peerWaiters = []
        return _Waiter(
            self.watcher, self.peerWaiters, timeout, "the peer's KeyUpdate"
        ).deferred

    def sendDelay(self) -> float:
        """
        Seconds until one more KeyUpdate of ours stays within what peers
        accept (KEY_UPDATE_RATE_SENT, KEY_UPDATES_IN_A_ROW_SENT, counted on
        every KeyUpdate we send, answers included): 0 for now.

        :raises RotationRateLimited: when only application data sent by us
            can allow one.
        """
        outbound = self.outbound
        if outbound is None:
            return 0.0  # nothing sent yet
        watcher = self.watcher
        now = watcher.clock.seconds()
        if watcher.bytesSent != self.bytesAtLastSent:
            self.bytesAtLastSent = watcher.bytesSent
            outbound.data()
        allowed = outbound.next_allowed(now)
        if allowed is None:
            raise RotationRateLimited(
                "another KeyUpdate now would exceed what peers accept (too "
                "many in a row without application data sent)"
            )
        return float(allowed - now)

    def hold(
        self,
        delay: float,
        requestPeer: bool,
        timeout: float | None,
        reason: str,
        policy: bool,
    ) -> Deferred[None]:
        """
        The application's KeyUpdate, held until the sending rate allows it;
        at most MAX_WAITERS held at a time.
        """
        if len(self.heldUpdates) >= MAX_WAITERS:
            raise RotationRateLimited(
                f"another KeyUpdate now would exceed what peers accept (too "
                f"many within a second), and {MAX_WAITERS} already wait for "
                f"the rate to allow them; possible again in {delay:.3f} s"
            )

        queue = self.heldUpdates
        if not isinstance(queue, list):
            queue = self.heldUpdates = []

        def cancel(_: object) -> None:
            if entry in queue:
                queue.remove(entry)
            if call.active():
                call.cancel()

        def release() -> None:
            queue.remove(entry)
            self.keyUpdate(requestPeer, timeout, reason, policy).chainDeferred(held)

        held: Deferred[None] = Deferred(cancel)
        call = self.watcher.clock.callLater(delay, release)
        entry = (call, held)
        queue.append(entry)
        return held

    def send(self, requestPeer: bool, reason: str, policy: bool = False) -> None:
        """
        :meth:`keyUpdate` up to the wait for the peer's answer: raises what
        its Deferred would fail with.
        """
        watcher = self.watcher
        if watcher.closing():
            raise ConnectionStateError(
                "keyUpdate() after loseConnection() or connection loss"
            )
        # Never two update_requested outstanding (openssl#32283): a second
        # request while one is unanswered rotates our keys again without
        # asking, and waits for the same answer.
        request = requestPeer and not self.requestOutstanding
        watcher.flushApplication()
        # Whatever asks (a policy, the application), no KeyUpdate of ours
        # goes past the bounds peers enforce.
        delay = self.sendDelay()
        if delay > 0:
            raise RotationRateLimited(
                "another KeyUpdate now would exceed what peers accept (too "
                f"many within a second); possible again in {delay:.3f} s"
            )
        key_update(watcher.conn, request)
        watcher.flush()
        if request:
            self.requestOutstanding = True
            self.answerDue = True
            self.requested += 1
        if watcher.rotation is not None and not policy:
            # A new key the policy did not ask for (the application's own
            # keyUpdate()): its counters start again from here.
            watcher.rotation.keyUpdateSent(request)
        if requestPeer:
            # A caller waits for the peer's answer: its own event, at once
            # (such calls are few: at most MAX_WAITERS wait together, and
            # the sending rate bounds them too).
            self.logSent(request, True, reason, 1)
            return
        # Timed rotations at bulk rates would otherwise cost an event each
        # (a third of the library's time per KeyUpdate, measured).
        self.lastReason = reason
        sentLog = self.sentLog
        if sentLog.due(watcher.clock.seconds()):
            held, sentLog.held = sentLog.held, 0
            self.logSent(False, False, reason, held)
