"""
Every exception twisted_rekey raises.

All of them derive from :class:`RekeyError`, so ``except RekeyError`` catches
anything this library reports.  The subclasses say precisely what went wrong;
several also derive from the built-in exception a Python programmer would
expect (``NotImplementedError``, ``ValueError``, ``TypeError``,
``TimeoutError``) so that generic handlers keep working.

This module must never import Twisted or touch OpenSSL.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyInProgress",
    "ConnectionStateError",
    "FunctionUnavailable",
    "InsecureRenegotiation",
    "InvalidUpdateType",
    "KeyUpdateFlood",
    "NotAConnection",
    "OpenSSLCallError",
    "PeerRefused",
    "RekeyError",
    "RekeyTimeout",
    "RenegotiationForbidden",
    "RenegotiationRateLimited",
    "RotationRateLimited",
    "WrongProtocolVersion",
]


class RekeyError(Exception):
    """
    Base class of every error raised by twisted_rekey.

    .. versionadded:: 0.1.0
    """


class FunctionUnavailable(RekeyError, NotImplementedError):
    """
    The OpenSSL that cryptography bundles offers no verified way to call a
    function this operation needs (for example ``SSL_key_update`` on a wheel
    whose linker dropped it, or on Windows).  :attr:`reason` says why each way
    failed; :func:`twisted_rekey.capabilities` reports the same up front.

    :ivar function: the OpenSSL function's name, e.g. ``"SSL_key_update"``.
    :ivar reason: why no way to reach it was verified.

    .. versionadded:: 0.1.0
    """

    def __init__(self, function: str, reason: str) -> None:
        super().__init__(f"{function} is not available: {reason}")
        self.function = function
        self.reason = reason


class NotAConnection(RekeyError, TypeError):
    """
    The object passed is not a pyOpenSSL :class:`OpenSSL.SSL.Connection`.

    .. versionadded:: 0.1.0
    """


class InvalidUpdateType(RekeyError, ValueError):
    """
    A KeyUpdate type other than ``update_not_requested`` (0) or
    ``update_requested`` (1) was asked for.

    .. versionadded:: 0.1.0
    """


class WrongProtocolVersion(RekeyError):
    """
    The operation does not exist in the negotiated protocol version: a
    KeyUpdate on TLS 1.2 or lower, or a renegotiation on TLS 1.3.

    :ivar version: the negotiated version name, such as ``"TLSv1.2"``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


class InsecureRenegotiation(RekeyError):
    """
    The peer does not support secure renegotiation (RFC 5746), and this
    library never renegotiates without it.

    .. versionadded:: 0.1.0
    """


class RenegotiationForbidden(RekeyError):
    """
    The application protocol the connection negotiated (ALPN) forbids TLS
    renegotiation: HTTP/2 over TLS 1.2 (RFC 9113, section 9.2.1, where a
    client treats a renegotiation as a connection error).  Nothing was sent;
    such a connection cannot rotate its keys without reconnecting.

    :ivar protocol: the negotiated ALPN protocol, such as ``b"h2"``.

    .. versionadded:: 0.2.0
    """

    def __init__(self, message: str, protocol: bytes) -> None:
        super().__init__(message)
        self.protocol = protocol


class ConnectionStateError(RekeyError):
    """
    The connection cannot rekey in its current state: the handshake has not
    finished, a shutdown was sent or received, or the connection is closed.

    .. versionadded:: 0.1.0
    """


class AlreadyInProgress(RekeyError):
    """
    A rekey of the same kind is already under way on this connection (for
    example a renegotiation that has not completed, or a requested KeyUpdate
    the peer has not answered yet).

    .. versionadded:: 0.1.0
    """


class RekeyTimeout(RekeyError, TimeoutError):
    """
    The peer did not complete the rekey within the allowed time.

    .. versionadded:: 0.1.0
    """


class PeerRefused(RekeyError):
    """
    The peer refused the rekey (for example a server that does not allow
    client-initiated renegotiation answered with ``no_renegotiation``), or
    the connection was lost before the rekey completed.

    .. versionadded:: 0.1.0
    """


class RenegotiationRateLimited(RekeyError):
    """
    The peer started more renegotiations than the configured rate allows;
    the connection is dropped.

    .. versionadded:: 0.1.0
    """


class RotationRateLimited(RekeyError):
    """
    This side did not send the KeyUpdate asked for: one more now would take
    it past what peers accept (more than 8 within a second ends a GnuTLS
    connection, 32 in a row without application data a rustls or BoringSSL
    one).  The connection is unchanged; try again later, or after sending
    data.

    .. versionadded:: 0.1.0
    """


class KeyUpdateFlood(RekeyError):
    """
    The peer sent more KeyUpdates than the configured bound allows (too many
    in a row without application data, or too many per second); the
    connection is dropped.

    .. versionadded:: 0.1.0
    """


class OpenSSLCallError(RekeyError):
    """
    An OpenSSL call failed for a reason no more precise exception covers.

    :ivar errors: the OpenSSL error queue at the time of failure, as
        ``(library, reason)`` strings.  The queue itself is cleared.

    .. versionadded:: 0.1.0
    """

    def __init__(self, function: str, errors: Sequence[tuple[str, str]]) -> None:
        detail = "; ".join(f"{lib}: {reason}" for lib, reason in errors) or (
            "no error on the OpenSSL error queue"
        )
        super().__init__(f"{function} failed: {detail}")
        self.function = function
        self.errors = list(errors)
