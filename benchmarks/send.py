"""
``RekeyConnection(policy).send(1 KiB)`` against ``Connection.send``: the
cost the pyOpenSSL layer adds to every write.

Both client connections are handshaken over memory BIOs; each sample times
a batch of 1 KiB sends and then drains the BIO (outside the timing), the
variants alternating sample by sample.  The policy rotates hourly, so no
rotation happens inside the timing: this is the bookkeeping per write.
"""

from __future__ import annotations

import time
from typing import Any

from OpenSSL import SSL

from twisted_rekey import RekeyConnection, RotationPolicy

from ._common import Certificates, Figure, median, orders, paired

BUF = b"x" * 1024


def _pair(certs: Certificates, make: Any) -> Any:
    server_ctx, client_ctx = certs.contexts()
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = make(client_ctx)
    client.set_connect_state()
    for _ in range(10):  # bounded: a TLS 1.3 handshake takes two flights
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
    client.send(BUF)  # the first write starts the policy's schedule
    client.bio_read(1 << 20)
    return client


def _batch(conn: Any, n: int) -> float:
    send = conn.send
    start = time.perf_counter()
    for _ in range(n):
        send(BUF)
    elapsed = time.perf_counter() - start
    conn.bio_read(1 << 24)
    return elapsed / n


def measure(rounds: int, batch: int = 200, repeat: int = 5) -> dict[str, list[float]]:
    """Per variant, per round: seconds per 1 KiB send (best of *repeat*)."""
    certs = Certificates()
    conns = {
        "plain": _pair(certs, lambda ctx: SSL.Connection(ctx, None)),
        "rekey": _pair(certs, lambda ctx: RekeyConnection(ctx, None)),
        "policy": _pair(
            certs,
            lambda ctx: RekeyConnection(
                ctx, None, policy=RotationPolicy(interval=3600)
            ),
        ),
    }
    out: dict[str, list[float]] = {v: [] for v in conns}
    for order in orders(list(conns), rounds):
        for v in order:
            # Best of a few batches: the least disturbed by the machine.
            out[v].append(min(_batch(conns[v], batch) for _ in range(repeat)))
    return out


def figures(results: dict[str, list[float]]) -> list[Figure]:
    us = {v: median(s) * 1e6 for v, s in results.items()}
    bare = median(paired(results["rekey"], results["plain"]))
    extra = us["policy"] - us["plain"]
    return [
        Figure(
            "send-1KiB-vs-pyopenssl",
            "RekeyConnection(policy).send(1 KiB) / Connection.send",
            paired(results["policy"], results["plain"]),
            "<= 1.2",
            extra={
                "no policy": f"{bare:.3f}x",
                "per send": (
                    f"plain {us['plain']:.2f} us, no policy {us['rekey']:.2f} us, "
                    f"policy {us['policy']:.2f} us (+{extra:.2f} us)"
                ),
            },
        )
    ]
