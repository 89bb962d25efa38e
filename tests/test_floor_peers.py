"""
The floor and rate no known peer's cap can trip, against a peer no one
here wrote: GnuTLS closes a connection at the 9th KeyUpdate within one
second (counted on arrival), so the shortest rotation the library allows,
and an application asking for KeyUpdates as fast as it can, must stay
below that on the wire.
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from peers import GNUTLS_KEY_UPDATE_RECEIVED, CertFiles
from test_protocol_peers import (
    TIMEOUT,
    Watched,
    _dataBothWays,
    _gnutlsCli,
    _ourServer,
    _reactor,
)
from twisted.internet import task

from twisted_rekey import (
    MIN_INTERVAL_LOWEST,
    PeerRefused,
    RotationPolicy,
    RotationRateLimited,
)


class Fastest(Watched):
    rotationPolicy = RotationPolicy(
        interval=MIN_INTERVAL_LOWEST,
        min_interval=MIN_INTERVAL_LOWEST,
        jitter=0,
        skip_idle=False,
    )
    rotationGranularity = 0.05


@pytest_twisted.ensureDeferred
async def test_shortest_allowed_rotation_does_not_trip_gnutls(
    cert_files: CertFiles,
) -> None:
    reactor = _reactor()
    async with _ourServer(_gnutlsCli(cert_files), cert_files, Fastest) as (
        client,
        us,
    ):
        asked: list[Any] = []
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            # Data both ways, and the application asking for two more
            # KeyUpdates on top of the policy's every 50 ms: far more than
            # GnuTLS takes, were they all sent.
            us.send(b"tick\n")
            for _ in range(2):
                d = us.keyUpdate()
                d.addErrback(lambda f: f.trap(RotationRateLimited, PeerRefused))
                d.addBoth(asked.append)
            await task.deferLater(reactor, 0.05, lambda: None)
        refused = sum(1 for a in asked if a is not None)
        await _dataBothWays(client, us, "after")
        assert us.lost is None
        sent = us.rekeyStats.keyUpdatesSent
        # ~3 s at most 6 per 1.1 s: well over GnuTLS's 8 in total, never 9
        # within its second.
        assert sent >= 10
        assert refused > 0
        deadline = time.monotonic() + TIMEOUT
        while client.count(GNUTLS_KEY_UPDATE_RECEIVED) < sent:
            assert time.monotonic() < deadline, "gnutls-cli did not log them all"
            await task.deferLater(reactor, 0.05, lambda: None)
        assert client.count(GNUTLS_KEY_UPDATE_RECEIVED) == sent
        assert "maximum number of key updates" not in client.output
