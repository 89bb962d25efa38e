"""
A TLS 1.2 renegotiation of ours and the application's writes, in memory
(``iosim`` with a ``task.Clock``): a server's writes wait from its HelloRequest
until the client's ClientHello (a Go or GnuTLS client in its handshake takes
data for a protocol error); a renegotiation that starts but never ends
closes the connection, logged, at its deadline; and a policy's renegotiation
waits for the client to pause (Java's JSSE writes in the middle of its
handshake, which OpenSSL rejects).  The same against real Go
clients is in ``test_foreign_stacks.py``.
"""

from __future__ import annotations

from typing import Any

from test_protocol import Pair, Peer, _result
from twistedharness import Events

from twisted_rekey import RekeyTimeout, handshake_complete
from twisted_rekey._renegotiation import RENEGOTIATION_DEADLINE


class RecordingClient(Peer):
    """Notes whether it was in a handshake when each chunk arrived."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.seenAt: list[tuple[bytes, bool]] = []

    def dataReceived(self, data: bytes) -> None:
        conn = self.transport.getHandle()  # type: ignore[union-attr]
        self.seenAt.append((data, handshake_complete(conn)))
        super().dataReceived(data)


def test_server_writes_wait_for_the_client_hello(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2", clientClass=RecordingClient)
    client = pair.client
    assert isinstance(client, RecordingClient)
    done = _result(pair.server.renegotiate())
    pair.server.transport.write(b"during")  # type: ignore[union-attr]
    pair.pump.flush()
    assert done == [None]
    # Not in the middle of the client's handshake: after it.
    assert client.seenAt == [(b"during", True)]
    assert client.renegotiationsSeen == 1
    assert pair.server.rekeyStats.bytesSent == len(b"during")


def test_writes_go_out_when_the_client_ignores_the_hello_request(
    cert_files: Any,
) -> None:
    pair = Pair(cert_files, "1.2")
    done = _result(pair.server.renegotiate(timeout=3))
    pair.server.transport.write(b"held")  # type: ignore[union-attr]
    # Nothing moves for 3 s, as with a client that ignores HelloRequests.
    pair.clock.advance(3)
    assert len(done) == 1 and done[0].check(RekeyTimeout)
    pair.pump.flush()
    assert bytes(pair.client.received) == b"held"
    assert pair.server.lost is None


def test_stuck_renegotiation_closes_the_connection(
    cert_files: Any,
    events: Events,
) -> None:
    pair = Pair(cert_files, "1.2")
    done = _result(pair.server.renegotiate(timeout=3))
    serverConn = pair.server.transport.getHandle()  # type: ignore[union-attr]
    # Until the server has read the ClientHello; then the client goes
    # silent, mid-handshake.
    for _ in range(5):
        if not handshake_complete(serverConn):
            break
        pair.pump.pump()
    assert not handshake_complete(serverConn)
    pair.clock.advance(3)
    assert "renegotiation_stuck" in events.names()
    pair.pump.flush()
    assert pair.server.lost is not None
    assert pair.server.lost.check(RekeyTimeout)
    assert len(done) == 1 and done[0].check(Exception)


def _policyRotation(pair: Pair, timeout: float | None = 30) -> list[Any]:
    # What RotationDriver calls on a TLS 1.2 server when the policy says.
    watcher = pair.server._rekeyWatcher
    assert watcher is not None
    rotating = watcher.rotate(False, timeout, "test")
    assert rotating is not None
    return _result(rotating)


def test_policy_renegotiation_waits_for_a_quiet_client(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    quiet = pair.server.renegotiationQuietPeriod
    assert quiet == 0.25
    done = _policyRotation(pair)
    for _ in range(10):
        pair.client.transport.write(b"busy")  # type: ignore[union-attr]
        pair.pump.flush()
        pair.clock.advance(quiet / 2)
    assert pair.server.rekeyStats.renegotiations == 0
    assert pair.client.renegotiationsSeen == 0
    pair.clock.advance(quiet)
    pair.pump.flush()
    assert done == [None]
    assert pair.client.renegotiationsSeen == 1


def test_policy_renegotiation_gives_up_on_a_client_never_quiet(
    cert_files: Any,
) -> None:
    pair = Pair(cert_files, "1.2")
    done = _policyRotation(pair, timeout=None)
    for _ in range(int(RENEGOTIATION_DEADLINE / 0.1) + 10):
        pair.client.transport.write(b"busy")  # type: ignore[union-attr]
        pair.pump.flush()
        pair.clock.advance(0.1)
        if done:
            break
    assert len(done) == 1 and done[0].check(RekeyTimeout)
    assert "never quiet" in str(done[0].value)
    assert pair.client.renegotiationsSeen == 0
    assert pair.server.lost is None
    assert not pair.clock.getDelayedCalls()


def test_explicit_renegotiate_does_not_wait(cert_files: Any) -> None:
    pair = Pair(cert_files, "1.2")
    pair.client.transport.write(b"busy")  # type: ignore[union-attr]
    done = _result(pair.server.renegotiate())
    pair.pump.flush()
    assert done == [None]
