"""
Python memory per idle connection, by ``tracemalloc``: what the Twisted
layer keeps for a connection beyond plain Twisted TLS.

Each sample is a fresh interpreter holding both ends of N TLS 1.3
connections over loopback (a plain client; a server that is plain Twisted,
the mixin without a policy, or the mixin with a 60 s policy).  After a
warm-up of 20 connections it takes a snapshot, makes N more connections,
waits until every server has read its client's first byte, and divides
the growth of Python's allocations by N.  Modes alternate, sample by
sample; the figure is each mode's median beyond the median of ``plain``.

This counts what Python allocates (objects, dicts, the strings of log
fields), not OpenSSL's own buffers: ``python -m benchmarks`` reports the
server's RSS per connection beside it.

    python -m benchmarks.memory [--connections N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from statistics import median

MODES = ("plain", "mixin", "policy")
_BATCH = 50


def _sample(mode: str, n: int) -> float:
    """One sample, in this process: bytes per connection pair."""
    import gc
    import tracemalloc

    from twisted.internet import defer, protocol, reactor, task

    from twisted_rekey import RekeyProtocolMixin, RotationPolicy

    from ._common import Certificates

    certs = Certificates()
    ready: list[object] = []

    class Plain(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            ready.append(self)

    class Watched(RekeyProtocolMixin, Plain):
        rotationPolicy = RotationPolicy(interval=60.0) if mode == "policy" else None

    class Client(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"x")  # type: ignore[union-attr]

    server = Plain if mode == "plain" else Watched
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0,
        protocol.Factory.forProtocol(server),
        certs.serverOptions(),
        backlog=4 * _BATCH,
        interface="127.0.0.1",
    )
    number = port.getHost().port
    clients = protocol.ClientFactory.forProtocol(Client)
    result: list[float] = []

    async def connect(count: int) -> None:
        # In batches within the listen backlog: a SYN the kernel drops is
        # retried only seconds later.
        while count > 0:
            batch = min(count, _BATCH)
            count -= batch
            goal = len(ready) + batch
            for _ in range(batch):
                reactor.connectSSL(  # type: ignore[attr-defined]
                    "127.0.0.1", number, clients, certs.clientOptions()
                )
            for _ in range(3000):  # at most 30 s a batch
                if len(ready) >= goal:
                    break
                await task.deferLater(reactor, 0.01)
            else:
                raise RuntimeError(f"{mode}: {goal - len(ready)} connections not ready")

    async def run() -> None:
        try:
            await connect(20)
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            await connect(n)
            await task.deferLater(reactor, 0.2)
            gc.collect()
            after = tracemalloc.take_snapshot()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
            result.append(grown / n)
        finally:
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if not result:
        raise RuntimeError(f"{mode}: no sample")
    return result[0]


def measure(connections: int, rounds: int) -> dict[str, list[float]]:
    """Bytes per connection pair, per mode, per round (alternating)."""
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            out = subprocess.run(
                [
                    *(sys.executable, "-m", "benchmarks.memory"),
                    *("--sample", mode, "--connections", str(connections)),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if out.returncode != 0:
                tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"{mode} sample failed: {tail[0]}")
            samples[mode].append(json.loads(out.stdout.splitlines()[-1]))
    return samples


def report(samples: dict[str, list[float]]) -> list[str]:
    plain = median(samples["plain"])
    lines = [f"plain Twisted TLS: {plain:,.0f} B per connection pair"]
    for mode in MODES[1:]:
        m = median(samples[mode])
        spread = ", ".join(f"{s - plain:+,.0f}" for s in samples[mode])
        lines.append(
            f"{mode}: {m - plain:+,.0f} B per connection beyond plain "
            f"(samples {spread}); goal <= +1,024 B"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.connections < 1 or args.rounds < 1:
        parser.error("--connections and --rounds must be at least 1")
    if args.sample:
        print(json.dumps(_sample(args.sample, args.connections)))
        return 0
    samples = measure(args.connections, args.rounds)
    for line in report(samples):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
