"""
Bulk TLS throughput over loopback while the keys rotate, and what watching
a connection costs when they do not.

One process holds both ends (so CPU time is both ends together), the server
sends 64 KiB writes as fast as the client takes them, and every variant of a
round moves the same bytes, in an order that rotates from round to round:

``plain``
    plain Twisted TLS, no rotation: the baseline of every TLS 1.3 figure
    (``plain12`` for TLS 1.2).
``watch``
    both ends with :class:`twisted_rekey.RekeyProtocolMixin`, no rotation.
``bare:<kind>:<bytes>``
    plain Twisted, and the sender calls the resolved C function itself
    (``SSL_key_update`` + ``SSL_do_handshake``, or ``SSL_renegotiate`` /
    ``SSL_renegotiate_abbreviated``) every *bytes*: the limit any library
    on OpenSSL could reach.
``lib:<kind>:<bytes>``
    both ends with the mixin, and the sender calls its public
    ``keyUpdate()`` / ``renegotiate()`` every *bytes*.  By default the
    library sends at most 6 KeyUpdates per 1.1 s (``KEY_UPDATE_RATE_SENT``,
    so that no known peer's cap is tripped) and holds the rest: at bulk
    speed it would then rotate a hundred times less often than the bare
    call, and look cheaper than it is.  These runs lift that cap on the
    sender, and the *rotations* reported for a ``lib`` variant are the ones
    the receiver saw (its ``rekeyStats``), equal to the bare call's.

*kind* is ``ku`` (KeyUpdate), ``kureq`` (KeyUpdate asking the peer to
update too), ``full`` or ``resumed`` (TLS 1.2 renegotiation; the server
keeps a session cache only for ``resumed``).  Timing starts when the
server's handshake completes and stops when the client has every byte.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from twisted_rekey import RekeyProtocolMixin
from twisted_rekey._policy import KeyUpdateCounter

from ._common import Certificates, Figure, median, orders, paired

CHUNK = b"x" * 65536
KIB, MIB = 1024, 1024 * 1024


def _bare(kind: str) -> Callable[[Any], None]:
    # The resolved C call, nothing else: the limit of the library's cost.
    from twisted_rekey._binding import function, lib

    if kind in ("ku", "kureq"):
        keyUpdate = function("SSL_key_update")[1]
        updateType = 1 if kind == "kureq" else 0

        def rotate(ssl: Any) -> None:
            keyUpdate(ssl, updateType)
            lib.SSL_do_handshake(ssl)

    else:
        renegotiate = (
            function("SSL_renegotiate_abbreviated")[1]
            if kind == "resumed"
            else lib.SSL_renegotiate
        )

        def rotate(ssl: Any) -> None:
            renegotiate(ssl)
            lib.SSL_do_handshake(ssl)

    return rotate


class Sink(protocol.Protocol):
    """The client: counts bytes, fires the run's Deferred when all are in."""

    def connectionMade(self) -> None:
        self.count = 0
        self.run: _Run = self.factory.run  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.count >= self.run.total:
            self.run.finish()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self.count < self.run.total:
            self.run.lost(self.count, reason)


@implementer(IHandshakeListener)
class Source(protocol.Protocol):
    """The server: once the handshake is done, writes as fast as it may."""

    every = 0
    rotations = 0

    def connectionMade(self) -> None:
        self.run: _Run = self.factory.run  # type: ignore[attr-defined]
        self.left = self.run.total
        self.since = 0
        self.paused = True

    def handshakeCompleted(self) -> None:
        self.run.begin()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()

    def rotate(self) -> None:
        self.run.rotate(self.transport.getHandle()._ssl)  # type: ignore[union-attr]
        self.run.rotations += 1

    def resumeProducing(self) -> None:
        self.paused = False
        every = self.run.every
        while not self.paused and self.left > 0:
            self.left -= len(CHUNK)
            self.transport.write(CHUNK)  # type: ignore[union-attr]
            if every:
                self.since += len(CHUNK)
                if self.since >= every and self.left > 0:
                    self.since = 0
                    self.rotate()
        if self.left <= 0:
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


class WatchedSink(RekeyProtocolMixin, Sink):
    # A KeyUpdate every 64 KiB at a few hundred MB/s is thousands a second:
    # the receiver's guard (64 a second by default) would rightly end the
    # connection.  These runs measure the cost of rotating, not the guard.
    keyUpdateRateLimit = None

    def dataReceived(self, data: bytes) -> None:
        if self.count + len(data) >= self.run.total:
            # What reached this side: the proof that the sender rotated.
            stats = self.rekeyStats
            self.run.rotations = stats.keyUpdatesReceived + stats.renegotiations
        Sink.dataReceived(self, data)


class WatchedSource(RekeyProtocolMixin, Source):
    # The answers to requested KeyUpdates come as fast, and the client sends
    # no application data between them: with the default guards the
    # server ends the connection after 32 (keyUpdateFloodLimit).
    keyUpdateRateLimit = None
    keyUpdateFloodLimit = None

    def handshakeCompleted(self) -> None:
        RekeyProtocolMixin.handshakeCompleted(self)
        # The sending cap lifted (see the module's docstring): the one
        # private attribute a benchmark touches, to rotate as often as the
        # bare call does.
        watcher = self._rekeyWatcher
        assert watcher is not None
        watcher.keyUpdates().outbound = KeyUpdateCounter(None, None)
        Source.handshakeCompleted(self)

    #: Our requests whose answer has not arrived yet.
    asking = 0

    def rotate(self) -> None:
        kind = self.run.kind
        if kind == "ku":
            d = self.keyUpdate()
        elif kind == "kureq":
            # A KeyUpdate on every call, as the bare variant sends, asking
            # whenever no request of ours is unanswered: the library never
            # has two outstanding and sends the others unasked anyway.
            # Asking on every call at bulk speed would queue a caller per
            # KeyUpdate until MAX_WAITERS, fail the rest unsent, and so
            # measure fewer rotations than the bare variant makes.
            ask = self.asking == 0
            d = self.keyUpdate(requestPeer=ask)
            if ask:
                self.asking += 1
                d.addBoth(self.answered)
        else:
            d = self.renegotiate(abbreviated=kind == "resumed")
        d.addErrback(self.run.failed)

    def answered(self, result: object) -> object:
        self.asking -= 1
        return result


class _Run:
    """One variant: its listening port, and the state of its current run."""

    def __init__(self, variant: str, certs: Certificates, reactor: Any) -> None:
        self.variant = variant
        self.reactor = reactor
        parts = variant.split(":")
        self.mode = parts[0]
        self.kind = parts[1] if len(parts) > 1 else ""
        self.every = int(parts[2]) if len(parts) > 2 else 0
        tls12 = variant == "plain12" or self.kind in ("full", "resumed")
        self.rotate = _bare(self.kind) if self.mode == "bare" else None
        watched = self.mode in ("watch", "lib")
        server = protocol.Factory.forProtocol(WatchedSource if watched else Source)
        client = protocol.ClientFactory.forProtocol(WatchedSink if watched else Sink)
        server.run = client.run = self  # type: ignore[attr-defined]
        self.client = client
        self.clientOptions = certs.clientOptions()
        self.port = reactor.listenSSL(
            0,
            server,
            certs.serverOptions(tls12=tls12, sessions=self.kind == "resumed"),
            interface="127.0.0.1",
        )
        self.errors: list[str] = []
        self.timeout = 20.0
        self.total = 0

    async def once(self, total: int) -> tuple[float, float, int]:
        """Move *total* bytes: (wall seconds, CPU seconds, rotations)."""
        self.total, self.rotations = total, 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.start = (0.0, 0.0)
        gc.collect()
        self.reactor.connectSSL(
            "127.0.0.1", self.port.getHost().port, self.client, self.clientOptions
        )
        await self.done.addTimeout(self.timeout, self.reactor)
        wall, cpu = self.end[0] - self.start[0], self.end[1] - self.start[1]
        await task.deferLater(self.reactor, 0.01, lambda: None)
        return wall, cpu, self.rotations

    def begin(self) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def finish(self) -> None:
        if not self.done.called:
            self.end = (time.perf_counter(), time.process_time())
            self.done.callback(None)

    def lost(self, count: int, reason: Any) -> None:
        if not self.done.called:
            why = reason.getErrorMessage() if reason is not None else "?"
            self.done.errback(
                RuntimeError(
                    f"{self.variant}: connection lost after {count} of "
                    f"{self.total} bytes: {why}"
                )
            )

    def failed(self, reason: Any) -> None:
        self.errors.append(reason.getErrorMessage())


def variants() -> tuple[list[str], list[str]]:
    """The TLS 1.3 and TLS 1.2 variants."""
    tls13 = ["plain", "watch"]
    for every in (64 * KIB, 256 * KIB, MIB, 4 * MIB):
        tls13 += [f"bare:ku:{every}", f"lib:ku:{every}"]
    for every in (64 * KIB, MIB):
        tls13 += [f"bare:kureq:{every}", f"lib:kureq:{every}"]
    tls12 = ["plain12"]
    for kind in ("full", "resumed"):
        tls12 += [f"bare:{kind}:{4 * MIB}", f"lib:{kind}:{4 * MIB}"]
    return tls13, tls12


async def measure(
    reactor: Any, rounds: int, mib13: int, mib12: int
) -> dict[str, dict[str, list[float]]]:
    """Per variant, per round: throughput (MB/s), CPU ns/byte, rotations."""
    certs = Certificates()
    tls13, tls12 = variants()
    results: dict[str, dict[str, list[float]]] = {}
    for group, mib in ((tls13, mib13), (tls12, mib12)):
        runs = {v: _Run(v, certs, reactor) for v in group}
        total = mib * MIB
        for v in group:  # warm both paths of every variant
            await runs[v].once(total // 4)
        for order in orders(group, rounds):
            for v in order:
                wall, cpu, rotations = await runs[v].once(total)
                r = results.setdefault(v, {"mbps": [], "nspb": [], "rotations": []})
                r["mbps"].append(total / wall / 1e6)
                r["nspb"].append(cpu / total * 1e9)
                r["rotations"].append(rotations)
        for run in runs.values():
            await run.port.stopListening()
            if run.errors:
                results[run.variant]["errors"] = [float(len(run.errors))]
                print(f"  {run.variant}: {len(run.errors)} failed: {run.errors[0]}")
    return results


def figures(results: dict[str, dict[str, list[float]]]) -> list[Figure]:
    def ratio(v: str, base: str, key: str = "mbps") -> list[float]:
        return paired(results[v][key], results[base][key])

    def extra(*vs: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for v in vs:
            r = results[v]
            out[v] = (
                f"{median(r['mbps']):.0f} MB/s {median(r['nspb']):.3f} ns/B "
                f"{median(r['rotations']):.0f} rotations"
            )
        return out

    figs: list[Figure] = []
    for every, label in ((MIB, "1MiB"), (64 * KIB, "64KiB")):
        lib, bare = f"lib:ku:{every}", f"bare:ku:{every}"
        figs.append(
            Figure(
                f"keyupdate-{label}-vs-bare",
                f"TLS 1.3 throughput, keyUpdate() every {label} / bare C call",
                ratio(lib, bare),
                ">= 0.99" if every == MIB else "",
                cpu=ratio(lib, bare, "nspb"),
                extra={
                    "lib/plain": f"{median(ratio(lib, 'plain')):.3f}",
                    "bare/plain": f"{median(ratio(bare, 'plain')):.3f}",
                    **extra("plain", bare, lib),
                },
            )
        )
        lib, bare = f"lib:kureq:{every}", f"bare:kureq:{every}"
        figs.append(
            Figure(
                f"keyupdate-requested-{label}-vs-plain",
                f"TLS 1.3 throughput, keyUpdate(requestPeer=True) every {label}"
                " / plain",
                ratio(lib, "plain"),
                ">= 0.95" if every == MIB else "",
                cpu=ratio(lib, "plain", "nspb"),
                extra={
                    "bare/plain": f"{median(ratio(bare, 'plain')):.3f}",
                    "lib/bare": f"{median(ratio(lib, bare)):.3f}",
                    "CPU/byte lib/bare": f"{median(ratio(lib, bare, 'nspb')):.3f}",
                    **extra(bare, lib),
                },
            )
        )
    for kind in ("full", "resumed"):
        lib, bare = f"lib:{kind}:{4 * MIB}", f"bare:{kind}:{4 * MIB}"
        figs.append(
            Figure(
                f"renegotiation-{kind}-4MiB-vs-bare",
                f"TLS 1.2 throughput, renegotiate() ({kind}) every 4MiB / bare C call",
                ratio(lib, bare),
                ">= 0.99",
                cpu=ratio(lib, bare, "nspb"),
                extra={
                    "lib/plain12": f"{median(ratio(lib, 'plain12')):.3f}",
                    "bare/plain12": f"{median(ratio(bare, 'plain12')):.3f}",
                    **extra("plain12", bare, lib),
                },
            )
        )
    figs.append(
        Figure(
            "watching-vs-plain",
            "TLS 1.3 throughput, watched (no rotation) / plain",
            ratio("watch", "plain"),
            ">= 0.99; CPU per byte <= 1.005",
            cpu=ratio("watch", "plain", "nspb"),
            extra=extra("plain", "watch"),
        )
    )
    return figs


def curve(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Throughput against rotation interval, for the plot."""
    out: dict[str, Any] = {"plain": median(results["plain"]["mbps"])}
    for mode in ("bare", "lib"):
        points = []
        for every in (64 * KIB, 256 * KIB, MIB, 4 * MIB):
            r = results[f"{mode}:ku:{every}"]
            points.append((every, median(r["mbps"]), median(r["nspb"])))
        out[mode] = points
    out["plain_nspb"] = median(results["plain"]["nspb"])
    return out
