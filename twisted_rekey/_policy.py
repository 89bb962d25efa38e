"""
When to rotate the traffic keys of one TLS connection: the sans-IO core.

A :class:`RotationPolicy` is the configuration (how often, after how much
data, how far apart); :meth:`RotationPolicy.start` makes the
:class:`RotationSchedule` of one connection, which counts what was sent and
says when a rotation is due.  The caller drives it the way h11 and aioquic
are driven: it passes ``now`` in every call, asks :meth:`~RotationSchedule.
get_timer` for the next deadline, calls :meth:`~RotationSchedule.handle_timer`
when that deadline passes, and reports what it did
(:meth:`~RotationSchedule.rotated`, :meth:`~RotationSchedule.peer_rotated`).

This module must never do I/O, read a clock of its own, or import Twisted,
pyOpenSSL or cryptography: it decides, the caller acts.  All times are
seconds on whatever monotonic clock the caller uses, as long as it always
uses the same one.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "KEY_UPDATES_IN_A_ROW_SENT",
    "KEY_UPDATE_RATE_SENT",
    "MIN_INTERVAL_LOWEST",
    "KeyUpdateCounter",
    "RotationAction",
    "RotationMethod",
    "RotationPolicy",
    "RotationReason",
    "RotationSchedule",
    "aead_record_limit",
    "client_renegotiation_refusal",
]

RotationMethod = Literal["key-update", "renegotiation"]
"""
How a connection rotates its keys: ``"key-update"`` (TLS 1.3 KeyUpdate) or
``"renegotiation"`` (TLS 1.2 and older, RFC 5746 secure renegotiation).
"""

RotationReason = Literal["interval", "bytes", "records", "aead-limit", "request-peer"]
"""
Why a rotation is due: the timed interval passed, ``max_bytes`` or
``max_records`` was reached, the confidentiality limit of the cipher was
near, or the peer's key is due for renewal (``request_peer_interval``).
"""

MIN_INTERVAL_LOWEST = 0.2
"""
The lowest ``min_interval`` accepted, in seconds.  GnuTLS drops a peer at
the 9th KeyUpdate within one second, counted on arrival: gaps on the wire
came out up to ~17 ms shorter than the sender's floor, so 0.125 s leaves no
margin; 0.2 s (at most 6 in any second on the wire) held.
"""

KEY_UPDATE_RATE_SENT = (6, 1.1)
"""
``(count, seconds)``: the most KeyUpdates this library sends (rotations,
requests and answers together) within any window of *seconds*, whatever a
policy or the application asks.  GnuTLS allows 8 per rolling second; the
window is 0.1 s longer than GnuTLS's, for the gaps the wire shortens.
"""

KEY_UPDATES_IN_A_ROW_SENT = 16
"""
The most KeyUpdates this library sends in a row without application data
of its own between them.  rustls and BoringSSL end a connection at 32 in a
row, Go counts 16 "useless" records: half of the first, and the second.
"""

_RECORD_PAYLOAD = 16384  # the largest TLS plaintext record (RFC 8446 §5.1)

# rustls's limit for AES-GCM; RFC 8446 §5.5 allows 2^24.5 full-size records
# and RFC 9147 §4.5.3 gives AES-CCM the same confidentiality bound.  The
# bound comes from the 128-bit block size, so it holds for ARIA and Camellia
# in the same modes.
_BLOCK128_AEAD_RECORDS = 1 << 23
_BLOCK128_CIPHERS = ("AES", "ARIA", "CAMELLIA")
_BLOCK128_MODES = frozenset({"GCM", "CCM", "CCM8"})
_NAME_TOKENS = re.compile(r"[-_ ]+")

_TLS13 = "TLSv1.3"
_RENEGOTIABLE = frozenset({"TLSv1.2", "TLSv1.1", "TLSv1", "TLSv1.0", "SSLv3"})

#: ALPN protocols whose specification forbids TLS renegotiation.
_NO_RENEGOTIATION = {
    b"h2": "HTTP/2 forbids TLS renegotiation (RFC 9113, section 9.2.1)",
}


def renegotiation_forbidden(application_protocol: bytes | None) -> str | None:
    """
    Why a connection that negotiated *application_protocol* (ALPN) must
    never renegotiate, in a sentence; ``None`` if it may.
    """
    if not application_protocol:
        return None
    return _NO_RENEGOTIATION.get(bytes(application_protocol))


def aead_record_limit(cipher_name: str | None) -> int | None:
    """
    How many records one key of this cipher suite may protect before the
    library rotates it by itself.

    AES-GCM and AES-CCM suites (and the same modes over ARIA and Camellia,
    whose block is also 128 bits) get 2\\ :sup:`23` records, the limit rustls
    uses, comfortably below the 2\\ :sup:`24.5` of RFC 8446 §5.5.
    ChaCha20-Poly1305 has no limit that a connection can reach in practice,
    and ciphers that are not AEADs (CBC suites, NULL) or that this function
    does not know have none either: both give ``None``.

    Names are matched without regard to case, as OpenSSL spells them
    (``"TLS_AES_128_GCM_SHA256"``, ``"ECDHE-RSA-AES128-GCM-SHA256"``,
    ``"AES128-CCM8"``) or as IANA does
    (``"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"``, ``"TLS_RSA_WITH_AES_128_CCM_8"``).

    :param cipher_name: the negotiated cipher suite name, or ``None`` when
        it is not known.
    :returns: the number of records, or ``None`` for no limit.
    :raises TypeError: if *cipher_name* is neither a string nor ``None``.

    .. versionadded:: 0.1.0
    """
    if cipher_name is None:
        return None
    if not isinstance(cipher_name, str):
        raise TypeError(
            f"cipher_name must be a str or None, not {type(cipher_name).__name__}"
        )
    tokens = _NAME_TOKENS.split(cipher_name.upper())
    # IANA spells CCM_8 as two tokens; OpenSSL as CCM8.
    for i, token in enumerate(tokens[:-1]):
        if token == "CCM" and tokens[i + 1] == "8":
            tokens[i] = "CCM8"
    if not _BLOCK128_MODES.intersection(tokens):
        return None
    if any(token.startswith(_BLOCK128_CIPHERS) for token in tokens):
        return _BLOCK128_AEAD_RECORDS
    return None


class KeyUpdateCounter:
    """
    The KeyUpdates of one direction of one connection: how many within a
    rolling window, and how many in a row without application data.  The
    same counter bounds what this library sends (with
    :data:`KEY_UPDATE_RATE_SENT` and :data:`KEY_UPDATES_IN_A_ROW_SENT`) and
    what it accepts from a peer (the Twisted layer's flood guard), so the
    two rules cannot drift apart.  Constant memory: it keeps the times of
    the last *count* + 1 KeyUpdates only.

    :param rate: ``(count, seconds)``: at most *count* within *seconds*, or
        ``None`` for no rate bound.
    :param in_a_row: at most this many in a row without application data,
        or ``None`` for no such bound.
    :param events: what is counted, as the sentence naming a crossed rate
        bound says it (the Twisted layer bounds a client's renegotiations
        with the same rolling window).

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_count",
        "_events",
        "_oldest",
        "_times",
        "_window",
        "in_a_row",
        "in_a_row_limit",
    )

    def __init__(
        self,
        rate: tuple[int, float] | None,
        in_a_row: int | None,
        events: str = "KeyUpdates",
    ) -> None:
        self._events = events
        # The times of the last count + 1 KeyUpdates, oldest first until the
        # list is full, then a ring whose oldest entry is at _oldest: a few
        # floats per connection (a deque takes a 64-slot block from its first
        # entry, ~600 bytes, and every connection has several counters).
        # An empty tuple until the first KeyUpdate: most counters see none.
        self._oldest = 0
        if rate is None:
            self._count = 0
            self._window = 0.0
            self._times: list[float] | tuple[()] | None = None
        else:
            self._count, self._window = rate
            self._times = ()
        self.in_a_row_limit = in_a_row
        #: KeyUpdates since the last application data.
        self.in_a_row = 0

    @classmethod
    def for_sending(cls) -> KeyUpdateCounter:
        """
        A counter with the bounds of what this library sends:
        :data:`KEY_UPDATE_RATE_SENT` and :data:`KEY_UPDATES_IN_A_ROW_SENT`.
        """
        return cls(KEY_UPDATE_RATE_SENT, KEY_UPDATES_IN_A_ROW_SENT)

    def data(self) -> None:
        """Application data passed: the run of KeyUpdates ends."""
        self.in_a_row = 0

    def add(self, now: float) -> str | None:
        """
        Count one KeyUpdate at *now*.

        :returns: which bound it crossed, in a sentence fit for a log, or
            ``None`` while within both.
        """
        self.in_a_row += 1
        limit = self.in_a_row_limit
        if limit is not None and self.in_a_row > limit:
            return (
                f"{self.in_a_row} KeyUpdates in a row without application "
                f"data (limit {limit})"
            )
        times = self._times
        if times is not None:
            if not isinstance(times, list):
                times = self._times = []
            if len(times) <= self._count:
                times.append(now)
                oldest = times[0]
            else:
                times[self._oldest] = now
                self._oldest = (self._oldest + 1) % len(times)
                oldest = times[self._oldest]
            if len(times) > self._count and oldest > now - self._window:
                return (
                    f"{len(times)} {self._events} within {self._window} s "
                    f"(limit {self._count})"
                )
        return None

    def next_allowed(self, now: float) -> float | None:
        """
        The earliest time one more KeyUpdate stays within both bounds:
        *now* or later, or ``None`` when only application data can allow
        one (the run without data is at its bound).
        """
        limit = self.in_a_row_limit
        if limit is not None and self.in_a_row >= limit:
            return None
        times = self._times
        if times is not None and self._count and len(times) >= self._count:
            # The count-th newest time, a microsecond past the window's end
            # (against rounding).
            newest = (self._oldest - 1) % len(times)
            kth = times[(newest - self._count + 1) % len(times)]
            return max(now, kth + self._window + 1e-6)
        if times is not None and not self._count:
            return None
        return now


# The fast path's bounds (see RotationSchedule._calm_bounds).
_NO_BOUNDS = (0.0, 0.0, 0.0, 0.0)
_UNBOUNDED = (math.inf, math.inf, math.inf, math.inf)


@functools.lru_cache(maxsize=64)
def _bounds(
    records: float, nbytes: float, outstanding: bool
) -> tuple[float, float, float, float]:
    # Shared between connections: the same few values for every one of a
    # policy, so no tuple per connection.
    if outstanding:
        return (records, nbytes, math.inf, math.inf)
    return (records, nbytes, records, nbytes)


def _records(nbytes: int, records: int | None) -> int:
    """The records *nbytes* took: as reported, or estimated."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, not {nbytes}")
    if records is None:
        return -(-nbytes // _RECORD_PAYLOAD)
    if records < 0:
        raise ValueError(f"records must be >= 0, not {records}")
    return records


def _check_seconds(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds"
            + (" or None" if optional else "")
            + f", not {type(value).__name__}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value}")


def _check_count(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, not {value}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


@dataclass(frozen=True)
class RotationAction:
    """
    A rotation the caller should perform now.

    :ivar method: how to rotate: ``"key-update"`` or ``"renegotiation"``.
    :ivar reason: why, for the log: ``"interval"``, ``"bytes"``,
        ``"records"``, ``"aead-limit"`` or ``"request-peer"``.  When several
        apply, the one named is the first in this order: ``"aead-limit"``,
        ``"records"``, ``"bytes"``, ``"interval"``, ``"request-peer"``.
    :ivar request_peer: send the KeyUpdate with ``update_requested``, so
        that the peer rotates its sending key too.  Always ``False`` for a
        renegotiation, which renews the keys of both directions anyway.

    .. versionadded:: 0.1.0
    """

    method: RotationMethod
    reason: RotationReason
    request_peer: bool = False


@dataclass(frozen=True, init=False)
class RotationPolicy:
    """
    When the keys of a connection are rotated: an immutable configuration,
    shared by any number of connections.

    With the defaults, the only trigger is the confidentiality limit of the
    negotiated cipher (see :func:`aead_record_limit`).

    :param interval: seconds between timed rotations, or ``None`` for none.
    :param jitter: each timed deadline is drawn uniformly from
        ``interval * (1 - jitter)`` to ``interval * (1 + jitter)`` (and the
        same for *request_peer_interval*), so that connections opened
        together do not all rotate together.  ``0 <= jitter < 1``.
    :param max_bytes: rotate a key after it protected this many bytes of
        application data, or ``None``.  Each direction counts its own: bytes
        we sent count toward our key, bytes received toward the peer's
        (renewed by a request on TLS 1.3, by a renegotiation on TLS 1.2).
    :param max_records: the same, in TLS records, or ``None``.
    :param aead_limit: also rotate each direction's key before the
        confidentiality limit of the negotiated cipher
        (:func:`aead_record_limit`).
    :param request_peer_interval: seconds after which the peer's sending key
        is due for renewal: the next rotation asks the peer to rotate too
        (KeyUpdate ``update_requested``), at most one request being
        outstanding at a time; on TLS 1.2 a renegotiation renews both
        directions.  ``None`` never asks by time.
    :param min_interval: the least time, in seconds, between two rotations
        of ours, whatever triggered them; a threshold reached sooner waits.
        At least :data:`MIN_INTERVAL_LOWEST` (0.2 s).  Whatever it says, no
        more than :data:`KEY_UPDATE_RATE_SENT` KeyUpdates go out in any
        window, nor more than :data:`KEY_UPDATES_IN_A_ROW_SENT` in a row
        without application data sent; a rotation due beyond that waits.
    :param skip_idle: skip a timed rotation of a key that encrypted nothing
        since it came into use: *interval* skips while we sent nothing,
        *request_peer_interval* while the peer sent nothing (on TLS 1.2,
        where one renegotiation renews both, *interval* skips only while
        neither side sent anything).  It becomes due with the next data of
        that direction.  A key that encrypted nothing gains nothing from
        rotating.
    :param rng: the random number generator of the jitter; tests pass a
        seeded :class:`random.Random`.  ``None`` uses a private one.

    :raises TypeError: if an argument has the wrong type.
    :raises ValueError: if an argument is out of range, if *interval* or
        *request_peer_interval* is below *min_interval*, or if nothing would
        ever trigger a rotation.

    .. versionadded:: 0.1.0
    """

    interval: float | None
    jitter: float
    max_bytes: int | None
    max_records: int | None
    aead_limit: bool
    request_peer_interval: float | None
    min_interval: float
    skip_idle: bool
    rng: random.Random = field(compare=False, repr=False)

    def __init__(
        self,
        *,
        interval: float | None = None,
        jitter: float = 0.1,
        max_bytes: int | None = None,
        max_records: int | None = None,
        aead_limit: bool = True,
        request_peer_interval: float | None = None,
        min_interval: float = 1.0,
        skip_idle: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        _check_seconds("interval", interval, optional=True)
        _check_seconds("request_peer_interval", request_peer_interval, optional=True)
        _check_seconds("min_interval", min_interval, optional=False)
        if min_interval < MIN_INTERVAL_LOWEST:
            raise ValueError(
                f"min_interval must be at least {MIN_INTERVAL_LOWEST} s, not "
                f"{min_interval}: GnuTLS drops a peer that sends more than 8 "
                f"KeyUpdates within one second"
            )
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"jitter must be a number, not {type(jitter).__name__}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be >= 0 and < 1, not {jitter}")
        _check_count("max_bytes", max_bytes)
        _check_count("max_records", max_records)
        _check_bool("aead_limit", aead_limit)
        _check_bool("skip_idle", skip_idle)
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(
                f"rng must be a random.Random or None, not {type(rng).__name__}"
            )
        for name, value in (
            ("interval", interval),
            ("request_peer_interval", request_peer_interval),
        ):
            if value is not None and value < min_interval:
                raise ValueError(
                    f"{name}={value} is below min_interval={min_interval}; "
                    f"to rotate this often, lower min_interval explicitly "
                    f"(min_interval={value})"
                )
        if (
            interval is None
            and request_peer_interval is None
            and max_bytes is None
            and max_records is None
            and not aead_limit
        ):
            raise ValueError(
                "nothing would ever trigger a rotation: set interval, max_bytes, "
                "max_records or request_peer_interval, or keep aead_limit=True"
            )
        setattr_ = object.__setattr__
        setattr_(self, "interval", interval)
        setattr_(self, "jitter", jitter)
        setattr_(self, "max_bytes", max_bytes)
        setattr_(self, "max_records", max_records)
        setattr_(self, "aead_limit", aead_limit)
        setattr_(self, "request_peer_interval", request_peer_interval)
        setattr_(self, "min_interval", min_interval)
        setattr_(self, "skip_idle", skip_idle)
        setattr_(self, "rng", random.Random() if rng is None else rng)

    def _draw(self, seconds: float) -> float:
        if not self.jitter:
            return seconds
        return seconds * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def start(
        self,
        now: float,
        *,
        protocol: str,
        cipher: str | None,
        secure_renegotiation: bool | None = None,
        application_protocol: bytes | None = None,
    ) -> RotationSchedule:
        """
        Begin the schedule of one connection whose handshake just completed.

        :param now: the current time, in seconds.
        :param protocol: the negotiated protocol version, as OpenSSL names it
            (``"TLSv1.3"``, ``"TLSv1.2"``).
        :param cipher: the negotiated cipher suite name, or ``None`` if not
            known (then no AEAD limit applies).
        :param secure_renegotiation: whether the peer supports secure
            renegotiation (RFC 5746); only read for TLS 1.2 and older, where
            anything but ``True`` disables rotation.
        :param application_protocol: the protocol negotiated by ALPN
            (``b"h2"``), or ``None``; only read for TLS 1.2 and older, where
            one that forbids renegotiation (HTTP/2) disables rotation.
        :returns: the connection's schedule.  It may be disabled (see
            :attr:`RotationSchedule.disabled_reason`); a disabled schedule
            never asks for a rotation.
        :raises TypeError: if *protocol* is not a string.

        .. versionadded:: 0.1.0
        """
        return RotationSchedule(
            self,
            now,
            protocol=protocol,
            cipher=cipher,
            secure_renegotiation=secure_renegotiation,
            application_protocol=application_protocol,
        )


def client_renegotiation_refusal(
    schedule: RotationSchedule, *, is_client: bool | None, allowed: bool, option: str
) -> str | None:
    """
    Why *schedule* must not rotate a client's connection, or ``None``.

    On TLS 1.2 a client rotates by renegotiating, which OpenSSL 3 servers
    (and many others) refuse, and the refusal ends the connection in the
    client's OpenSSL: a client's policy stays off there unless the
    application says the server allows it.

    :param is_client: whether this side is the client; ``None`` (not
        known) counts as a client, since not rotating is the safe error.
    :param allowed: what the application set with *option*.
    :param option: how the application allows it, for the sentence.
    """
    if schedule.method != "renegotiation" or allowed or is_client is False:
        return None
    return (
        f"on {schedule._protocol} a client rotates by renegotiating, which "
        "many servers refuse by closing the connection (set "
        f"{option} where the server allows it)"
    )


class RotationSchedule:
    """
    The rotation state of one connection: what was sent under the current
    key, and when the next rotation is due.  Make one with
    :meth:`RotationPolicy.start`.

    An action returned by :meth:`data_sent` or :meth:`handle_timer` stays
    *issued* until the caller reports :meth:`rotated` or
    :meth:`rotation_failed`; meanwhile no other action is returned and
    :meth:`get_timer` is ``None``, so a rotation that takes a round trip (a
    renegotiation) is never asked for twice.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        policy: RotationPolicy,
        now: float,
        *,
        protocol: str,
        cipher: str | None,
        secure_renegotiation: bool | None = None,
        application_protocol: bytes | None = None,
    ) -> None:
        if not isinstance(protocol, str):
            raise TypeError(f"protocol must be a str, not {type(protocol).__name__}")
        self._policy = policy
        self._protocol = protocol
        self._method: RotationMethod | None = None
        self._disabled_reason: str | None = None
        if protocol == _TLS13:
            self._method = "key-update"
        elif protocol in _RENEGOTIABLE:
            forbidden = renegotiation_forbidden(application_protocol)
            if forbidden is not None:
                self._disabled_reason = (
                    f"{protocol} rotates keys by renegotiation, and {forbidden}"
                )
            elif secure_renegotiation:
                self._method = "renegotiation"
            elif secure_renegotiation is None:
                self._disabled_reason = (
                    f"{protocol} rotates keys by renegotiation, and whether the "
                    f"peer supports secure renegotiation (RFC 5746) is not known"
                )
            else:
                self._disabled_reason = (
                    f"{protocol} rotates keys by renegotiation, and the peer does "
                    f"not support secure renegotiation (RFC 5746)"
                )
        else:
            self._disabled_reason = (
                f"no way to rotate the keys of a {protocol} connection is known"
            )

        aead = aead_record_limit(cipher) if policy.aead_limit else None
        self._aead_records = aead
        self._max_records = policy.max_records
        self._max_bytes = policy.max_bytes

        self._last_rotation = now
        self._retry_after = now
        self._bytes = 0
        self._records = 0
        self._total_bytes = 0
        self._total_records = 0
        # Under the peer's current sending key.
        self._peer_bytes = 0
        self._peer_records = 0
        self._total_bytes_received = 0
        self._total_records_received = 0
        # Every KeyUpdate we send, answers included: the rate and run
        # bounds no policy option can lift.  Made with the first one.
        self._sent_updates: KeyUpdateCounter | None = None
        self._bytes_at_update = 0
        self._rotations = 0
        self._peer_rotations = 0
        self._issued: RotationAction | None = None
        self._request_outstanding = False
        self._interval_deadline: float | None = None
        self._request_deadline: float | None = None
        self._arm_interval(now)
        self._arm_request(now)
        # The fast path of data_sent() and data_received(), which run on
        # every write and read: before _calm_until, and while the counters
        # stay under _calm_bounds (our records and bytes, the peer's), _issue()
        # would return None.  Set by _issue() when it returns None, cleared
        # by every other change.  Two attributes, not five: past 30 an
        # instance's dict is no longer shared and costs ~1.3 KiB more.
        self._calm_until = -math.inf
        self._calm_bounds = _NO_BOUNDS

    def __repr__(self) -> str:
        state = self._method or f"disabled ({self._disabled_reason})"
        return (
            f"<RotationSchedule {self._protocol} {state} bytes={self._bytes} "
            f"records={self._records} rotations={self._rotations}>"
        )

    # -- what the caller reads ------------------------------------------------

    @property
    def policy(self) -> RotationPolicy:
        """The policy this schedule follows."""
        return self._policy

    @property
    def method(self) -> RotationMethod | None:
        """
        ``"key-update"``, ``"renegotiation"``, or ``None`` when the schedule
        is disabled.
        """
        return self._method

    @property
    def disabled_reason(self) -> str | None:
        """
        Why this connection will never rotate, in a sentence fit for a log;
        ``None`` when the schedule is enabled.
        """
        return self._disabled_reason

    @property
    def record_limit(self) -> int | None:
        """
        The number of records after which a rotation is due (the lower of
        ``max_records`` and the cipher's AEAD limit), or ``None``.
        """
        limits = [x for x in (self._max_records, self._aead_records) if x is not None]
        return min(limits) if limits else None

    @property
    def bytes_sent(self) -> int:
        """Bytes of application data sent under the current key."""
        return self._bytes

    @property
    def records_sent(self) -> int:
        """Records sent (or estimated) under the current key."""
        return self._records

    @property
    def total_bytes_sent(self) -> int:
        """Bytes of application data sent since :meth:`RotationPolicy.start`."""
        return self._total_bytes

    @property
    def total_records_sent(self) -> int:
        """Records sent (or estimated) since :meth:`RotationPolicy.start`."""
        return self._total_records

    @property
    def bytes_received(self) -> int:
        """Bytes of application data received under the peer's current key."""
        return self._peer_bytes

    @property
    def records_received(self) -> int:
        """Records received (or estimated) under the peer's current key."""
        return self._peer_records

    @property
    def total_bytes_received(self) -> int:
        """Bytes of application data received since :meth:`RotationPolicy.start`."""
        return self._total_bytes_received

    @property
    def last_rotation(self) -> float:
        """
        When the current sending key came into use: the time of the last
        rotation, or of the start until there was one.
        """
        return self._last_rotation

    @property
    def rotations(self) -> int:
        """How many rotations of ours were reported with :meth:`rotated`."""
        return self._rotations

    @property
    def peer_rotations(self) -> int:
        """How many rotations of the peer were reported with :meth:`peer_rotated`."""
        return self._peer_rotations

    @property
    def request_outstanding(self) -> bool:
        """
        Whether we asked the peer to rotate and it has not answered yet.
        """
        return self._request_outstanding

    @property
    def interval_deadline(self) -> float | None:
        """
        The jittered time of the next timed rotation, as drawn, or ``None``
        without an interval.  The rotation may come later: after the
        ``min_interval`` floor, or with the next data when idle.
        """
        return self._interval_deadline

    @property
    def request_deadline(self) -> float | None:
        """
        The jittered time at which the peer's key is due for renewal, or
        ``None`` (no ``request_peer_interval``, or a request is outstanding).
        """
        return self._request_deadline

    # -- events the caller reports ------------------------------------------

    def data_sent(
        self, now: float, nbytes: int, records: int | None = None
    ) -> RotationAction | None:
        """
        Count application data sent under the current key.

        :param now: the current time.
        :param nbytes: bytes of application data written.
        :param records: TLS records they took, when known; otherwise
            ``ceil(nbytes / 16384)``.
        :returns: the rotation now due, if any, so that a caller that counts
            every write needs no timer for byte and record thresholds.
        :raises ValueError: if *nbytes* or *records* is negative.

        .. versionadded:: 0.1.0
        """
        records = _records(nbytes, records)
        self._bytes += nbytes
        self._records += records
        self._total_bytes += nbytes
        self._total_records += records
        if now < self._calm_until:
            records_bound, bytes_bound, _, _ = self._calm_bounds
            if self._records < records_bound and self._bytes < bytes_bound:
                return None
        return self._issue(now)

    def data_received(
        self, now: float, nbytes: int, records: int | None = None
    ) -> RotationAction | None:
        """
        Count application data received under the peer's current key.  It
        makes the peer's key due for renewal by ``max_bytes``,
        ``max_records``, the AEAD limit and ``request_peer_interval``, as
        :meth:`data_sent` does for ours.  A caller may sum several reads
        into one call.

        :param now: the current time.
        :param nbytes: bytes of application data received.
        :param records: TLS records they took, when known; otherwise
            ``ceil(nbytes / 16384)``.
        :returns: the rotation now due, if any.
        :raises ValueError: if *nbytes* or *records* is negative.

        .. versionadded:: 0.1.0
        """
        records = _records(nbytes, records)
        self._peer_bytes += nbytes
        self._peer_records += records
        self._total_bytes_received += nbytes
        self._total_records_received += records
        if now < self._calm_until:
            _, _, records_bound, bytes_bound = self._calm_bounds
            if self._peer_records < records_bound and self._peer_bytes < bytes_bound:
                return None
        return self._issue(now)

    def get_timer(self) -> float | None:
        """
        The next time at which :meth:`handle_timer` may have something to do.

        :returns: an absolute time, possibly already past; or ``None`` when
            nothing is scheduled: the schedule is disabled, an action is
            issued and not yet reported, or the only rotation left is a
            timed one skipped while idle (it comes back with
            :meth:`data_sent`).

        .. versionadded:: 0.1.0
        """
        if self._method is None or self._issued is not None:
            return None
        floor = self._floor()
        if floor is None:
            return None
        if self._threshold_reason() is not None:
            return floor
        deadlines = [
            deadline
            for deadline, used in (
                (self._interval_deadline, self._own_key_used()),
                (self._request_deadline, self._peer_key_used()),
            )
            if deadline is not None and (used or not self._policy.skip_idle)
        ]
        if not deadlines:
            return None
        return max(floor, min(deadlines))

    def handle_timer(self, now: float) -> RotationAction | None:
        """
        Say what is due at *now*.  Calling it early, or more often than
        needed, is harmless.

        :param now: the current time.
        :returns: the rotation to perform now, or ``None``.

        .. versionadded:: 0.1.0
        """
        return self._issue(now)

    def rotated(self, now: float, *, requested_peer: bool) -> None:
        """
        The caller rotated our sending key (started a renegotiation or sent a
        KeyUpdate), whether an action asked for it or not.  The counters
        start again from zero and the next timed deadline is drawn afresh.

        :param now: the current time.
        :param requested_peer: whether the KeyUpdate was sent with
            ``update_requested``; until :meth:`peer_rotated` reports the
            answer, no further rotation asks the peer.  Ignored for a
            renegotiation.

        .. versionadded:: 0.1.0
        """
        self._issued = None
        self._calm_until = -math.inf
        self._rotations += 1
        self._new_key(now)
        if self._method == "renegotiation":
            self._new_peer_key()
            self._arm_request(now)
            return
        self._sent_update(now)
        if requested_peer:
            self._request_outstanding = True
            self._request_deadline = None

    def rotation_failed(self, now: float) -> None:
        """
        The caller could not perform the issued rotation (a write was pending,
        the peer refused).  The counters are kept and the rotation is asked
        for again no sooner than ``min_interval`` from *now*.

        :param now: the current time.

        .. versionadded:: 0.1.0
        """
        self._issued = None
        self._calm_until = -math.inf
        self._retry_after = now + self._policy.min_interval

    def peer_rotated(self, now: float, *, requested: bool) -> None:
        """
        The peer rotated its sending key: a KeyUpdate or a renegotiation
        from the peer completed.  This answers an outstanding request.

        :param now: the current time.
        :param requested: whether the peer's KeyUpdate carried
            ``update_requested``.  The TLS stack answers it by itself with our
            next write, which rotates our sending key too, so the schedule
            counts that as a new key of ours (and so does any renegotiation,
            which renews both directions).

        .. versionadded:: 0.1.0
        """
        self._peer_rotations += 1
        self._calm_until = -math.inf
        self._request_outstanding = False
        self._new_peer_key()
        self._arm_request(now)
        if requested or self._method == "renegotiation":
            self._new_key(now)
            if self._method == "key-update":
                # The TLS stack's answer: a KeyUpdate of ours on the wire.
                self._sent_update(now)

    # -- internals ----------------------------------------------------------

    def _sent_update(self, now: float) -> None:
        counter = self._sent_updates
        if counter is None:
            counter = self._sent_updates = KeyUpdateCounter.for_sending()
        if self._total_bytes != self._bytes_at_update:
            self._bytes_at_update = self._total_bytes
            counter.data()
        counter.add(now)

    def _new_peer_key(self) -> None:
        self._peer_bytes = 0
        self._peer_records = 0

    def _own_key_used(self) -> bool:
        # One renegotiation renews both directions: on TLS 1.2 the timed
        # interval is the age limit of both keys.
        if self._method == "renegotiation":
            return bool(self._bytes or self._peer_bytes)
        return bool(self._bytes)

    def _peer_key_used(self) -> bool:
        return bool(self._peer_bytes)

    def _new_key(self, now: float) -> None:
        self._last_rotation = now
        self._retry_after = now
        self._bytes = 0
        self._records = 0
        self._arm_interval(now)

    def _arm_interval(self, now: float) -> None:
        interval = self._policy.interval
        if interval is not None:
            self._interval_deadline = now + self._policy._draw(interval)

    def _arm_request(self, now: float) -> None:
        interval = self._policy.request_peer_interval
        if interval is not None:
            self._request_deadline = now + self._policy._draw(interval)

    def _floor(self) -> float | None:
        floor = max(self._last_rotation + self._policy.min_interval, self._retry_after)
        counter = self._sent_updates
        if self._method != "key-update" or counter is None:
            return floor  # none of ours sent yet: no bound to reach
        if self._total_bytes != self._bytes_at_update:
            # Data went out since our last KeyUpdate: the run ended.
            self._bytes_at_update = self._total_bytes
            counter.data()
        allowed = counter.next_allowed(floor)
        return None if allowed is None else max(floor, allowed)

    def _limit_reason(self, records: int, nbytes: int) -> RotationReason | None:
        aead = self._aead_records
        max_records = self._max_records
        if aead is not None and records >= aead:
            if max_records is None or aead <= max_records:
                return "aead-limit"
        if max_records is not None and records >= max_records:
            return "records"
        if self._max_bytes is not None and nbytes >= self._max_bytes:
            return "bytes"
        return None

    def _peer_limit_reason(self) -> RotationReason | None:
        # The peer's key can be renewed only by asking (one request at a
        # time) or by a renegotiation.
        if self._request_outstanding:
            return None
        return self._limit_reason(self._peer_records, self._peer_bytes)

    def _threshold_reason(self) -> RotationReason | None:
        own = self._limit_reason(self._records, self._bytes)
        peer = self._peer_limit_reason()
        if own is None or peer is None:
            return own or peer
        order = ("aead-limit", "records", "bytes")
        return own if order.index(own) <= order.index(peer) else peer

    def _calm(self) -> None:
        """
        Nothing is due now: note until when, and up to which counts, data
        alone cannot make anything due (the time-based reasons as though
        both keys were used, which only makes the fast path end sooner).
        """
        times = (self._interval_deadline, self._request_deadline)
        deadlines = [d for d in times if d is not None]
        self._calm_until = min(deadlines) if deadlines else math.inf
        caps = [c for c in (self._aead_records, self._max_records) if c is not None]
        records = min(caps) if caps else math.inf
        nbytes = math.inf if self._max_bytes is None else self._max_bytes
        # The peer's key is renewed by its answer, never by its counts.
        self._calm_bounds = _bounds(records, nbytes, self._request_outstanding)

    def _issue(self, now: float) -> RotationAction | None:
        method = self._method
        if method is None or self._issued is not None:
            # Until rotated() or rotation_failed(), which clear this.
            self._calm_until = math.inf
            self._calm_bounds = _UNBOUNDED
            return None
        skip = self._policy.skip_idle
        peer_used = self._peer_key_used() or not skip
        request = (
            self._request_deadline is not None
            and now >= self._request_deadline
            and peer_used
        ) or self._peer_limit_reason() is not None
        reason = self._threshold_reason()
        if reason is None:
            if (
                self._interval_deadline is not None
                and now >= self._interval_deadline
                and (self._own_key_used() or not skip)
            ):
                reason = "interval"
            elif request:
                reason = "request-peer"
            else:
                self._calm()
                return None
        floor = self._floor()
        if floor is None or now < floor:
            return None
        action = RotationAction(
            method, reason, request_peer=request and method == "key-update"
        )
        self._issued = action
        return action
