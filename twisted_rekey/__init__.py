"""
twisted_rekey: rotate the traffic keys of long-lived TLS connections without
reconnecting — TLS 1.3 KeyUpdate and TLS 1.2 renegotiation — from pyOpenSSL
and Twisted.

The pyOpenSSL layer (snake_case) is imported eagerly and is cheap; the Twisted
layer (camelCase) is imported on first use, so that pyOpenSSL applications do
not pay for importing Twisted.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._binding import (
    Capabilities,
    Resolution,
    capabilities,
    verify_cert_error_string,
)
from ._connection import (
    OP_ALLOW_CLIENT_RENEGOTIATION,
    OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION,
    KeyUpdateType,
    RekeyConnection,
    RekeyConnectionMixin,
    RekeyMethod,
    allow_client_renegotiation,
    get_key_update_type,
    handshake_complete,
    key_update,
    protocol_version,
    rekey,
    renegotiate,
    renegotiate_abbreviated,
    renegotiate_pending,
    secure_renegotiation_support,
    set_max_proto_version,
    total_renegotiations,
)
from ._policy import (
    KEY_UPDATE_RATE_SENT,
    KEY_UPDATES_IN_A_ROW_SENT,
    MIN_INTERVAL_LOWEST,
    RotationAction,
    RotationPolicy,
    RotationSchedule,
    aead_record_limit,
)
from .exceptions import (
    AlreadyInProgress,
    ConnectionStateError,
    FunctionUnavailable,
    InsecureRenegotiation,
    InvalidUpdateType,
    KeyUpdateFlood,
    NotAConnection,
    OpenSSLCallError,
    PeerRefused,
    RekeyError,
    RekeyTimeout,
    RenegotiationForbidden,
    RenegotiationRateLimited,
    RotationRateLimited,
    WrongProtocolVersion,
)

# Names served lazily: name -> private module that defines it.
if TYPE_CHECKING:
    # What the lazy names below are, for type checkers (not imported at run
    # time: they import Twisted).
    from ._alpn import allowALPNWithoutProtocols as allowALPNWithoutProtocols
    from ._interfaces import IRekeyable as IRekeyable
    from ._metrics import RekeyMetrics as RekeyMetrics
    from ._protocol import RekeyProtocolMixin as RekeyProtocolMixin
    from ._protocol import RekeyStats as RekeyStats
    from ._rotation import RotatingFactory as RotatingFactory
    from ._rotation import RotatingProtocol as RotatingProtocol
    from ._rotation import rekeyableFor as rekeyableFor
    from ._scheduler import RotationScheduler as RotationScheduler

_LAZY: dict[str, str] = {
    "IRekeyable": "._interfaces",
    "RekeyMetrics": "._metrics",
    "RekeyProtocolMixin": "._protocol",
    "RekeyStats": "._protocol",
    "RotatingFactory": "._rotation",
    "RotatingProtocol": "._rotation",
    "RotationScheduler": "._scheduler",
    "allowALPNWithoutProtocols": "._alpn",
    "rekeyableFor": "._rotation",
}

# Still importable, but no longer part of what a star-import brings.
_DEPRECATED: dict[str, str] = {
    "RotatingProtocol": (
        "twisted_rekey.RotatingProtocol is deprecated since 0.2.0: "
        "RotatingFactory returns the application's own protocol, and "
        "rekeyableFor(protocol) reaches its rotation"
    ),
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        # Lazily, as service-identity does: importlib.metadata costs ~10 ms.
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("twisted_rekey")
        except PackageNotFoundError:  # a source tree that is not installed
            return "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    deprecation = _DEPRECATED.get(name)
    if deprecation is not None:
        # Not cached in globals(): every access warns.
        import warnings

        warnings.warn(deprecation, DeprecationWarning, stacklevel=2)
        return value
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # So that dir(), tab completion and autodoc see the lazy names too.
    return sorted({*globals(), *_LAZY})


__all__ = [
    "KEY_UPDATES_IN_A_ROW_SENT",
    "KEY_UPDATE_RATE_SENT",
    "MIN_INTERVAL_LOWEST",
    "OP_ALLOW_CLIENT_RENEGOTIATION",
    "OP_NO_SESSION_RESUMPTION_ON_RENEGOTIATION",
    "AlreadyInProgress",
    "Capabilities",
    "ConnectionStateError",
    "FunctionUnavailable",
    "IRekeyable",
    "InsecureRenegotiation",
    "InvalidUpdateType",
    "KeyUpdateFlood",
    "KeyUpdateType",
    "NotAConnection",
    "OpenSSLCallError",
    "PeerRefused",
    "RekeyConnection",
    "RekeyConnectionMixin",
    "RekeyError",
    "RekeyMethod",
    "RekeyMetrics",
    "RekeyProtocolMixin",
    "RekeyStats",
    "RekeyTimeout",
    "RenegotiationForbidden",
    "RenegotiationRateLimited",
    "Resolution",
    "RotatingFactory",
    "RotationAction",
    "RotationPolicy",
    "RotationRateLimited",
    "RotationSchedule",
    "RotationScheduler",
    "WrongProtocolVersion",
    "__version__",
    "aead_record_limit",
    "allowALPNWithoutProtocols",
    "allow_client_renegotiation",
    "capabilities",
    "get_key_update_type",
    "handshake_complete",
    "key_update",
    "protocol_version",
    "rekey",
    "rekeyableFor",
    "renegotiate",
    "renegotiate_abbreviated",
    "renegotiate_pending",
    "secure_renegotiation_support",
    "set_max_proto_version",
    "total_renegotiations",
    "verify_cert_error_string",
]
