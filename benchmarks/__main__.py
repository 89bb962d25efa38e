"""
Run every benchmark of twisted_rekey and print one row per figure::

    python -m benchmarks            # the full run (about 8 minutes here)
    python -m benchmarks --quick    # a smoke run, well under a minute

Each figure is a ratio to its baseline measured in the same run, in
alternating rounds; rows give the median and interquartile range over the
rounds.  ``--json FILE`` keeps everything measured, ``--plot FILE`` draws
``docs/performance.png`` from it (needs the ``bench`` extra: matplotlib).
Loopback only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import _common


@dataclass
class Settings:
    bulk_rounds: int
    bulk_mib13: int
    bulk_mib12: int
    send_rounds: int
    stream_counts: tuple[int, ...]
    stream_rounds: int
    stream_seconds: float
    scale_stages: tuple[int, ...]
    interval: float
    heartbeat: float
    warmup: float
    windows: int
    window_seconds: float
    cold_runs: int


FULL = Settings(
    bulk_rounds=30,
    bulk_mib13=16,
    bulk_mib12=32,
    send_rounds=200,
    stream_counts=(1, 10, 100, 1000),
    stream_rounds=8,
    stream_seconds=1.2,
    scale_stages=(1000, 4000, 10000),
    interval=60.0,
    heartbeat=15.0,
    warmup=5.0,
    windows=6,
    window_seconds=10.0,
    cold_runs=15,
)
QUICK = Settings(
    bulk_rounds=1,
    bulk_mib13=2,
    bulk_mib12=9,
    send_rounds=4,
    # 1000 streams take 3000 handshakes, most of a quick run: the full run
    # measures them, the quick one runs the same code with fewer.
    stream_counts=(1, 10, 100),
    stream_rounds=1,
    stream_seconds=0.5,
    scale_stages=(50, 100),
    interval=1.0,
    heartbeat=0.5,
    warmup=1.3,
    windows=1,
    window_seconds=0.5,
    cold_runs=1,
)


async def _twisted(reactor: Any, s: Settings, out: dict[str, Any]) -> None:
    from . import bulk, streams

    results = await bulk.measure(reactor, s.bulk_rounds, s.bulk_mib13, s.bulk_mib12)
    out["figures"] += [f.json() for f in _show(bulk.figures(results))]
    out["curve"] = bulk.curve(results)
    out["bulk"] = results
    stream = await streams.measure(
        reactor, s.stream_counts, s.stream_rounds, s.stream_seconds
    )
    out["figures"] += [f.json() for f in _show(streams.figures(stream))]
    out["streams"] = stream


def _show(figures: list[_common.Figure]) -> list[_common.Figure]:
    for f in figures:
        print(f.line(), flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--json", metavar="FILE", help="write every result here")
    parser.add_argument("--plot", metavar="FILE", help="draw the figures (PNG)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    started = time.monotonic()
    out: dict[str, Any] = {"settings": vars(s).copy(), "figures": []}
    out["environment"] = env = _common.environment()
    print(
        "twisted_rekey benchmarks"
        + (" (--quick: figures mean nothing)" if args.quick else "")
    )
    for key, value in env.items():
        print(f"  {key}: {value}")
    print(flush=True)

    from . import coldstart, scale, send

    out["figures"] += [
        f.json() for f in _show(send.figures(send.measure(s.send_rounds)))
    ]

    from twisted.internet import defer, task

    def run(reactor: Any) -> Any:
        return defer.ensureDeferred(_twisted(reactor, s, out))

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            raise

    out["scale"] = scaled = scale.measure(
        s.scale_stages, s.interval, s.heartbeat, s.warmup, s.windows, s.window_seconds
    )
    out["figures"] += [f.json() for f in _show(scale.figures(scaled))]
    out["figures"] += [
        f.json() for f in _show(coldstart.figures(coldstart.measure(s.cold_runs)))
    ]
    out["duration_s"] = time.monotonic() - started
    print(f"\ndone in {out['duration_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        from . import plot

        plot.draw(out, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
