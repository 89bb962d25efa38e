"""
Rotation on a policy, driven by reactor timers: in memory (``iosim`` with a
shared ``task.Clock``) with synthetic traffic.  Wire-level proofs are in
``test_rotation_loopback.py``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_protocol import Peer, _result
from test_rotation_loopback import Lines
from twisted.internet import protocol, task
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocolFactory,
    IProtocolNegotiationFactory,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.protocols.wire import Echo
from twisted.test import iosim
from twistedharness import Events, client_options, server_options
from zope.interface import implementer

import twisted_rekey
from twisted_rekey import (
    IRekeyable,
    RekeyProtocolMixin,
    RotatingFactory,
    RotationPolicy,
    RotationScheduler,
    rekeyableFor,
)
from twisted_rekey._driver import granularityFor
from twisted_rekey._scheduler import schedulerFor


class Link:
    """One in-memory TLS connection on a clock shared with others."""

    def __init__(
        self,
        cert_files: Any,
        clock: task.Clock,
        serverFactory: protocol.Factory,
        clientFactory: protocol.Factory,
        version: str = "1.3",
    ) -> None:
        sf = TLSMemoryBIOFactory(
            server_options(cert_files, version), False, serverFactory, clock
        )
        cf = TLSMemoryBIOFactory(client_options(cert_files), True, clientFactory, clock)
        c, s, self.pump = iosim.connectedServerAndClient(
            lambda: sf.buildProtocol(None),
            lambda: cf.buildProtocol(None),
            clock=clock,
        )
        self.client: Any = c.wrappedProtocol
        self.server: Any = s.wrappedProtocol
        self.pump.flush()

    def close(self) -> None:
        self.client.transport.loseConnection()
        self.pump.flush()


def link(
    cert_files: Any,
    clock: task.Clock,
    policy: RotationPolicy | None,
    version: str = "1.3",
    side: str = "client",
    granularity: float | None = None,
    serverClass: type[Peer] = Peer,
    renegotiateAsClient: bool = False,
) -> Link:
    """A link whose *side* (a :class:`Peer`) has *policy*."""

    class Rotating(Peer):
        rotationPolicy = policy
        rotationGranularity = granularity

    Rotating.renegotiateAsClient = renegotiateAsClient

    ours: type[Peer] = Rotating
    if side == "server":
        return Link(
            cert_files,
            clock,
            protocol.Factory.forProtocol(type("S", (ours, serverClass), {})),
            protocol.Factory.forProtocol(Peer),
            version,
        )
    return Link(
        cert_files,
        clock,
        protocol.Factory.forProtocol(serverClass),
        protocol.Factory.forProtocol(ours),
        version,
    )


def advance(clock: task.Clock, links: list[Link], seconds: float, step: float) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)
        for each in links:
            each.pump.flush()


# -- time --------------------------------------------------------------------------


def test_interval_with_jitter_bounds_over_many_connections(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=60, jitter=0.2, rng=random.Random(1))
    links = [link(cert_files, clock, policy) for _ in range(24)]
    for each in links:
        each.client.transport.write(b"data")
        each.pump.flush()
    # One pending call for all of them: the deadlines are coalesced.
    assert len(clock.getDelayedCalls()) == 1
    first: dict[int, float] = {}
    for _ in range(80):
        clock.advance(1)
        for i, each in enumerate(links):
            each.pump.flush()
            if each.client.rekeyStats.keyUpdatesSent and i not in first:
                first[i] = clock.seconds()
    assert len(first) == len(links)
    # Each drawn in [48, 72] and rounded up to the 1 s bucket.
    assert all(48 <= t <= 73 for t in first.values()), first
    assert len(set(first.values())) >= 8, "jitter spread them"
    for each in links:
        schedule = each.client.rotationSchedule
        assert schedule.rotations == 1 and schedule.method == "key-update"
        assert each.server.updates == [False]
    # Idle since their rotation: nothing left to time (skip_idle).
    assert clock.getDelayedCalls() == []
    for each in links:
        each.close()
    assert clock.getDelayedCalls() == []


def test_repeated_intervals_with_traffic(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=10, jitter=0.1, rng=random.Random(2))
    one = link(cert_files, clock, policy)
    for _ in range(100):
        one.client.transport.write(b"tick")
        advance(clock, [one], 1, 1)
    # 100 s at ~10 s (+ up to 1 s of rounding): 8 to 11 rotations.
    rotations = one.client.rotationSchedule.rotations
    assert 8 <= rotations <= 11
    assert len(one.server.updates) == rotations
    assert one.server.received == b"tick" * 100
    one.close()
    assert clock.getDelayedCalls() == []


def test_application_key_update_restarts_the_interval(cert_files: Any) -> None:
    """The application's own keyUpdate() is a new key for the policy too."""
    clock = task.Clock()
    policy = RotationPolicy(interval=10, jitter=0)
    one = link(cert_files, clock, policy)
    one.client.transport.write(b"a")
    advance(clock, [one], 8, 1)
    schedule = one.client.rotationSchedule
    assert schedule.rotations == 0
    one.client.keyUpdate()
    one.client.transport.write(b"b")
    one.pump.flush()
    assert schedule.rotations == 1
    advance(clock, [one], 5, 1)  # 13 s: the policy's own would have been at 10
    assert one.client.rekeyStats.keyUpdatesSent == 1
    advance(clock, [one], 6, 1)  # 19 s: 10 s after the application's
    assert one.client.rekeyStats.keyUpdatesSent == 2
    assert one.server.updates == [False, False]
    one.close()


def test_skip_idle(cert_files: Any) -> None:
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(interval=5, jitter=0))
    advance(clock, [one], 300, 5)
    assert one.client.rekeyStats.keyUpdatesSent == 0
    assert clock.getDelayedCalls() == []
    # Data makes the overdue rotation due again: at once.
    one.client.transport.write(b"now")
    one.pump.flush()
    assert one.client.rekeyStats.keyUpdatesSent == 1
    assert one.server.received == b"now"
    one.close()


def test_no_skip_idle_rotates_idle_connections(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=5, jitter=0, skip_idle=False)
    one = link(cert_files, clock, policy)
    advance(clock, [one], 31, 1)
    assert one.client.rekeyStats.keyUpdatesSent == 6
    assert one.server.updates == [False] * 6
    one.close()
    assert clock.getDelayedCalls() == []


def test_granularity_follows_min_interval(cert_files: Any) -> None:
    assert granularityFor(RotationPolicy(interval=60)) == 1.0
    fast = RotationPolicy(interval=0.2, min_interval=0.2)
    assert granularityFor(fast) == 0.05
    assert granularityFor(RotationPolicy(interval=2)) == 0.5
    assert granularityFor(RotationPolicy(max_bytes=1 << 30)) == 1.0
    clock = task.Clock()
    assert schedulerFor(clock, 1.0) is RotationScheduler.forReactor(clock)
    assert schedulerFor(clock, 0.025) is schedulerFor(clock, 0.025)
    assert schedulerFor(clock, 0.025).granularity == 0.025
    one = link(cert_files, clock, RotationPolicy(interval=0.2, min_interval=0.2))
    one.client.transport.write(b"x")
    one.pump.flush()
    advance(clock, [one], 0.3, 0.025)
    assert one.client.rekeyStats.keyUpdatesSent == 1
    one.close()


# -- amounts -----------------------------------------------------------------------


def test_byte_threshold(cert_files: Any) -> None:
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(max_bytes=1000, min_interval=1))
    clock.advance(1)  # min_interval counts from the handshake too
    one.client.transport.write(b"a" * 600)
    one.pump.flush()
    assert one.server.updates == []
    one.client.transport.write(b"b" * 600)
    one.pump.flush()
    # At the write that crossed it, with no timer involved.
    assert one.server.updates == [False]
    assert one.client.rotationSchedule.bytes_sent == 0
    assert one.server.received == b"a" * 600 + b"b" * 600
    # Past the threshold again within min_interval: waits for the floor.
    one.client.transport.write(b"c" * 1200)
    one.pump.flush()
    assert one.server.updates == [False]
    advance(clock, [one], 1, 1)
    assert one.server.updates == [False, False]
    one.close()


def test_record_threshold(cert_files: Any) -> None:
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(max_records=3, min_interval=1))
    clock.advance(1)
    for _ in range(3):
        one.client.transport.write(b"r")
        one.pump.flush()
    assert one.server.updates == [False]
    one.close()


def test_aead_limit_by_default(cert_files: Any) -> None:
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy())
    schedule = one.client.rotationSchedule
    # TLS 1.3 here negotiates an AES-GCM suite: rustls's 2**23 records.
    assert "GCM" in one.client.transport.getHandle().get_cipher_name()
    assert schedule.record_limit == 2**23
    assert schedule.interval_deadline is None
    # Only the record limit can trigger: no timer, whatever the traffic.
    one.client.transport.write(b"x" * 100_000)
    one.pump.flush()
    assert clock.getDelayedCalls() == []
    # Near the limit, the next write rotates.
    clock.advance(1)
    schedule._records = 2**23 - 1
    one.client.transport.write(b"y")
    one.pump.flush()
    assert one.server.updates == [False]
    one.close()


# -- the peer's key ----------------------------------------------------------------


def test_request_peer_one_outstanding(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(request_peer_interval=10, jitter=0, aead_limit=False)
    one = link(cert_files, clock, policy)
    one.client.transport.write(b"x")
    # The peer's key carried data: it is due for renewal.
    one.server.transport.write(b"s")
    one.pump.flush()
    clock.advance(10)  # due; the peer's answer is not pumped yet
    schedule = one.client.rotationSchedule
    assert one.client.rekeyStats.keyUpdatesRequested == 1
    assert schedule.request_outstanding
    # Long past the next deadline, still unanswered: no second request.
    one.client.transport.write(b"y")
    clock.advance(30)
    assert one.client.rekeyStats.keyUpdatesSent == 1
    one.pump.flush()
    assert one.server.updates == [True]
    assert one.client.updates == [False]
    assert not schedule.request_outstanding and schedule.peer_rotations == 1
    # The answer re-arms the request deadline, and the peer's new key
    # carries data again.
    one.client.transport.write(b"z")
    one.server.transport.write(b"t")
    advance(clock, [one], 11, 1)
    assert one.client.rekeyStats.keyUpdatesRequested == 2
    assert one.server.updates == [True, True]
    one.close()
    assert clock.getDelayedCalls() == []


def test_peer_rotation_restarts_the_interval(cert_files: Any) -> None:
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(interval=10, jitter=0))
    one.client.transport.write(b"x")
    advance(clock, [one], 8, 1)
    # The peer asks: our answer is a new sending key, so the interval restarts.
    one.server.keyUpdate(requestPeer=True)
    one.pump.flush()
    assert one.client.rotationSchedule.peer_rotations == 1
    one.client.transport.write(b"x")
    advance(clock, [one], 5, 1)
    assert one.client.rotationSchedule.rotations == 0
    advance(clock, [one], 6, 1)
    assert one.client.rotationSchedule.rotations == 1
    one.close()


# -- TLS 1.2 -----------------------------------------------------------------------


def test_tls12_renegotiates(cert_files: Any, events: Events) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=10, jitter=0)
    one = link(cert_files, clock, policy, version="1.2", side="server")
    schedule = one.server.rotationSchedule
    assert schedule.method == "renegotiation"
    one.server.transport.write(b"x")
    advance(clock, [one], 11, 1)
    assert schedule.rotations == 1
    assert one.server.renegotiationsSeen == one.client.renegotiationsSeen == 1
    assert "renegotiation_started" in events.names()
    # A renegotiation the peer starts renews our key too.
    one.close()
    assert clock.getDelayedCalls() == []


def test_tls12_policy_hears_only_of_renegotiations_it_did_not_start(
    cert_files: Any,
) -> None:
    # Its own renegotiation reaches the policy once, from its Deferred; the
    # application's reaches it from the connection, as a new key both ways.
    clock = task.Clock()
    policy = RotationPolicy(interval=10, jitter=0)
    one = link(cert_files, clock, policy, version="1.2", side="server")
    schedule = one.server.rotationSchedule
    one.server.transport.write(b"x")
    advance(clock, [one], 11, 1)
    assert (schedule.rotations, schedule.peer_rotations) == (1, 0)
    one.server.transport.write(b"y")
    advance(clock, [one], 5, 1)  # 16 s: the next of the policy's is at 21
    done = _result(one.server.renegotiate())
    advance(clock, [one], 1, 1)
    assert done == [None]
    assert (schedule.rotations, schedule.peer_rotations) == (1, 1)
    assert one.client.renegotiationsSeen == 2
    one.server.transport.write(b"z")
    advance(clock, [one], 8, 1)  # 25 s: the interval restarted at 16 s
    assert schedule.rotations == 1
    advance(clock, [one], 3, 1)  # 28 s
    assert (schedule.rotations, schedule.peer_rotations) == (2, 1)
    assert one.client.renegotiationsSeen == 3
    assert one.client.received == b"xyz"
    one.close()
    assert clock.getDelayedCalls() == []


def test_tls12_client_policy_disabled_by_default(
    cert_files: Any, events: Events
) -> None:
    # A client's rotation on TLS 1.2 is a client-initiated renegotiation,
    # which OpenSSL 3 servers refuse by ending the connection: by default a
    # client's policy leaves TLS 1.2 alone, says why once, and the
    # connection lives on.
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(interval=5, jitter=0), "1.2")
    disabled = [e for e in events.events if e["rekey_event"] == "rotation_disabled"]
    assert len(disabled) == 1
    assert "renegotiateAsClient" in disabled[0]["reason"]
    one.client.transport.write(b"x")
    advance(clock, [one], 30, 1)
    assert one.client.lost is None and one.server.lost is None
    assert one.client.rotationSchedule.rotations == 0
    assert one.server.renegotiationsSeen == 0
    assert clock.getDelayedCalls() == []
    one.close()


def test_tls12_client_refused_fails_the_connection(
    cert_files: Any, events: Events
) -> None:
    # With renegotiateAsClient against a server that refuses, the client's
    # OpenSSL fails the connection ("no renegotiation"), as documented.
    # Nothing is left pending or logged as an error.
    clock = task.Clock()
    one = link(
        cert_files,
        clock,
        RotationPolicy(interval=5, jitter=0),
        "1.2",
        renegotiateAsClient=True,
    )
    one.client.transport.write(b"x")
    advance(clock, [one], 6, 1)
    assert "renegotiation_refused" in events.names()
    assert one.client.lost is not None and one.server.lost is not None
    assert one.client.rotationSchedule.rotations == 0
    assert clock.getDelayedCalls() == []


def test_tls12_allowed_client_renegotiates(cert_files: Any) -> None:
    class Allowing(Peer):
        allowClientRenegotiation = True

    clock = task.Clock()
    policy = RotationPolicy(interval=5, jitter=0)
    one = link(
        cert_files,
        clock,
        policy,
        "1.2",
        serverClass=Allowing,
        renegotiateAsClient=True,
    )
    one.client.transport.write(b"x")
    advance(clock, [one], 6, 1)
    assert one.client.rotationSchedule.rotations == 1
    assert one.server.renegotiationsSeen == 1
    one.close()


def test_tls12_without_secure_renegotiation_left_alone(
    cert_files: Any, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenSSL always offers RFC 5746 and has no switch to stop it, so a peer
    # without it is simulated: the driver is told the peer lacks it.
    monkeypatch.setattr(
        "twisted_rekey._connection.secure_renegotiation_support", lambda conn: False
    )
    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(interval=5, jitter=0), "1.2", "server")
    disabled = [e for e in events.events if e["rekey_event"] == "rotation_disabled"]
    assert len(disabled) == 1
    assert "secure renegotiation" in disabled[0]["reason"]
    assert one.server.rotationSchedule.method is None
    one.server.transport.write(b"x")
    advance(clock, [one], 30, 1)
    assert one.server.renegotiationsSeen == 0
    assert clock.getDelayedCalls() == []
    assert [e["rekey_event"] for e in events.events].count("rotation_disabled") == 1
    one.close()


# -- lifetime ----------------------------------------------------------------------


def test_tls12_renegotiation_never_taken_up_stops_rotation(
    cert_files: Any, events: Events
) -> None:
    """
    A client may ignore a HelloRequest (RFC 5246), and OpenSSL then starts
    no other renegotiation: after the timeout the policy stops for that
    connection instead of waiting on the stale one again and again.
    """
    from twisted_rekey._driver import RENEGOTIATION_TIMEOUT

    clock = task.Clock()
    one = link(cert_files, clock, RotationPolicy(interval=5, jitter=0), "1.2", "server")
    one.server.transport.write(b"x")
    one.pump.flush()
    # The HelloRequest is never delivered: the client "ignores" it.
    clock.advance(6)
    # The policy's renegotiation waits for a quiet client first.
    clock.advance(1)
    clock.advance(RENEGOTIATION_TIMEOUT + 1)
    disabled = [e for e in events.events if e["rekey_event"] == "rotation_disabled"]
    assert len(disabled) == 1 and "did not" in disabled[0]["error"]
    clock.advance(60)
    assert [e for e in events.events if e["rekey_event"] == "rotation_failed"] == []
    assert one.server.rotationSchedule.rotations == 0
    one.pump.flush()
    one.close()


def test_timers_cancelled_on_loss(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=60, request_peer_interval=120)
    links = [link(cert_files, clock, policy) for _ in range(5)]
    for each in links:
        each.client.transport.write(b"x")
        each.pump.flush()
    scheduler = RotationScheduler.forReactor(clock)
    assert len(scheduler) == 5 and len(clock.getDelayedCalls()) == 1
    for i, each in enumerate(links):
        if i % 2:
            each.client.transport.loseConnection()
        else:
            each.server.transport.abortConnection()
        each.pump.flush()
    assert len(scheduler) == 0
    assert clock.getDelayedCalls() == []


def test_loss_while_request_unanswered(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(request_peer_interval=5, jitter=0, aead_limit=False)
    one = link(cert_files, clock, policy)
    one.client.transport.write(b"x")
    one.server.transport.write(b"s")
    one.pump.flush()
    clock.advance(5)
    assert one.client.rotationSchedule.request_outstanding
    one.client.transport.abortConnection()
    one.pump.flush()
    assert clock.getDelayedCalls() == []


def test_no_policy_no_schedule(cert_files: Any) -> None:
    clock = task.Clock()
    one = link(cert_files, clock, None)
    assert one.client.rotationSchedule is None
    one.client.transport.write(b"x")
    one.pump.flush()
    assert clock.getDelayedCalls() == []
    one.close()


# -- the factory wrapper -----------------------------------------------------------


def echoTicking(one: Link, clock: task.Clock, seconds: int) -> bytes:
    """Write from the client once a second for *seconds*; what was written."""
    sent = b""
    for i in range(seconds):
        chunk = b"%d," % i
        sent += chunk
        one.client.transport.write(chunk)
        # In eighths: a TLS 1.2 server's policy polls for the client's
        # quiet period (renegotiationQuietPeriod) between its writes.
        advance(clock, [one], 1, 0.125)
    return sent


@implementer(IHandshakeListener)
class Listening(Echo):
    handshakes = 0

    def handshakeCompleted(self) -> None:
        self.handshakes += 1


def test_factory_wrapper_on_unchanged_echo(cert_files: Any) -> None:
    clock = task.Clock()
    inner = protocol.Factory.forProtocol(Listening)
    policy = RotationPolicy(interval=10, jitter=0.1)
    factory = RotatingFactory(inner, policy)
    one = Link(cert_files, clock, factory, protocol.Factory.forProtocol(Peer))
    # Nothing in between: the application's own protocol, on Twisted's TLS.
    app = one.server
    assert type(app) is Listening
    assert isinstance(app.transport, TLSMemoryBIOProtocol)
    assert app.handshakes == 1
    rotation = rekeyableFor(app)
    assert isinstance(rotation, RekeyProtocolMixin)
    assert IRekeyable.providedBy(rotation)
    assert not isinstance(app, RekeyProtocolMixin)
    sent = echoTicking(one, clock, 60)
    assert one.client.received == sent
    rotations = rotation.rotationSchedule.rotations
    assert 5 <= rotations <= 7
    assert len(one.client.updates) == rotations == rotation.rekeyStats.keyUpdatesSent
    # Counted where the bytes leave TLS, without touching the protocol.
    assert rotation.rekeyStats.bytesReceived == len(sent)
    assert rotation.rekeyStats.bytesSent == len(sent)
    assert "dataReceived" not in vars(app) and "makeConnection" not in vars(app)
    one.close()
    assert clock.getDelayedCalls() == []


@implementer(IHandshakeListener)
class Hooked(Echo):
    def connectionMade(self) -> None:
        self.updates: list[bool] = []

    def handshakeCompleted(self) -> None:
        pass

    def keyUpdateReceived(self, updateRequested: bool) -> None:
        self.updates.append(updateRequested)


def test_factory_wrapper_renegotiates_tls12_from_the_server(cert_files: Any) -> None:
    clock = task.Clock()
    factory = RotatingFactory(
        protocol.Factory.forProtocol(Echo), RotationPolicy(interval=10, jitter=0)
    )
    one = Link(cert_files, clock, factory, protocol.Factory.forProtocol(Peer), "1.2")
    rotation: Any = rekeyableFor(one.server)
    assert one.client.received == echoTicking(one, clock, 35)
    assert rotation.rotationSchedule.method == "renegotiation"
    # The client saw each renegotiation complete.
    assert one.client.renegotiationsSeen == rotation.rekeyStats.renegotiations == 3
    one.close()


def test_factory_wrapper_tls12_client_renegotiates_when_allowed(
    cert_files: Any,
) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=5, jitter=0)
    server = RotatingFactory(
        protocol.Factory.forProtocol(Echo), None, allowClientRenegotiation=True
    )
    client = RotatingFactory(
        protocol.Factory.forProtocol(Lines), policy, renegotiateAsClient=True
    )
    one = Link(cert_files, clock, server, client, "1.2")
    ours: Any = rekeyableFor(one.client)
    theirs: Any = rekeyableFor(one.server)
    for i in range(12):
        one.client.transport.write(b"%d;" % i)
        advance(clock, [one], 1, 1)
    assert ours.rotationSchedule.rotations == 2
    assert theirs.rekeyStats.renegotiations == ours.rekeyStats.renegotiations == 2
    assert bytes(one.client.received) == b"".join(b"%d;" % i for i in range(12))
    one.close()


def test_factory_wrapper_calls_the_protocols_hooks(cert_files: Any) -> None:
    clock = task.Clock()
    factory = RotatingFactory(protocol.Factory.forProtocol(Hooked), None)
    one = Link(cert_files, clock, factory, protocol.Factory.forProtocol(Peer))
    one.client.keyUpdate(requestPeer=True)
    one.pump.flush()
    assert one.server.updates == [True]
    stats = rekeyableFor(one.server).rekeyStats  # type: ignore[union-attr]
    assert stats.keyUpdatesReceived == 1 and stats.keyUpdatesSent == 1
    assert one.client.updates == [False]
    one.close()


def test_factory_wrapper_forwards_the_factory(cert_files: Any) -> None:
    calls: list[str] = []

    @implementer(IProtocolNegotiationFactory)
    class Client(protocol.ClientFactory):
        protocol = Echo
        noisy = False

        def startFactory(self) -> None:
            calls.append("start")

        def stopFactory(self) -> None:
            calls.append("stop")

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            calls.append("failed")

        def clientConnectionLost(self, connector: Any, reason: Any) -> None:
            calls.append("lost")

        def acceptableProtocols(self) -> list[bytes]:
            return [b"x-test"]

        def logPrefix(self) -> str:
            return "ClientLog"

    inner = Client()
    factory: Any = RotatingFactory(inner, RotationPolicy(interval=60))
    for interface in (IProtocolNegotiationFactory, IProtocolFactory):
        assert interface.providedBy(factory)
    assert factory.acceptableProtocols() == [b"x-test"]
    assert factory.logPrefix() == "ClientLog" and factory.noisy is False
    factory.doStart()
    factory.doStop()
    factory.clientConnectionFailed(None, None)
    factory.clientConnectionLost(None, None)
    assert calls == ["start", "stop", "failed", "lost"]
    assert inner.numPorts == 0
    # Written through too.
    factory.noisy = True
    assert inner.noisy is True
    assert factory.policy.interval == 60

    class Nothing(protocol.Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    assert RotatingFactory(Nothing(), None).buildProtocol(None) is None


class Slotted:
    """An IProtocol that takes no instance attributes."""

    __slots__ = ("transport",)

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def test_factory_wrapper_says_when_it_cannot_watch(events: Events) -> None:
    class Factory(protocol.Factory):
        def buildProtocol(self, addr: Any) -> Any:
            return Slotted()

    built = RotatingFactory(Factory(), RotationPolicy(interval=60)).buildProtocol(None)
    # Handed over all the same, with a warning instead of a rotation.
    assert type(built) is Slotted
    (event,) = [e for e in events.events if e["rekey_event"] == "rotation_unavailable"]
    assert event["protocol"] is built


def test_mixin_protocol_gets_the_policy(cert_files: Any) -> None:
    clock = task.Clock()
    policy = RotationPolicy(interval=10, jitter=0.1)
    factory = RotatingFactory(protocol.Factory.forProtocol(Peer), policy)
    one = Link(cert_files, clock, factory, protocol.Factory.forProtocol(Peer))
    assert type(one.server) is Peer and one.server.rotationPolicy is policy
    assert rekeyableFor(one.server) is one.server
    assert rekeyableFor(one.server.transport) is one.server
    one.close()


def test_rotating_protocol_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="rekeyableFor"):
        cls = twisted_rekey.RotatingProtocol
    assert issubclass(cls, RekeyProtocolMixin)
    assert "RotatingProtocol" not in twisted_rekey.__all__


def test_factory_wrapper_checks_arguments() -> None:
    inner = protocol.Factory.forProtocol(Echo)
    with pytest.raises(TypeError):
        RotatingFactory(inner, 60)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RotatingFactory(inner, RotationPolicy(interval=5), granularity=0)


def test_factory_wrapper_without_policy_can_rekey(cert_files: Any) -> None:
    clock = task.Clock()
    factory = RotatingFactory(protocol.Factory.forProtocol(Echo), None)
    one = Link(cert_files, clock, factory, protocol.Factory.forProtocol(Peer))
    rotation: Any = rekeyableFor(one.server)
    done = _result(rotation.rekey())
    one.pump.flush()
    assert done == [None] and one.client.updates == [False]
    assert rotation.rotationSchedule is None
    assert rekeyableFor(Echo()) is None
    one.close()


def test_lazy_exports() -> None:
    for name in ("RotatingFactory", "rekeyableFor", "allowALPNWithoutProtocols"):
        assert name in twisted_rekey.__all__
        assert name in dir(twisted_rekey)
