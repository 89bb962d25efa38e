"""
What watching for KeyUpdates and handshakes costs on bulk TLS throughput.

Runs plain Twisted TLS and the same connection with :class:`RekeyProtocolMixin`
on both ends, over loopback sockets, interleaved (A B A B ...), and prints the
median throughput of each and their ratio.  The target is a ratio >= 0.98.

    /tmp/venv/bin/python benchmarks/bench_watch.py [--mib 64] [--rounds 7]

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import trustme
from twisted.internet import defer, protocol, reactor, ssl, task

from twisted_rekey import RekeyProtocolMixin

CHUNK = b"x" * 65536


class Sink(protocol.Protocol):
    def connectionMade(self) -> None:
        self.count = 0
        self.done: defer.Deferred[None] = self.factory.done  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.count >= self.factory.total:  # type: ignore[attr-defined]
            self.transport.loseConnection()  # type: ignore[union-attr]
            if not self.done.called:
                self.done.callback(None)


class Source(protocol.Protocol):
    def connectionMade(self) -> None:
        self.left = self.factory.total  # type: ignore[attr-defined]
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            self.left -= len(CHUNK)
            self.transport.write(CHUNK)  # type: ignore[union-attr]
        if self.left <= 0:
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


class WatchedSink(RekeyProtocolMixin, Sink):
    pass


class WatchedSource(RekeyProtocolMixin, Source):
    pass


async def once(watched: bool, total: int, sopts: Any, copts: Any) -> float:
    done: defer.Deferred[None] = defer.Deferred()
    sf = protocol.Factory.forProtocol(WatchedSink if watched else Sink)
    sf.done, sf.total = done, total  # type: ignore[attr-defined]
    cf = protocol.ClientFactory.forProtocol(WatchedSource if watched else Source)
    cf.total = total  # type: ignore[attr-defined]
    port = reactor.listenSSL(0, sf, sopts, interface="127.0.0.1")  # type: ignore[attr-defined]
    start = time.perf_counter()
    reactor.connectSSL("127.0.0.1", port.getHost().port, cf, copts)  # type: ignore[attr-defined]
    await done.addTimeout(120, reactor)
    elapsed = time.perf_counter() - start
    await port.stopListening()
    await task.deferLater(reactor, 0.05, lambda: None)
    return total / elapsed / 1e6


async def main(args: argparse.Namespace) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    sopts = ssl.PrivateCertificate.loadPEM(
        cert.private_key_and_cert_chain_pem.bytes()
    ).options()
    copts = ssl.optionsForClientTLS(
        "localhost", ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    )
    total = args.mib * 1024 * 1024
    await once(False, total // 8, sopts, copts)  # warm up
    await once(True, total // 8, sopts, copts)
    plain: list[float] = []
    watched: list[float] = []
    for i in range(args.rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        for w in order:
            (watched if w else plain).append(await once(w, total, sopts, copts))
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"plain Twisted TLS : median {p:8.1f} MB/s  {[round(x) for x in plain]}")
    print(f"with rekey watcher: median {w:8.1f} MB/s  {[round(x) for x in watched]}")
    print(f"ratio watched/plain: {w / p:.3f} (cost {100 * (1 - w / p):+.1f}%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    arguments = parser.parse_args()
    task.react(lambda _: defer.ensureDeferred(main(arguments)))
