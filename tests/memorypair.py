"""
pyOpenSSL connection pairs joined by memory BIOs, for tests that need no
sockets: a server and a client :class:`twisted_rekey.RekeyConnection`, a pump
that moves bytes until both sides are quiet, and a watcher that records the
handshake messages each side *reads* (from OpenSSL's info callback), which is
how a test proves the peer saw a KeyUpdate or a renegotiation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trustme
from OpenSSL import SSL

from twisted_rekey import RekeyConnection, allow_client_renegotiation

_CA = trustme.CA()
_CERT = _CA.issue_cert("localhost", "127.0.0.1", "::1")


def server_context(version: int, *, allow_client_reneg: bool = False) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    _CERT.configure_cert(ctx)
    if allow_client_reneg:
        allow_client_renegotiation(ctx)
    return ctx


def client_context(version: int) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    _CA.configure_trust(ctx)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return ctx


@dataclass
class Watcher:
    """Records the state strings OpenSSL reports on one connection."""

    states: list[str] = field(default_factory=list)

    def __call__(self, conn: SSL.Connection, where: int, ret: int) -> None:
        self.states.append(conn.get_state_string().decode("ascii"))

    def count(self, text: str) -> int:
        return sum(1 for s in self.states if text in s)


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
    version: int = SSL.TLS1_3_VERSION, *, allow_client_reneg: bool = False
) -> Pair:
    server = RekeyConnection(
        server_context(version, allow_client_reneg=allow_client_reneg), None
    )
    server.set_accept_state()
    client = RekeyConnection(client_context(version), None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    server_seen, client_seen = Watcher(), Watcher()
    server.set_info_callback(server_seen)
    client.set_info_callback(client_seen)
    return Pair(
        server,
        client,
        server_seen,
        client_seen,
        {"server": bytearray(), "client": bytearray()},
    ).handshake()
