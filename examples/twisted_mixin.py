"""
Key rotation for a Twisted protocol in a few lines: mix in
:class:`twisted_rekey.RekeyProtocolMixin`, and give it a rotation policy.

Runs by itself: a TLS echo server on a free loopback port (with a throw-away
certificate) whose connections rotate their keys every second while data
flows, and a client that sends a line every 0.3 s, asks for one rotation of
its own with ``keyUpdate(requestPeer=True)``, and stops after 3 seconds.
``python examples/twisted_mixin.py`` exits 0 when both sides saw rotations.
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from twisted.internet import endpoints, protocol, ssl, task

from twisted_rekey import RekeyProtocolMixin, RotationPolicy


class Echo(RekeyProtocolMixin, protocol.Protocol):
    rotationPolicy = RotationPolicy(interval=1.0)  # and before AEAD limits

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class Client(RekeyProtocolMixin, protocol.Protocol):
    def keyUpdateReceived(self, updateRequested: bool) -> None:
        print("client: the server rotated its sending keys")


async def main(reactor: Any) -> None:
    key, cert = make_certificate()
    server = endpoints.SSL4ServerEndpoint(
        reactor,
        0,
        ssl.CertificateOptions(privateKey=key, certificate=cert),
        5,
        "127.0.0.1",
    )
    port = await server.listen(protocol.Factory.forProtocol(Echo))
    trust = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate(cert))
    tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    factory = protocol.Factory.forProtocol(Client)
    client = await endpoints.wrapClientTLS(trust, tcp).connect(factory)
    for i in range(10):
        client.transport.write(b"line %d\n" % i)
        if i == 3:
            await client.keyUpdate(requestPeer=True, timeout=5)
            print("client: keyUpdate(requestPeer=True) answered")
        await task.deferLater(reactor, 0.3, lambda: None)
    stats = client.rekeyStats
    print(f"client: sent {stats.keyUpdatesSent}, received {stats.keyUpdatesReceived}")
    client.transport.loseConnection()
    await port.stopListening()
    if stats.keyUpdatesSent < 1 or stats.keyUpdatesReceived < 2:
        raise SystemExit("FAILED: expected our KeyUpdate, its answer and the server's")


def make_certificate() -> tuple[Any, Any]:
    """A self-signed certificate for 127.0.0.1, valid for an hour."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto

    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(san, critical=False)
        .sign(pkey, hashes.SHA256())
    )
    return crypto.PKey.from_cryptography_key(pkey), crypto.X509.from_cryptography(cert)


if __name__ == "__main__":
    task.react(main)  # exits 0, or 1 with the reason on stderr
