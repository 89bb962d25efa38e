"""
Key update and renegotiation for any pyOpenSSL :class:`OpenSSL.SSL.Connection`.

Free functions named after the OpenSSL calls they wrap (``key_update(conn)``
for ``SSL_key_update``), in pyOpenSSL's snake_case, plus a mixin that offers
the same as methods and a ready :class:`RekeyConnection`.  They need no
reactor: they work over plain sockets and memory BIOs alike.

Every failure is a precise :class:`~twisted_rekey.exceptions.RekeyError`,
never cryptography's generic ``InternalError``, and leaves OpenSSL's error
queue empty.  This module must never import Twisted.
"""

from __future__ import annotations

import enum
import math
import os
import sys
import time
from typing import Any, Callable, Union

from OpenSSL import SSL

from . import _binding
from ._binding import ffi, lib
from ._binding import need as _need
from ._infocallback import infoCallbackFor
from ._policy import (
    RotationAction,
    RotationPolicy,
    RotationSchedule,
    client_renegotiation_refusal,
    renegotiation_forbidden,
)
from .exceptions import (
    AlreadyInProgress,
    ConnectionStateError,
    FunctionUnavailable,
    InsecureRenegotiation,
    InvalidUpdateType,
    NotAConnection,
    OpenSSLCallError,
    PeerRefused,
    RekeyError,
    RenegotiationForbidden,
    WrongProtocolVersion,
)

__all__ = [
    "OP_ALLOW_CLIENT_RENEGOTIATION",
    "OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION",
    "KeyUpdateType",
    "RekeyConnection",
    "RekeyConnectionMixin",
    "RekeyMethod",
    "allow_client_renegotiation",
    "get_key_update_type",
    "handshake_complete",
    "key_update",
    "protocol_version",
    "rekey",
    "renegotiate",
    "renegotiate_abbreviated",
    "renegotiate_pending",
    "secure_renegotiation_support",
    "set_max_proto_version",
    "total_renegotiations",
]

#: ``SSL_OP_ALLOW_CLIENT_RENEGOTIATION`` (OpenSSL 3.0+): let a server accept a
#: renegotiation its client starts.  Not in cryptography's cffi ``lib``.
OP_ALLOW_CLIENT_RENEGOTIATION = 1 << 8

#: ``SSL_OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION``: make a server-initiated
#: renegotiation a full handshake instead of resuming the session.
OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION = 0x00010000

_TLS1_3_VERSION = 0x0304
_SSL_CTRL_GET_RI_SUPPORT = 76
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124

# OpenSSL's reason codes (stable since 1.1.1) for the failures we name.
_R_INVALID_KEY_UPDATE_TYPE = 120
_R_STILL_IN_INIT = 121
_R_BAD_WRITE_RETRY = 127
_R_WRONG_SSL_VERSION = 266
_R_NO_RENEGOTIATION = 339
_R_UNSAFE_LEGACY_RENEGOTIATION_DISABLED = 338


class KeyUpdateType(enum.IntEnum):
    """
    What ``SSL_get_key_update_type`` reports: the KeyUpdate this side will
    send next, if any.

    .. versionadded:: 0.1.0
    """

    #: No KeyUpdate is pending.
    NONE = -1
    #: A KeyUpdate that does not ask the peer to update is pending.  This is
    #: also the state after the *peer* asked us to update: our answer waits
    #: for our next write unless something sends it.
    NOT_REQUESTED = 0
    #: A KeyUpdate that asks the peer to update its own keys is pending.
    REQUESTED = 1


class RekeyMethod(enum.Enum):
    """
    How :func:`rekey` rotated the keys.

    .. versionadded:: 0.1.0
    """

    #: A TLS 1.3 KeyUpdate message.
    KEY_UPDATE = "key_update"
    #: A TLS 1.2 (or older) renegotiation.
    RENEGOTIATION = "renegotiation"


UpdateType = Union[bool, int, KeyUpdateType]


def _ssl(conn: object) -> Any:
    if not isinstance(conn, SSL.Connection):
        raise NotAConnection(
            f"expected an OpenSSL.SSL.Connection, got {type(conn).__name__}"
        )
    return conn._ssl


def _drain_errors() -> list[tuple[int, str, str]]:
    """Empty OpenSSL's error queue, returning ``(reason, library, text)``."""
    errors: list[tuple[int, str, str]] = []
    while True:
        code = lib.ERR_get_error()
        if not code:
            return errors
        library = lib.ERR_lib_error_string(code)
        reason = lib.ERR_reason_error_string(code)
        errors.append(
            (
                lib.ERR_GET_REASON(code),
                ffi.string(library).decode("ascii", "replace")
                if library != ffi.NULL
                else "unknown library",
                ffi.string(reason).decode("ascii", "replace")
                if reason != ffi.NULL
                else f"reason {lib.ERR_GET_REASON(code)}",
            )
        )


def _call_failed(function: str, conn: SSL.Connection) -> Exception:
    """Turn a failed call's error queue into the most precise exception."""
    errors = _drain_errors()
    reasons = {reason for reason, _, _ in errors}
    detail = "; ".join(text for _, _, text in errors)
    if _R_INVALID_KEY_UPDATE_TYPE in reasons:
        return InvalidUpdateType(f"{function}: {detail}")
    if _R_WRONG_SSL_VERSION in reasons:
        name = conn.get_protocol_version_name()
        return WrongProtocolVersion(f"{function} is not possible on {name}", name)
    if _R_STILL_IN_INIT in reasons:
        return ConnectionStateError(
            f"{function}: a handshake (or an earlier key update) is still running"
        )
    if _R_BAD_WRITE_RETRY in reasons:
        return ConnectionStateError(
            f"{function}: a write is pending; retry once it has completed"
        )
    if _R_NO_RENEGOTIATION in reasons:
        return PeerRefused(f"{function}: renegotiation is switched off ({detail})")
    if _R_UNSAFE_LEGACY_RENEGOTIATION_DISABLED in reasons:
        return InsecureRenegotiation(f"{function}: {detail}")
    return OpenSSLCallError(function, [(lib_, text) for _, lib_, text in errors])


# TLS_ST_OK is the only state whose long name says this.
_FINISHED = b"SSL negotiation finished successfully"
_SHUT_DOWN = int(lib.SSL_SENT_SHUTDOWN | lib.SSL_RECEIVED_SHUTDOWN)


def handshake_complete(conn: SSL.Connection) -> bool:
    """
    Whether the initial handshake has completed and no new one is running.

    :param conn: a pyOpenSSL connection.
    :raises NotAConnection: if *conn* is not one.

    .. versionadded:: 0.1.0
    """
    return bool(ffi.string(lib.SSL_state_string_long(_ssl(conn))) == _FINISHED)


def _check_open(conn: SSL.Connection, function: str) -> Any:
    # On every rotation: the checks of handshake_complete() and
    # renegotiate_pending() on the SSL* directly, not through their
    # argument checks again.
    ssl = _ssl(conn)
    if lib.SSL_get_shutdown(ssl) & _SHUT_DOWN:
        raise ConnectionStateError(f"{function}: the connection is shut down")
    if ffi.string(lib.SSL_state_string_long(ssl)) != _FINISHED and not (
        _need("SSL_renegotiate_pending")(ssl)
    ):
        raise ConnectionStateError(f"{function}: the handshake has not completed")
    return ssl


def protocol_version(conn: SSL.Connection) -> str:
    """
    The negotiated protocol's name, such as ``"TLSv1.3"``.

    :param conn: a pyOpenSSL connection.
    :raises NotAConnection: if *conn* is not one.

    .. versionadded:: 0.1.0
    """
    _ssl(conn)
    return str(conn.get_protocol_version_name())


def _is_server(conn: SSL.Connection) -> bool | None:
    """Whether *conn* is a server; ``None`` when that cannot be told here."""
    is_server = _binding.function("SSL_is_server")[1]
    return None if is_server is None else bool(is_server(_ssl(conn)))


def application_protocol(conn: SSL.Connection) -> bytes | None:
    """The protocol the handshake negotiated by ALPN, or ``None``."""
    return conn.get_alpn_proto_negotiated() or None


def _is_tls13(conn: SSL.Connection) -> bool:
    return bool(lib.SSL_version(_ssl(conn)) >= _TLS1_3_VERSION)


def _update_type(request_peer: UpdateType) -> int:
    if isinstance(request_peer, bool):
        return int(request_peer)
    if isinstance(request_peer, int) and request_peer in (0, 1):
        return int(request_peer)
    raise InvalidUpdateType(
        f"the KeyUpdate type must be 0 (update_not_requested) or "
        f"1 (update_requested), not {request_peer!r}"
    )


def _flush_handshake(conn: SSL.Connection) -> None:
    """Run the handshake state machine so the new message is written now."""
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        # Expected after a renegotiation: the rest arrives with the peer's
        # answer and completes inside the application's next read.
        pass
    except SSL.Error as e:
        # On a blocking socket a client's renegotiation runs to its end here,
        # so the server's refusal arrives here too.
        if "no renegotiation" in str(e):
            raise PeerRefused(f"the peer refused to renegotiate: {e}") from e
        raise


def key_update(conn: SSL.Connection, request_peer: UpdateType = False) -> None:
    """
    Send a TLS 1.3 KeyUpdate now (``SSL_key_update`` then
    ``SSL_do_handshake``), so that this side's sending keys change.

    The message is written to the connection's socket or memory BIO before
    this returns; with a memory BIO, read it out with ``bio_read`` as usual.

    :param conn: a pyOpenSSL connection whose TLS 1.3 handshake has completed.
    :param request_peer: ``True`` (or :attr:`KeyUpdateType.REQUESTED`) to ask
        the peer to update its own sending keys too.
    :raises InvalidUpdateType: if *request_peer* is not a valid type.
    :raises WrongProtocolVersion: on TLS 1.2 or lower.
    :raises ConnectionStateError: before the handshake has completed, while
        an earlier key update or a write is still pending, or after shutdown.
    :raises FunctionUnavailable: if ``SSL_key_update`` cannot be reached
        with this build of cryptography.
    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.
    :raises OpenSSL.SSL.Error: as pyOpenSSL raises it, if writing fails (a
        non-blocking socket may raise ``WantWriteError``).

    .. versionadded:: 0.1.0
    """
    update_type = _update_type(request_peer)
    func = _need("SSL_key_update")
    ssl = _check_open(conn, "SSL_key_update")
    if lib.SSL_version(ssl) < _TLS1_3_VERSION:  # as _is_tls13()
        name = conn.get_protocol_version_name()
        raise WrongProtocolVersion(
            f"KeyUpdate exists only in TLS 1.3; this connection uses {name} "
            "(use renegotiate() or rekey())",
            name,
        )
    lib.ERR_clear_error()
    if func(ssl, update_type) != 1:
        raise _call_failed("SSL_key_update", conn)
    _flush_handshake(conn)


def get_key_update_type(conn: SSL.Connection) -> KeyUpdateType:
    """
    The KeyUpdate this side has pending (``SSL_get_key_update_type``).

    :attr:`KeyUpdateType.NOT_REQUESTED` right after reading a peer's
    KeyUpdate means the peer asked us to update and our answer has not been
    sent yet.

    :param conn: a pyOpenSSL connection.
    :raises FunctionUnavailable: if the function cannot be reached.
    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.

    .. versionadded:: 0.1.0
    """
    ssl = _ssl(conn)
    return KeyUpdateType(_need("SSL_get_key_update_type")(ssl))


def secure_renegotiation_support(conn: SSL.Connection) -> bool:
    """
    Whether the peer supports secure renegotiation (RFC 5746), as
    ``SSL_get_secure_renegotiation_support`` reports it.  Meaningful once the
    handshake has completed.

    :raises FunctionUnavailable: if ``SSL_ctrl`` cannot be reached.
    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.

    .. versionadded:: 0.1.0
    """
    ssl = _ssl(conn)
    return bool(_need("SSL_ctrl")(ssl, _SSL_CTRL_GET_RI_SUPPORT, 0, ffi.NULL))


def set_max_proto_version(conn: SSL.Connection, version: int) -> None:
    """
    Cap the newest protocol version *conn* may negotiate, as
    ``SSL_set_max_proto_version`` does (pyOpenSSL has it for a whole
    ``Context`` only).  Call before the handshake; for a connection made by
    a Context that others share (a Twisted client connection creator's).

    :param version: an OpenSSL version constant, such as
        ``OpenSSL.SSL.TLS1_2_VERSION``; ``0`` lifts the cap.
    :raises FunctionUnavailable: if ``SSL_ctrl`` cannot be reached.
    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.
    :raises OpenSSLCallError: if OpenSSL refuses *version*.

    .. versionadded:: 0.2.0
    """
    ssl = _ssl(conn)
    ctrl = _need("SSL_ctrl")
    if ctrl(ssl, _SSL_CTRL_SET_MAX_PROTO_VERSION, version, ffi.NULL) != 1:
        raise _call_failed("SSL_set_max_proto_version", conn)


def _renegotiate(conn: SSL.Connection, name: str) -> None:
    func = _need(name)
    ssl = _check_open(conn, name)
    if _is_tls13(conn):
        raise WrongProtocolVersion(
            "TLS 1.3 has no renegotiation (use key_update() or rekey())", "TLSv1.3"
        )
    alpn = application_protocol(conn)
    forbidden = renegotiation_forbidden(alpn)
    if forbidden is not None:
        assert alpn is not None
        raise RenegotiationForbidden(f"{name}: {forbidden}", alpn)
    if renegotiate_pending(conn):
        raise AlreadyInProgress(f"{name}: a renegotiation is already in progress")
    try:
        secure = secure_renegotiation_support(conn)
    except FunctionUnavailable:
        # OpenSSL itself refuses insecure renegotiation unless explicitly
        # allowed, which this library never does; let it say so below.
        secure = True
    if not secure:
        raise InsecureRenegotiation(
            f"{name}: the peer does not support secure renegotiation (RFC 5746)"
        )
    # Whether a renegotiation resumes the session is the server's choice,
    # made when the ClientHello arrives (a client asking for a full one
    # offers no session: SSL_renegotiate does that).
    if name == "SSL_renegotiate" and _is_server(conn) is not False:
        _refuse_resumption(ssl)
    elif lib.SSL_get_options(ssl) & OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION:
        _need("SSL_clear_options")(ssl, OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION)
    lib.ERR_clear_error()
    if func(ssl) != 1:
        raise _call_failed(name, conn)
    _flush_handshake(conn)


def _refuse_resumption(ssl: Any) -> None:
    # OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION makes OpenSSL skip the
    # session lookup altogether, and with it the session ticket a client
    # asked for (its empty session_ticket extension): the ServerHello acks
    # none and no NewSessionTicket comes.  GnuTLS 3.7 clients that got a
    # ticket in the first handshake wait for one anyway and fail
    # ("unexpected TLS packet" in _gnutls_recv_new_session_ticket).  A
    # session ID context of this connection's own makes whatever session
    # the client offers (by ID or ticket) one OpenSSL does not resume, "like
    # a cache miss": a full handshake, with a new ticket if asked for.
    try:
        set_context = _need("SSL_set_session_id_context")
    except FunctionUnavailable:
        # Full key exchange still, without the ticket a GnuTLS client needs.
        lib.SSL_set_options(ssl, OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION)
        return
    context = os.urandom(32)
    if set_context(ssl, context, len(context)) != 1:
        lib.ERR_clear_error()
        lib.SSL_set_options(ssl, OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION)


def renegotiate(conn: SSL.Connection) -> None:
    """
    Start a full TLS 1.2 (or older) renegotiation: new keys from a new key
    exchange (``SSL_renegotiate`` then ``SSL_do_handshake``).

    A client sends its ClientHello at once, offering no session.  A server
    sends a HelloRequest and gives this connection a session ID context of
    its own (random), so that no session the client offers, by ID or by
    ticket, is resumed; it still issues a session ticket when the client
    asks for one, which GnuTLS clients need (see :doc:`/security`).  Where
    that function cannot be reached it sets
    ``OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION`` instead.  Sessions made by
    the renegotiation carry that context: a later connection cannot resume
    them.  A server should write nothing more until
    :func:`renegotiate_pending` turns false: Go and GnuTLS clients take data
    arriving in their handshake for a protocol error (the Twisted layer holds
    such writes itself).  The handshake completes
    as the application goes on reading: :func:`renegotiate_pending` turns
    false and :func:`total_renegotiations` grows.

    :raises WrongProtocolVersion: on TLS 1.3.
    :raises AlreadyInProgress: while a renegotiation is pending.
    :raises InsecureRenegotiation: if the peer lacks RFC 5746 support.
    :raises RenegotiationForbidden: if the connection negotiated an
        application protocol (ALPN) that forbids renegotiation: HTTP/2.
    :raises ConnectionStateError: before the handshake completed, or after
        shutdown.
    :raises PeerRefused: if renegotiation is switched off on this
        connection, or (on a blocking socket, where the handshake runs to its
        end at once) the peer answered ``no_renegotiation``.
    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.

    .. versionadded:: 0.1.0
    """
    _renegotiate(conn, "SSL_renegotiate")


def renegotiate_abbreviated(conn: SSL.Connection) -> None:
    """
    Start a renegotiation that resumes the current session
    (``SSL_renegotiate_abbreviated``): new keys from fresh randoms, without a
    new key exchange.  Cheaper than :func:`renegotiate`.  On a server, the
    client decides: it resumes unless it offers no session.

    :raises: as :func:`renegotiate`, and
        :class:`~twisted_rekey.exceptions.FunctionUnavailable` if the
        function cannot be reached with this build of cryptography.

    .. versionadded:: 0.1.0
    """
    _renegotiate(conn, "SSL_renegotiate_abbreviated")


def renegotiate_pending(conn: SSL.Connection) -> bool:
    """
    Whether a renegotiation has been started and not completed
    (``SSL_renegotiate_pending``).

    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.

    .. versionadded:: 0.1.0
    """
    return bool(_need("SSL_renegotiate_pending")(_ssl(conn)))


def total_renegotiations(conn: SSL.Connection) -> int:
    """
    How many renegotiations this connection has started
    (``SSL_total_renegotiations``).

    :raises NotAConnection: if *conn* is not a pyOpenSSL connection.

    .. versionadded:: 0.1.0
    """
    return int(lib.SSL_total_renegotiations(_ssl(conn)))


def rekey(conn: SSL.Connection, request_peer: UpdateType = False) -> RekeyMethod:
    """
    Rotate this connection's keys the way its protocol version allows: a
    KeyUpdate on TLS 1.3, a full renegotiation on TLS 1.2 and lower.

    :param request_peer: on TLS 1.3, also ask the peer to update (ignored by
        a renegotiation, which changes both directions anyway).
    :returns: the method used.
    :raises: what :func:`key_update` or :func:`renegotiate` raise.

    .. versionadded:: 0.1.0
    """
    if _is_tls13(conn):
        key_update(conn, request_peer)
        return RekeyMethod.KEY_UPDATE
    _update_type(request_peer)
    renegotiate(conn)
    return RekeyMethod.RENEGOTIATION


def allow_client_renegotiation(target: SSL.Context | SSL.Connection) -> None:
    """
    Let a server accept renegotiations that its clients start.

    OpenSSL 3 refuses them by default (the client sees ``no_renegotiation``),
    because each costs the server a full handshake: allow them only where
    clients need to rekey TLS 1.2 connections themselves, and bound them (the
    Twisted layer rate-limits them).  Insecure legacy renegotiation stays off.

    Pass a :class:`OpenSSL.SSL.Context` before it makes its first connection
    (pyOpenSSL refuses to change a Context in use), or a single
    :class:`OpenSSL.SSL.Connection` at any time.

    :raises NotAConnection: (a :class:`TypeError`) if *target* is neither.
    :raises ValueError: from pyOpenSSL, if the Context is already in use.

    .. versionadded:: 0.1.0
    """
    if isinstance(target, SSL.Context):
        target.set_options(OP_ALLOW_CLIENT_RENEGOTIATION)
    elif isinstance(target, SSL.Connection):
        # pyOpenSSL < 25 has no Connection.set_options.
        lib.SSL_set_options(target._ssl, OP_ALLOW_CLIENT_RENEGOTIATION)
    else:
        raise NotAConnection(
            "expected an OpenSSL.SSL.Context or Connection, "
            f"got {type(target).__name__}"
        )


def start_schedule(
    policy: RotationPolicy, conn: SSL.Connection, now: float
) -> RotationSchedule:
    """
    *policy*'s schedule for *conn*, whose handshake has completed: what the
    policy needs to know of the connection, read once (for TLS 1.2 and
    older also its peer's secure renegotiation support and the ALPN
    protocol, which decide whether it may renegotiate).
    """
    # Interned: each schedule keeps it, and "TLSv1.3" once per process is
    # enough (56 bytes a connection otherwise).
    version = sys.intern(protocol_version(conn))
    secure: bool | None = None
    alpn: bytes | None = None
    if version != "TLSv1.3":
        try:
            secure = secure_renegotiation_support(conn)
        except FunctionUnavailable:
            secure = None  # unknown: the policy then leaves TLS 1.2 alone
        alpn = application_protocol(conn)
    cipher = conn.get_cipher_name()
    return policy.start(
        now,
        protocol=version,
        cipher=None if cipher is None else str(cipher),
        secure_renegotiation=secure,
        application_protocol=alpn,
    )


def forbid_renegotiation(conn: SSL.Connection) -> str | None:
    """
    Where the application protocol *conn* negotiated forbids renegotiation
    (HTTP/2 over TLS 1.2), switch it off on this connection both ways
    (``SSL_OP_NO_RENEGOTIATION``: the peer's attempts get a
    ``no_renegotiation`` alert, even where client renegotiation was
    allowed), and say why; else ``None`` and nothing changes.
    """
    if _is_tls13(conn):
        return None
    forbidden = renegotiation_forbidden(application_protocol(conn))
    if forbidden is not None:
        ssl = conn._ssl  # type: ignore[attr-defined]
        lib.SSL_set_options(ssl, lib.SSL_OP_NO_RENEGOTIATION)
    return forbidden


# Looked up once: the per-write path calls it without going through super().
_Connection_send = SSL.Connection.send
# As the policy counts records when it is not told: ceil(nbytes / 16384).
_RECORD_PAYLOAD = 16384
_NO_LIMIT = 1 << 62


class RekeyConnectionMixin:
    """
    The functions of this module as methods, for subclasses of
    :class:`OpenSSL.SSL.Connection`.

    Unlike pyOpenSSL's own ``Connection.renegotiate`` (which returns
    ``False`` when it cannot start), :meth:`renegotiate` here raises a precise
    exception and sends the renegotiation message at once.

    .. versionadded:: 0.1.0
    """

    def key_update(self, request_peer: UpdateType = False) -> None:
        """See :func:`twisted_rekey.key_update`."""
        key_update(self, request_peer)  # type: ignore[arg-type]

    def get_key_update_type(self) -> KeyUpdateType:
        """See :func:`twisted_rekey.get_key_update_type`."""
        return get_key_update_type(self)  # type: ignore[arg-type]

    def renegotiate(self) -> bool:
        """See :func:`twisted_rekey.renegotiate`.  Returns ``True``."""
        renegotiate(self)  # type: ignore[arg-type]
        return True

    def renegotiate_abbreviated(self) -> None:
        """See :func:`twisted_rekey.renegotiate_abbreviated`."""
        renegotiate_abbreviated(self)  # type: ignore[arg-type]

    def renegotiate_pending(self) -> bool:
        """See :func:`twisted_rekey.renegotiate_pending`."""
        return renegotiate_pending(self)  # type: ignore[arg-type]

    def total_renegotiations(self) -> int:
        """See :func:`twisted_rekey.total_renegotiations`."""
        return total_renegotiations(self)  # type: ignore[arg-type]

    def secure_renegotiation_support(self) -> bool:
        """See :func:`twisted_rekey.secure_renegotiation_support`."""
        return secure_renegotiation_support(self)  # type: ignore[arg-type]

    def rekey(self, request_peer: UpdateType = False) -> RekeyMethod:
        """See :func:`twisted_rekey.rekey`."""
        return rekey(self, request_peer)  # type: ignore[arg-type]


class _Meter:
    """
    The state :meth:`RekeyConnection.send` reads and updates on every
    write, kept out of the connection: pyOpenSSL's ``Connection`` defines
    ``__getattr__``, which sends every attribute access on it down CPython's
    slow path (about 35 ns each, ~0.3 us a write here).
    """

    __slots__ = (
        "clock",
        "due",
        "error",
        "inline",
        "records",
        "slack",
        "slack_records",
        "unsent",
    )

    def __init__(self, clock: Callable[[], float], *, inline: bool) -> None:
        self.clock = clock
        #: Whether the policy applies (there is one, and no rotation_error).
        self.inline = inline
        # Data sent and not yet told to the schedule, and how much more may
        # be sent, or until when, before the schedule must hear of it: the
        # per-write path then only adds and compares (_rekey_rearm).
        self.unsent = 0
        self.records = 0
        self.slack = 0
        self.slack_records = 0
        self.due = -math.inf
        #: What an info callback raised, re-raised once OpenSSL has returned.
        self.error: BaseException | None = None


class _Watching:
    """A :class:`RekeyConnection`'s observer of its info callback."""

    __slots__ = ("conn",)

    def __init__(self, conn: RekeyConnection) -> None:
        self.conn = conn

    def observe(self, ssl: Any, where: int, ret: int) -> None:
        self.conn._rekey_info(ssl, where, ret)

    def observeFailed(self, error: BaseException) -> None:
        self.conn._rekey_info_failed(error)

    def chainedFailed(self, error: BaseException) -> None:
        self.conn._rekey_chained_failed(error)


class RekeyConnection(RekeyConnectionMixin, SSL.Connection):
    """
    A :class:`OpenSSL.SSL.Connection` with key update and renegotiation
    methods, counters of the KeyUpdates each side sent, and optionally a
    rotation policy applied inline.

    It watches handshake messages with a per-connection info callback
    (which fires on handshake messages only, never on application data).
    That callback chains to the one that would otherwise run — the
    Context's, or one set with :meth:`set_info_callback` — so installing
    this class switches nothing off, and :meth:`set_info_callback` works
    here even with pyOpenSSL releases that lack it.

    With a *policy*, every ``send``/``write``/``sendall`` accounts the data
    sent and, when the policy says a rotation is due (time, bytes, records,
    the cipher's AEAD limit), rotates right after that write: a KeyUpdate on
    TLS 1.3, a renegotiation on TLS 1.2 with a peer that supports secure
    renegotiation.  No reactor and no thread is needed; a connection that
    sends nothing does not rotate (nor would it gain anything from it).

    A rotation never makes a successful write fail: if it cannot be done
    (for example a non-blocking socket that would block), the policy is told
    and retries later; if the build of cryptography cannot reach
    ``SSL_key_update``, rotation stops and :attr:`rotation_error` says why.

    :param context: as for :class:`OpenSSL.SSL.Connection`.
    :param socket: as for :class:`OpenSSL.SSL.Connection`.
    :param policy: a :class:`twisted_rekey.RotationPolicy`, or ``None``.
    :param clock: a monotonic clock in seconds (tests pass a fake one).
    :param renegotiate_as_client: whether a *client*'s policy may rotate a
        TLS 1.2 connection.  ``False`` by default: that takes a
        client-initiated renegotiation, which OpenSSL 3 servers (and many
        others) refuse, and the refusal ends the connection; then
        :attr:`rotation_error` says why rotation stays off.
    :raises TypeError: if *policy* is not a policy.
    :raises FunctionUnavailable: if ``SSL_set_info_callback`` cannot be
        reached (it is in every cryptography release's cffi ``lib`` since
        43, and found in the symbol table before that).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        context: SSL.Context,
        socket: Any = None,
        *,
        policy: RotationPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        renegotiate_as_client: bool = False,
    ) -> None:
        if policy is not None and not isinstance(policy, RotationPolicy):
            raise TypeError(
                f"policy must be a RotationPolicy, not {type(policy).__name__}"
            )
        super().__init__(context, socket)
        self._rekey_policy = policy
        self._rekey_meter = _Meter(clock, inline=policy is not None)
        self._rekey_renegotiate_as_client = renegotiate_as_client
        self._rekey_schedule: RotationSchedule | None = None
        #: KeyUpdates this side has written.
        self.key_updates_sent = 0
        #: KeyUpdates read from the peer.
        self.key_updates_received = 0
        #: How many of those asked this side to update too.
        self.key_update_requests_received = 0
        self._rekey_rotation_error: RekeyError | None = None
        infoCallbackFor(self).add(_Watching(self), takesChainErrors=True)

    @property
    def rotation_error(self) -> RekeyError | None:
        """Why inline rotation stopped, or ``None`` while it works."""
        return self._rekey_rotation_error

    @rotation_error.setter
    def rotation_error(self, error: RekeyError | None) -> None:
        self._rekey_rotation_error = error
        self._rekey_meter.inline = self._rekey_policy is not None and error is None

    @property
    def rotation_schedule(self) -> RotationSchedule | None:
        """
        The policy's state for this connection (counters, next deadline),
        once the first write after the handshake has started it.
        """
        schedule = self._rekey_schedule
        if schedule is not None and self._rekey_meter.records:
            self._rekey_account(0)  # so that its counters are up to date
        return schedule

    def set_info_callback(
        self, callback: Callable[[SSL.Connection, int, int], object]
    ) -> None:
        """
        As pyOpenSSL's ``Connection.set_info_callback`` (25.2 and later):
        *callback* runs instead of the Context's info callback, for this
        connection.  An exception it raises is re-raised by the call of this
        connection that was running (``recv``, ``send``, ``do_handshake``...)
        once OpenSSL has returned, never inside OpenSSL.
        """
        infoCallbackFor(self).replacement = callback

    def _rekey_chained_failed(self, error: BaseException) -> None:
        # The application's (or the Context's) callback: re-raised by the
        # call that was running, once OpenSSL has returned.
        meter = self._rekey_meter
        if meter.error is None:
            meter.error = error

    def _rekey_info_failed(self, error: BaseException) -> None:
        self.rotation_error = RekeyError(f"watching the peer failed: {error!r}")

    def _rekey_info(self, ssl: Any, where: int, ret: int) -> None:
        # Inside OpenSSL (through _infocallback): record, never re-enter the
        # state machine.
        if not where & lib.SSL_CB_LOOP:
            return
        try:
            state = ffi.string(lib.SSL_state_string_long(ssl))
            if not state.endswith(b"key update"):
                return
            if b" write " in state:
                self.key_updates_sent += 1
                return
            self.key_updates_received += 1
            # Right after reading it, a pending update_not_requested on our
            # side means the peer asked us to update.
            try:
                pending = get_key_update_type(self)
            except FunctionUnavailable:
                pending = KeyUpdateType.NONE  # unknown in this build
            requested = pending is KeyUpdateType.NOT_REQUESTED
            self.key_update_requests_received += requested
            schedule = self._rekey_schedule
            if schedule is not None:
                now = self._rekey_meter.clock()
                self._rekey_tell(schedule, now)
                schedule.peer_rotated(now, requested=requested)
                self._rekey_rearm(schedule)
        except Exception as e:
            self.rotation_error = RekeyError(f"watching the peer failed: {e!r}")

    def _rekey_reraise(self) -> None:
        meter = self._rekey_meter
        error, meter.error = meter.error, None
        if error is not None:
            raise error

    def do_handshake(self) -> None:
        """As :meth:`OpenSSL.SSL.Connection.do_handshake`."""
        try:
            super().do_handshake()
        finally:
            self._rekey_reraise()

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        """As :meth:`OpenSSL.SSL.Connection.recv`."""
        try:
            data = bytes(super().recv(bufsiz, flags))
        finally:
            self._rekey_reraise()
        self._rekey_account(len(data), received=True)
        return data

    read = recv

    def recv_into(
        self, buffer: Any, nbytes: int | None = None, flags: int | None = None
    ) -> int:
        """As :meth:`OpenSSL.SSL.Connection.recv_into`."""
        try:
            received = int(super().recv_into(buffer, nbytes, flags))
        finally:
            self._rekey_reraise()
        self._rekey_account(received, received=True)
        return received

    def send(self, buf: Any, flags: int = 0) -> int:
        """As :meth:`OpenSSL.SSL.Connection.send`, then the policy."""
        # The per-write path: a 1 KiB send costs ~2 us in pyOpenSSL, so every
        # attribute lookup and call here shows (benchmarks/, "send"); it
        # reads the connection once, and then only its _Meter.
        meter = self._rekey_meter
        try:
            sent: int = _Connection_send(self, buf, flags)
        finally:
            if meter.error is not None:
                self._rekey_reraise()
        if meter.inline:
            unsent = meter.unsent = meter.unsent + sent
            records = meter.records = meter.records - (-sent // _RECORD_PAYLOAD)
            if (
                unsent >= meter.slack
                or records >= meter.slack_records
                or meter.clock() >= meter.due
            ):
                self._rekey_account(0)
        return sent

    write = send

    def sendall(self, buf: Any, flags: int = 0) -> int:
        """As :meth:`OpenSSL.SSL.Connection.sendall`, then the policy."""
        try:
            result = int(super().sendall(buf, flags))
        finally:
            self._rekey_reraise()
        try:
            nbytes = memoryview(buf).nbytes
        except TypeError:  # str, which old pyOpenSSL releases still encode
            nbytes = len(buf)
        self._rekey_account(nbytes)
        return result

    # -- the policy, inline -----------------------------------------------------

    def _rekey_start(self, now: float) -> RotationSchedule | None:
        assert self._rekey_policy is not None
        if not handshake_complete(self):
            return None
        schedule = start_schedule(self._rekey_policy, self, now)
        self._rekey_schedule = schedule
        is_server = _is_server(self)
        refusal = client_renegotiation_refusal(
            schedule,
            is_client=None if is_server is None else not is_server,
            allowed=self._rekey_renegotiate_as_client,
            option="renegotiate_as_client=True",
        )
        if refusal is not None:
            self.rotation_error = RekeyError(f"rotation stays off: {refusal}")
        return schedule

    def _rekey_account(self, nbytes: int, received: bool = False) -> None:
        # Tell the schedule what was sent (*nbytes* more, and whatever the
        # per-write path held back) or, with *received*, what the peer sent
        # (each direction's bytes count toward its own key: a connection
        # that only receives renews the peer's key too); rotate if it says
        # so, and work out how much may be sent before it must be asked again.
        meter = self._rekey_meter
        if not meter.inline:
            return
        if not received:
            meter.unsent += nbytes
            meter.records -= -nbytes // _RECORD_PAYLOAD
        now = meter.clock()
        schedule = self._rekey_schedule or self._rekey_start(now)
        if schedule is None or schedule.disabled_reason is not None:
            meter.unsent = meter.records = 0
            meter.slack = meter.slack_records = 0
            return
        # data_sent() already says whatever is due at *now*, timed rotations
        # included: asking get_timer() as well would only repeat it.
        action = self._rekey_tell(schedule, now)
        if action is None and received and nbytes:
            action = schedule.data_received(now, nbytes)
        if action is None:
            action = schedule.handle_timer(now)
        if action is not None:
            self._rekey_rotate(schedule, now, action)
        self._rekey_rearm(schedule)

    def _rekey_tell(
        self, schedule: RotationSchedule, now: float
    ) -> RotationAction | None:
        meter = self._rekey_meter
        if not meter.records:
            return None
        action = schedule.data_sent(now, meter.unsent, records=meter.records)
        meter.unsent = meter.records = 0
        return action

    def _rekey_rearm(self, schedule: RotationSchedule) -> None:
        # The schedule's decisions change only when a threshold is crossed or
        # a deadline passes: until then writes need not reach it.  The slack
        # is exactly what is left below each threshold, so a rotation comes
        # after the same write as if every write were told at once.
        meter = self._rekey_meter
        deadline = schedule.get_timer()
        if deadline is None and not schedule.bytes_sent:
            # Idle under skip_idle: the first byte brings the deadline back.
            meter.slack = meter.slack_records = 1
            meter.due = math.inf
            return
        meter.due = math.inf if deadline is None else deadline
        limit = schedule.policy.max_bytes
        meter.slack = _NO_LIMIT if limit is None else limit - schedule.bytes_sent
        records = schedule.record_limit
        meter.slack_records = (
            _NO_LIMIT if records is None else records - schedule.records_sent
        )

    def _rekey_rotate(
        self, schedule: RotationSchedule, now: float, action: RotationAction
    ) -> None:
        # The policy waits for rotated() or rotation_failed(): always say one.
        # And the write that got here succeeded: nothing below may make it
        # look as if it failed (a caller would send the data again).
        try:
            if action.method == "key-update":
                key_update(self, action.request_peer)
            else:
                renegotiate(self)
        except SSL.WantWriteError:
            # OpenSSL accepted the rotation and sends it with the next write.
            schedule.rotated(now, requested_peer=action.request_peer)
        except FunctionUnavailable as e:
            schedule.rotation_failed(now)
            self.rotation_error = e
        except (RekeyError, SSL.Error):
            # A broken connection says so at the application's next call.
            schedule.rotation_failed(now)
        except Exception as e:
            # The application's own info callback raised during the
            # rotation's handshake step: re-raised by the next call.
            schedule.rotation_failed(now)
            if self._rekey_meter.error is None:
                self._rekey_meter.error = e
        else:
            schedule.rotated(now, requested_peer=action.request_peer)
