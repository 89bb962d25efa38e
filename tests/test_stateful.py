"""
A hypothesis state machine over memory BIOs (``iosim`` with a shared
``task.Clock``): random interleavings of writes, KeyUpdates of both kinds
from both sides, renegotiations, pauses and closes.

Renegotiations are the server's, as a policy makes them: an OpenSSL client
that starts one itself ends the connection ("unexpected record") when the
server's data, written before the server saw the ClientHello, arrives in
the middle of it, and no sender can know to hold that data back.

Whatever the order: no exception escapes, each direction's data arrives
whole and in order, the counters of one side agree with what the other
saw, and the library never trips its own guard on the other side (a
rotation pattern it allows never ends a connection to a peer running it).
"""

from __future__ import annotations

import tempfile
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from peers import make_cert_files
from test_protocol import Pair, Peer, _result

from twisted_rekey import (
    AlreadyInProgress,
    ConnectionStateError,
    PeerRefused,
    RotationRateLimited,
    WrongProtocolVersion,
)

_DIRECTORY = tempfile.TemporaryDirectory(prefix="twisted-rekey-stateful-")
CERTS = make_cert_files(_DIRECTORY.name)
SIDES = st.sampled_from(["client", "server"])


class Rotations(RuleBasedStateMachine):
    @initialize(version=st.sampled_from(["1.3", "1.2"]))
    def start(self, version: str) -> None:
        self.version = version
        self.pair = Pair(CERTS, version)
        self.sent = {"client": bytearray(), "server": bytearray()}
        self.closed: str | None = None
        self.waiting: list[list[Any]] = []

    def peer(self, side: str) -> Peer:
        return getattr(self.pair, side)  # type: ignore[no-any-return]

    @staticmethod
    def other(side: str) -> str:
        return "server" if side == "client" else "client"

    def refusedOnly(self, result: list[Any], *allowed: type[Exception]) -> None:
        if result and result[0] is not None:
            failure = result[0]
            assert failure.check(*allowed), failure.getTraceback()

    @precondition(lambda self: self.closed is None)
    @rule(side=SIDES, data=st.binary(min_size=1, max_size=40000))
    def write(self, side: str, data: bytes) -> None:
        self.peer(side).transport.write(data)  # type: ignore[union-attr]
        self.sent[side] += data

    @precondition(lambda self: self.closed is None)
    @rule(side=SIDES, request=st.booleans())
    def keyUpdate(self, side: str, request: bool) -> None:
        result = _result(self.peer(side).keyUpdate(requestPeer=request))
        if not result:
            self.waiting.append(result)  # waits for the peer's answer
        allowed: tuple[type[Exception], ...] = (RotationRateLimited, AlreadyInProgress)
        if self.version == "1.2":
            allowed = (WrongProtocolVersion,)
        self.refusedOnly(result, *allowed)

    @precondition(lambda self: self.closed is None)
    @rule()
    def renegotiate(self) -> None:
        result = _result(self.pair.server.renegotiate())
        if not result:
            self.waiting.append(result)
        allowed: tuple[type[Exception], ...] = (AlreadyInProgress,)
        if self.version == "1.3":
            allowed = (WrongProtocolVersion,)
        self.refusedOnly(result, *allowed)

    @rule()
    def pump(self) -> None:
        self.pair.pump.flush()

    @rule(seconds=st.sampled_from([0.01, 0.25, 1.2, 11.0]))
    def pause(self, seconds: float) -> None:
        self.pair.clock.advance(seconds)

    @precondition(lambda self: self.closed is None)
    @rule(side=SIDES)
    def close(self, side: str) -> None:
        self.closed = side
        self.peer(side).transport.loseConnection()  # type: ignore[union-attr]

    @invariant()
    def inOrder(self) -> None:
        if not hasattr(self, "pair"):
            return
        for side in ("client", "server"):
            received = bytes(self.peer(self.other(side)).received)
            assert bytes(self.sent[side]).startswith(received)
        if self.closed is None:
            # Nothing this library sent ended the connection.
            assert self.pair.client.lost is None, self.pair.client.lost
            assert self.pair.server.lost is None, self.pair.server.lost

    def teardown(self) -> None:
        if not hasattr(self, "pair"):
            return
        pair = self.pair
        pair.pump.flush()
        if self.closed is None:
            for side in ("client", "server"):
                received = bytes(self.peer(self.other(side)).received)
                assert received == bytes(self.sent[side])
            client, server = pair.client.rekeyStats, pair.server.rekeyStats
            assert client.keyUpdatesSent == server.keyUpdatesReceived
            assert server.keyUpdatesSent == client.keyUpdatesReceived
            assert client.renegotiations == server.renegotiations
            assert client.bytesSent == server.bytesReceived == len(self.sent["client"])
            assert server.bytesSent == client.bytesReceived == len(self.sent["server"])
            assert pair.server.updates.count(True) == client.keyUpdatesRequested
            pair.client.transport.loseConnection()  # type: ignore[union-attr]
        else:
            # What the closing side wrote before it closed arrived whole.
            closer = self.closed
            received = bytes(self.peer(self.other(closer)).received)
            assert received == bytes(self.sent[closer])
        for _ in range(3):
            pair.pump.flush()
            pair.clock.advance(31)
        pair.pump.flush()
        assert pair.client.lost is not None and pair.server.lost is not None
        for result in self.waiting:
            assert result, "a Deferred never fired"
            # Held for the sending rate until after the close: refused.
            self.refusedOnly(result, PeerRefused, ConnectionStateError)
        assert pair.clock.getDelayedCalls() == []


Rotations.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRotations = Rotations.TestCase
