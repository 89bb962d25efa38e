"""
The public API's types, pinned: this file is never run, only type-checked
(``mypy`` with the project's strict settings, from ``tests/test_quality.py``).
A change to a public signature that breaks callers fails here first.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from typing_extensions import assert_type

import twisted_rekey
from twisted_rekey import (
    Capabilities,
    KeyUpdateType,
    RekeyConnection,
    RekeyError,
    RekeyMethod,
    RotationAction,
    RotationPolicy,
    RotationSchedule,
    aead_record_limit,
    capabilities,
    get_key_update_type,
    key_update,
    protocol_version,
    rekey,
    renegotiate,
    renegotiate_abbreviated,
    renegotiate_pending,
    secure_renegotiation_support,
    set_max_proto_version,
    total_renegotiations,
    verify_cert_error_string,
)


def pyopenssl_layer(conn: SSL.Connection) -> None:
    assert_type(key_update(conn), None)
    assert_type(key_update(conn, request_peer=True), None)
    assert_type(get_key_update_type(conn), KeyUpdateType)
    assert_type(renegotiate(conn), None)
    assert_type(renegotiate_abbreviated(conn), None)
    assert_type(renegotiate_pending(conn), bool)
    assert_type(total_renegotiations(conn), int)
    assert_type(secure_renegotiation_support(conn), bool)
    assert_type(set_max_proto_version(conn, SSL.TLS1_2_VERSION), None)
    assert_type(verify_cert_error_string(10), str)
    assert_type(rekey(conn), RekeyMethod)
    assert_type(protocol_version(conn), str)
    assert_type(capabilities(), Capabilities)
    assert_type(capabilities().key_update, bool)


def connection_subclass(ctx: SSL.Context, sock: Any) -> None:
    policy = RotationPolicy(interval=3600.0, max_bytes=1 << 30)
    conn = RekeyConnection(ctx, sock, policy=policy)
    assert_type(conn.key_updates_sent, int)
    assert_type(conn.key_updates_received, int)
    assert_type(conn.rotation_schedule, RotationSchedule | None)
    assert_type(conn.rotation_error, RekeyError | None)
    assert_type(conn.send(b"data"), int)
    assert_type(conn.rekey(), RekeyMethod)


def policy(now: float) -> None:
    schedule = RotationPolicy(interval=60.0).start(
        now, protocol="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256"
    )
    assert_type(schedule, RotationSchedule)
    assert_type(schedule.data_sent(now, 100), RotationAction | None)
    assert_type(schedule.get_timer(), float | None)
    assert_type(schedule.handle_timer(now), RotationAction | None)
    assert_type(aead_record_limit("TLS_AES_128_GCM_SHA256"), int | None)


def twisted_layer() -> None:
    from twisted.internet.defer import Deferred

    from twisted_rekey import (
        RekeyProtocolMixin,
        RekeyStats,
        RotatingFactory,
        allowALPNWithoutProtocols,
        rekeyableFor,
    )

    class Proto(RekeyProtocolMixin):
        rotationPolicy = RotationPolicy(interval=60.0)

    proto = Proto()
    assert_type(proto.keyUpdate(requestPeer=True, timeout=30.0), Deferred[None])
    assert_type(proto.renegotiate(abbreviated=True), Deferred[None])
    assert_type(proto.rekey(), Deferred[None])
    assert_type(proto.rekeyStats, RekeyStats)
    assert_type(proto.rotationSchedule, RotationSchedule | None)
    from twisted.internet.protocol import Factory, Protocol

    # Any: that a Factory provides IProtocolFactory is zope's to tell, and
    # this check runs without the mypy-zope plugin.
    factory: Any = Factory.forProtocol(Protocol)
    wrapped = RotatingFactory(factory, RotationPolicy(interval=60.0))
    assert_type(wrapped.policy, RotationPolicy | None)
    assert_type(rekeyableFor(Protocol()), RekeyProtocolMixin | None)
    options: Any = None
    assert_type(allowALPNWithoutProtocols(options), Any)
    assert twisted_rekey.__version__


def metrics(protocol: Any, factory: Any) -> None:
    collector = twisted_rekey.RekeyMetrics(buckets=(1.0, 60.0))
    assert_type(collector.track(protocol, "server"), None)
    assert_type(collector.trackFactory(factory), None)
    assert_type(collector.startObserving(), None)
    assert_type(collector.stopObserving(), None)
