"""
Wire-level proof that ``key_update`` changes the keys.

Our client talks to Python's ``ssl`` module over memory BIOs; every byte the
client writes is captured and its secrets come from pyOpenSSL's key-log
callback.  The records after our KeyUpdate must open under the *next* traffic
secret (RFC 8446 §7.2, derived here independently with cryptography's HKDF)
and must not open under the old one, while Python's ``ssl`` keeps reading
them: the peer followed the change too.
"""

from __future__ import annotations

import ssl

import pytest
import tls13
from OpenSSL import SSL
from peers import CertFiles

from twisted_rekey import RekeyConnection
from twisted_rekey._binding import lib

SUITES = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
]


class _Link:
    """Our RekeyConnection (client) joined to an ``ssl.SSLObject`` (server)."""

    def __init__(self, certs: CertFiles, suite: str) -> None:
        self.keylog: list[bytes] = []
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.load_verify_locations(str(certs.ca_cert))
        ctx.set_verify(SSL.VERIFY_PEER)
        ctx.set_keylog_callback(lambda conn, line: self.keylog.append(line))
        # pyOpenSSL has no set_ciphersuites; the cffi lib has.
        assert lib.SSL_CTX_set_ciphersuites(ctx._context, suite.encode()) == 1
        self.client = RekeyConnection(ctx, None)
        self.client.set_connect_state()

        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        server_ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.server = server_ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=True
        )
        self.client_wrote = bytearray()
        self.server_read = bytearray()

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = self.client.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if data:
                self.client_wrote += data
                self.incoming.write(data)
                moved = True
            try:
                self.server.do_handshake()
                while True:
                    self.server_read += self.server.read(1 << 20)
            except ssl.SSLWantReadError:
                pass
            out = self.outgoing.read()
            if out:
                self.client.bio_write(out)
                moved = True
            try:
                self.client.do_handshake()
                self.client.recv(1 << 20)
            except SSL.WantReadError:
                pass
            if not moved:
                return
        raise AssertionError("still moving bytes")


@pytest.mark.parametrize("suite", SUITES)
def test_records_after_key_update_use_the_next_secret(
    cert_files: CertFiles, suite: str
) -> None:
    link = _Link(cert_files, suite)
    link.pump()
    assert link.client.get_cipher_name() == suite

    link.client.sendall(b"under the first key")
    link.pump()
    link.client.key_update()
    link.client.sendall(b"under the second key")
    link.pump()
    link.client.key_update(request_peer=True)
    link.client.sendall(b"under the third key")
    link.pump()

    # The foreign peer read everything, across both changes.
    assert bytes(link.server_read) == (
        b"under the first keyunder the second keyunder the third key"
    )

    log = tls13.parse_key_log(b"\n".join(link.keylog))
    secret0 = log.client_traffic_secret()
    records = tls13.decrypt_stream(bytes(link.client_wrote), secret0, suite)

    data = [(r.generation, r.plaintext) for r in records if r.content_type == 23]
    assert data == [
        (0, b"under the first key"),
        (1, b"under the second key"),
        (2, b"under the third key"),
    ]
    flags = [f for r in records for f in tls13.key_updates_in(r)]
    assert flags == [False, True]

    # And not under the old key: the record after the first KeyUpdate
    # fails to open with generation 0's key at any plausible sequence number.
    after = next(r for r in records if r.generation == 1)
    old_keys = tls13.derive_key_iv(secret0, suite)
    for seq in range(8):
        with pytest.raises(tls13.DecryptionError):
            tls13.decrypt_record(after.record, old_keys, seq, suite)
    # The next secret is the RFC's derivation, not just "some other key".
    hash_ = tls13.cipher_suite(suite).hash
    new_keys = tls13.derive_key_iv(tls13.next_traffic_secret(secret0, hash_), suite)
    assert tls13.decrypt_record(after.record, new_keys, 0, suite)[1] == (
        b"under the second key"
    )


def test_keylog_has_both_directions(cert_files: CertFiles) -> None:
    """The key-log callback gives both traffic secrets of the connection."""
    link = _Link(cert_files, SUITES[0])
    link.pump()
    log = tls13.parse_key_log(b"\n".join(link.keylog))
    conn = log.connection()
    assert {"CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"} <= set(conn)
    assert conn["CLIENT_TRAFFIC_SECRET_0"] != conn["SERVER_TRAFFIC_SECRET_0"]
