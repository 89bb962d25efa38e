"""
A rotation policy applied inline by :class:`twisted_rekey.RekeyConnection`
on ``send()``, for applications with no reactor: the peer sees each
rotation the policy asks for, and every byte arrives.
"""

from __future__ import annotations

import socket

import pytest
from memorypair import blocking, make_pair, read_until
from OpenSSL import SSL
from peers import CertFiles, OpenSSLServer

from twisted_rekey import RekeyConnection
from twisted_rekey._policy import RotationPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bytes_threshold_rotates_and_data_arrives() -> None:
    clock = FakeClock()
    policy = RotationPolicy(max_bytes=10_000, min_interval=0.2, aead_limit=False)
    pair = make_pair(client_policy=policy, clock=clock)
    sent = b""
    for i in range(50):
        chunk = bytes([i % 256]) * 1000
        pair.client.send(chunk)
        sent += chunk
        clock.now += 0.1
        pair.pump()
    # 50,000 bytes in 10,000-byte keys: a rotation after each 10,000.
    assert pair.server_seen.count("read client key update") == 5
    schedule = pair.client.rotation_schedule
    assert schedule is not None
    assert schedule.rotations == 5
    assert pair.take("server") == sent


def test_min_interval_holds_back_threshold_rotations() -> None:
    clock = FakeClock()
    policy = RotationPolicy(max_bytes=1000, min_interval=1.0, aead_limit=False)
    pair = make_pair(client_policy=policy, clock=clock)
    # The first write starts the schedule: its key counts as new then.
    for _ in range(30):  # 30 kB in 0.3 s: the floor allows no rotation yet
        pair.client.sendall(b"x" * 1000)
        clock.now += 0.01
    pair.pump()
    assert pair.server_seen.count("read client key update") == 0
    clock.now += 1.0
    pair.client.sendall(b"y")  # the threshold passed long ago: due now
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1
    for _ in range(30):  # and again the floor holds the next one back
        pair.client.sendall(b"x" * 1000)
        clock.now += 0.01
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1
    assert len(pair.take("server")) == 60_001


def test_interval_rotates_on_next_write_and_skips_idle() -> None:
    clock = FakeClock()
    policy = RotationPolicy(interval=60, jitter=0, aead_limit=False)
    pair = make_pair(client_policy=policy, clock=clock)
    pair.client.sendall(b"start")
    clock.now += 59
    pair.client.sendall(b"still the first key")
    pair.pump()
    assert pair.server_seen.count("read client key update") == 0
    clock.now += 2
    pair.client.sendall(b"after the interval")
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1
    # An hour with nothing sent: nothing to rotate; the next write does.
    clock.now += 3600
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1
    pair.client.sendall(b"back")
    pair.pump()
    assert pair.server_seen.count("read client key update") == 2
    assert pair.take("server") == (b"startstill the first keyafter the intervalback")


def test_request_peer_waits_for_the_answer() -> None:
    clock = FakeClock()
    policy = RotationPolicy(
        interval=1, request_peer_interval=1, jitter=0, min_interval=1
    )
    pair = make_pair(client_policy=policy, clock=clock)
    pair.client.sendall(b"a")
    # The peer's key is due by what it carried: the server sends first.
    pair.server.sendall(b"hello")
    pair.pump()
    assert pair.take("client") == b"hello"
    clock.now += 1.5
    pair.client.sendall(b"b")
    pair.pump()
    schedule = pair.client.rotation_schedule
    assert schedule is not None
    assert schedule.request_outstanding
    # The server answers with its next write; the client reads it.
    pair.server.sendall(b"answer")
    pair.pump()
    assert pair.take("client") == b"answer"
    assert not schedule.request_outstanding
    assert schedule.peer_rotations == 1


def test_tls12_policy_renegotiates_with_server() -> None:
    clock = FakeClock()
    policy = RotationPolicy(max_bytes=5000, min_interval=0.2, aead_limit=False)
    pair = make_pair(
        SSL.TLS1_2_VERSION,
        allow_client_reneg=True,
        client_policy=policy,
        clock=clock,
        renegotiate_as_client=True,
    )
    pair.client.sendall(b"start")  # starts the schedule
    for _ in range(3):
        clock.now += 0.25
        pair.client.sendall(b"z" * 5000)
        pair.pump()
    assert pair.client.total_renegotiations() == 3
    assert pair.server_seen.count("read client hello") == 4  # 1 + 3
    assert pair.take("server") == b"start" + b"z" * 15000


def test_tls12_client_policy_stays_off_by_default() -> None:
    """
    Against a server that refuses client renegotiation (OpenSSL 3's
    default), a client's policy must not end its own connection.
    """
    clock = FakeClock()
    policy = RotationPolicy(max_bytes=5000, min_interval=0.2, aead_limit=False)
    pair = make_pair(SSL.TLS1_2_VERSION, client_policy=policy, clock=clock)
    for _ in range(4):
        clock.now += 0.1
        pair.client.sendall(b"z" * 5000)
        pair.pump()
    assert pair.client.total_renegotiations() == 0
    assert pair.client.rotation_error is not None
    assert "renegotiate_as_client" in str(pair.client.rotation_error)
    assert pair.take("server") == b"z" * 20000


def test_rotation_never_fails_a_write_that_succeeded() -> None:
    """
    The application's info callback raising during the rotation's
    handshake step: the write still returns what it sent, and the error
    comes out of the next call.
    """
    clock = FakeClock()
    policy = RotationPolicy(max_bytes=1000, min_interval=0.2, aead_limit=False)
    pair = make_pair(client_policy=policy, clock=clock)
    pair.client.sendall(b"start")

    def raise_on_key_update(conn: SSL.Connection, where: int, ret: int) -> None:
        if b"key update" in conn.get_state_string():
            raise ZeroDivisionError("from the application's callback")

    pair.client.set_info_callback(raise_on_key_update)
    clock.now += 1
    assert pair.client.send(b"x" * 2000) == 2000
    with pytest.raises(ZeroDivisionError):
        pair.client.recv(10)
    pair.pump()
    assert pair.take("server") == b"start" + b"x" * 2000
    assert pair.server_seen.count("read client key update") == 1


def test_policy_type_checked() -> None:
    ctx = SSL.Context(SSL.TLS_METHOD)
    with pytest.raises(TypeError, match="RotationPolicy"):
        RekeyConnection(ctx, None, policy={"interval": 5})  # type: ignore[arg-type]


def test_scheduled_rotation_seen_by_openssl_s_server(cert_files: CertFiles) -> None:
    """The foreign peer logs each KeyUpdate the policy sent."""
    clock = FakeClock()
    policy = RotationPolicy(interval=10, jitter=0, aead_limit=False)
    with OpenSSLServer(cert_files, version="1.3") as server:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.load_verify_locations(str(cert_files.ca_cert))
        ctx.set_verify(SSL.VERIFY_PEER)
        sock = socket.create_connection(server.address, timeout=10)
        blocking(sock)
        conn = RekeyConnection(ctx, sock, policy=policy, clock=clock)
        conn.set_connect_state()
        try:
            conn.do_handshake()
            server.expect_handshake()
            for i in range(3):
                clock.now += 11
                conn.sendall(f"line {i}\n".encode())
                server.expect(rf"line {i}")
            # The first write started the schedule; each later one was due,
            # and its KeyUpdate follows it.
            assert server.expect_key_update(False) is False
            assert server.expect_key_update(False) is False
            assert server.key_updates_received() == [False, False]
            server.send_line("still talking")
            assert b"still talking" in read_until(conn, b"talking")
        finally:
            sock.close()


def test_send_rotates_after_the_same_write_as_if_each_were_counted() -> None:
    # send() tells the schedule of its writes in batches (the per-write path
    # only adds): the rotation must still follow the write that crosses the
    # threshold, a timed one the first write after its deadline, and the
    # schedule's counters must be exact whenever they are read.
    clock = FakeClock()
    policy = RotationPolicy(
        interval=60, jitter=0, max_bytes=10_000, min_interval=0.2, aead_limit=False
    )
    pair = make_pair(client_policy=policy, clock=clock)
    for i in range(1, 10):
        pair.client.send(b"x" * 1000)
        clock.now += 0.025  # past min_interval by the 10th write
        pair.pump()
        schedule = pair.client.rotation_schedule
        assert schedule is not None
        assert (schedule.bytes_sent, schedule.records_sent) == (1000 * i, i)
    assert pair.server_seen.count("read client key update") == 0
    pair.client.send(b"x" * 1000)  # the 10,000th byte
    pair.pump()
    assert pair.server_seen.count("read client key update") == 1
    assert schedule.bytes_sent == 0
    assert schedule.total_bytes_sent == 10_000
    clock.now += 30
    assert pair.client.send(b"y" * 12_000) == 12_000  # past the byte limit
    pair.pump()
    assert pair.server_seen.count("read client key update") == 2
    clock.now += 59
    pair.client.send(b"z")
    pair.pump()
    assert pair.server_seen.count("read client key update") == 2
    clock.now += 2  # the interval passed: the next write rotates
    pair.client.send(b"z")
    pair.pump()
    assert pair.server_seen.count("read client key update") == 3
    assert schedule.total_records_sent == 10 + 1 + 2
    assert len(pair.take("server")) == 22_002
