"""
Many streams through one reactor: N TLS 1.3 connections over loopback, all
sending at once, with a rotation policy of one second against plain Twisted.

Every variant keeps its N connections open for the whole run (handshakes
are not measured).  In each round every variant in turn streams on all its
connections for a fixed window; what the clients received in that window,
and the process's CPU time, give throughput and CPU per byte.  With
``policy`` every connection really rotates about once a second while it
sends (N KeyUpdates per second):

``plain``
    plain Twisted TLS.
``watch``
    the server factory in :class:`twisted_rekey.RotatingFactory` with no
    policy.
``policy``
    the same with ``RotationPolicy(interval=1)``.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from twisted_rekey import RotatingFactory, RotationPolicy, rekeyableFor

from ._common import Certificates, Figure, median, orders, paired

CHUNK = b"s" * 16384
VARIANTS = ("plain", "watch", "policy")


@implementer(IHandshakeListener)
class Streamer(protocol.Protocol):
    """The server end: streams while its group's window is open."""

    def connectionMade(self) -> None:
        self.group: _Group = self.factory.group  # type: ignore[attr-defined]
        self.paused = False
        self.registered = False

    def handshakeCompleted(self) -> None:
        self.group.streamers.append(self)
        self.group.ready()

    def go(self) -> None:
        if not self.registered:
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]
            self.registered = True
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.group.streaming:
            self.transport.write(CHUNK)  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class Counter(protocol.Protocol):
    """The client end: counts what arrives."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.group.received += len(data)  # type: ignore[attr-defined]


class _Group:
    """One variant's N connections."""

    def __init__(self, variant: str, n: int, certs: Certificates, reactor: Any) -> None:
        self.variant, self.n, self.reactor = variant, n, reactor
        self.streamers: list[Streamer] = []
        self.streaming = False
        self.received = 0
        self.allReady: defer.Deferred[None] = defer.Deferred()
        inner = protocol.Factory.forProtocol(Streamer)
        inner.group = self  # type: ignore[attr-defined]
        factory: Any = inner
        self.policy: RotationPolicy | None = None
        if variant == "watch":
            factory = RotatingFactory(inner, None)
        elif variant == "policy":
            self.policy = RotationPolicy(interval=1.0, min_interval=0.5)
            factory = RotatingFactory(inner, self.policy)
        self.port = reactor.listenSSL(
            0, factory, certs.serverOptions(), interface="127.0.0.1"
        )
        client = protocol.ClientFactory.forProtocol(Counter)
        client.group = self  # type: ignore[attr-defined]
        self.client = client
        self.clientOptions = certs.clientOptions()
        self.connectors: list[Any] = []

    def ready(self) -> None:
        if len(self.streamers) == self.n and not self.allReady.called:
            self.allReady.callback(None)

    async def connect(self) -> None:
        port = self.port.getHost().port
        for i in range(self.n):
            self.connectors.append(
                self.reactor.connectSSL(
                    "127.0.0.1", port, self.client, self.clientOptions, timeout=30
                )
            )
            if i % 50 == 49:  # let the handshakes keep up
                await task.deferLater(self.reactor, 0.01, lambda: None)
        await self.allReady.addTimeout(60 + self.n / 20, self.reactor)

    def rotations(self) -> int:
        total = 0
        for s in self.streamers:
            # RotatingFactory returns the application's own protocol: its
            # rotation is reached through rekeyableFor(), not its transport.
            rekeyable = rekeyableFor(s)
            schedule = None if rekeyable is None else rekeyable.rotationSchedule
            if schedule is not None:
                total += schedule.rotations
        return total

    async def window(self, seconds: float) -> tuple[float, float, int, float]:
        """Stream for *seconds*: (MB/s, CPU ns/byte, bytes, rotations/s)."""
        rot0 = self.rotations()
        self.streaming = True
        self.received = 0
        start, cpu = time.perf_counter(), time.process_time()
        for s in self.streamers:
            s.go()
        await task.deferLater(self.reactor, seconds, lambda: None)
        got = self.received
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.streaming = False
        rotations = self.rotations() - rot0
        # Let what is still in flight arrive before the next variant's turn.
        await task.deferLater(self.reactor, 0.2, lambda: None)
        return got / wall / 1e6, cpu / max(got, 1) * 1e9, got, rotations / wall

    async def close(self) -> None:
        for c in self.connectors:
            c.disconnect()
        await self.port.stopListening()
        await task.deferLater(self.reactor, 0.2, lambda: None)


async def measure(
    reactor: Any, counts: tuple[int, ...], rounds: int, seconds: float
) -> dict[int, dict[str, dict[str, list[float]]]]:
    certs = Certificates()
    results: dict[int, dict[str, dict[str, list[float]]]] = {}
    for n in counts:
        groups = {v: _Group(v, n, certs, reactor) for v in VARIANTS}
        for g in groups.values():
            await g.connect()
        per = results[n] = {
            v: {"mbps": [], "nspb": [], "rotations_per_s": []} for v in VARIANTS
        }
        for v in VARIANTS:  # warm-up turn, not counted
            await groups[v].window(seconds / 4)
        for order in orders(list(VARIANTS), rounds):
            for v in order:
                mbps, nspb, _, rps = await groups[v].window(seconds)
                per[v]["mbps"].append(mbps)
                per[v]["nspb"].append(nspb)
                per[v]["rotations_per_s"].append(rps)
        for g in groups.values():
            await g.close()
    return results


def figures(results: dict[int, dict[str, dict[str, list[float]]]]) -> list[Figure]:
    figs = []
    for n, per in results.items():

        def r(v: str, key: str = "mbps", per: Any = per) -> list[float]:
            return paired(per[v][key], per["plain"][key])

        figs.append(
            Figure(
                f"streams-{n}-policy-vs-plain",
                f"{n} streams through one reactor, 1 s policy / plain (throughput)",
                r("policy"),
                ">= 0.97" if n == 1000 else "",
                cpu=r("policy", "nspb"),
                extra={
                    "watch/plain": f"{median(r('watch')):.3f}",
                    "CPU/byte watch/plain": f"{median(r('watch', 'nspb')):.3f}",
                    "plain": f"{median(per['plain']['mbps']):.0f} MB/s",
                    "rotations/s": f"{median(per['policy']['rotations_per_s']):.0f}",
                },
            )
        )
    return figs
