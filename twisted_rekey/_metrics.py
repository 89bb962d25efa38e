"""
Prometheus metrics of key rotation, for any application's own protocols
(the twistd plugins' ``--metrics`` among them).

:class:`RekeyMetrics` is a ``prometheus_client`` collector built on the
library's public surface only: each tracked connection's
:attr:`~twisted_rekey.RekeyProtocolMixin.rekeyStats` (read when scraped,
and folded into the totals when the connection ends), and the
``twisted.logger`` events that carry a ``rekey_event`` field (rotation
failures, guard trips, who started a renegotiation).

This module must never import ``prometheus_client`` at import time: the
library and the plugins work without it; only a collector being scraped
needs it (the ``metrics`` extra).
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

__all__ = [
    "DEFAULT_BUCKETS",
    "RekeyMetrics",
]

#: Upper bounds (seconds) of the "time since the last rotation" buckets.
DEFAULT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)

# rekey_event values, and the label they are counted under.
_FAILURES = {
    "rotation_failed": "rotation_failed",
    "rotation_error": "rotation_error",
    "rekey_timeout": "rekey_timeout",
    "rotation_request_unanswered": "request_unanswered",
    "key_update_answer_failed": "answer_failed",
    "renegotiation_refused": "renegotiation_refused",
    "reload_rotation_failed": "after_reload",
}
_GUARDS = {
    "key_update_flood": "key_update_flood",
    "client_renegotiation_rate_limited": "client_renegotiation_rate",
    "client_renegotiation_refused": "client_renegotiation_refused",
}
_RENEGOTIATIONS_STARTED = {
    "renegotiation_started": "local",
    "renegotiation_started_by_peer": "peer",
}
_RELOADS = {
    "certificate_reloaded": "ok",
    "certificate_reload_refused": "refused",
}
_OTHER = {"client_certificate_refused"}

# Fields of RekeyStats summed per side, and the metric each feeds.
_STATS = (
    ("bytesReceived", "bytes_received", "Application bytes received."),
    ("bytesSent", "bytes_sent", "Application bytes sent."),
    ("keyUpdatesSent", "key_updates_sent", "TLS 1.3 KeyUpdates sent (answers too)."),
    ("keyUpdatesReceived", "key_updates_received", "TLS 1.3 KeyUpdates received."),
    (
        "keyUpdatesRequested",
        "key_updates_requested",
        "KeyUpdates sent with update_requested.",
    ),
    (
        "renegotiations",
        "renegotiations",
        "TLS 1.2 renegotiations completed (either side's).",
    ),
)


class RekeyMetrics:
    """
    A ``prometheus_client`` collector of key-rotation figures.

    Give it the connections to count with :meth:`track` (from the factory's
    ``buildProtocol``, or with :meth:`trackFactory`), and start counting the
    log events with :meth:`startObserving`; then register it:
    ``registry.register(metrics)``.  Tracking reads nothing but
    ``rekeyStats``: any :class:`~twisted_rekey.RekeyProtocolMixin` (or
    :class:`~twisted_rekey.RotatingProtocol`) can be tracked.

    The log events are those of the whole process (``twisted.logger``'s
    global publisher): one collector per process.

    :param namespace: the metrics' prefix.
    :param buckets: upper bounds of the "seconds since the last rotation"
        buckets (a gauge histogram over the open connections).

    .. versionadded:: 0.2.0
    """

    def __init__(
        self,
        namespace: str = "twisted_rekey",
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        self.namespace = namespace
        self.buckets = tuple(sorted(buckets))
        # Open connections -> their side label (weak: a protocol never
        # closed properly must not be kept alive by its metrics).
        self._open: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._closed: dict[str, Counter[str]] = {}
        self._connections: Counter[str] = Counter()
        self._events: Counter[tuple[str, str]] = Counter()
        self._observing = False
        self._publisher: Any = None

    # -- what is counted

    def track(self, protocol: Any, side: str = "server") -> None:
        """
        Count *protocol* (a :class:`~twisted_rekey.RekeyProtocolMixin`) under
        the label ``side``, from now until its ``connectionLost``.
        """
        self._open[protocol] = side
        self._connections[side] += 1
        lost = protocol.connectionLost

        def connectionLost(reason: Failure = connectionDone) -> None:
            try:
                lost(reason)
            finally:
                self.untrack(protocol)

        # For this connection only, as the TLS layer's own hooks do; the
        # protocol's class is left alone.
        protocol.connectionLost = connectionLost

    def untrack(self, protocol: Any) -> None:
        """Stop counting *protocol* as open; its figures join the totals."""
        side = self._open.pop(protocol, None)
        if side is None:
            return
        stats = protocol.rekeyStats
        totals = self._closed.setdefault(side, Counter())
        for field, _, _ in _STATS:
            totals[field] += getattr(stats, field)

    def trackFactory(self, factory: Any, side: str = "server") -> None:
        """
        :meth:`track` every protocol *factory* builds from now on (its
        ``buildProtocol`` is wrapped on this instance only).
        """
        build = factory.buildProtocol

        def buildProtocol(addr: Any) -> Any:
            protocol = build(addr)
            if protocol is not None:
                self.track(protocol, side)
            return protocol

        factory.buildProtocol = buildProtocol

    def startObserving(self, publisher: Any = None) -> None:
        """Count the ``rekey_event`` log events (globally, by default)."""
        if not self._observing:
            chosen: Any = publisher or globalLogPublisher
            chosen.addObserver(self)
            self._publisher = chosen
            self._observing = True

    def stopObserving(self) -> None:
        """Undo :meth:`startObserving`."""
        if self._observing:
            self._publisher.removeObserver(self)
            self._observing = False

    def __call__(self, event: dict[str, Any]) -> None:
        """An ``ILogObserver``: count one event."""
        name = event.get("rekey_event")
        if name is not None:
            self._events[("event", str(name))] += 1

    # -- the Prometheus collector

    def collect(self) -> Iterator[Any]:
        """The metric families, for ``prometheus_client``."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeHistogramMetricFamily,
            GaugeMetricFamily,
        )

        ns = self.namespace
        # One pass over the open connections (a scrape runs on the reactor
        # thread): the sums per side, and each one's seconds since rotation.
        fields = [field for field, _, _ in _STATS]
        open_: dict[str, int] = Counter()
        sums: dict[str, list[int]] = {}
        ages: dict[str, list[float]] = {}
        for protocol, side in list(self._open.items()):
            stats = protocol.rekeyStats
            open_[side] += 1
            row = sums.get(side)
            if row is None:
                row = sums[side] = [0] * len(fields)
            for i, field in enumerate(fields):
                row[i] += getattr(stats, field)
            if stats.lastRotation is not None:
                ages.setdefault(side, []).append(stats.secondsSinceRotation)
        sides = sorted(set(open_) | set(self._closed) | set(self._connections))

        gauge = GaugeMetricFamily(
            f"{ns}_connections_open", "Connections open now.", labels=["side"]
        )
        total = CounterMetricFamily(
            f"{ns}_connections", "Connections counted since start.", labels=["side"]
        )
        for side in sides:
            gauge.add_metric([side], open_[side])
            total.add_metric([side], self._connections[side])
        yield gauge
        yield total

        for i, (field, name, doc) in enumerate(_STATS):
            family = CounterMetricFamily(f"{ns}_{name}", doc, labels=["side"])
            for side in sides:
                value = self._closed.get(side, Counter())[field]
                if side in sums:
                    value += sums[side][i]
                family.add_metric([side], value)
            yield family

        for name, doc, label, mapping in (
            (
                "renegotiations_started",
                "Renegotiations started, by this side or the peer.",
                "by",
                _RENEGOTIATIONS_STARTED,
            ),
            (
                "rotation_failures",
                "Rotations that failed, timed out or were refused.",
                "kind",
                _FAILURES,
            ),
            (
                "guard_trips",
                "Peers cut off or refused by a guard against rekey abuse.",
                "guard",
                _GUARDS,
            ),
            ("certificate_reloads", "Certificate reloads.", "outcome", _RELOADS),
        ):
            family = CounterMetricFamily(f"{ns}_{name}", doc, labels=[label])
            for event, labelValue in mapping.items():
                family.add_metric([labelValue], self._events[("event", event)])
            yield family
        refused = CounterMetricFamily(
            f"{ns}_client_certificates_refused",
            "TLS clients refused for their certificate (mutual TLS).",
        )
        refused.add_metric([], self._events[("event", "client_certificate_refused")])
        yield refused

        histogram = GaugeHistogramMetricFamily(
            f"{ns}_seconds_since_rotation",
            "Open connections by the seconds since their keys last changed "
            "(either direction, or the handshake).",
            labels=["side"],
        )
        for side in sides:
            seconds = sorted(ages.get(side, []))
            buckets = [
                (_bound(bound), float(bisect_right(seconds, bound)))
                for bound in self.buckets
            ]
            buckets.append(("+Inf", float(len(seconds))))
            histogram.add_metric([side], buckets, float(sum(seconds)))
        yield histogram


def _bound(value: float) -> str:
    return repr(float(value))
