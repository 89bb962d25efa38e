"""
A client of ``twistd -n rekey-echo`` that rotates the keys between chunks
and checks that every byte comes back.

Start the server (it prints where its certificate is), then::

    python examples/echo_client.py --cafile ~/.local/state/twisted-rekey/localhost.pem

It connects to 127.0.0.1:8443 (``--host``, ``--port``), verifies the
server's certificate for ``localhost`` (``--servername``; ``--insecure``
skips verification), then, for each of ``--chunks`` chunks of random bytes:
sends it, waits until all of it has been echoed intact, and (after every
``--rotate-every`` chunks) rotates the keys with ``rekey(requestPeer=True)``
— a TLS 1.3 KeyUpdate asking the server to update its own keys too (a
renegotiation on TLS 1.2) — which fires once the server's answer arrived.
It prints the connection's ``rekeyStats`` and exits 0 when every byte came
back and every rotation was answered, 1 otherwise.  Every wait is bounded
(``--timeout``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from twisted.internet import defer, endpoints, protocol, ssl, task
from twisted.python.failure import Failure

from twisted_rekey import RekeyProtocolMixin


class EchoChecker(RekeyProtocolMixin, protocol.Protocol):
    """Sends chunks and checks their echo; the caller rotates the keys."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.expected = 0
        self.waiting: defer.Deferred[None] | None = None
        self.handshake: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        self.handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None and len(self.received) >= self.expected:
            waiting, self.waiting = self.waiting, None
            waiting.callback(None)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        for d in (self.handshake, self.waiting):
            if d is not None and not d.called:
                d.errback(reason)
        self.closed.callback(None)

    def echo(self, chunk: bytes) -> defer.Deferred[None]:
        """Send *chunk*; fires when as many bytes have come back."""
        self.expected += len(chunk)
        self.waiting = defer.Deferred()
        self.transport.write(chunk)  # type: ignore[union-attr]
        if len(self.received) >= self.expected:
            self.dataReceived(b"")
        return self.waiting


def tls_options(args: argparse.Namespace) -> Any:
    if args.insecure:
        # No verification: for a quick look only.
        return ssl.CertificateOptions()
    trust = None
    if args.cafile:
        with open(args.cafile, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
    return ssl.optionsForClientTLS(args.servername, trustRoot=trust)


async def run(reactor: Any, args: argparse.Namespace) -> int:
    endpoint = endpoints.wrapClientTLS(
        tls_options(args),
        endpoints.HostnameEndpoint(reactor, args.host, args.port, timeout=args.timeout),
    )
    client = await endpoint.connect(protocol.Factory.forProtocol(EchoChecker))
    assert isinstance(client, EchoChecker)
    sent = bytearray()
    rotations = 0
    try:
        await client.handshake.addTimeout(args.timeout, reactor)
        conn = client.transport.getHandle()  # type: ignore[union-attr]
        print(
            f"connected: {conn.get_protocol_version_name()} "
            f"{conn.get_cipher_name()} to {args.host}:{args.port}"
        )
        for i in range(1, args.chunks + 1):
            chunk = os.urandom(args.chunk_size)
            sent += chunk
            await client.echo(chunk).addTimeout(args.timeout, reactor)
            if client.received != sent:
                print(f"FAILED: chunk {i} came back altered", file=sys.stderr)
                return 1
            if i % args.rotate_every:
                print(f"chunk {i}: {len(chunk)} bytes echoed intact")
            else:
                # TLS 1.3: KeyUpdate(update_requested), fires on the server's
                # answer; TLS 1.2: a renegotiation, fires when it completed.
                await client.rekey(requestPeer=True, timeout=args.timeout)
                rotations += 1
                print(f"chunk {i}: {len(chunk)} bytes echoed intact, keys rotated")
            if args.pause:
                await task.deferLater(reactor, args.pause, lambda: None)
    except Exception as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        stats = client.rekeyStats
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
    print(
        f"stats: keyUpdatesSent={stats.keyUpdatesSent} "
        f"keyUpdatesReceived={stats.keyUpdatesReceived} "
        f"keyUpdatesRequested={stats.keyUpdatesRequested} "
        f"renegotiations={stats.renegotiations} "
        f"bytesSent={stats.bytesSent} bytesReceived={stats.bytesReceived}"
    )
    print(f"OK: {len(sent)} bytes echoed intact, {rotations} rotations answered")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--servername", default="localhost")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--cafile", help="the certificate rekey-echo printed")
    trust.add_argument("--insecure", action="store_true", help="do not verify")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=64 * 1024)
    parser.add_argument("--rotate-every", type=int, default=1, help="chunks")
    parser.add_argument("--pause", type=float, default=0.0, help="between chunks")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    async def go(reactor: Any) -> None:
        status = await run(reactor, args)
        if status:
            raise SystemExit(status)  # react() exits with this status

    task.react(go)


if __name__ == "__main__":
    main()
