"""
The ``zope.interface`` that names what a rekeying Twisted protocol offers.

Code that holds a protocol (or wants to know whether one can rotate its
keys) asks ``IRekeyable.providedBy(protocol)`` instead of sniffing for
methods.  This module declares, it never implements: no OpenSSL here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# zope.interface ships no type information (Twisted checks it with mypy-zope).
from zope.interface import Attribute, Interface  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = ["IRekeyable"]


class IRekeyable(Interface):  # type: ignore[misc]
    """
    A TLS connection whose traffic keys can be rotated without reconnecting:
    a TLS 1.3 KeyUpdate, or a TLS 1.2 renegotiation.

    .. versionadded:: 0.1.0
    """

    rekeyStats = Attribute(
        "A :class:`twisted_rekey.RekeyStats` snapshot of this connection's "
        "key updates, renegotiations, and time and bytes since the last "
        "rotation."
    )

    def keyUpdate(  # type: ignore[empty-body]
        requestPeer: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Send a TLS 1.3 KeyUpdate.

        :param requestPeer: also ask the peer to rotate its own sending keys;
            the Deferred then fires only once the peer's KeyUpdate arrived.
        :param timeout: seconds to wait for the peer's KeyUpdate, or ``None``
            to wait as long as the connection lasts.
        :returns: a Deferred that fires with ``None`` once the KeyUpdate has
            been handed to the underlying transport (and, with
            *requestPeer*, once the peer's own KeyUpdate arrived).
        """

    def renegotiate(  # type: ignore[empty-body]
        abbreviated: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Renegotiate a TLS 1.2 (or older) connection.

        :param abbreviated: resume the current session instead of a new key
            exchange.
        :param timeout: seconds to wait for the new handshake to complete.
        :returns: a Deferred that fires with ``None`` once the new handshake
            has completed.
        """

    def rekey(  # type: ignore[empty-body]
        requestPeer: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Rotate the keys the way the negotiated protocol version allows: a
        KeyUpdate on TLS 1.3, a full renegotiation on TLS 1.2 and older.

        :returns: a Deferred as :meth:`keyUpdate` or :meth:`renegotiate`
            return it.
        """
