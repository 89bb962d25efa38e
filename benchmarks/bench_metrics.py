"""
What one Prometheus scrape of :class:`twisted_rekey.RekeyMetrics` costs as
the number of open connections grows: ``generate_latest`` over a registry
holding only the collector, with N tracked connections.

Each tracked connection builds a fresh :class:`~twisted_rekey.RekeyStats`
per scrape, as the mixin's ``rekeyStats`` does (a frozen dataclass of ten
fields), so the figure includes that.  The scrape runs on the reactor
thread in the plugins: the per-connection cost says how many connections a
scrape interval can carry before it delays I/O noticeably.

Usage: python benchmarks/bench_metrics.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from twisted_rekey import RekeyMetrics, RekeyStats


class Connection:
    """Stands for a protocol: the collector reads ``rekeyStats`` only."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def rekeyStats(self) -> RekeyStats:
        n = self.n
        return RekeyStats(n, n, 0, 0, n * 1000, n * 1000, n, n, 100.0, float(n % 7200))

    def connectionLost(self, reason: Any = None) -> None:
        pass


def scrape_seconds(count: int, runs: int) -> float:
    from prometheus_client import CollectorRegistry, generate_latest

    metrics = RekeyMetrics()
    connections = [Connection(i) for i in range(count)]
    for i, connection in enumerate(connections):
        metrics.track(connection, "listen" if i % 2 else "connect")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        generate_latest(registry)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    base = scrape_seconds(0, args.runs)
    print(f"no connections: {base * 1e3:.2f} ms per scrape")
    for count in (100, 1_000, 10_000):
        seconds = scrape_seconds(count, args.runs)
        per = (seconds - base) / count
        print(
            f"{count:>6} connections: {seconds * 1e3:7.2f} ms per scrape "
            f"({per * 1e6:.2f} µs per connection, {seconds / base:.0f}x empty)"
        )


if __name__ == "__main__":
    main()
