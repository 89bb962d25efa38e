"""
The Twisted protocol mixin: in memory (``iosim`` with a ``task.Clock``) for
the logic, and over real loopback sockets for every kind of TLS transport
Twisted makes (``listenSSL``/``connectSSL``, ``ssl:`` endpoints,
``wrapClientTLS``, ``startTLS``), in both roles.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twistedharness import Events, client_options, server_options
from zope.interface.verify import verifyObject

from twisted_rekey import (
    KEY_UPDATE_RATE_SENT,
    AlreadyInProgress,
    ConnectionStateError,
    IRekeyable,
    KeyUpdateFlood,
    PeerRefused,
    RekeyProtocolMixin,
    RekeyStats,
    RekeyTimeout,
    RenegotiationRateLimited,
    RotationRateLimited,
    WrongProtocolVersion,
    _twistedtls,
    get_key_update_type,
    key_update,
)
from twisted_rekey._waiter import MAX_WAITERS

TIMEOUT = 10.0


class Peer(RekeyProtocolMixin, protocol.Protocol):
    """Records what it sees; echoes nothing unless told to."""

    echo = False

    def connectionMade(self) -> None:
        self.received = bytearray()
        self.updates: list[bool] = []
        self.renegotiationsSeen = 0
        self.lost: Failure | None = None
        self.handshakes = 0
        self.lostDeferred: defer.Deferred[None] = defer.Deferred()
        self.dataDeferreds: list[tuple[bytes, defer.Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]
        for wanted, d in list(self.dataDeferreds):
            if wanted in self.received:
                self.dataDeferreds.remove((wanted, d))
                d.callback(None)

    def waitFor(self, data: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.dataDeferreds.append((data, d))
        self.dataReceived(b"")
        return d

    def keyUpdateReceived(self, updateRequested: bool) -> None:
        self.updates.append(updateRequested)

    def renegotiationCompleted(self) -> None:
        self.renegotiationsSeen += 1

    onHandshake: defer.Deferred[Peer] | None = None

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        watcher = self._rekeyWatcher
        if watcher is not None and watcher.handshakeNoted:
            # Counts the handshakes the mixin noted (and started a policy on).
            self.handshakes += 1
        if self.onHandshake is not None:
            d, self.onHandshake = self.onHandshake, None
            d.callback(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason
        self.lostDeferred.callback(None)


class Pair:
    def __init__(
        self,
        cert_files: Any,
        version: str = "1.3",
        serverClass: type[Peer] = Peer,
        clientClass: type[Peer] = Peer,
    ) -> None:
        self.clock = task.Clock()
        sf = TLSMemoryBIOFactory(
            server_options(cert_files, version),
            False,
            protocol.Factory.forProtocol(serverClass),
            self.clock,
        )
        cf = TLSMemoryBIOFactory(
            client_options(cert_files),
            True,
            protocol.Factory.forProtocol(clientClass),
            self.clock,
        )
        c, s, self.pump = iosim.connectedServerAndClient(
            lambda: sf.buildProtocol(None),
            lambda: cf.buildProtocol(None),
            clock=self.clock,
        )
        self.client: Peer = c.wrappedProtocol
        self.server: Peer = s.wrappedProtocol
        self.pump.flush()

    def side(self, role: str) -> tuple[Peer, Peer]:
        """(us, peer) for the role we play."""
        if role == "client":
            return self.client, self.server
        return self.server, self.client


def _result(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


ROLES = pytest.mark.parametrize("role", ["client", "server"])


# -- the interface and the figures -------------------------------------------


def test_interface(cert_files: Any) -> None:
    pair = Pair(cert_files)
    assert IRekeyable.providedBy(pair.client)
    assert IHandshakeListener.providedBy(pair.client)
    verifyObject(IRekeyable, pair.client)
    assert isinstance(pair.client.rekeyStats, RekeyStats)
    assert not IRekeyable.providedBy(protocol.Protocol())
    assert pair.client.handshakes == pair.server.handshakes == 1


def test_stats_before_connection() -> None:
    stats = Peer().rekeyStats
    assert stats.keyUpdatesSent == 0 and stats.lastRotation is None


# -- TLS 1.3 KeyUpdate ---------------------------------------------------------


@ROLES
def test_key_update_seen_by_peer(cert_files: Any, role: str, events: Events) -> None:
    pair = Pair(cert_files)
    us, peer = pair.side(role)
    us.transport.write(b"before")  # type: ignore[union-attr]
    done = _result(us.keyUpdate())
    # Handed to the transport at once, without a write or a clock tick.
    assert done == [None]
    pair.pump.flush()
    assert peer.updates == [False]
    assert us.rekeyStats.keyUpdatesSent == 1
    assert peer.rekeyStats.keyUpdatesReceived == 1
    assert peer.rekeyStats.keyUpdatesSent == 0
    us.transport.write(b"after")  # type: ignore[union-attr]
    peer.transport.write(b"back")  # type: ignore[union-attr]
    pair.pump.flush()
    assert bytes(peer.received) == b"beforeafter"
    assert bytes(us.received) == b"back"
    assert "key_update_sent" in events.names()
    assert "key_update_received" in events.names()


@ROLES
def test_request_peer_fires_on_answer_from_idle_peer(
    cert_files: Any, role: str
) -> None:
    pair = Pair(cert_files)
    us, peer = pair.side(role)
    done = _result(us.keyUpdate(requestPeer=True))
    assert done == []
    # One delivery to the peer, no clock tick: its answer must already be
    # on its transport (OpenSSL alone would wait for the peer's next write).
    pair.pump.pump(advanceClock=False)
    assert peer.updates == [True]
    assert peer.rekeyStats.keyUpdatesSent == 1
    pair.pump.pump(advanceClock=False)
    assert done == [None]
    assert us.updates == [False]
    assert us.rekeyStats.keyUpdatesRequested == 1
    assert us.rekeyStats.keyUpdatesReceived == 1


def test_answer_not_doubled_when_application_writes(cert_files: Any) -> None:
    class Echo(Peer):
        echo = True

    pair = Pair(cert_files, serverClass=Echo)
    done = _result(pair.client.keyUpdate(requestPeer=True))
    pair.client.transport.write(b"ping")  # type: ignore[union-attr]
    pair.pump.flush()
    assert done == [None]
    assert bytes(pair.client.received) == b"ping"
    # The echo's write carried the answer: exactly one KeyUpdate came back.
    assert pair.server.rekeyStats.keyUpdatesSent == 1
    assert pair.client.rekeyStats.keyUpdatesReceived == 1


def test_second_request_while_one_outstanding(cert_files: Any) -> None:
    pair = Pair(cert_files)
    first = _result(pair.client.keyUpdate(requestPeer=True))
    second = _result(pair.client.keyUpdate(requestPeer=True))
    pair.pump.flush()
    assert first == second == [None]
    stats = pair.client.rekeyStats
    # Two rotations of our keys, but only one update_requested on the wire.
    assert stats.keyUpdatesSent == 2
    assert stats.keyUpdatesRequested == 1
    assert pair.server.updates == [True, False]
    assert pair.server.rekeyStats.keyUpdatesSent == 1
    # Afterwards, a new request asks again.
    third = _result(pair.client.keyUpdate(requestPeer=True))
    pair.pump.flush()
    assert third == [None]
    assert pair.client.rekeyStats.keyUpdatesRequested == 2


def test_requests_in_a_loop_are_bounded(cert_files: Any) -> None:
    """
    keyUpdate(requestPeer=True) in a loop while the answer is outstanding:
    at most MAX_WAITERS wait for the answer and MAX_WAITERS for the sending
    rate, the rest fail at once with a clear error and send nothing, and no
    more KeyUpdates go out than peers accept.
    """
    pair = Pair(cert_files)
    calls = [_result(pair.client.keyUpdate(requestPeer=True)) for _ in range(10000)]
    watcher = pair.client._rekeyWatcher
    assert watcher is not None
    updates = watcher.keyUpdates()
    assert len(updates.peerWaiters) <= MAX_WAITERS
    assert len(updates.heldUpdates) <= MAX_WAITERS
    refused = [c[0] for c in calls if c]
    assert len(refused) >= 10000 - 2 * MAX_WAITERS
    assert all(f.check(AlreadyInProgress, RotationRateLimited) for f in refused)
    assert pair.client.rekeyStats.keyUpdatesSent <= KEY_UPDATE_RATE_SENT[0]
    waiting = [c for c in calls if not c]
    for _ in range(10):
        pair.pump.flush()
        pair.clock.advance(0.5)
    pair.pump.flush()
    assert all(c == [None] for c in waiting)
    assert not updates.peerWaiters and not updates.heldUpdates
    assert pair.server.updates[0] is True
    assert pair.client.lost is None and pair.server.lost is None


def test_renegotiate_in_a_loop_is_bounded(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    calls = [_result(pair.server.renegotiate()) for _ in range(1000)]
    watcher = pair.server._rekeyWatcher
    assert (
        watcher is not None
        and watcher.reneg is not None
        and len(watcher.reneg.waiters) == MAX_WAITERS
    )
    assert all(c[0].check(AlreadyInProgress) for c in calls[MAX_WAITERS:])
    pair.pump.flush()
    assert all(c == [None] for c in calls[:MAX_WAITERS])
    assert pair.server.rekeyStats.renegotiations == 1


def test_many_plain_updates_each_sent(cert_files: Any) -> None:
    pair = Pair(cert_files)
    for _ in range(5):
        assert _result(pair.client.keyUpdate()) == [None]
    pair.pump.flush()
    assert pair.server.updates == [False] * 5


def test_request_timeout(cert_files: Any, events: Events) -> None:
    pair = Pair(cert_files)
    done = _result(pair.client.keyUpdate(requestPeer=True, timeout=5))
    pair.clock.advance(5)
    assert len(done) == 1 and done[0].check(RekeyTimeout)
    assert "rekey_timeout" in events.names()
    # The request stays outstanding: the next one does not ask again, and
    # the late answer satisfies it.
    later = _result(pair.client.keyUpdate(requestPeer=True, timeout=5))
    pair.pump.flush()
    assert later == [None]
    assert pair.client.rekeyStats.keyUpdatesRequested == 1
    assert not pair.clock.getDelayedCalls()


def test_cancel_waiting(cert_files: Any) -> None:
    pair = Pair(cert_files)
    d = pair.client.keyUpdate(requestPeer=True, timeout=5)
    d.cancel()
    assert _result(d)[0].check(defer.CancelledError)
    assert not pair.clock.getDelayedCalls()
    pair.pump.flush()


def test_key_update_on_tls12(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    [failure] = _result(pair.client.keyUpdate())
    assert failure.check(WrongProtocolVersion)


def test_key_update_during_renegotiation(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    reneg = _result(pair.server.renegotiate())
    [failure] = _result(pair.server.keyUpdate())
    assert failure.check(WrongProtocolVersion)
    # rekey() during a renegotiation joins it rather than starting another.
    joined = _result(pair.server.rekey())
    pair.pump.flush()
    assert reneg == joined == [None]
    assert pair.server.rekeyStats.renegotiations == 1


def test_calls_after_lose_connection(cert_files: Any) -> None:
    pair = Pair(cert_files)
    pair.client.transport.loseConnection()  # type: ignore[union-attr]
    for call in (
        pair.client.keyUpdate,
        pair.client.renegotiate,
        pair.client.rekey,
    ):
        [failure] = _result(call())
        assert failure.check(ConnectionStateError)
    pair.pump.flush()


def test_waiting_deferred_fails_on_connection_loss(cert_files: Any) -> None:
    pair = Pair(cert_files)
    done = _result(pair.client.keyUpdate(requestPeer=True, timeout=30))
    pair.client.transport.abortConnection()  # type: ignore[union-attr]
    pair.pump.flush()
    assert len(done) == 1 and done[0].check(PeerRefused)
    # Caused by the loss itself, which the application can inspect.
    assert isinstance(done[0].value.__cause__, ConnectionClosed)
    assert not pair.clock.getDelayedCalls()
    [failure] = _result(pair.client.keyUpdate())
    assert failure.check(ConnectionStateError)


def test_before_handshake_fails() -> None:
    class Early(Peer):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.early = _result(self.keyUpdate())

    sf = protocol.Factory.forProtocol(Early)
    proto = sf.buildProtocol(None)
    assert isinstance(proto, Early)
    [failure] = _result(proto.keyUpdate())
    assert failure.check(ConnectionStateError)


def test_buffered_writes_go_under_the_old_key(cert_files: Any) -> None:
    """
    Bytes written before keyUpdate() sit in the buffering transport until
    the next reactor turn; the KeyUpdate must not overtake them.
    """
    from tls13 import parse_records

    pair = Pair(cert_files)
    wire = pair.client.transport.transport  # type: ignore[union-attr]
    sent: list[bytes] = []
    original = wire.write

    def capture(data: bytes) -> None:
        sent.append(data)
        original(data)

    wire.write = capture
    pair.client.transport.write(b"x")  # type: ignore[union-attr]
    assert sent == []  # still aggregated
    pair.client.keyUpdate()
    records, rest = parse_records(b"".join(sent))
    assert rest == b""
    # 1 byte of data + inner type + tag, then KeyUpdate (5) + type + tag.
    assert [len(r.payload) for r in records] == [1 + 1 + 16, 5 + 1 + 16]
    pair.pump.flush()
    assert bytes(pair.server.received) == b"x"
    assert pair.server.updates == [False]


# -- flood guard -----------------------------------------------------------------


def _flood(sender: Peer, count: int) -> None:
    conn = sender.transport.getHandle()  # type: ignore[union-attr]
    tls = sender.transport
    for _ in range(count):
        key_update(conn, False)
    tls._flushSendBIO()  # type: ignore[union-attr]


def test_key_update_flood_dropped(
    cert_files: Any, events: Events, logged_failures: Any
) -> None:
    pair = Pair(cert_files)
    _flood(pair.client, 33)
    pair.pump.flush()
    assert pair.server.lost is not None
    assert pair.server.lost.check(KeyUpdateFlood)
    assert "key_update_flood" in events.names()
    [event] = [e for e in events.events if e["rekey_event"] == "key_update_flood"]
    assert "in a row" in event["reason"]
    assert pair.client.lost is not None


def _bursts(pair: Pair, bursts: int, size: int, seconds: float) -> None:
    """*bursts* times: *size* KeyUpdates, a byte of data, *seconds* pass."""
    for _ in range(bursts):
        _flood(pair.client, size)
        pair.client.transport.write(b"d")  # type: ignore[union-attr]
        pair.pump.flush()
        pair.clock.advance(seconds)


def test_key_updates_with_data_between_are_fine(cert_files: Any) -> None:
    pair = Pair(cert_files)
    _bursts(pair, 3, 20, 1)
    assert pair.server.lost is None
    assert pair.server.rekeyStats.keyUpdatesReceived == 60


def test_key_update_rate_limit(cert_files: Any) -> None:
    class Strict(Peer):
        keyUpdateRateLimit = (8, 1.0)

    pair = Pair(cert_files, serverClass=Strict)
    for _ in range(9):
        _flood(pair.client, 1)
        pair.client.transport.write(b"d")  # type: ignore[union-attr]
        pair.pump.flush()
        pair.clock.advance(0.01)
    assert pair.server.lost is not None
    assert pair.server.lost.check(KeyUpdateFlood)


def test_flood_limit_configurable(cert_files: Any) -> None:
    class Lenient(Peer):
        keyUpdateFloodLimit = None
        keyUpdateRateLimit = None

    pair = Pair(cert_files, serverClass=Lenient)
    _flood(pair.client, 100)
    pair.pump.flush()
    assert pair.server.lost is None
    assert pair.server.rekeyStats.keyUpdatesReceived == 100


# -- TLS 1.2 renegotiation --------------------------------------------------------


class AllowingServer(Peer):
    allowClientRenegotiation = True


@pytest.mark.parametrize("abbreviated", [False, True])
@ROLES
def test_renegotiate(cert_files: Any, role: str, abbreviated: bool) -> None:
    pair = Pair(cert_files, "1.2", serverClass=AllowingServer)
    us, peer = pair.side(role)
    us.transport.write(b"before")  # type: ignore[union-attr]
    done = _result(us.renegotiate(abbreviated=abbreviated))
    assert done == []
    pair.pump.flush()
    assert done == [None]
    assert us.rekeyStats.renegotiations == peer.rekeyStats.renegotiations == 1
    assert us.renegotiationsSeen == peer.renegotiationsSeen == 1
    us.transport.write(b"after")  # type: ignore[union-attr]
    peer.transport.write(b"back")  # type: ignore[union-attr]
    pair.pump.flush()
    assert bytes(peer.received) == b"beforeafter"
    assert bytes(us.received) == b"back"


def test_rekey_picks_by_version(cert_files: Any) -> None:
    pair13 = Pair(cert_files, "1.3")
    assert _result(pair13.client.rekey()) == [None]
    pair13.pump.flush()
    assert pair13.server.updates == [False]
    pair12 = Pair(cert_files, "1.2")
    done = _result(pair12.server.rekey())
    pair12.pump.flush()
    assert done == [None]
    assert pair12.client.renegotiationsSeen == 1


def test_renegotiate_on_tls13(cert_files: Any) -> None:
    pair = Pair(cert_files)
    [failure] = _result(pair.client.renegotiate())
    assert failure.check(WrongProtocolVersion)


def test_second_renegotiate_joins_the_first(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    first = _result(pair.server.renegotiate())
    second = _result(pair.server.renegotiate())
    pair.pump.flush()
    assert first == second == [None]
    assert pair.server.rekeyStats.renegotiations == 1


def test_client_renegotiation_refused_by_default(
    cert_files: Any, events: Events
) -> None:
    pair = Pair(cert_files, "1.2")
    done = _result(pair.client.renegotiate())
    pair.pump.flush()
    assert len(done) == 1 and done[0].check(PeerRefused)
    assert "no_renegotiation" in str(done[0].value)
    assert "client_renegotiation_refused" in events.names()
    # OpenSSL reports the refused handshake as done: no new keys, though.
    assert pair.server.renegotiationsSeen == 0
    assert pair.server.rekeyStats.renegotiations == 0
    assert "renegotiation_refused" in events.names()


def test_client_renegotiation_rate_limited(cert_files: Any, events: Events) -> None:
    class Limited(AllowingServer):
        clientRenegotiationLimit = (2, 60.0)

    pair = Pair(cert_files, "1.2", serverClass=Limited)
    for _ in range(2):
        done = _result(pair.client.renegotiate())
        pair.pump.flush()
        assert done == [None]
        pair.clock.advance(1)
    third = _result(pair.client.renegotiate())
    pair.pump.flush()
    assert len(third) == 1 and third[0].check(PeerRefused)
    assert pair.server.lost is not None
    assert pair.server.lost.check(RenegotiationRateLimited)
    assert "client_renegotiation_rate_limited" in events.names()


def test_client_renegotiation_window_slides(cert_files: Any) -> None:
    class Limited(AllowingServer):
        clientRenegotiationLimit = (1, 10.0)

    pair = Pair(cert_files, "1.2", serverClass=Limited)
    for _ in range(3):
        done = _result(pair.client.renegotiate())
        pair.pump.flush()
        assert done == [None]
        pair.clock.advance(11)
    assert pair.server.lost is None


def test_renegotiation_timeout(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    done = _result(pair.server.renegotiate(timeout=3))
    pair.clock.advance(3)
    assert len(done) == 1 and done[0].check(RekeyTimeout)
    pair.pump.flush()
    assert pair.server.rekeyStats.renegotiations == 1


# -- hooks -------------------------------------------------------------------------


def test_hook_errors_are_logged_not_fatal(
    cert_files: Any, logged_failures: Any
) -> None:
    class Broken(Peer):
        def keyUpdateReceived(self, updateRequested: bool) -> None:
            raise RuntimeError("application bug")

    pair = Pair(cert_files, serverClass=Broken)
    done = _result(pair.client.keyUpdate(requestPeer=True))
    pair.pump.flush()
    # The answer went out before the hook ran.
    assert done == [None]
    assert len(logged_failures.flush(RuntimeError)) == 1
    assert pair.server.lost is None


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_hook_runs_before_the_deferred_fires(cert_files: Any, version: str) -> None:
    """
    Code waiting on keyUpdate(requestPeer=True) or renegotiate() finds the
    hook's bookkeeping already done (s_server's answer arrives in the same
    read as its data, so an application resumed by the Deferred saw no hook
    call yet).
    """
    pair = Pair(cert_files, version)
    seen: list[int] = []
    if version == "1.3":
        d = pair.client.keyUpdate(requestPeer=True)
        d.addCallback(lambda _: seen.append(len(pair.client.updates)))
    else:
        d = pair.server.renegotiate()
        d.addCallback(lambda _: seen.append(pair.server.renegotiationsSeen))
    pair.pump.flush()
    assert seen == [1]


def test_stats_bytes_and_time(cert_files: Any) -> None:
    pair = Pair(cert_files)
    pair.clock.advance(100)
    pair.client.transport.write(b"a" * 1000)  # type: ignore[union-attr]
    pair.pump.flush()
    stats = pair.client.rekeyStats
    assert stats.bytesSent == stats.bytesSentSinceRotation == 1000
    assert stats.secondsSinceRotation >= 100
    assert pair.server.rekeyStats.bytesReceivedSinceRotation == 1000
    pair.client.keyUpdate()
    pair.pump.flush()
    stats = pair.client.rekeyStats
    assert stats.bytesSent == 1000
    assert stats.bytesSentSinceRotation == 0
    assert stats.secondsSinceRotation < 1
    assert pair.server.rekeyStats.bytesReceivedSinceRotation == 0


def test_bytes_sent_counts_only_what_openssl_took(cert_files: Any) -> None:
    """
    A write during a renegotiation is re-buffered by Twisted (OpenSSL wants
    to read first): it counts once it went through, not before, not twice.
    """
    pair = Pair(cert_files, "1.2", serverClass=AllowingServer)
    pair.client.renegotiate()
    pair.pump.pump(advanceClock=False)
    tls: Any = pair.client.transport
    tls.write(b"a" * 100_000)
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()
    assert b"".join(tls._appSendBuffer) == b"a" * 100_000
    assert pair.client.rekeyStats.bytesSent == 0
    pair.pump.flush()
    assert pair.client.rekeyStats.bytesSent == 100_000
    assert pair.server.rekeyStats.bytesReceived == len(pair.server.received)
    assert bytes(pair.server.received) == b"a" * 100_000


def test_rotation_driver_entry_point(cert_files: Any, events: Events) -> None:
    # What a rotation policy's driver calls (its Rotator): a KeyUpdate that
    # waits for no answer is done on return, one that asks for an answer
    # returns the Deferred of that answer.
    pair = Pair(cert_files)
    watcher = pair.client._rekeyWatcher
    assert watcher is not None
    assert watcher.rotate(False, None, "policy: test") is None
    asked = watcher.rotate(True, None, "policy: asked")
    assert asked is not None
    done = _result(asked)
    assert done == []
    pair.pump.flush()
    assert done == [None]
    assert pair.server.updates == [False, True]
    sent = [e for e in events.events if e["rekey_event"] == "key_update_sent"]
    assert [e["reason"] for e in sent] == ["policy: test", "policy: asked"]


def test_sent_key_updates_logged_at_a_bounded_rate(
    cert_files: Any, events: Events
) -> None:
    """
    Our unrequested KeyUpdates make at most one ``key_update_sent`` event
    per second and connection: each event counts the ones held back since
    the last (``updates``), the connection's loss reports the rest, so the
    events add up to what was sent.  A KeyUpdate whose caller waits for the
    peer's answer gets an event of its own at once.
    """
    pair = Pair(cert_files)
    client: Any = pair.client

    def burst(count: int) -> None:
        for _ in range(count):
            assert _result(client.keyUpdate()) == [None]
            client.transport.write(b"x")
        pair.pump.flush()

    burst(4)
    pair.clock.advance(1.2)
    burst(4)
    asked = _result(client.keyUpdate(requestPeer=True))
    pair.pump.flush()
    assert asked == [None]
    sent = events.named("key_update_sent")
    assert [(e["updates"], e["requested"]) for e in sent] == [
        (1, False),
        (4, False),
        (1, True),
    ]
    assert "sent 4 KeyUpdates (update_requested=False)" in sent[1]["log_format"].format(
        **sent[1]
    )
    client.transport.loseConnection()
    pair.pump.flush()
    sent = events.named("key_update_sent")
    assert [e["updates"] for e in sent] == [1, 4, 1, 3]
    assert sent[-1]["reason"] == "application"
    assert sum(e["updates"] for e in sent) == client.rekeyStats.keyUpdatesSent == 9
    assert pair.server.rekeyStats.keyUpdatesReceived == 9
    assert pair.server.received == b"x" * 8


def test_key_update_type_settles(cert_files: Any) -> None:
    pair = Pair(cert_files)
    pair.client.keyUpdate(requestPeer=True)
    pair.pump.flush()
    for side in (pair.client, pair.server):
        conn = side.transport.getHandle()  # type: ignore[union-attr]
        assert int(get_key_update_type(conn)) == -1


# -- real sockets, every transport kind, both roles ---------------------------------


class StartTLSPeer(Peer):
    """Speaks one plain line, then switches to TLS (``startTLS``)."""

    options: Any = None
    isClient = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.plain = bytearray()
        self.secure = False
        if self.isClient:
            self.transport.write(b"STARTTLS\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.secure:
            return super().dataReceived(data)
        self.plain += data
        if b"\n" in self.plain:
            if not self.isClient:
                self.transport.write(b"GO\n")  # type: ignore[union-attr]
            self.secure = True
            self.transport.startTLS(self.options)  # type: ignore[union-attr]


async def _exchange(client: Peer, server: Peer, tls13: bool = True) -> None:
    from twisted.internet import reactor

    async def within(d: defer.Deferred[Any]) -> Any:
        return await d.addTimeout(TIMEOUT, reactor)

    for us, peer, tag in ((client, server, b"c"), (server, client, b"s")):
        if tls13:
            await within(us.keyUpdate(requestPeer=True, timeout=TIMEOUT))
        else:
            await within(us.renegotiate(timeout=TIMEOUT))
        us.transport.write(tag + b"-after")  # type: ignore[union-attr]
        await within(peer.waitFor(tag + b"-after"))
    # Hooks run once the read that completed a rotation has ended: one more
    # round trip makes sure both sides got there.
    client.transport.write(b"ping")  # type: ignore[union-attr]
    await within(server.waitFor(b"ping"))
    server.transport.write(b"pong")  # type: ignore[union-attr]
    await within(client.waitFor(b"pong"))
    if tls13:
        assert client.updates == [False, True]
        assert server.updates == [True, False]
        assert client.rekeyStats.keyUpdatesSent == 2
        assert server.rekeyStats.keyUpdatesSent == 2
    else:
        assert client.renegotiationsSeen == server.renegotiationsSeen == 2


async def _close(client: Peer, server: Peer, port: Any) -> None:
    from twisted.internet import reactor

    client.transport.loseConnection()  # type: ignore[union-attr]
    await defer.gatherResults([client.lostDeferred, server.lostDeferred]).addTimeout(
        TIMEOUT, reactor
    )
    await port.stopListening()


class Connected:
    """Collects the protocol instances a factory builds."""

    def __init__(self, cls: type[Peer]) -> None:
        self.cls = cls
        self.built: defer.Deferred[Peer] = defer.Deferred()

    def factory(self) -> protocol.Factory:
        outer = self

        class F(protocol.ClientFactory):
            def buildProtocol(self, addr: Any) -> Any:
                p = outer.cls()
                p.factory = self
                p.onHandshake = outer.built
                return p

        return F()


def _serverPeerClass(version: str) -> type[Peer]:
    return AllowingServer if version == "1.2" else Peer


KINDS = ["listenSSL", "endpoints", "wrapClientTLS", "startTLS"]


async def _connect(kind: str, cert_files: Any, version: str) -> tuple[Peer, Peer, Any]:
    from twisted.internet import reactor

    server = Connected(_serverPeerClass(version))
    client = Connected(Peer)
    sopts = server_options(cert_files, version)
    copts = client_options(cert_files)
    if kind == "listenSSL":
        port = reactor.listenSSL(0, server.factory(), sopts, interface="127.0.0.1")
        reactor.connectSSL(
            "127.0.0.1", port.getHost().port, client.factory(), copts, timeout=5
        )
    elif kind == "endpoints":
        spec = (
            f"ssl:0:interface=127.0.0.1:privateKey={cert_files.server_key}:"
            f"certKey={cert_files.server_cert}"
        )
        if version == "1.2":
            # The ssl: string has no version switch: use the options object.
            sep = endpoints.SSL4ServerEndpoint(reactor, 0, sopts, interface="127.0.0.1")
        else:
            sep = endpoints.serverFromString(reactor, spec)
        port = await sep.listen(server.factory())
        cep = endpoints.clientFromString(
            reactor,
            f"ssl:host=127.0.0.1:port={port.getHost().port}:"
            f"caCertsDir={cert_files.directory}:hostname=localhost:timeout=5",
        )
        await cep.connect(client.factory())
    elif kind == "wrapClientTLS":
        port = reactor.listenSSL(0, server.factory(), sopts, interface="127.0.0.1")
        tcp = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, timeout=5
        )
        await endpoints.wrapClientTLS(copts, tcp).connect(client.factory())
    else:

        class S(StartTLSPeer, _serverPeerClass(version)):  # type: ignore[misc]
            options = sopts

        class C(StartTLSPeer):
            options = copts
            isClient = True

        server.cls, client.cls = S, C
        port = reactor.listenTCP(0, server.factory(), interface="127.0.0.1")
        tcp = endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, timeout=5
        )
        await tcp.connect(client.factory())
    s = await server.built.addTimeout(TIMEOUT, reactor)
    c = await client.built.addTimeout(TIMEOUT, reactor)
    return c, s, port


async def _handshaken(c: Peer, s: Peer) -> None:
    from twisted.internet import reactor

    c.transport.write(b"hello")  # type: ignore[union-attr]
    await s.waitFor(b"hello").addTimeout(TIMEOUT, reactor)
    s.transport.write(b"hi")  # type: ignore[union-attr]
    await c.waitFor(b"hi").addTimeout(TIMEOUT, reactor)


@pytest.mark.parametrize("version", ["1.3", "1.2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_real_sockets(cert_files: Any, kind: str, version: str) -> None:
    c, s, port = await _connect(kind, cert_files, version)
    try:
        await _handshaken(c, s)
        await _exchange(c, s, tls13=version == "1.3")
        assert IRekeyable.providedBy(c) and IRekeyable.providedBy(s)
    finally:
        await _close(c, s, port)
    assert c.handshakes == s.handshakes == 1


@pytest_twisted.ensureDeferred
async def test_real_sockets_idle_answer(cert_files: Any) -> None:
    """The peer requests; we write nothing; the answer still arrives."""
    from twisted.internet import reactor

    c, s, port = await _connect("listenSSL", cert_files, "1.3")
    try:
        await _handshaken(c, s)
        await c.keyUpdate(requestPeer=True).addTimeout(TIMEOUT, reactor)
        assert s.updates == [True]
        assert s.rekeyStats.keyUpdatesSent == 1
    finally:
        await _close(c, s, port)


_unused: Callable[..., Any] = verifyObject


# -- the guard holds per message --------------------------------------------------


def test_flood_in_one_write_stops_at_the_bound(
    cert_files: Any, events: Events, logged_failures: Any
) -> None:
    """
    2,427 KeyUpdates and then data, all in one write (as one 64 KiB write
    carries them): the guard stops OpenSSL at the bound, inside the read.
    No KeyUpdate past it is processed, nothing after it delivered, and the
    log says once which rule tripped.
    """
    pair = Pair(cert_files)
    conn = pair.client.transport.getHandle()  # type: ignore[union-attr]
    for _ in range(2427):
        key_update(conn, False)
    pair.client.transport.write(b"after the flood")  # type: ignore[union-attr]
    pair.pump.flush()
    limit = Peer.keyUpdateFloodLimit
    assert limit is not None
    assert pair.server.lost is not None and pair.server.lost.check(KeyUpdateFlood)
    assert pair.server.rekeyStats.keyUpdatesReceived == limit + 1
    assert pair.server.updates == []
    assert bytes(pair.server.received) == b""
    [flood] = [e for e in events.events if e["rekey_event"] == "key_update_flood"]
    assert f"{limit + 1} KeyUpdates in a row" in flood["reason"]
    assert (
        len([e for e in events.events if e["rekey_event"] == "key_update_received"])
        <= 1
    )


def test_received_key_update_events_are_rate_limited(
    cert_files: Any, events: Events
) -> None:
    """Within the bounds, still at most one event a second per connection."""
    pair = Pair(cert_files)
    _bursts(pair, 30, 1, 0.1)
    assert pair.server.lost is None
    assert pair.server.rekeyStats.keyUpdatesReceived == 30
    received = [e for e in events.events if e["rekey_event"] == "key_update_received"]
    assert 2 <= len(received) <= 4
    assert sum(e["updates"] for e in received) <= 30
    assert received[-1]["count"] <= 30


class ClosingPeer(Peer):
    """Logs its loss, as the plugins' "closed: ..." line does."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        Logger().info("closed", rekey_event="application_closed")
        super().connectionLost(reason)


def test_held_key_update_events_come_before_the_applications_loss(
    cert_files: Any, events: Events
) -> None:
    """
    What the throttle held back is logged when the connection goes, and
    before the application hears of the loss: a line the application logs
    then comes after every KeyUpdate it read, as on the wire.
    """
    pair = Pair(cert_files, serverClass=ClosingPeer)
    _bursts(pair, 5, 1, 0.1)  # within one second: all but the first held
    pair.client.transport.loseConnection()  # type: ignore[union-attr]
    pair.pump.flush()
    assert pair.server.lost is not None
    names = events.names()
    received = [i for i, name in enumerate(names) if name == "key_update_received"]
    closed = names.index("application_closed")
    assert received and max(received) < closed
    updates = sum(
        e["updates"] for e in events.events if e["rekey_event"] == "key_update_received"
    )
    assert updates == pair.server.rekeyStats.keyUpdatesReceived == 5


def test_answers_to_our_requests_are_not_counted(cert_files: Any) -> None:
    """
    A side that streams and asks the idle peer to update on every rotation
    receives only answers, with no data between them: far more than the
    32-in-a-row bound, and it keeps its peer.
    """
    pair = Pair(cert_files)
    for _ in range(100):
        pair.client.transport.write(b"d")  # type: ignore[union-attr]
        assert _result(pair.client.keyUpdate(requestPeer=True)) == []
        pair.pump.flush()
        pair.clock.advance(0.25)
    assert pair.client.lost is None and pair.server.lost is None
    assert pair.client.rekeyStats.keyUpdatesReceived == 100
    assert pair.server.rekeyStats.bytesSent == 0


def test_key_updates_past_the_rate_wait_for_it(cert_files: Any) -> None:
    """
    The application asking for KeyUpdates faster than peers accept: the
    ones past the rate are held (their Deferreds fire when sent), a few at
    most; the rest fail with RotationRateLimited and send nothing.
    """
    pair = Pair(cert_files)
    count, window = KEY_UPDATE_RATE_SENT
    results = [_result(pair.client.keyUpdate()) for _ in range(count + MAX_WAITERS + 5)]
    assert results[:count] == [[None]] * count
    held = results[count : count + MAX_WAITERS]
    assert held == [[]] * MAX_WAITERS
    assert all(r[0].check(RotationRateLimited) for r in results[count + MAX_WAITERS :])
    pair.pump.flush()
    assert pair.server.rekeyStats.keyUpdatesReceived == count
    sent = [pair.server.rekeyStats.keyUpdatesReceived]
    for _ in range(30):
        pair.clock.advance(0.1)
        pair.pump.flush()
        sent.append(pair.server.rekeyStats.keyUpdatesReceived)
    assert held == [[None]] * MAX_WAITERS
    assert sent[-1] == count + MAX_WAITERS
    # Never more than the rate within a window, on the wire.
    steps = int(window / 0.1)
    assert all(b - a <= count for a, b in zip(sent, sent[steps:]))


def test_held_key_updates_fail_when_the_connection_goes(cert_files: Any) -> None:
    pair = Pair(cert_files)
    count, _ = KEY_UPDATE_RATE_SENT
    results = [_result(pair.client.keyUpdate()) for _ in range(count + 2)]
    pair.client.transport.abortConnection()  # type: ignore[union-attr]
    pair.pump.flush()
    assert all(r[0].check(PeerRefused) for r in results[count:])
    assert not pair.clock.getDelayedCalls()


# -- closing during a renegotiation -----------------------------------------------


@pytest.mark.parametrize("closer", ["server", "client"])
def test_lose_connection_during_renegotiation_completes(
    cert_files: Any, closer: str
) -> None:
    """
    loseConnection() while a renegotiation runs (ours: the server's; the
    peer's: seen from the client) still sends close_notify and closes, once
    the handshake ends, without waiting for closeTimeout.
    """
    pair = Pair(cert_files, "1.2")
    reneg = _result(pair.server.renegotiate())
    if closer == "client":
        # The HelloRequest reaches the client, which starts its handshake.
        pair.pump.pump()
    side = getattr(pair, closer)
    conn = side.transport.getHandle()
    side.transport.loseConnection()
    pair.pump.flush()
    assert conn.get_shutdown() & SSL.SENT_SHUTDOWN
    assert pair.server.lost is not None and pair.client.lost is not None
    assert len(reneg) == 1
    assert not pair.clock.getDelayedCalls()


def test_lose_connection_aborts_when_renegotiation_never_ends(
    cert_files: Any, events: Events
) -> None:
    pair = Pair(cert_files, "1.2")
    _result(pair.server.renegotiate())
    pair.pump.pump()  # the client has started its handshake
    pair.client.transport.loseConnection()
    # The server never answers: nothing more is pumped.
    pair.clock.advance(Peer.closeTimeout)
    assert "close_timeout" in events.names()
    pair.pump.flush()
    assert pair.client.lost is not None


def test_peer_close_while_writes_wait_on_our_renegotiation(cert_files: Any) -> None:
    """
    Our renegotiation holds a write (WantRead); the peer closes; SSL_write
    then reads the close_notify.  Twisted's own handling of that raises
    IndexError (it expects the error's args): the mixin finishes it as a
    clean close instead, and nothing escapes.
    """

    class Allowing(Peer):
        allowClientRenegotiation = True

    pair = Pair(cert_files, "1.2", serverClass=Allowing)
    reneg = _result(pair.client.renegotiate())
    pair.client.transport.write(b"\x00")  # type: ignore[union-attr]
    pair.server.transport.loseConnection()  # type: ignore[union-attr]
    pair.pump.flush()
    pair.clock.advance(Peer.closeTimeout)
    pair.pump.flush()
    assert pair.client.lost is not None and pair.server.lost is not None
    assert len(reneg) == 1
    assert not pair.clock.getDelayedCalls()


def test_connection_gains_one_attribute_and_keeps_its_class(cert_files: Any) -> None:
    """
    The watched Connection carries one attribute of ours (its info callback
    hub) and stays an instance of its own class: the received bytes are
    counted by a subclass that only adds to ``recv``.  A second attribute
    would take the Connection's dict out of the layout its class's
    instances share (~0.8 KiB a connection on CPython 3.11).
    """
    pair = Pair(cert_files)
    plain = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    for peer in (pair.client, pair.server):
        conn: Any = peer.transport._tlsConnection  # type: ignore[union-attr]
        assert set(conn.__dict__) - set(plain.__dict__) == {"_rekeyInfo"}
        assert isinstance(conn, SSL.Connection)
        assert type(conn).__mro__[1] is SSL.Connection
        assert type(conn).__name__ == "Connection" and type(conn).__slots__ == ()
    pair.client.transport.write(b"x" * 50_000)  # type: ignore[union-attr]
    pair.pump.flush()
    assert pair.server.rekeyStats.bytesReceived == 50_000
    assert bytes(pair.server.received) == b"x" * 50_000
    # A second connection reuses the subclass made for the first.
    other = Pair(cert_files)
    assert type(other.server.transport._tlsConnection) is type(  # type: ignore[union-attr]
        pair.server.transport._tlsConnection  # type: ignore[union-attr]
    )


def test_tls_protocol_gains_one_attribute_and_keeps_its_class(
    cert_files: Any,
) -> None:
    """
    The watched TLS protocol carries one attribute of ours (its watcher)
    and stays an instance of a subclass of its own class, named as it, that
    routes the five methods the watcher wraps: five bound methods set on
    the instance would cost ~400 bytes a connection.  The subclass is made
    once per class.
    """
    pair = Pair(cert_files)
    plainPair = iosim.connectedServerAndClient(
        lambda: TLSMemoryBIOFactory(
            server_options(cert_files, "1.3"),
            False,
            protocol.Factory.forProtocol(protocol.Protocol),
            task.Clock(),
        ).buildProtocol(None),
        lambda: TLSMemoryBIOFactory(
            client_options(cert_files),
            True,
            protocol.Factory.forProtocol(protocol.Protocol),
            task.Clock(),
        ).buildProtocol(None),
    )
    plainPair[2].flush()
    plain: Any = plainPair[1]
    for peer in (pair.client, pair.server):
        tls: Any = peer.transport
        assert set(tls.__dict__) - set(plain.__dict__) == {"_rekeyTLSWatcher"}
        assert isinstance(tls, type(plain))
        assert type(tls).__mro__[1] is type(plain)
        assert type(tls).__name__ == type(plain).__name__
    pair.client.transport.write(b"x" * 50_000)  # type: ignore[union-attr]
    pair.pump.flush()
    assert pair.client.rekeyStats.bytesSent == 50_000
    assert bytes(pair.server.received) == b"x" * 50_000
    assert _result(pair.client.keyUpdate()) == [None]
    pair.pump.flush()
    assert pair.server.rekeyStats.keyUpdatesReceived == 1
    other = Pair(cert_files)
    assert type(other.server.transport) is type(pair.server.transport)


def test_tls_protocol_refusing_a_new_class_is_patched_on_the_instance(
    cert_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Where the TLS protocol's instances refuse a new ``__class__``, the five
    methods are replaced on the instance, and everything still works.
    """

    def incompatible(base: type) -> type:
        # Another layout: CPython refuses to assign it as the __class__.
        return type(base.__name__, (base,), {"__slots__": ("extra",)})

    monkeypatch.setattr(_twistedtls, "_watchedClass", incompatible)
    pair = Pair(cert_files)
    tls: Any = pair.server.transport
    assert type(tls) is TLSMemoryBIOFactory.protocol
    assert {"dataReceived", "connectionLost", "_write"} <= set(tls.__dict__)
    pair.client.transport.write(b"y" * 20_000)  # type: ignore[union-attr]
    tls.write(b"z" * 10_000)
    pair.pump.flush()
    assert bytes(pair.server.received) == b"y" * 20_000
    assert pair.server.rekeyStats.bytesSent == 10_000
    answered = _result(pair.server.keyUpdate(requestPeer=True))
    pair.pump.flush()
    assert answered == [None]
    assert pair.client.rekeyStats.keyUpdatesReceived == 1
    assert pair.server.rekeyStats.keyUpdatesReceived == 1
    pair.client.transport.loseConnection()  # type: ignore[union-attr]
    pair.pump.flush()
    assert pair.server.lost is not None


def test_tls_method_shadowed_before_us_is_kept(cert_files: Any) -> None:
    """
    What the watcher routes through (the TLS protocol's ``_write`` here) is
    called as the class defines it, unless an instance attribute already
    replaced it (as ``BufferingTLSTransport`` does with ``write``): then that
    replacement is the one called.
    """
    seen: list[bytes] = []
    clock = task.Clock()

    def shadowed(tls: Any) -> Any:
        original = tls._write

        def _write(data: bytes) -> None:
            seen.append(data)
            original(data)

        tls._write = _write
        return tls

    sf = TLSMemoryBIOFactory(
        server_options(cert_files, "1.3"),
        False,
        protocol.Factory.forProtocol(Peer),
        clock,
    )
    cf = TLSMemoryBIOFactory(
        client_options(cert_files), True, protocol.Factory.forProtocol(Peer), clock
    )
    c, s, pump = iosim.connectedServerAndClient(
        lambda: shadowed(sf.buildProtocol(None)),
        lambda: cf.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    server: Peer = s.wrappedProtocol
    client: Peer = c.wrappedProtocol
    server.transport.write(b"through both")  # type: ignore[union-attr]
    pump.flush()
    assert b"".join(seen) == b"through both"
    assert bytes(client.received) == b"through both"
    assert server.rekeyStats.bytesSent == len(b"through both")


def test_received_bytes_counted_past_an_instance_recv(cert_files: Any) -> None:
    """
    A Connection whose ``recv`` an instance attribute already replaced (a
    subclass's ``recv`` would never be reached) has that one wrapped: the
    bytes are counted, and the replacement still runs.
    """
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from zope.interface import implementer

    calls: list[int] = []
    options = server_options(cert_files, "1.3")

    @implementer(IOpenSSLServerConnectionCreator)
    class Creator:
        def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
            conn = SSL.Connection(options.getContext(), None)
            plainRecv = conn.recv

            def recv(*args: Any) -> bytes:
                calls.append(1)
                return plainRecv(*args)

            conn.recv = recv  # type: ignore[method-assign]
            return conn

    clock = task.Clock()
    sf = TLSMemoryBIOFactory(
        Creator(), False, protocol.Factory.forProtocol(Peer), clock
    )
    cf = TLSMemoryBIOFactory(
        client_options(cert_files), True, protocol.Factory.forProtocol(Peer), clock
    )
    c, s, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(None), lambda: cf.buildProtocol(None), clock=clock
    )
    pump.flush()
    c.wrappedProtocol.transport.write(b"y" * 40_000)
    pump.flush()
    server: Peer = s.wrappedProtocol
    assert bytes(server.received) == b"y" * 40_000
    assert server.rekeyStats.bytesReceived == 40_000
    assert calls
    assert type(s._tlsConnection) is SSL.Connection
