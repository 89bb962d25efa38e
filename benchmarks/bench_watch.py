"""
What watching for KeyUpdates and handshakes costs on bulk TLS throughput.

Runs plain Twisted TLS and the same connection with :class:`RekeyProtocolMixin`
on both ends, over loopback sockets, both ends in this process.  Many short
rounds, each one plain and one watched run in alternating order (A B, B A,
...), so that a slow spell of a shared machine hits both alike.  Per run it
records wall-clock throughput and CPU time per byte (``time.process_time()``,
both ends together): CPU cost is far less noisy than throughput on a shared
machine, and it is what watching adds.  It prints the medians, and the
median of the per-round paired ratios with their quartiles.  The target is a
cost of at most 2% (a ratio >= 0.98 for throughput, <= 1.02 for CPU).

    /tmp/venv/bin/python benchmarks/bench_watch.py [--mib 16] [--rounds 40]
    /tmp/venv/bin/python benchmarks/bench_watch.py --profile   # where it goes

Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
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


async def once(
    watched: bool, total: int, sopts: Any, copts: Any
) -> tuple[float, float]:
    """One connection moving *total* bytes: (wall seconds, CPU seconds)."""
    done: defer.Deferred[None] = defer.Deferred()
    sf = protocol.Factory.forProtocol(WatchedSink if watched else Sink)
    sf.done, sf.total = done, total  # type: ignore[attr-defined]
    cf = protocol.ClientFactory.forProtocol(WatchedSource if watched else Source)
    cf.total = total  # type: ignore[attr-defined]
    port = reactor.listenSSL(0, sf, sopts, interface="127.0.0.1")  # type: ignore[attr-defined]
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    reactor.connectSSL("127.0.0.1", port.getHost().port, cf, copts)  # type: ignore[attr-defined]
    await done.addTimeout(120, reactor)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await port.stopListening()
    await task.deferLater(reactor, 0.02, lambda: None)
    return wall, cpu


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def options() -> tuple[Any, Any]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    sopts = ssl.PrivateCertificate.loadPEM(
        cert.private_key_and_cert_chain_pem.bytes()
    ).options()
    copts = ssl.optionsForClientTLS(
        "localhost", ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    )
    return sopts, copts


async def profile(args: argparse.Namespace) -> None:
    """Profile watched runs; print what twisted_rekey's own code costs."""
    sopts, copts = options()
    total = args.mib * 1024 * 1024
    await once(True, total, sopts, copts)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(4):
        await once(True, total, sopts, copts)
    profiler.disable()
    stats = pstats.Stats(profiler)
    everything = stats.total_tt  # type: ignore[attr-defined]
    print(f"profiled: {everything:.3f} s in all (4 x {args.mib} MiB, watched)")
    stats.sort_stats("tottime").print_stats("twisted_rekey", 12)
    ours = sum(
        row[2]
        for (path, _, _), row in stats.stats.items()  # type: ignore[attr-defined]
        if "twisted_rekey" in path
    )
    print(f"time inside twisted_rekey's functions: {100 * ours / everything:.2f}%")


async def main(args: argparse.Namespace) -> None:
    sopts, copts = options()
    total = args.mib * 1024 * 1024
    for watched in (False, True, False, True):  # warm up both paths
        await once(watched, total // 4, sopts, copts)
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(args.rounds):
        for watched in (False, True) if i % 2 == 0 else (True, False):
            runs[watched].append(await once(watched, total, sopts, copts))

    mb = total / 1e6
    tput = {w: [mb / wall for wall, _ in runs[w]] for w in runs}
    nsPerByte = {w: [cpu / total * 1e9 for _, cpu in runs[w]] for w in runs}
    pairedTput = [w / p for p, w in zip(tput[False], tput[True])]
    pairedCpu = [w / p for p, w in zip(nsPerByte[False], nsPerByte[True])]

    print(f"{args.rounds} rounds x {args.mib} MiB per run, A/B order alternating")
    for label, w in (("plain Twisted TLS ", False), ("with rekey watcher", True)):
        print(
            f"{label}: median {statistics.median(tput[w]):7.1f} MB/s, "
            f"{statistics.median(nsPerByte[w]):6.3f} CPU ns/byte "
            f"(both ends)"
        )
    tp = statistics.median(tput[True]) / statistics.median(tput[False])
    cp = statistics.median(nsPerByte[True]) / statistics.median(nsPerByte[False])
    print(f"throughput ratio watched/plain: medians {tp:.3f}; ", end="")
    q1, q2, q3 = quartiles(pairedTput)
    print(f"paired per round: median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    print(f"CPU per byte ratio watched/plain: medians {cp:.3f}; ", end="")
    q1, q2, q3 = quartiles(pairedCpu)
    print(f"paired per round: median {q2:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    cost = 100 * (q2 - 1)
    verdict = "within" if cost <= 2 else "ABOVE"
    print(f"watching costs {cost:+.2f}% CPU per byte: {verdict} the 2% target")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mib", type=int, default=16, help="MiB per run")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--profile", action="store_true", help="profile watched runs instead"
    )
    arguments = parser.parse_args()
    run = profile if arguments.profile else main
    task.react(lambda _: defer.ensureDeferred(run(arguments)))
