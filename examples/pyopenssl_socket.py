"""
Rotate the keys of a pyOpenSSL connection over plain sockets, no Twisted.

A tiny TLS echo server runs in a thread on 127.0.0.1 with a throw-away
certificate; a :class:`twisted_rekey.RekeyConnection` client connects, sends
data, rotates the keys, sends more, and checks every byte came back.

- TLS 1.3 (default): ``key_update(request_peer=True)``.  The server's own
  info callback proves it read our KeyUpdate, ``get_key_update_type`` shows
  its answer pending until its next write, and the client's info callback
  proves the answer arrived.
- TLS 1.2 (``--tls1_2``): ``rekey()`` renegotiates (the server allows
  client-initiated renegotiation, which OpenSSL 3 refuses by default).  The
  server sees a second ClientHello, and the exported keying material changes
  on both sides, equally.

Run it as ``python examples/pyopenssl_socket.py [--tls1_2]``; it exits 0 when
every proof holds.  Every blocking socket call is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import socket
import struct
import sys
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from twisted_rekey import (
    KeyUpdateType,
    RekeyConnection,
    RekeyMethod,
    allow_client_renegotiation,
)

HOST = "127.0.0.1"
EKM_LABEL = b"EXPORTER-twisted-rekey-example"


def make_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate for 127.0.0.1, valid for one hour."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twisted-rekey example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def bound(sock: socket.socket, seconds: float) -> None:
    """
    Make every blocking send/recv on *sock* give up after *seconds*.

    pyOpenSSL needs a blocking socket (Python's ``settimeout`` makes it
    non-blocking underneath); the kernel's own timeouts keep it blocking and
    bounded: OpenSSL then reports ``WantReadError``/``WantWriteError``.
    """
    if sys.platform == "win32":
        value = struct.pack("I", int(seconds * 1000))
    else:
        whole = int(seconds)
        value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def recv_exactly(conn: SSL.Connection, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = conn.recv(size - len(data))
        except SSL.WantReadError:
            raise TimeoutError("no data from the server in time") from None
        data += chunk
    return bytes(data)


class StateLog:
    """An info callback that keeps OpenSSL's state strings, in order."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, conn: SSL.Connection, where: int, ret: int) -> None:
        with self._lock:
            self.states.append(conn.get_state_string().decode("ascii", "replace"))

    def count(self, text: str) -> int:
        with self._lock:
            return sum(1 for state in self.states if text in state)


class EchoServer(threading.Thread):
    """Accepts one connection and echoes it, recording what it saw."""

    def __init__(self, context: SSL.Context, timeout: float) -> None:
        super().__init__(name="echo server", daemon=True)
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(timeout)
        self.port: int = self.listener.getsockname()[1]
        self.context = context
        self.timeout = timeout
        self.seen = StateLog()
        #: get_key_update_type() right after each read, before the echo.
        self.pending: list[KeyUpdateType] = []
        #: exported keying material after each read (TLS 1.2 proof).
        self.ekm: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            raw, _ = self.listener.accept()
        except OSError as e:
            self.error = e
            return
        raw.settimeout(None)
        bound(raw, self.timeout)
        conn = RekeyConnection(self.context, raw)
        conn.set_info_callback(self.seen)
        conn.set_accept_state()
        try:
            while True:
                try:
                    data = conn.recv(65536)
                except SSL.ZeroReturnError:
                    return
                if conn.get_protocol_version_name() == "TLSv1.3":
                    # A KeyUpdate(update_requested) read with this data leaves
                    # our answer pending (NOT_REQUESTED) until we write.
                    self.pending.append(conn.get_key_update_type())
                else:
                    self.ekm.append(conn.export_keying_material(EKM_LABEL, 32))
                conn.sendall(data)
        except SSL.WantReadError:
            self.error = TimeoutError("the client went quiet")
        except (SSL.Error, OSError) as e:
            self.error = e
        finally:
            raw.close()
            self.listener.close()


def contexts(version: int) -> tuple[SSL.Context, SSL.Context]:
    cert, key = make_certificate()
    server = SSL.Context(SSL.TLS_METHOD)
    server.set_min_proto_version(version)
    server.set_max_proto_version(version)
    server.use_certificate(crypto.X509.from_cryptography(cert))
    server.use_privatekey(crypto.PKey.from_cryptography_key(key))
    if version == SSL.TLS1_2_VERSION:
        allow_client_renegotiation(server)

    client = SSL.Context(SSL.TLS_METHOD)
    client.set_min_proto_version(version)
    client.set_max_proto_version(version)
    store = client.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(cert))
    client.set_verify(SSL.VERIFY_PEER, lambda conn, cert, err, depth, ok: bool(ok))
    return server, client


def echo(client: SSL.Connection, payload: bytes) -> None:
    client.sendall(payload)
    back = recv_exactly(client, len(payload))
    if back != payload:
        raise AssertionError(f"echo mismatch: sent {payload!r}, got {back!r}")


def run(tls12: bool, timeout: float) -> list[str]:
    """Run the demonstration; returns the report lines or raises."""
    version = SSL.TLS1_2_VERSION if tls12 else SSL.TLS1_3_VERSION
    server_ctx, client_ctx = contexts(version)
    server = EchoServer(server_ctx, timeout)
    server.start()
    report: list[str] = []
    sock = socket.create_connection((HOST, server.port), timeout=timeout)
    try:
        sock.settimeout(None)
        bound(sock, timeout)
        client = RekeyConnection(client_ctx, sock)
        client_seen = StateLog()
        client.set_info_callback(client_seen)
        client.set_connect_state()
        client.do_handshake()
        report.append(
            f"connected: {client.get_protocol_version_name()} "
            f"{client.get_cipher_name()} to {HOST}:{server.port}"
        )

        first = b"before the key change: " + bytes(range(64))
        echo(client, first)
        report.append(f"echo before: {len(first)} bytes intact")

        if tls12:
            report += _renegotiate(client, server)
        else:
            report += _key_update(client, server, client_seen)

        second = b"after the key change: " + bytes(range(255, 191, -1))
        echo(client, second)
        report.append(f"echo after: {len(second)} bytes intact under the new keys")
        if tls12:
            ekm = client.export_keying_material(EKM_LABEL, 32)
            if not server.ekm or server.ekm[-1] != ekm:
                raise AssertionError("client and server keys differ after the rekey")
            report.append(
                "proof: the server exports the same new keying material "
                f"({ekm[:8].hex()}...)"
            )
        client.shutdown()
    finally:
        sock.close()
        server.join(timeout)
    if server.is_alive():
        raise TimeoutError("the echo server did not finish")
    if server.error is not None:
        raise AssertionError(f"the echo server failed: {server.error!r}")
    return report


def _key_update(
    client: RekeyConnection, server: EchoServer, client_seen: StateLog
) -> list[str]:
    client.key_update(request_peer=True)
    lines = ["client: key_update(request_peer=True) sent"]
    payload = b"rotate!"
    echo(client, payload)
    if server.seen.count("read client key update") != 1:
        raise AssertionError(f"the server saw no KeyUpdate: {server.seen.states}")
    lines.append('proof: server read our KeyUpdate ("TLSv1.3 read client key update")')
    if server.pending[-1] is not KeyUpdateType.NOT_REQUESTED:
        raise AssertionError(f"server's pending update: {server.pending[-1]!r}")
    lines.append(
        "proof: server's answer was pending until its echo "
        "(get_key_update_type: NOT_REQUESTED)"
    )
    if client_seen.count("read server key update") != 1:
        raise AssertionError(f"no KeyUpdate answer: {client_seen.states}")
    lines.append(
        'proof: client read the server\'s KeyUpdate ("TLSv1.3 read server key update")'
    )
    if client.get_key_update_type() is not KeyUpdateType.NONE:
        raise AssertionError("a KeyUpdate of the client is still pending")
    return lines


def _renegotiate(client: RekeyConnection, server: EchoServer) -> list[str]:
    before = client.export_keying_material(EKM_LABEL, 32)
    hellos = server.seen.count("read client hello")
    method = client.rekey()
    if method is not RekeyMethod.RENEGOTIATION:
        raise AssertionError(f"rekey() used {method}")
    lines = ["client: rekey() started a renegotiation"]
    echo(client, b"rotate!")
    if client.renegotiate_pending() or client.total_renegotiations() != 1:
        raise AssertionError("the renegotiation did not complete")
    lines.append("proof: renegotiation complete (total_renegotiations: 1)")
    if server.seen.count("read client hello") != hellos + 1:
        raise AssertionError(f"the server saw no new ClientHello: {server.seen.states}")
    lines.append("proof: server read a second ClientHello")
    after = client.export_keying_material(EKM_LABEL, 32)
    if after == before:
        raise AssertionError("the exported keying material did not change")
    change = f"{before[:8].hex()}... -> {after[:8].hex()}..."
    lines.append(f"proof: keying material changed ({change})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tls1_2", action="store_true", help="renegotiate on TLS 1.2 instead"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        lines = run(args.tls1_2, args.timeout)
    except Exception as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print("OK: keys rotated, every byte echoed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
