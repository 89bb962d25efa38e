"""
The figures of ``docs/performance.rst`` drawn from a run's JSON: throughput
against rotation interval (plain Twisted, the bare C call, the library), and
CPU against the number of connections.  Needs matplotlib (the ``bench``
extra).
"""

from __future__ import annotations

from typing import Any


def draw(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    curve = results["curve"]
    for mode, label, style in (
        ("bare", "bare SSL_key_update", "s--"),
        ("lib", "twisted_rekey keyUpdate()", "o-"),
    ):
        points = curve[mode]
        kib = [p[0] / 1024 for p in points]
        left.plot(kib, [p[1] for p in points], style, label=label)
        middle.plot(kib, [p[2] for p in points], style, label=label)
    left.axhline(
        curve["plain"], color="grey", linestyle=":", label="plain, no rotation"
    )
    middle.axhline(
        curve["plain_nspb"], color="grey", linestyle=":", label="plain, no rotation"
    )
    for ax in (left, middle):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KeyUpdate every ... KiB (TLS 1.3, loopback)")
        ax.set_ylim(bottom=0)
    left.set_ylabel("throughput, MB/s (median)")
    left.set_title("Bulk throughput while rotating")
    left.legend(loc="lower right", fontsize="small")
    middle.set_ylabel("CPU time per byte, both ends, ns (median)")
    middle.set_title("CPU per byte while rotating (steadier)")
    middle.legend(loc="lower left", fontsize="small")

    stages = results["scale"]["stages"]
    counts = sorted(stages, key=int)
    modes = (("plain", "s:"), ("watch", "^--"), ("policy", "o-"), ("bare", "d-."))
    for mode, style in modes:
        if any(mode not in stages[n] for n in counts):
            continue  # a run from before the mode existed
        for side, color in (("server", "C0"), ("client", "C1")):
            if mode == "bare" and side == "client":
                continue  # its clients do what plain's do
            # The windows span one interval: their mean is the whole of it.
            values = [_mean(stages[n][mode][side]) for n in counts]
            right.plot(
                [int(n) for n in counts],
                values,
                style,
                color=color,
                alpha=1.0 if mode == "policy" else 0.6,
                label=f"{side}, {mode}",
            )
    interval = results["settings"]["interval"]
    heartbeat = results["settings"]["heartbeat"]
    right.set_xlabel(f"connections on one reactor (heartbeat every {heartbeat:g} s)")
    right.set_ylabel("CPU, % of one core (over one interval)")
    right.set_title(f"CPU with a {interval:g} s rotation policy")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    import statistics

    return statistics.fmean(values)
