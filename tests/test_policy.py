"""
Tests for the sans-IO rotation policy: no reactor, no sockets, time passed in.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from twisted_rekey import _policy
from twisted_rekey._policy import (
    KEY_UPDATE_RATE_SENT,
    KEY_UPDATES_IN_A_ROW_SENT,
    MIN_INTERVAL_LOWEST,
    KeyUpdateCounter,
    RotationAction,
    RotationPolicy,
    RotationSchedule,
    aead_record_limit,
    client_renegotiation_refusal,
)

AES_GCM = "TLS_AES_128_GCM_SHA256"
CHACHA = "TLS_CHACHA20_POLY1305_SHA256"
LIMIT = 1 << 23


def start(
    policy: RotationPolicy,
    now: float = 0.0,
    protocol: str = "TLSv1.3",
    cipher: str | None = AES_GCM,
    secure_renegotiation: bool | None = None,
) -> RotationSchedule:
    return policy.start(
        now,
        protocol=protocol,
        cipher=cipher,
        secure_renegotiation=secure_renegotiation,
    )


def test_module_imports_no_io_library() -> None:
    """
    The policy module, loaded on its own (not through the package, which
    imports the pyOpenSSL layer), pulls in neither Twisted, pyOpenSSL nor
    cryptography.
    """
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {_policy.__file__!r})\n"
        "module = sys.modules['p'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert module.RotationPolicy\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('twisted', 'OpenSSL', 'cryptography', 'socket', 'select')]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


# -- aead_record_limit ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_CCM_SHA256",
        "TLS_AES_128_CCM_8_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "AES128-GCM-SHA256",
        "DHE-RSA-AES256-CCM",
        "ECDHE-ECDSA-AES128-CCM8",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_RSA_WITH_AES_128_CCM_8",
        "ecdhe-rsa-aes128-gcm-sha256",
        "ECDHE-RSA-ARIA128-GCM-SHA256",
    ],
)
def test_aead_limit_block_cipher_modes(name: str) -> None:
    """
    AES-GCM and AES-CCM suites, TLS 1.3 and 1.2, OpenSSL and IANA names,
    rotate at 2^23 records.
    """
    assert aead_record_limit(name) == LIMIT


@pytest.mark.parametrize(
    "name",
    [
        "TLS_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-AES128-SHA256",  # CBC: not an AEAD
        "AES128-SHA",
        "NULL-SHA256",
        "TLS_SOMETHING_NEW",
        "",
        None,
    ],
)
def test_aead_limit_none(name: str | None) -> None:
    """
    ChaCha20-Poly1305, non-AEAD and unknown suites have no record limit.
    """
    assert aead_record_limit(name) is None


def test_aead_limit_type() -> None:
    with pytest.raises(TypeError, match="cipher_name"):
        aead_record_limit(b"TLS_AES_128_GCM_SHA256")  # type: ignore[arg-type]


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"interval": 0}, ValueError, "interval"),
        ({"interval": -5.0}, ValueError, "interval"),
        ({"interval": float("inf")}, ValueError, "interval"),
        ({"interval": float("nan")}, ValueError, "interval"),
        ({"interval": "60"}, TypeError, "interval"),
        ({"interval": True}, TypeError, "interval"),
        ({"jitter": 1.0}, ValueError, "jitter"),
        ({"jitter": -0.1}, ValueError, "jitter"),
        ({"jitter": None}, TypeError, "jitter"),
        ({"max_bytes": 0}, ValueError, "max_bytes"),
        ({"max_bytes": 1.5}, TypeError, "max_bytes"),
        ({"max_records": -1}, ValueError, "max_records"),
        ({"max_records": True}, TypeError, "max_records"),
        ({"aead_limit": 1}, TypeError, "aead_limit"),
        ({"skip_idle": None}, TypeError, "skip_idle"),
        ({"min_interval": 0.01}, ValueError, "min_interval"),
        ({"min_interval": 0}, ValueError, "min_interval"),
        ({"request_peer_interval": 0}, ValueError, "request_peer_interval"),
        ({"rng": 42}, TypeError, "rng"),
        ({"aead_limit": False}, ValueError, "nothing would ever trigger"),
    ],
)
def test_validation(
    kwargs: dict[str, object], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        RotationPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["interval", "request_peer_interval"])
def test_interval_below_floor_says_to_lower_min_interval(name: str) -> None:
    """
    A period below min_interval is refused, with the fix in the message.
    """
    with pytest.raises(ValueError, match="lower min_interval explicitly"):
        RotationPolicy(**{name: 0.5})  # type: ignore[arg-type]
    policy = RotationPolicy(**{name: 0.5, "min_interval": 0.5})  # type: ignore[arg-type]
    assert getattr(policy, name) == 0.5


def test_lowest_min_interval_accepted() -> None:
    policy = RotationPolicy(interval=MIN_INTERVAL_LOWEST, min_interval=0.2)
    assert policy.min_interval == MIN_INTERVAL_LOWEST == 0.2


@pytest.mark.parametrize("floor", [0.05, 0.1, 0.125, 0.19])
def test_floor_below_what_gnutls_takes_is_refused(floor: float) -> None:
    """
    A floor that lets more than 8 KeyUpdates into one second on the wire
    (GnuTLS's cap) is an error, not silently raised.
    """
    with pytest.raises(ValueError, match=r"at least 0\.2 s.*GnuTLS"):
        RotationPolicy(interval=floor, min_interval=floor)


def test_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        RotationPolicy(60)  # type: ignore[misc]
    policy = RotationPolicy(interval=60)
    with pytest.raises(AttributeError):
        policy.interval = 30  # type: ignore[misc]


def test_equal_policies_ignore_rng() -> None:
    a = RotationPolicy(interval=60, rng=random.Random(1))
    b = RotationPolicy(interval=60, rng=random.Random(2))
    assert a == b
    assert hash(a) == hash(b)
    assert a != RotationPolicy(interval=61)


def test_defaults_rotate_only_at_aead_limit() -> None:
    schedule = start(RotationPolicy())
    assert schedule.get_timer() is None
    assert schedule.record_limit == LIMIT
    assert schedule.data_sent(100.0, 10**9, records=LIMIT - 1) is None
    assert schedule.data_sent(100.0, 10, records=1) == RotationAction(
        "key-update", "aead-limit", request_peer=False
    )


def test_protocol_must_be_str() -> None:
    with pytest.raises(TypeError, match="protocol"):
        RotationPolicy().start(0.0, protocol=b"TLSv1.3", cipher=None)  # type: ignore[arg-type]


# -- methods and disabled schedules --------------------------------------------


def test_tls13_uses_key_update() -> None:
    schedule = start(RotationPolicy(interval=10), protocol="TLSv1.3")
    assert schedule.method == "key-update"
    assert schedule.disabled_reason is None


@pytest.mark.parametrize("protocol", ["TLSv1.2", "TLSv1.1", "TLSv1"])
def test_tls12_uses_renegotiation(protocol: str) -> None:
    policy = RotationPolicy(max_bytes=1000, request_peer_interval=5.0)
    schedule = start(
        policy,
        protocol=protocol,
        cipher="ECDHE-RSA-AES128-GCM-SHA256",
        secure_renegotiation=True,
    )
    assert schedule.method == "renegotiation"
    assert schedule.record_limit == LIMIT
    action = schedule.data_sent(2.0, 1000)
    assert action == RotationAction("renegotiation", "bytes", request_peer=False)
    schedule.rotated(2.0, requested_peer=True)
    # A renegotiation renews both directions: nothing is left outstanding,
    # and the peer's key clock starts again.
    assert not schedule.request_outstanding
    assert schedule.request_deadline is not None
    assert schedule.request_deadline > 2.0


@pytest.mark.parametrize(
    ("secure", "words"), [(False, "does not support"), (None, "not known")]
)
def test_tls12_without_secure_renegotiation_is_disabled(
    secure: bool | None, words: str
) -> None:
    policy = RotationPolicy(interval=1.0, max_bytes=10, max_records=1)
    schedule = start(
        policy,
        protocol="TLSv1.2",
        cipher="ECDHE-RSA-AES128-GCM-SHA256",
        secure_renegotiation=secure,
    )
    assert schedule.method is None
    assert schedule.disabled_reason is not None
    assert "secure renegotiation" in schedule.disabled_reason
    assert words in schedule.disabled_reason
    assert schedule.get_timer() is None
    for t in range(1, 100):
        assert schedule.data_sent(float(t), 100_000, records=LIMIT) is None
        assert schedule.handle_timer(float(t)) is None
    assert schedule.get_timer() is None
    assert schedule.bytes_sent == 99 * 100_000


@pytest.mark.parametrize(
    ("protocol", "alpn", "method"),
    [
        ("TLSv1.2", b"h2", None),
        ("TLSv1.2", b"http/1.1", "renegotiation"),
        ("TLSv1.2", None, "renegotiation"),
        # RFC 9113 forbids renegotiation only: a KeyUpdate is no handshake.
        ("TLSv1.3", b"h2", "key-update"),
    ],
)
def test_http2_forbids_renegotiation(
    protocol: str, alpn: bytes | None, method: str | None
) -> None:
    schedule = RotationPolicy(interval=1.0, skip_idle=False).start(
        0.0,
        protocol=protocol,
        cipher=None,
        secure_renegotiation=True,
        application_protocol=alpn,
    )
    assert schedule.method == method
    if method is None:
        assert schedule.disabled_reason is not None
        assert "HTTP/2 forbids TLS renegotiation" in schedule.disabled_reason
        assert schedule.handle_timer(1e9) is None
    else:
        assert schedule.disabled_reason is None
        assert schedule.handle_timer(1e9) is not None


@pytest.mark.parametrize("protocol", ["DTLSv1.2", "QUIC", ""])
def test_unknown_protocol_is_disabled(protocol: str) -> None:
    schedule = start(RotationPolicy(interval=1.0), protocol=protocol)
    assert schedule.method is None
    assert schedule.disabled_reason is not None
    assert schedule.handle_timer(1e9) is None


def test_tls13_ignores_secure_renegotiation() -> None:
    schedule = start(RotationPolicy(interval=10), secure_renegotiation=False)
    assert schedule.method == "key-update"


# -- timed rotation and jitter -------------------------------------------------


def test_interval_rotation() -> None:
    policy = RotationPolicy(interval=60, jitter=0, skip_idle=False)
    schedule = start(policy, now=100.0)
    assert schedule.get_timer() == 160.0
    assert schedule.handle_timer(159.999) is None
    action = schedule.handle_timer(160.0)
    assert action == RotationAction("key-update", "interval", request_peer=False)
    # Issued and not yet reported: not asked again, no timer.
    assert schedule.get_timer() is None
    assert schedule.handle_timer(161.0) is None
    schedule.rotated(161.0, requested_peer=False)
    assert schedule.rotations == 1
    assert schedule.last_rotation == 161.0
    assert schedule.get_timer() == 221.0


@settings(max_examples=50, deadline=None)
@given(
    interval=st.floats(min_value=1.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=0.99),
    seed=st.integers(0, 2**32),
)
def test_jitter_stays_in_bounds(interval: float, jitter: float, seed: int) -> None:
    policy = RotationPolicy(
        interval=interval, jitter=jitter, rng=random.Random(seed), skip_idle=False
    )
    schedule = start(policy, now=0.0)
    now = 0.0
    for _ in range(20):
        deadline = schedule.interval_deadline
        assert deadline is not None
        assert now + interval * (1 - jitter) - 1e-9 <= deadline
        assert deadline <= now + interval * (1 + jitter) + 1e-9
        # Data between rotations: never 16 KeyUpdates in a row without it.
        assert schedule.data_sent(now, 1) is None
        now = max(deadline, now + policy.min_interval)
        assert schedule.handle_timer(now) is not None
        schedule.rotated(now, requested_peer=False)


def test_jitter_spreads_connections() -> None:
    """
    Connections started together get different deadlines, over the whole
    jitter range.
    """
    policy = RotationPolicy(interval=60, jitter=0.1, rng=random.Random(7))
    deadlines = [start(policy, now=0.0).interval_deadline for _ in range(1000)]
    assert all(d is not None and 54.0 <= d <= 66.0 for d in deadlines)
    assert len(set(deadlines)) == 1000
    lows = [d for d in deadlines if d is not None and d < 55.0]
    highs = [d for d in deadlines if d is not None and d > 65.0]
    assert lows
    assert highs


def test_seeded_rng_is_deterministic() -> None:
    a = start(RotationPolicy(interval=60, rng=random.Random(3)))
    b = start(RotationPolicy(interval=60, rng=random.Random(3)))
    assert a.interval_deadline == b.interval_deadline


def test_zero_jitter_is_exact() -> None:
    schedule = start(RotationPolicy(interval=30, jitter=0), now=5.0)
    assert schedule.interval_deadline == 35.0


def test_jittered_low_deadline_still_respects_floor() -> None:
    """
    interval == min_interval with jitter may draw below the floor; the
    rotation still waits for it.
    """
    for seed in range(50):
        policy = RotationPolicy(
            interval=1.0,
            min_interval=1.0,
            jitter=0.5,
            skip_idle=False,
            rng=random.Random(seed),
        )
        schedule = start(policy, now=0.0)
        timer = schedule.get_timer()
        assert timer is not None and timer >= 1.0
        assert schedule.handle_timer(0.999) is None


# -- skip_idle -----------------------------------------------------------------


def test_skip_idle_defers_timed_rotation_to_next_data() -> None:
    policy = RotationPolicy(interval=60, jitter=0)
    schedule = start(policy, now=0.0)
    # Nothing sent: no timer at all, and the deadline passing does nothing.
    assert schedule.get_timer() is None
    assert schedule.handle_timer(1000.0) is None
    # The first data after the deadline makes the rotation due at once.
    action = schedule.data_sent(1000.0, 5)
    assert action == RotationAction("key-update", "interval", request_peer=False)
    schedule.rotated(1000.0, requested_peer=False)
    assert schedule.bytes_sent == 0
    assert schedule.get_timer() is None


def test_skip_idle_data_before_deadline_arms_timer() -> None:
    schedule = start(RotationPolicy(interval=60, jitter=0), now=0.0)
    assert schedule.data_sent(10.0, 1) is None
    assert schedule.get_timer() == 60.0
    assert schedule.handle_timer(60.0) is not None


def test_skip_idle_off_rotates_idle_connections() -> None:
    schedule = start(RotationPolicy(interval=60, jitter=0, skip_idle=False))
    assert schedule.get_timer() == 60.0
    assert schedule.handle_timer(60.0) == RotationAction("key-update", "interval")


def test_idle_never_sends_keyupdates_in_a_row() -> None:
    """
    With skip_idle, every rotation of ours follows data sent under the key
    it retires, however long the connection idles in between.
    """
    policy = RotationPolicy(interval=60, request_peer_interval=60, jitter=0.2)
    schedule = start(policy, now=0.0)
    now = 0.0
    rotations_without_data = 0
    sent_since = False
    for step in range(1, 2000):
        now = step * 7.0
        if step % 50 == 0:
            sent_since = True
            action = schedule.data_sent(now, 100)
        else:
            action = schedule.handle_timer(now)
        if action is not None:
            rotations_without_data += not sent_since
            sent_since = False
            schedule.rotated(now, requested_peer=action.request_peer)
            if action.request_peer:
                schedule.peer_rotated(now + 0.1, requested=False)
    assert schedule.rotations > 10
    assert rotations_without_data == 0


# -- byte and record thresholds ------------------------------------------------


def test_byte_threshold() -> None:
    schedule = start(RotationPolicy(max_bytes=1000), now=0.0)
    assert schedule.data_sent(5.0, 999) is None
    assert schedule.bytes_sent == 999
    assert schedule.data_sent(5.0, 1) == RotationAction("key-update", "bytes")
    schedule.rotated(5.0, requested_peer=False)
    assert schedule.bytes_sent == 0
    assert schedule.total_bytes_sent == 1000


def test_record_threshold_and_estimate() -> None:
    schedule = start(RotationPolicy(max_records=10), now=0.0)
    # 16384 bytes is one record, 16385 two, 1 byte one.
    assert schedule.data_sent(5.0, 16384) is None
    assert schedule.data_sent(5.0, 16385) is None
    assert schedule.data_sent(5.0, 1) is None
    assert schedule.records_sent == 4
    assert schedule.data_sent(5.0, 0) is None
    assert schedule.records_sent == 4
    assert schedule.data_sent(5.0, 10, records=5) is None
    assert schedule.data_sent(5.0, 10, records=1) == RotationAction(
        "key-update", "records"
    )


def test_max_records_below_aead_limit_names_records() -> None:
    schedule = start(RotationPolicy(max_records=100), cipher=AES_GCM)
    assert schedule.record_limit == 100
    assert schedule.data_sent(5.0, 1, records=100) == RotationAction(
        "key-update", "records"
    )


def test_aead_limit_below_max_records_names_aead() -> None:
    schedule = start(RotationPolicy(max_records=LIMIT * 4), cipher=AES_GCM)
    assert schedule.data_sent(5.0, 1, records=LIMIT) == RotationAction(
        "key-update", "aead-limit"
    )


def test_chacha_has_no_aead_limit() -> None:
    schedule = start(RotationPolicy(max_bytes=10**15), cipher=CHACHA)
    assert schedule.record_limit is None
    assert schedule.data_sent(5.0, 1, records=LIMIT * 8) is None


def test_aead_limit_can_be_turned_off() -> None:
    schedule = start(RotationPolicy(aead_limit=False, max_bytes=10**15))
    assert schedule.record_limit is None
    assert schedule.data_sent(5.0, 1, records=LIMIT) is None


def test_negative_counts_refused() -> None:
    schedule = start(RotationPolicy())
    with pytest.raises(ValueError, match="nbytes"):
        schedule.data_sent(0.0, -1)
    with pytest.raises(ValueError, match="records"):
        schedule.data_sent(0.0, 1, records=-1)


# -- min_interval floor --------------------------------------------------------


def test_floor_delays_threshold_rotation() -> None:
    schedule = start(RotationPolicy(max_bytes=100, min_interval=2.0), now=10.0)
    # Threshold crossed 0.5 s after start: wait for the floor.
    assert schedule.data_sent(10.5, 500) is None
    assert schedule.get_timer() == 12.0
    assert schedule.handle_timer(11.99) is None
    assert schedule.handle_timer(12.0) == RotationAction("key-update", "bytes")
    schedule.rotated(12.0, requested_peer=False)
    # And again between two rotations of ours.
    assert schedule.data_sent(12.1, 500) is None
    assert schedule.get_timer() == 14.0
    # Data sent when the floor has passed rotates inline.
    assert schedule.data_sent(14.5, 1) == RotationAction("key-update", "bytes")


def test_floor_counts_from_peer_requested_update() -> None:
    """
    Answering the peer's update_requested changes our key too: it counts as
    a rotation for the floor and the counters.
    """
    schedule = start(RotationPolicy(max_bytes=100, min_interval=1.0), now=0.0)
    schedule.data_sent(5.0, 50)
    schedule.peer_rotated(5.0, requested=True)
    assert schedule.bytes_sent == 0
    assert schedule.last_rotation == 5.0
    assert schedule.peer_rotations == 1
    assert schedule.rotations == 0
    assert schedule.data_sent(5.5, 200) is None
    assert schedule.get_timer() == 6.0


def test_peer_update_without_request_keeps_our_counters() -> None:
    schedule = start(RotationPolicy(max_bytes=100), now=0.0)
    schedule.data_sent(5.0, 50)
    schedule.peer_rotated(5.0, requested=False)
    assert schedule.bytes_sent == 50
    assert schedule.last_rotation == 0.0


def test_rotation_failed_retries_after_floor() -> None:
    schedule = start(RotationPolicy(max_bytes=100, min_interval=1.0), now=0.0)
    action = schedule.data_sent(5.0, 200)
    assert action is not None
    schedule.rotation_failed(5.0)
    assert schedule.bytes_sent == 200
    assert schedule.handle_timer(5.5) is None
    assert schedule.get_timer() == 6.0
    assert schedule.handle_timer(6.0) == action


def test_manual_rotation_resets_schedule() -> None:
    """
    rotated() without an issued action (the application asked) re-arms too.
    """
    schedule = start(RotationPolicy(interval=60, jitter=0, max_bytes=1000))
    schedule.data_sent(10.0, 900)
    schedule.rotated(20.0, requested_peer=False)
    assert schedule.bytes_sent == 0
    assert schedule.interval_deadline == 80.0
    assert schedule.data_sent(21.0, 900) is None


# -- asking the peer to rotate -------------------------------------------------


def test_request_peer_interval() -> None:
    policy = RotationPolicy(request_peer_interval=30, jitter=0)
    schedule = start(policy, now=0.0)
    # The peer's key is due by the traffic it carries.
    schedule.data_received(1.0, 10)
    assert schedule.get_timer() == 30.0
    action = schedule.handle_timer(30.0)
    assert action == RotationAction("key-update", "request-peer", request_peer=True)
    schedule.rotated(30.0, requested_peer=True)
    assert schedule.request_outstanding
    assert schedule.request_deadline is None


def test_only_one_request_outstanding() -> None:
    """
    Until the peer answers, further rotations go out without the flag.
    """
    policy = RotationPolicy(
        interval=10, request_peer_interval=10, jitter=0, skip_idle=False
    )
    schedule = start(policy, now=0.0)
    first = schedule.handle_timer(10.0)
    assert first == RotationAction("key-update", "interval", request_peer=True)
    schedule.rotated(10.0, requested_peer=True)
    now = 10.0
    for _ in range(10):
        timer = schedule.get_timer()
        assert timer is not None
        now = timer
        action = schedule.handle_timer(now)
        assert action == RotationAction("key-update", "interval", request_peer=False)
        schedule.rotated(now, requested_peer=False)
        assert schedule.request_outstanding
    # The answer arrives: the peer's key clock starts again from it.
    schedule.peer_rotated(now + 0.5, requested=False)
    assert not schedule.request_outstanding
    assert schedule.request_deadline == now + 10.5
    action = schedule.handle_timer(now + 10.5)
    assert action is not None and action.request_peer


def test_request_piggybacks_on_threshold_rotation() -> None:
    policy = RotationPolicy(max_bytes=100, request_peer_interval=30, jitter=0)
    schedule = start(policy, now=0.0)
    schedule.data_received(1.0, 1)
    action = schedule.data_sent(31.0, 100)
    assert action == RotationAction("key-update", "bytes", request_peer=True)


def test_peer_rotation_postpones_request() -> None:
    """
    A KeyUpdate the peer sends on its own renews its key just as well.
    """
    policy = RotationPolicy(request_peer_interval=30, jitter=0)
    schedule = start(policy, now=0.0)
    schedule.data_received(1.0, 10)
    schedule.peer_rotated(20.0, requested=False)
    assert schedule.handle_timer(30.0) is None
    schedule.data_received(21.0, 10)
    assert schedule.get_timer() == 50.0


def test_request_skipped_while_the_peer_sends_nothing() -> None:
    """
    skip_idle skips only a key that encrypted nothing: our data does not
    make the peer's key due, the peer's data does.
    """
    schedule = start(RotationPolicy(request_peer_interval=30, jitter=0))
    assert schedule.get_timer() is None
    assert schedule.handle_timer(100.0) is None
    assert schedule.data_sent(100.0, 1) is None
    assert schedule.get_timer() is None
    assert schedule.data_received(100.0, 1) == RotationAction(
        "key-update", "request-peer", request_peer=True
    )


def test_repr_mentions_state() -> None:
    schedule = start(RotationPolicy(), protocol="TLSv1.2")
    assert "disabled" in repr(schedule)
    assert "key-update" in repr(start(RotationPolicy()))


# -- each direction's key, by the traffic it carries --------------------------


def drive(
    schedule: RotationSchedule,
    until: float,
    step: float,
    *,
    received: int = 0,
    sent: int = 0,
) -> list[RotationAction]:
    """
    Run *schedule* from 0 to *until*, data arriving (and going) every
    *step* seconds, performing every action at once and answering every
    request at once, as a peer would.
    """
    actions = []
    now = 0.0
    while now < until:
        now += step
        for action in (
            schedule.data_received(now, received) if received else None,
            schedule.data_sent(now, sent) if sent else None,
            schedule.handle_timer(now),
        ):
            if action is None:
                continue
            actions.append(action)
            schedule.rotated(now, requested_peer=action.request_peer)
            if action.request_peer:
                schedule.peer_rotated(now, requested=False)
    return actions


@pytest.mark.parametrize("protocol", ["TLSv1.3", "TLSv1.2"])
def test_receive_only_link_renews_the_peers_key(protocol: str) -> None:
    """
    A side that only receives (telemetry, log shipping) renews the key that
    carries the data: by requests on TLS 1.3, by renegotiations on TLS 1.2.
    """
    policy = RotationPolicy(
        interval=0.5, request_peer_interval=0.5, min_interval=0.5, jitter=0
    )
    schedule = start(policy, protocol=protocol, secure_renegotiation=True)
    actions = drive(schedule, 5.0, 0.05, received=1024)
    assert len(actions) >= 8
    if protocol == "TLSv1.3":
        assert all(a.request_peer and a.method == "key-update" for a in actions)
    else:
        assert all(a.method == "renegotiation" for a in actions)


def test_tls12_interval_counts_either_direction() -> None:
    """One renegotiation renews both keys: the interval is due by either."""
    schedule = start(
        RotationPolicy(interval=60, jitter=0),
        protocol="TLSv1.2",
        secure_renegotiation=True,
    )
    assert schedule.get_timer() is None
    assert schedule.data_received(1.0, 10) is None
    assert schedule.get_timer() == 60.0
    assert schedule.handle_timer(60.0) == RotationAction("renegotiation", "interval")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"max_bytes": 1000}, "bytes"),
        ({"max_records": 10}, "records"),
        ({}, "aead-limit"),
    ],
)
def test_received_traffic_counts_toward_the_peers_limits(
    kwargs: dict[str, int], reason: str
) -> None:
    schedule = start(RotationPolicy(**kwargs))  # type: ignore[arg-type]
    assert schedule.data_received(5.0, 999, records=9) is None
    records = LIMIT if reason == "aead-limit" else 1
    action = schedule.data_received(5.0, 1, records=records)
    assert action == RotationAction("key-update", reason, request_peer=True)  # type: ignore[arg-type]
    schedule.rotated(5.0, requested_peer=True)
    # The request is outstanding: no second one, whatever arrives.
    assert schedule.data_received(10.0, 10**6, records=LIMIT) is None
    schedule.peer_rotated(10.5, requested=False)
    assert schedule.bytes_received == 0
    assert schedule.records_received == 0


def test_skip_idle_skips_only_the_key_that_encrypted_nothing() -> None:
    policy = RotationPolicy(interval=10, request_peer_interval=10, jitter=0)
    schedule = start(policy)
    schedule.data_sent(1.0, 5)
    # Our key carried data, the peer's none: rotate ours, do not ask.
    assert schedule.handle_timer(10.0) == RotationAction(
        "key-update", "interval", request_peer=False
    )


def test_sent_rate_bound_holds_whatever_the_options() -> None:
    """
    Rotations and answers together never exceed KEY_UPDATE_RATE_SENT in any
    window, even with a busy peer requesting and a byte threshold hit on
    every write.
    """
    count, window = KEY_UPDATE_RATE_SENT
    schedule = start(RotationPolicy(max_bytes=1, min_interval=MIN_INTERVAL_LOWEST))
    sent: list[float] = []
    ours: list[float] = []
    for tick in range(1, 1001):
        now = tick / 100
        if tick % 37 == 0:
            # The peer asks; our stack answers: a KeyUpdate of ours.
            schedule.peer_rotated(now, requested=True)
            sent.append(now)
        action = schedule.data_sent(now, 100)
        if action is not None:
            schedule.rotated(now, requested_peer=False)
            sent.append(now)
            ours.append(now)
    assert len(ours) > 5
    # The answers alone may crowd a window (the peer's doing); a rotation
    # of ours never makes one fuller than the bound.
    for t in ours:
        assert len([u for u in sent if t - window < u <= t]) <= count
    assert all(b - a >= MIN_INTERVAL_LOWEST - 1e-9 for a, b in zip(ours, ours[1:]))


def test_sent_run_without_data_is_bounded() -> None:
    """
    With skip_idle off and nothing sent, rotations stop after
    KEY_UPDATES_IN_A_ROW_SENT (rustls and BoringSSL drop at 32) and start
    again with the next data.
    """
    policy = RotationPolicy(interval=1, jitter=0, skip_idle=False)
    schedule = start(policy)
    actions = drive(schedule, 100.0, 0.5)
    assert len(actions) == KEY_UPDATES_IN_A_ROW_SENT
    assert schedule.get_timer() is None
    assert schedule.data_sent(101.0, 1) == RotationAction(
        "key-update", "interval", request_peer=False
    )


def test_counter_bounds() -> None:
    counter = KeyUpdateCounter((3, 1.0), 5)
    assert [counter.add(t) for t in (0.0, 0.1, 0.2)] == [None] * 3
    assert counter.next_allowed(0.3) == pytest.approx(1.0)
    assert counter.add(0.3) == "4 KeyUpdates within 1.0 s (limit 3)"
    counter.add(1.5)
    assert (
        counter.add(2.6) == "6 KeyUpdates in a row without application data (limit 5)"
    )
    counter.data()
    assert counter.next_allowed(10.0) == 10.0
    unbounded = KeyUpdateCounter(None, None)
    assert all(unbounded.add(0.0) is None for _ in range(1000))


def test_client_renegotiation_refusal() -> None:
    # One rule for both layers: a TLS 1.2 client (or a side not known to be
    # the server) does not rotate unless the application allows it.
    policy = RotationPolicy(interval=60)
    tls12 = policy.start(
        0.0, protocol="TLSv1.2", cipher=None, secure_renegotiation=True
    )
    tls13 = policy.start(0.0, protocol="TLSv1.3", cipher=None)
    insecure = policy.start(
        0.0, protocol="TLSv1.2", cipher=None, secure_renegotiation=False
    )
    for is_client in (True, None):
        reason = client_renegotiation_refusal(
            tls12, is_client=is_client, allowed=False, option="theOption"
        )
        assert reason is not None
        assert "TLSv1.2" in reason and "theOption" in reason
    assert (
        client_renegotiation_refusal(tls12, is_client=False, allowed=False, option="o")
        is None
    )
    assert (
        client_renegotiation_refusal(tls12, is_client=True, allowed=True, option="o")
        is None
    )
    for schedule in (tls13, insecure):
        assert (
            client_renegotiation_refusal(
                schedule, is_client=True, allowed=False, option="o"
            )
            is None
        )


def test_key_update_counter_names_what_it_counts() -> None:
    counter = KeyUpdateCounter((2, 60.0), None, events="renegotiations")
    assert counter.add(0.0) is None
    assert counter.add(1.0) is None
    assert counter.add(2.0) == "3 renegotiations within 60.0 s (limit 2)"


_STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["sent", "received", "timer", "rotated", "failed", "peer", "peer-asked"]
        ),
        # Mostly short steps, so that many calls fall inside one interval.
        st.sampled_from([0.0, 0.3, 1.2, 2.5, 9.0, 31.0]),
        st.integers(min_value=0, max_value=70_000),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@example(  # a record limit reached by a later write
    steps=[("sent", 2.5, 70_000), ("sent", 1.2, 70_000), ("sent", 1.2, 70_000)],
    skip_idle=True,
    protocol="TLSv1.3",
    limits={"max_records": 9},
)
@example(  # a byte limit of the peer's key reached by a later read
    steps=[("received", 2.5, 60_000), ("received", 1.2, 60_000)],
    skip_idle=True,
    protocol="TLSv1.3",
    limits={"max_bytes": 100_000},
)
@example(  # our byte limit, and then the peer's after its answer
    steps=[("sent", 2.5, 60_000), ("sent", 1.2, 60_000), ("rotated", 0.0, 1),
           ("peer", 2.5, 0), ("received", 1.2, 60_000), ("received", 1.2, 60_000)],
    skip_idle=False,
    protocol="TLSv1.3",
    limits={"max_bytes": 100_000},
)  # fmt: skip
@given(
    steps=_STEPS,
    skip_idle=st.booleans(),
    protocol=st.sampled_from(["TLSv1.3", "TLSv1.2"]),
    limits=st.sampled_from(
        [
            {"max_bytes": 100_000},
            {"max_records": 9},
            {"request_peer_interval": 25.0},
            {"max_bytes": 50_000, "request_peer_interval": 10.0},
            {},
        ]
    ),
)
def test_fast_path_answers_as_the_full_evaluation(
    steps: list[tuple[str, float, int]],
    skip_idle: bool,
    protocol: str,
    limits: dict[str, float],
) -> None:
    """
    data_sent() and data_received() skip the evaluation while nothing can
    be due: a schedule whose fast path is defeated before every call (so
    it evaluates each time) returns the same actions and timers.
    """

    def schedule() -> RotationSchedule:
        policy = RotationPolicy(
            interval=30.0,
            min_interval=1.0,
            jitter=0,
            skip_idle=skip_idle,
            **limits,  # type: ignore[arg-type]
        )
        return start(policy, protocol=protocol, secure_renegotiation=True)

    fast, full = schedule(), schedule()
    now = 0.0
    for op, dt, nbytes in steps:
        now += dt
        results = []
        for s in (fast, full):
            if s is full:
                s._calm_until = -math.inf
            if op == "sent":
                results.append(s.data_sent(now, nbytes))
            elif op == "received":
                results.append(s.data_received(now, nbytes))
            elif op == "timer":
                results.append(s.handle_timer(now))
            elif op == "rotated":
                s.rotated(now, requested_peer=nbytes % 2 == 1)
            elif op == "failed":
                s.rotation_failed(now)
            else:
                s.peer_rotated(now, requested=op == "peer-asked")
            results.append(s.get_timer())
        assert results[: len(results) // 2] == results[len(results) // 2 :]
