"""
pyOpenSSL connection pairs joined by memory BIOs, for tests that need no
sockets: a server and a client :class:`twisted_rekey.RekeyConnection`, a pump
that moves bytes until both sides are quiet, and a watcher that records the
handshake messages each side *reads* (from OpenSSL's info callback), which is
how a test proves the peer saw a KeyUpdate or a renegotiation.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trustme
from OpenSSL import SSL

from twisted_rekey import RekeyConnection, _binding, allow_client_renegotiation
from twisted_rekey._binding import ffi, lib
from twisted_rekey._policy import RotationPolicy

_CA = trustme.CA()
_CERT = _CA.issue_cert("localhost", "127.0.0.1", "::1")
# Files, which every pyOpenSSL release since 0.x accepts.
_FILES = tempfile.TemporaryDirectory(prefix="twisted-rekey-tests-")
_CHAIN = os.path.join(_FILES.name, "chain.pem")
_KEY = os.path.join(_FILES.name, "key.pem")
_CA_FILE = os.path.join(_FILES.name, "ca.pem")
_CERT.private_key_and_cert_chain_pem.write_to_path(_CHAIN)
_CERT.private_key_pem.write_to_path(_KEY)
_CA.cert_pem.write_to_path(_CA_FILE)


def blocking(sock: socket.socket, seconds: int = 10) -> None:
    """
    Put *sock* in blocking mode, as pyOpenSSL needs (a Python socket timeout
    makes the socket non-blocking), with every read and write still bounded
    by the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``).
    """
    sock.settimeout(None)
    timeval = struct.pack("ll", seconds, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


@contextmanager
def connected(
    ctx: SSL.Context,
    address: tuple[str, int],
    *,
    servername: bytes | None = None,
    seconds: int = 10,
) -> Iterator[RekeyConnection]:
    """
    A handshaken blocking :class:`RekeyConnection` client to *address*,
    its handshake states recorded in ``conn.seen`` (a :class:`Watcher`);
    shut down and closed on leaving.
    """
    sock = socket.create_connection(address, timeout=seconds)
    blocking(sock, seconds)
    conn = RekeyConnection(ctx, sock)
    if servername is not None:
        conn.set_tlsext_host_name(servername)
    conn.seen = watch(conn)  # type: ignore[attr-defined]
    conn.set_connect_state()
    try:
        conn.do_handshake()
        yield conn
    finally:
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        sock.close()


def read_until(conn: SSL.Connection, marker: bytes) -> bytes:
    """Read from a blocking *conn* until *marker* has arrived."""
    got = b""
    while marker not in got:
        got += conn.recv(65536)
    return got


def server_context(version: int, *, allow_client_reneg: bool = False) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.use_certificate_chain_file(_CHAIN)
    ctx.use_privatekey_file(_KEY)
    if allow_client_reneg:
        allow_client_renegotiation(ctx)
    return ctx


def client_context(version: int) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.load_verify_locations(_CA_FILE)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return ctx


@dataclass
class Watcher:
    """Records the state strings OpenSSL reports on one connection."""

    states: list[str] = field(default_factory=list)

    def count(self, text: str) -> int:
        return sum(1 for s in self.states if text in s)


def watch(conn: SSL.Connection) -> Watcher:
    """
    Record *conn*'s handshake states with a per-connection info callback: a
    :class:`RekeyConnection` chains it behind its own watcher; a plain
    Connection gets it through cffi (pyOpenSSL < 25.2 has no
    ``Connection.set_info_callback``).
    """
    watcher = Watcher()

    def record(state: bytes) -> None:
        watcher.states.append(state.decode("ascii"))

    if isinstance(conn, RekeyConnection):
        conn.set_info_callback(lambda c, where, ret: record(c.get_state_string()))
        return watcher

    def info(ssl: object, where: int, ret: int) -> None:
        record(ffi.string(lib.SSL_state_string_long(ssl)))

    callback = ffi.callback("void (*)(const SSL *, int, int)", info)
    conn._test_info_callback = callback  # type: ignore[attr-defined]
    _binding.function("SSL_set_info_callback")[1](conn._ssl, callback)
    return watcher


@dataclass
class Pair:
    server: RekeyConnection
    client: RekeyConnection
    server_seen: Watcher
    client_seen: Watcher
    received: dict[str, bytearray]

    def pump(self, rounds: int = 50) -> None:
        """Move bytes both ways, reading application data, until quiet."""
        ends = (
            ("server", self.server, self.client),
            ("client", self.client, self.server),
        )
        for _ in range(rounds):
            moved = False
            for _, src, dst in ends:
                try:
                    data = src.bio_read(1 << 20)
                except SSL.WantReadError:
                    data = b""
                if data:
                    dst.bio_write(data)
                    moved = True
            for name, conn, _ in ends:
                while True:
                    try:
                        self.received[name] += conn.recv(1 << 20)
                    except (SSL.WantReadError, SSL.ZeroReturnError):
                        break
            if not moved:
                return
        raise AssertionError(f"still moving bytes after {rounds} rounds")

    def handshake(self) -> Pair:
        for conn in (self.client, self.server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        self.pump()
        return self

    def take(self, name: str) -> bytes:
        data = bytes(self.received[name])
        self.received[name].clear()
        return data


def make_pair(
    version: int = SSL.TLS1_3_VERSION,
    *,
    allow_client_reneg: bool = False,
    client_policy: RotationPolicy | None = None,
    clock: Callable[[], float] | None = None,
    renegotiate_as_client: bool = False,
) -> Pair:
    """
    A handshaken pair.  With *client_policy*, the client applies it inline.
    """
    server = RekeyConnection(
        server_context(version, allow_client_reneg=allow_client_reneg), None
    )
    server.set_accept_state()
    if client_policy is None:
        client = RekeyConnection(client_context(version), None)
    else:
        client = RekeyConnection(
            client_context(version),
            None,
            policy=client_policy,
            clock=clock or time.monotonic,
            renegotiate_as_client=renegotiate_as_client,
        )
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    server_seen = watch(server)
    client_seen = watch(client)
    return Pair(
        server,
        client,
        server_seen,
        client_seen,
        {"server": bytearray(), "client": bytearray()},
    ).handshake()
