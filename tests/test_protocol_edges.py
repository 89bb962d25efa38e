"""
Edge cases of the Twisted layer: a build without ``SSL_get_key_update_type``,
a watcher attached after the handshake (as after ``startTLS``), an SNI
callback that switches Contexts, a chained callback that raises, and a
waiter that sends a new request from its callback.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from OpenSSL import SSL
from test_protocol import (
    Pair,
    Peer,
    _result,
)
from twisted.internet import protocol, task
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twistedharness import Events, client_options, server_options

from twisted_rekey import RotationPolicy, _binding
from twisted_rekey.exceptions import FunctionUnavailable


def test_peer_key_update_without_get_key_update_type(
    cert_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the getter cannot be reached, a peer's KeyUpdate is survived."""
    pair = Pair(cert_files)
    real = _binding.function

    def without_getter(name: str) -> Any:
        if name == "SSL_get_key_update_type":
            return _binding.Resolution(name, None, None, "not in this build"), None
        return real(name)

    monkeypatch.setattr(_binding, "function", without_getter)
    for requested in (False, True):
        d = pair.server.keyUpdate(requestPeer=requested)
        pair.pump.flush()
        pair.client.transport.write(b"still here")  # type: ignore[union-attr]
        pair.pump.flush()
        assert _result(d) == [None]
    assert pair.client.lost is None
    assert pair.client.rekeyStats.keyUpdatesReceived == 2
    # The request flag is unknown there: reported as not requested.
    assert pair.client.updates == [False, False]
    with pytest.raises(FunctionUnavailable):
        _binding_getter_is_gone(pair)


def _binding_getter_is_gone(pair: Pair) -> None:
    from twisted_rekey import get_key_update_type

    get_key_update_type(pair.client.transport.getHandle())  # type: ignore[union-attr]


class LateRotating(Peer):
    """Watching starts at handshakeCompleted, as after startTLS."""

    rotationPolicy = RotationPolicy(interval=5, jitter=0)

    def makeConnection(self, transport: Any) -> None:
        protocol.Protocol.makeConnection(self, transport)


def test_client_role_known_when_watching_starts_late(
    cert_files: Any, events: Events
) -> None:
    """
    A watcher attached after the handshake knows from the TLS factory that
    it is a client, so a TLS 1.2 client's policy stays off instead of
    renegotiating into a refusal that would end the connection.
    """
    pair = Pair(cert_files, "1.2", clientClass=LateRotating)
    watcher = pair.client._rekeyWatcher
    assert watcher is not None and watcher.isClient is True
    disabled = [e for e in events.events if e["rekey_event"] == "rotation_disabled"]
    assert len(disabled) == 1 and "renegotiateAsClient" in disabled[0]["reason"]
    pair.client.transport.write(b"x")  # type: ignore[union-attr]
    for _ in range(12):
        pair.clock.advance(1)
        pair.pump.flush()
    assert pair.client.lost is None and pair.server.lost is None
    assert pair.client.rekeyStats.renegotiations == 0


def _pair_with(cert_files: Any, server_options: Any) -> tuple[Any, Any, Any]:
    clock = task.Clock()
    sf = TLSMemoryBIOFactory(
        server_options, False, protocol.Factory.forProtocol(Peer), clock
    )
    cf = TLSMemoryBIOFactory(
        client_options(cert_files), True, protocol.Factory.forProtocol(Peer), clock
    )
    c, s, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(None), lambda: cf.buildProtocol(None), clock=clock
    )
    pump.flush()
    return c.wrappedProtocol, s.wrappedProtocol, pump


def test_sni_switched_context_callback_runs(cert_files: Any) -> None:
    """The chained callback is the one of the Context in effect, after SNI."""
    calls: list[str] = []
    first = server_options(cert_files, "1.3")
    second = server_options(cert_files, "1.3")
    ctx_a = first.getContext()
    ctx_b = second.getContext()
    ctx_a.set_info_callback(lambda conn, where, ret: calls.append("A"))
    ctx_b.set_info_callback(lambda conn, where, ret: calls.append("B"))
    ctx_a.set_tlsext_servername_callback(lambda conn: conn.set_context(ctx_b))

    client, server, pump = _pair_with(cert_files, first)
    assert server._rekeyWatcher is not None
    calls.clear()
    d = client.keyUpdate(requestPeer=True)
    pump.flush()
    server.transport.write(b"answer")
    pump.flush()
    assert _result(d) == [None]
    assert calls and set(calls) == {"B"}, calls
    client.transport.loseConnection()
    pump.flush()


def test_chained_callback_error_does_not_stop_watching(
    cert_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A Context info callback that raises is reported as it would be without
    the mixin (cffi's unraisable hook), and watching and data go on.
    """
    options = server_options(cert_files, "1.3")
    handshaken: list[bool] = []

    def broken(c: SSL.Connection, where: int, ret: int) -> None:
        if handshaken:
            raise ZeroDivisionError("the application's own callback")

    options.getContext().set_info_callback(broken)
    client, server, pump = _pair_with(cert_files, options)
    handshaken.append(True)
    reported: list[BaseException | None] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value)
    )
    d = client.keyUpdate()
    pump.flush()
    client.transport.write(b"data")
    pump.flush()
    assert _result(d) == [None]
    assert server.lost is None
    assert bytes(server.received) == b"data"
    assert server.rekeyStats.keyUpdatesReceived == 1
    assert reported and all(isinstance(e, ZeroDivisionError) for e in reported)
    client.transport.loseConnection()
    pump.flush()


def test_new_request_from_a_waiter_is_not_answered_by_an_older_update(
    cert_files: Any,
) -> None:
    """
    The peer's answer and a further KeyUpdate of its own arrive in one read;
    a new request sent from the first Deferred's callback must wait for an
    answer that comes after it, not be "answered" by the second update.
    """
    pair = Pair(cert_files)
    second: list[Any] = []
    first = pair.client.keyUpdate(requestPeer=True)
    first.addCallback(lambda _: second.append(pair.client.keyUpdate(requestPeer=True)))
    pair.pump.pump()  # the request reaches the server, which answers at once
    pair.server.keyUpdate()  # and rotates again, in the same flight
    pair.pump.pump()  # both reach the client in one read
    assert _result(first) == [None]
    assert pair.client.rekeyStats.keyUpdatesReceived == 2
    (d,) = second
    assert _result(d) == []
    pair.pump.flush()  # the server reads the new request and answers it
    assert _result(d) == [None]
    assert pair.client.rekeyStats.keyUpdatesReceived == 3


def test_client_renegotiation_dropped_where_openssl_would_accept_it(
    cert_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    OpenSSL before 3.0 accepts a client's renegotiation by default: a server
    that did not opt in drops the client itself.  Simulated here: the
    connection accepts at the OpenSSL level, and the version check says old.
    """
    from twisted_rekey import _renegotiation
    from twisted_rekey._binding import lib
    from twisted_rekey._connection import OP_ALLOW_CLIENT_RENEGOTIATION
    from twisted_rekey.exceptions import PeerRefused, RenegotiationRateLimited

    monkeypatch.setattr(_renegotiation, "_OPENSSL_BEFORE_3", True)
    pair = Pair(cert_files, "1.2")
    server_conn = pair.server.transport.getHandle()  # type: ignore[union-attr]
    lib.SSL_set_options(server_conn._ssl, OP_ALLOW_CLIENT_RENEGOTIATION)
    d = pair.client.renegotiate()
    pair.pump.flush()
    (failure,) = _result(d)
    assert failure.check(PeerRefused)
    assert pair.server.lost is not None
    assert pair.server.lost.check(RenegotiationRateLimited)
    assert "does not allow" in str(pair.server.lost.value)
