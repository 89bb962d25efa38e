"""
Key update and renegotiation for Twisted protocols, on the TLS transports
Twisted already makes (``listenSSL``/``connectSSL``, ``ssl:`` endpoints,
``wrapClientTLS`` with ``optionsForClientTLS``, ``startTLS``, and the
buffering TLS transport Twisted uses by default).

:class:`RekeyProtocolMixin` watches one connection through a *per-connection*
OpenSSL info callback (it fires once per handshake message, never per data
record, so watching costs nothing on bulk data), answers a peer's
KeyUpdate(update_requested) as soon as the read that carried it ends (OpenSSL
alone waits for the application's next write), and turns this side's
rotations into Deferreds and ``twisted.logger`` events.

This module must never replace a callback somebody else installed (it chains
to the Context's and the Connection's own info callbacks, which is where
older Twisted releases verify host names), never let an exception cross into
C, never allow insecure legacy renegotiation, and never import the reactor at
module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from time import time
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from ._binding import ffi, lib
from ._connection import (
    OP_ALLOW_CLIENT_RENEGOTIATION,
    _is_server,
    forbid_renegotiation,
    handshake_complete,
)
from ._driver import RotationDriver, startRotation
from ._infocallback import countReceived, infoCallbackFor
from ._interfaces import IRekeyable
from ._keyupdates import _KeyUpdates
from ._renegotiation import _Renegotiation
from ._twistedtls import (
    aborted,
    bufferApplicationData,
    connectionClosing,
    factoryClock,
    failConnection,
    findTLS,
    finishShutdown,
    flushApplication,
    flushSendBIO,
    patchTLS,
    shutdownTLS,
    tlsConnection,
)
from ._waiter import failAll
from .exceptions import (
    ConnectionStateError,
    RekeyError,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import ITransport

    from ._policy import RotationPolicy, RotationSchedule

__all__ = ["RekeyProtocolMixin", "RekeyStats"]

_LEVELS = frozenset(LogLevel.iterconstants())


class _Logger(Logger):
    """
    A :class:`~twisted.logger.Logger` whose events cost less to build: the
    same keys and values, handed to the same observer.  Every rotation
    emits one, so this runs N/interval times a second.
    """

    def emit(
        self, level: LogLevel, format: str | None = None, **kwargs: object
    ) -> None:
        # Logger.emit checks the level against LogLevel.iterconstants(),
        # which sorts the constants on every call (a fifth of an event's
        # cost); a set answers the same.  Anything unusual takes its path.
        if level not in _LEVELS or "log_trace" in kwargs:
            super().emit(level, format, **kwargs)
        else:
            self._publish(level, format, kwargs)

    def info(self, format: str | None = None, **kwargs: object) -> None:
        """As :meth:`twisted.logger.Logger.info`."""
        # Without Logger.info's second pass of the keyword arguments.
        if "log_trace" in kwargs:
            super().emit(LogLevel.info, format, **kwargs)
        else:
            self._publish(LogLevel.info, format, kwargs)

    def forConnection(self, source: object, connection: int, peer: str) -> _Logger:
        """
        A logger for one connection: its events have *source* (the
        application's protocol) as ``log_source``, and carry *connection*
        (a number unique in this process) and *peer* (the peer's address);
        their ``log_system`` reads as Twisted's own connection prefixes do
        (``Echo,3,127.0.0.1:4433``), so text logs name the connection too.
        """
        return _ConnectionLogger(self, source, connection, peer)

    #: The connection this logger names (see :meth:`forConnection`) and
    #: its peer; ``None`` for the module's logger.
    connection: int | None = None
    peer: str | None = None

    def _publish(
        self, level: LogLevel, format: str | None, event: dict[str, object]
    ) -> None:
        source = self.source
        connection = self.connection
        if connection is not None:
            peer = self.peer
            event["log_system"] = f"{type(source).__name__},{connection},{peer}"
            event["connection"] = connection
            event["peer"] = peer
        # What Logger.emit adds, in the same keys.
        event["log_logger"] = self
        event["log_level"] = level
        event["log_namespace"] = self.namespace
        event["log_source"] = source
        event["log_format"] = format
        event["log_time"] = time()
        # Any: ILogObserver's __call__ is declared without self.
        observer: Any = self.observer
        observer(event)


class _ConnectionLogger(_Logger):
    """
    One connection's logger (see :meth:`_Logger.forConnection`) in five
    slots, its events' fields made as each is emitted: a Logger with its
    instance dict and a dict of fields took some 360 bytes a connection.
    """

    __slots__ = ("connection", "namespace", "observer", "peer", "source")

    def __init__(
        self, parent: _Logger, source: object, connection: int, peer: str
    ) -> None:
        # Logger's three attributes land in the slots.
        super().__init__(parent.namespace, source, parent.observer)
        self.connection = connection
        self.peer = peer


_log = _Logger()

#: Numbers the connections in log events.
_connectionNumbers = count(1)


def _describePeer(tls: Any) -> str:
    """The peer's address as ``host:port`` (``[host]:port`` for IPv6)."""
    try:
        peer = tls.transport.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is None or port is None:
        return str(peer)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# TLS alert no_renegotiation (RFC 5246 §7.2.2).
_ALERT_NO_RENEGOTIATION = 100

_TLS1_3_VERSION = int(lib.TLS1_3_VERSION)
_string = ffi.string
_stateStringLong = lib.SSL_state_string_long
_CB_LOOP = int(lib.SSL_CB_LOOP)
_ST_CONNECT = int(lib.SSL_ST_CONNECT)
_ST_ACCEPT = int(lib.SSL_ST_ACCEPT)
_CB_HANDSHAKE_START = int(lib.SSL_CB_HANDSHAKE_START)
_CB_HANDSHAKE_DONE = int(lib.SSL_CB_HANDSHAKE_DONE)
_CB_ALERT = int(lib.SSL_CB_ALERT)
# SSL_CB_READ (4): in SSL_CB_READ_ALERT but not in SSL_CB_WRITE_ALERT.
_CB_READ = int(lib.SSL_CB_READ_ALERT) & ~_CB_ALERT
_BIO_read = lib.BIO_read
_SENT_SHUTDOWN = SSL.SENT_SHUTDOWN
_RECEIVED_SHUTDOWN = SSL.RECEIVED_SHUTDOWN

_SCRATCH = 16384
_scratchBuffer: list[Any] = []


def _scratch() -> Any:
    """Where trip() discards the bytes of a peer it stopped reading."""
    if not _scratchBuffer:
        _scratchBuffer.append(ffi.new("char[]", _SCRATCH))
    return _scratchBuffer[0]


@dataclass(frozen=True)
class RekeyStats:
    """
    A snapshot of one connection's key rotations.

    "Sent" keys are this side's sending keys (rotated by our KeyUpdates,
    answers included, and by renegotiations); "received" keys are the
    peer's.  Byte counts are application bytes, before TLS framing.

    .. versionadded:: 0.1.0
    """

    #: KeyUpdates this side sent (answers to the peer's requests included).
    keyUpdatesSent: int
    #: KeyUpdates received from the peer.
    keyUpdatesReceived: int
    #: KeyUpdates this side sent with update_requested.
    keyUpdatesRequested: int
    #: Renegotiations completed after the initial handshake (either side's).
    renegotiations: int
    #: Application bytes handed to TLS in total.
    bytesSent: int
    #: Application bytes received in total.
    bytesReceived: int
    #: Application bytes sent since this side's sending keys last changed.
    bytesSentSinceRotation: int
    #: Application bytes received since the peer's sending keys last changed.
    bytesReceivedSinceRotation: int
    #: Clock time of the last rotation in either direction (or of the
    #: handshake), ``None`` before the handshake completed.
    lastRotation: Optional[float]
    #: Seconds since :attr:`lastRotation` (0.0 before the handshake).
    secondsSinceRotation: float


class _Watcher:
    """
    Everything the mixin keeps per connection: the info callback, the
    wrappers around the TLS protocol's read, write and loss, the byte
    counts and the close.  A connection's KeyUpdates
    (:class:`~twisted_rekey._keyupdates._KeyUpdates`: the flood guard, the
    sending rate, the callers waiting on the peer) and its TLS 1.2
    renegotiations (:class:`~twisted_rekey._renegotiation._Renegotiation`)
    have their own objects, made on first need.
    """

    # One per connection: as a dict (past the 30 keys CPython shares
    # between instances) it took ~1.6 KiB a connection.
    __slots__ = (
        "bytesReceived",
        "bytesReceivedMark",
        "bytesSent",
        "bytesSentMark",
        "callbackErrors",
        "clock",
        "closeAfterHandshake",
        "closeTimer",
        "conn",
        "dirty",
        "handshakeNoted",
        "initialDone",
        "isClient",
        "lastRotation",
        "log",
        "lost",
        "owner",
        "previousErrors",
        "reneg",
        "renegotiations",
        "rotation",
        "tls",
        "tlsBufferedWrite",
        "tlsConnectionLost",
        "tlsDataReceived",
        "tlsShutdownTLS",
        "tlsWrite",
        "tripped",
        "updates",
    )

    def __init__(
        self,
        owner: RekeyProtocolMixin,
        tls: Any,
        conn: SSL.Connection,
        clock: Any,
    ) -> None:
        self.owner = owner
        self.tls = tls
        self.conn = conn
        self.clock = clock
        #: This connection's logger: every event names the connection.
        self.log = _log.forConnection(
            owner._rekeyApplication(), next(_connectionNumbers), _describePeer(tls)
        )
        # SSL_is_server where it can be reached (a watcher may attach after
        # the handshake, as after startTLS); the info callback's *where* bits
        # otherwise, once a handshake message passes.
        isServer = _is_server(conn)
        self.isClient: bool | None = None if isServer is None else not isServer
        self.lost = False

        self.renegotiations = 0
        self.bytesSent = 0
        self.bytesReceived = 0
        self.bytesSentMark = 0
        self.bytesReceivedMark = 0
        self.lastRotation: float | None = None

        self.initialDone = handshake_complete(conn)
        self.handshakeNoted = False
        # The owner's rotationPolicy at work, from the handshake on.
        self.rotation: RotationDriver | None = None
        # TLS 1.3 KeyUpdates, made the first time one is sent, read or
        # asked for: see keyUpdates().
        self.updates: _KeyUpdates | None = None
        # TLS 1.2 renegotiations, made the first time one is started or
        # asked for: see renegotiation().
        self.reneg: _Renegotiation | None = None

        # Filled by the info callback (inside SSL_read/SSL_do_handshake),
        # acted on by process() once the TLS protocol's read has returned.
        self.dirty = False
        self.callbackErrors: tuple[BaseException, ...] = ()
        # From the callback we chain to: logged, never fatal (without us,
        # cffi would have printed and ignored them).
        self.previousErrors: tuple[BaseException, ...] = ()
        # Set once a guard tripped: nothing more from this peer is read.
        self.tripped = False
        # loseConnection() met a handshake in progress: close once it ends.
        self.closeAfterHandshake = False
        self.closeTimer: Any = None

        if self.initialDone:
            self.lastRotation = clock.seconds()

        # The one info callback of this Connection chains to the one that
        # would be in effect without us, and to a RekeyConnection's own
        # watching, which keeps counting.
        infoCallbackFor(conn).add(self, takesChainErrors=True)

        if owner.allowClientRenegotiation:
            # Only servers look at this option.
            # Connection.set_options is missing from pyOpenSSL < 25.
            lib.SSL_set_options(conn._ssl, OP_ALLOW_CLIENT_RENEGOTIATION)

        (
            self.tlsDataReceived,
            self.tlsConnectionLost,
            self.tlsWrite,
            self.tlsBufferedWrite,
            self.tlsShutdownTLS,
        ) = patchTLS(tls, self)
        # Counted where the bytes leave OpenSSL, so that nothing is set on
        # the application's protocol (which may be a proxy that swaps what
        # it forwards to, as Site's HTTP/2 switch).
        countReceived(conn, self)

    # -- inside OpenSSL: record only, never raise, never call SSL_* that
    # -- could re-enter the state machine.

    def chainedFailed(self, error: BaseException) -> None:
        self.previousErrors += (error,)
        self.dirty = True

    def observeFailed(self, error: BaseException) -> None:
        self.callbackErrors += (error,)
        self.dirty = True

    def observe(self, ssl: Any, where: int, ret: int) -> None:
        # Three calls per KeyUpdate sent, more per handshake: names bound
        # at import, no method call for the sent count.
        if where & _ST_CONNECT:
            self.isClient = True
        elif where & _ST_ACCEPT:
            self.isClient = False
        if where & _CB_LOOP:
            state = _string(_stateStringLong(ssl))
            if state.endswith(b"key update"):
                updates = self.keyUpdates()
                if b" read " in state:
                    updates.read()
                elif b" write " in state:
                    updates.wrote()
        if where & _CB_HANDSHAKE_START and self.initialDone:
            self.renegotiation().started()
            self.dirty = True
        if where & _CB_HANDSHAKE_DONE:
            if self.initialDone:
                self.renegotiation().finished(self.conn)
            else:
                self.initialDone = True
            self.dirty = True
        if where & _CB_ALERT and (ret & 0xFF) == _ALERT_NO_RENEGOTIATION:
            self.renegotiation().alerted(byPeer=bool(where & _CB_READ))
            self.dirty = True

    def trip(self) -> None:
        """
        A guard tripped, inside OpenSSL: discard what is left of this read
        in the memory BIO, so that OpenSSL finds nothing more to process
        (no further KeyUpdate derived, answered or data delivered) and
        returns; the connection is dropped once it has.  BIO_read on the
        memory BIO is no SSL_* call: it cannot re-enter the state machine.
        """
        self.tripped = True
        self.dirty = True
        bio = getattr(self.conn, "_into_ssl", None)
        if bio is None:  # pragma: no cover - Twisted always uses memory BIOs
            return
        scratch = _scratch()
        # Bounded: the BIO holds at most what the transport read at once.
        while _BIO_read(bio, scratch, _SCRATCH) > 0:
            pass

    # -- wrappers around the TLS protocol and the application protocol

    def dataReceived(self, data: bytes) -> None:
        if self.tripped:
            return  # a guard tripped: nothing more from this peer
        before = self.bytesReceived
        self.tlsDataReceived(self.tls, data)
        reneg = self.reneg
        if reneg is not None:
            reneg.readDone()
        if self.dirty:
            self.process()
        # Once per read, not per record: the policy's count of the bytes
        # the peer's key carried.
        if self.rotation is not None and self.bytesReceived != before:
            self.rotation.dataReceived(self.bytesReceived - before)

    def write(self, data: bytes) -> None:
        reneg = self.reneg
        if reneg is not None and reneg.holding and reneg.holdWrite(data):
            return
        # Counted up front: bufferedWrite() takes back what OpenSSL could
        # not take yet, which is counted when it comes through here again.
        before = self.bytesSent
        self.bytesSent = before + len(data)
        try:
            self.tlsWrite(self.tls, data)
        except IndexError:
            self.peerClosedDuringWrite()
        if self.rotation is not None:
            self.rotation.dataSent(self.bytesSent - before)

    def peerClosedDuringWrite(self) -> None:
        """
        In the middle of a renegotiation SSL_write reads too, and may read
        the peer's close_notify: Twisted's _write then hands the
        ZeroReturnError to _representsEOF, which indexes its empty args.
        The peer closed cleanly: finish as Twisted does when a read meets
        the close_notify, instead of letting IndexError escape.
        """
        tls = self.tls
        conn = tlsConnection(tls)
        if conn is None or not conn.get_shutdown() & _RECEIVED_SHUTDOWN:
            raise
        finishShutdown(tls)

    def bufferedWrite(self, data: bytes) -> None:
        # Only TLSMemoryBIOProtocol._write re-buffers, with bytes that went
        # through write() above.
        self.bytesSent -= len(data)
        if not self.initialDone:
            self.tlsBufferedWrite(self.tls, data)
            return
        # A renegotiation is running (OpenSSL takes no data until it ends).
        # Twisted's own _bufferedWrite would pause the producer, and when
        # that producer is the TLS transport itself (an echo) the socket
        # would no longer be read, the handshake could not complete and
        # nothing would resume it.  bufferApplicationData pauses the
        # producer without letting the pause stop this connection's
        # reading; the bytes wait in Twisted's buffer, which it empties
        # after the read that completes the handshake, and the
        # renegotiation's deadline bounds how long that takes.
        bufferApplicationData(self.tls, data)

    def shutdownTLS(self) -> None:
        self.tlsShutdownTLS(self.tls)
        tls = self.tls
        conn = tlsConnection(tls)
        if (
            self.lost
            or aborted(tls)
            or conn is None
            or not self.initialDone
            or conn.get_shutdown() & _SENT_SHUTDOWN
        ):
            return
        # OpenSSL refuses to shut down in the middle of a handshake (a
        # renegotiation, ours or the peer's): no close_notify went out, and
        # Twisted would never try again, leaving the connection open.  Try
        # again when the handshake ends; abort if the close takes longer
        # than closeTimeout in all.
        self.closeAfterHandshake = True
        if self.closeTimer is None:
            self.closeTimer = self.clock.callLater(
                self.owner.closeTimeout, self.closeTimedOut
            )

    def closeTimedOut(self) -> None:
        self.closeTimer = None
        if self.lost:
            return
        timeout = self.owner.closeTimeout
        self.log.warn(
            "aborting a connection that did not close within {timeout} s of "
            "loseConnection() (a handshake was running)",
            rekey_event="close_timeout",
            timeout=timeout,
        )
        self.tls.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        # What the throttled events held back goes out before the
        # application hears of the loss, so that a log line it writes then
        # (the plugins' "closed: ...") comes after them, as on the wire.
        if self.updates is not None:
            self.updates.logHeld()
        try:
            self.tlsConnectionLost(self.tls, reason)
        finally:
            self.lose(reason)

    def lose(self, reason: Failure) -> None:
        if self.lost:
            return
        self.lost = True
        timer, self.closeTimer = self.closeTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.rotation is not None:
            self.rotation.stop()
        if self.reneg is not None:
            self.reneg.stop()
        if self.dirty:
            self.processEvents(answer=False)
        reneg = self.reneg
        if reneg is not None and reneg.refused:
            message = "the peer refused to renegotiate (no_renegotiation alert)"
        else:
            message = "the connection was lost before the rekey completed"
        updates = self.updates
        if updates is not None:
            # What the throttled events held back, once, so that the log
            # adds up to the connection's figures.
            updates.logHeld()
            updates.lost(message, reason)
        if reneg is not None:
            waiters, reneg.waiters = reneg.waiters, ()
            failAll(waiters, message, reason.value)

    # -- after the read: act on what the callback recorded

    def process(self) -> None:
        self.processEvents(answer=True)

    def processEvents(self, answer: bool) -> None:
        self.dirty = False
        chained, self.previousErrors = self.previousErrors, ()
        for error in chained:
            self.log.failure(
                "the info callback twisted_rekey chains to raised",
                Failure(error),  # type: ignore[no-untyped-call]
                rekey_event="chained_callback_error",
            )
        errors, self.callbackErrors = self.callbackErrors, ()
        for error in errors:
            self.log.failure(
                "twisted_rekey's info callback failed",
                Failure(error),  # type: ignore[no-untyped-call]
                rekey_event="callback_error",
            )
        if errors and not self.lost:
            self.drop(RekeyError(f"internal error while watching: {errors[0]!r}"))
            return

        if self.initialDone and not self.handshakeNoted:
            self.noteHandshake()

        if self.tripped and not self.lost:
            # Before anything the read recorded: a peer past a bound gets
            # no answer, no hook call and no more of our CPU.
            updates = self.updates
            flood = None if updates is None else updates.discard()
            tripping = self.reneg
            abuse = None if tripping is None else tripping.discard()
            if updates is not None and flood is not None:
                updates.dropFlooder(flood)
            else:
                self.renegotiation().dropRenegotiator(abuse or "a guard tripped")
            return

        updates = self.updates
        if updates is not None and updates.peerUpdates:
            updates.process(answer)

        reneg = self.reneg
        if reneg is not None and reneg.process():
            return

        if self.closeAfterHandshake and not self.lost:
            # loseConnection() met a handshake: if it is over, close now
            # (shutdownTLS() waits again if not).
            self.closeAfterHandshake = False
            shutdownTLS(self.tls)

    def callHook(self, hook: Callable[..., object], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            self.log.failure(
                "the application's {hook} raised",
                hook=getattr(hook, "__name__", repr(hook)),
                rekey_event="hook_error",
            )

    def noteHandshake(self) -> None:
        self.handshakeNoted = True
        if self.lastRotation is None:
            self.lastRotation = self.clock.seconds()
        # HTTP/2 over TLS 1.2: no renegotiation either way, whatever the
        # owner allows (the policy, told the protocol, stays off there).
        forbid_renegotiation(self.conn)
        owner = self.owner
        if owner.rotationPolicy is not None and not self.lost:
            self.rotation = startRotation(
                self,
                self.conn,
                self.clock,
                owner.rotationPolicy,
                isClient=self.isClient,
                renegotiateAsClient=owner.renegotiateAsClient,
                granularity=owner.rotationGranularity,
                log=self.log,
            )

    # -- our own rotations

    def closing(self) -> bool:
        return self.lost or connectionClosing(self.tls)

    def flushApplication(self) -> None:
        # BufferingTLSTransport holds small writes until the next reactor
        # turn: push them into TLS first, so they go under the old key.
        flushApplication(self.tls)

    def flush(self) -> None:
        if not flushSendBIO(self.tls):
            raise ConnectionStateError(
                "this Twisted's TLS transport has no _flushSendBIO(): "
                "twisted_rekey cannot send a handshake message while idle"
            )

    def rekeyNow(
        self,
        requestPeer: bool,
        timeout: float | None,
        reason: str,
        policy: bool = False,
    ) -> Deferred[None]:
        # SSL_version() == TLS1_3_VERSION is protocol_version() == "TLSv1.3".
        if lib.SSL_version(self.conn._ssl) == _TLS1_3_VERSION:
            return self.keyUpdates().keyUpdate(
                bool(requestPeer), timeout, reason, policy
            )
        return self.renegotiation().renegotiate(False, timeout, reason, policy)

    def rotate(
        self, requestPeer: bool, timeout: float | None, reason: str
    ) -> Deferred[None] | None:
        """
        The :class:`~twisted_rekey._driver.Rotator` of this connection's
        rotation driver: as :meth:`rekeyNow`, but a KeyUpdate that waits
        for no answer (the usual timed rotation) is complete when this
        returns ``None``, and raises what the Deferred would fail with.  No
        Deferred made and fired for it: this runs N/interval times a
        second.  The driver is not told of what it starts here.
        """
        if lib.SSL_version(self.conn._ssl) != _TLS1_3_VERSION:
            quiet = self.owner.renegotiationQuietPeriod
            if quiet and self.isClient is False:
                return self.renegotiation().whenQuiet(quiet, timeout, reason)
            return self.rekeyNow(requestPeer, timeout, reason, policy=True)
        if requestPeer:
            return self.rekeyNow(requestPeer, timeout, reason, policy=True)
        self.keyUpdates().send(False, reason, policy=True)
        return None

    def keyUpdates(self) -> _KeyUpdates:
        """This connection's KeyUpdate state, made on first need."""
        updates = self.updates
        if updates is None:
            updates = self.updates = _KeyUpdates(self)
        return updates

    def renegotiation(self) -> _Renegotiation:
        """This connection's renegotiation state, made on first need."""
        reneg = self.reneg
        if reneg is None:
            reneg = self.reneg = _Renegotiation(self)
        return reneg

    def renegotiated(self) -> int:
        """A renegotiation completed: new keys both ways.  The count."""
        self.renegotiations += 1
        self.bytesSentMark = self.bytesSent
        self.bytesReceivedMark = self.bytesReceived
        self.lastRotation = self.clock.seconds()
        return self.renegotiations

    def drop(self, error: RekeyError) -> None:
        # The reason the application's connectionLost receives.
        failConnection(self.tls, Failure(error))  # type: ignore[no-untyped-call]

    def stats(self) -> RekeyStats:
        now = self.clock.seconds()
        updates = self.updates
        return RekeyStats(
            keyUpdatesSent=0 if updates is None else updates.sent,
            keyUpdatesReceived=0 if updates is None else updates.received,
            keyUpdatesRequested=0 if updates is None else updates.requested,
            renegotiations=self.renegotiations,
            bytesSent=self.bytesSent,
            bytesReceived=self.bytesReceived,
            bytesSentSinceRotation=self.bytesSent - self.bytesSentMark,
            bytesReceivedSinceRotation=self.bytesReceived - self.bytesReceivedMark,
            lastRotation=self.lastRotation,
            secondsSinceRotation=(
                0.0 if self.lastRotation is None else now - self.lastRotation
            ),
        )


@implementer(IRekeyable, IHandshakeListener)
class RekeyProtocolMixin:
    """
    Key update and renegotiation for a Twisted protocol running over TLS.

    Put it first among the bases, ``class Echo(RekeyProtocolMixin, Protocol)``.
    The mixin starts watching the connection when it is made over TLS, or,
    after ``startTLS``, when the handshake completes (it implements
    :class:`~twisted.internet.interfaces.IHandshakeListener`; a subclass that
    overrides :meth:`handshakeCompleted` or :meth:`makeConnection` must call
    up).  It does not need ``connectionMade``, ``dataReceived`` or
    ``connectionLost`` to call up.

    Behaviour in the awkward cases:

    * A second :meth:`keyUpdate` with *requestPeer* while an earlier request
      is unanswered sends a KeyUpdate that does not ask again (at most one
      update_requested is ever outstanding) and fires with the same answer.
      At most 8 calls wait for one answer together: one more fails at once
      with :class:`~twisted_rekey.AlreadyInProgress` and sends nothing, so
      that no call pattern grows memory without bound.
      Without *requestPeer*, each call sends its own KeyUpdate.
    * A KeyUpdate that would take this side past
      :data:`~twisted_rekey.KEY_UPDATE_RATE_SENT` (what GnuTLS accepts)
      waits until the rate allows it, and its Deferred fires then (at most
      8 wait; one more fails with
      :class:`~twisted_rekey.RotationRateLimited`).  One past
      :data:`~twisted_rekey.KEY_UPDATES_IN_A_ROW_SENT` (rustls, BoringSSL)
      can only be allowed by data we send: :meth:`keyUpdate` fails at once
      with :class:`~twisted_rekey.RotationRateLimited` and sends nothing.
    * :meth:`keyUpdate` on a TLS 1.2 connection (renegotiating or not) fails
      with :class:`~twisted_rekey.WrongProtocolVersion`;
      :meth:`renegotiate` while a renegotiation (either side's) is running
      starts no new one and fires when the running one completes (again at
      most 8 calls wait together; one more fails with
      :class:`~twisted_rekey.AlreadyInProgress`).
    * After ``loseConnection()``, calls fail with
      :class:`~twisted_rekey.ConnectionStateError`; Deferreds still waiting
      when the connection is lost fail with
      :class:`~twisted_rekey.PeerRefused`.
    * Before the handshake completed, calls fail with
      :class:`~twisted_rekey.ConnectionStateError`.
    * While the application writes nothing, the mixin writes the TLS bytes
      of every rotation (its own, and its answers to the peer's requests)
      to the transport itself.

    Configuration, as class or instance attributes:

    :ivar clock: the :class:`~twisted.internet.interfaces.IReactorTime`
        for timeouts and figures; the global reactor when ``None``.
    :ivar allowClientRenegotiation: as a server, accept renegotiations the
        client starts (OpenSSL 3 refuses them by default).
    :ivar clientRenegotiationLimit: ``(count, seconds)``: a client starting
        more renegotiations than *count* within *seconds* is disconnected.
    :ivar keyUpdateFloodLimit: disconnect a peer that sends more than this
        many KeyUpdates in a row without application data (``None``: no
        bound).  32, as rustls and BoringSSL.
    :ivar keyUpdateRateLimit: ``(count, seconds)``: disconnect a peer that
        sends more than *count* KeyUpdates within *seconds* (``None``: no
        bound).  Both bounds count only KeyUpdates the peer sent unasked
        (the answer to our own request is not counted) and are checked as
        each KeyUpdate is read: past one, the rest of that read is
        discarded unprocessed and the connection dropped.
    :ivar closeTimeout: seconds within which ``loseConnection()`` called
        while a handshake (a renegotiation, either side's) runs must have
        closed the connection: the close_notify goes out when the handshake
        ends, and the connection is aborted when this passes first.
    :ivar rotationPolicy: a :class:`~twisted_rekey.RotationPolicy`: from
        the handshake on, the connection rotates its keys by itself when
        the policy says, on timers of the reactor's shared
        :class:`~twisted_rekey.RotationScheduler` (cancelled when the
        connection is lost).  ``None``: only when asked.
    :ivar rotationGranularity: the width of the rotation timers' buckets,
        in seconds; ``None`` derives it from the policy (one second, less
        when its interval is below four seconds).
    :ivar renegotiateAsClient: whether the *policy* of a TLS 1.2 client may
        renegotiate.  ``False`` by default: OpenSSL 3 servers, like many
        others, refuse a client's renegotiation, and the client's OpenSSL
        then ends the connection.  Rotate TLS 1.2 connections from the
        server side, or set this where the server is known to allow it.
        (It does not restrict :meth:`renegotiate` called by the
        application.)
    :ivar renegotiationQuietPeriod: the *policy* of a TLS 1.2 server starts a
        renegotiation only once the client has sent nothing for this many
        seconds (``None`` or 0: at once).  0.25 by default: Java's JSSE
        keeps sending application data while it renegotiates, which
        OpenSSL takes for a protocol error once its ServerHello is out
        (see :doc:`/security`).  A client that is never quiet that long
        within the renegotiation's timeout is not rotated any more.
        (It does not delay :meth:`renegotiate` called by the application.)

    .. versionadded:: 0.1.0
    """

    clock: IReactorTime | None = None
    allowClientRenegotiation: bool = False
    clientRenegotiationLimit: tuple[int, float] = (3, 600.0)
    keyUpdateFloodLimit: int | None = 32
    keyUpdateRateLimit: tuple[int, float] | None = (64, 1.0)
    closeTimeout: float = 10.0
    rotationPolicy: RotationPolicy | None = None
    rotationGranularity: float | None = None
    renegotiateAsClient: bool = False
    renegotiationQuietPeriod: float | None = 0.25

    _rekeyWatcher: _Watcher | None = None
    transport: ITransport | None

    # -- Twisted's calls into the protocol

    def makeConnection(self, transport: ITransport) -> None:
        """
        Connect as :class:`~twisted.internet.protocol.Protocol` does, then
        start watching if the transport is already TLS.
        """
        super().makeConnection(transport)  # type: ignore[misc]
        self._rekeyAttach()

    def handshakeCompleted(self) -> None:
        """
        Start watching if not yet (after ``startTLS``), and note the
        completed handshake.
        """
        watcher = self._rekeyAttach()
        if watcher is not None and not watcher.handshakeNoted:
            watcher.initialDone = True
            watcher.noteHandshake()

    # -- public API

    def keyUpdate(
        self, requestPeer: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Send a TLS 1.3 KeyUpdate, so that this side's sending keys change.

        Application bytes written before this call are encrypted under the
        old keys, bytes written after it under the new ones.

        :param requestPeer: also ask the peer to update its own sending keys
            (KeyUpdate(update_requested)); the Deferred then fires only when
            the peer's KeyUpdate has arrived.
        :param timeout: with *requestPeer*, seconds to wait for the peer
            before failing with :class:`~twisted_rekey.RekeyTimeout` (the
            connection stays open, and the request stays outstanding).
        :returns: a Deferred that fires with ``None`` once the KeyUpdate has
            been handed to the underlying transport (with *requestPeer*:
            once the peer's KeyUpdate arrived).  It fails with
            :class:`~twisted_rekey.WrongProtocolVersion` on TLS 1.2,
            :class:`~twisted_rekey.ConnectionStateError` before the
            handshake or after ``loseConnection()``,
            :class:`~twisted_rekey.FunctionUnavailable` where OpenSSL's
            ``SSL_key_update`` cannot be reached, and
            :class:`~twisted_rekey.PeerRefused` if the connection is lost
            while waiting.

        .. versionadded:: 0.1.0
        """
        return self._rekeyCall(
            lambda w: w.keyUpdates().keyUpdate(
                bool(requestPeer), timeout, "application"
            )
        )

    def renegotiate(
        self, abbreviated: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Renegotiate a TLS 1.2 (or older) connection: a new handshake, new
        keys both ways.

        :param abbreviated: resume the current session (fresh randoms, no
            new key exchange): cheaper, but no new key exchange.
        :param timeout: seconds to wait for the new handshake to complete
            before failing with :class:`~twisted_rekey.RekeyTimeout`.
        :returns: a Deferred that fires with ``None`` when the new handshake
            has completed.  It fails with
            :class:`~twisted_rekey.PeerRefused` when the peer refuses (a
            server that does not allow client-initiated renegotiation) or
            the connection drops first,
            :class:`~twisted_rekey.WrongProtocolVersion` on TLS 1.3,
            :class:`~twisted_rekey.InsecureRenegotiation` if the peer lacks
            RFC 5746, :class:`~twisted_rekey.RenegotiationForbidden` on an
            HTTP/2 connection (ALPN ``h2``), and
            :class:`~twisted_rekey.ConnectionStateError` before the
            handshake or after ``loseConnection()``.

        .. versionadded:: 0.1.0
        """
        return self._rekeyCall(
            lambda w: w.renegotiation().renegotiate(
                bool(abbreviated), timeout, "application"
            )
        )

    def rekey(
        self, requestPeer: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Rotate the keys the way the negotiated version allows:
        :meth:`keyUpdate` on TLS 1.3, a full :meth:`renegotiate` on TLS 1.2
        and older (*requestPeer* is then moot: both directions change).

        .. versionadded:: 0.1.0
        """
        return self._rekeyCall(
            lambda w: w.rekeyNow(bool(requestPeer), timeout, "application")
        )

    @property
    def rekeyStats(self) -> RekeyStats:
        """
        This connection's figures, as a :class:`RekeyStats` snapshot (all
        zero before the mixin started watching).

        .. versionadded:: 0.1.0
        """
        watcher = self._rekeyWatcher
        if watcher is None:
            return RekeyStats(0, 0, 0, 0, 0, 0, 0, 0, None, 0.0)
        return watcher.stats()

    @property
    def rotationSchedule(self) -> RotationSchedule | None:
        """
        The :attr:`rotationPolicy`'s state for this connection (counters,
        rotations, next deadline, or why it is disabled), from the
        handshake on; ``None`` without a policy.

        .. versionadded:: 0.1.0
        """
        watcher = self._rekeyWatcher
        driver = None if watcher is None else watcher.rotation
        return None if driver is None else driver.schedule

    # -- hooks for the application

    def keyUpdateReceived(self, updateRequested: bool) -> None:
        """
        Called when a KeyUpdate from the peer has been read (its sending keys
        changed).  When *updateRequested*, the answer has already been sent.

        .. versionadded:: 0.1.0
        """

    def renegotiationCompleted(self) -> None:
        """
        Called when a renegotiation (started by either side) has completed.

        .. versionadded:: 0.1.0
        """

    # -- what RotatingFactory's rotation of a connection changes

    def _rekeyApplication(self) -> object:
        """The protocol this connection's log events name as their source."""
        return self

    # -- plumbing

    def _rekeyCall(self, call: Callable[[_Watcher], Deferred[None]]) -> Deferred[None]:
        try:
            watcher = self._rekeyAttach()
            if watcher is None:
                raise ConnectionStateError("the transport is not (yet) TLS")
            return call(watcher)
        except Exception:
            return fail()

    def _rekeyAttach(self) -> _Watcher | None:
        watcher = self._rekeyWatcher
        if watcher is not None:
            return watcher
        transport = getattr(self, "transport", None)
        tls = findTLS(transport)
        if tls is None:
            return None
        conn = tlsConnection(tls)
        if conn is None or infoCallbackFor(conn).observedBy(_Watcher):
            return None
        # The clock given to the mixin, else the one Twisted's TLS factory
        # was given (the buffering transport runs on it), else the reactor.
        clock = self.clock
        if clock is None:
            clock = factoryClock(tls)
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        watcher = self._rekeyWatcher = _Watcher(self, tls, conn, clock)
        return watcher
