"""
ALPN for servers whose factory offers no protocols, on every Twisted.

Twisted 26.x installs its ALPN select callback on every server Context it
builds, and that callback answers a client offering protocols none of
which the server's factory speaks with an empty selection, which OpenSSL
turns into an ``internal_error`` alert: a plain echo server then fails
against a default ``curl``, ``httpx`` or ``requests``.  Older releases
(23.10 to 25.x) ignore the client's offer there, as RFC 7301 lets a server
that speaks no ALPN protocol do.

This module restores that, for a Context before its first connection.  It
keeps Twisted's choice wherever Twisted makes one (the factory's
:class:`~twisted.internet.interfaces.IProtocolNegotiationFactory` and the
options' ``acceptableProtocols``, in Twisted's order of preference), and
never touches a Context that has made a connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL

from ._twistedtls import alpnProtocolsFor, optionsProtocols

__all__ = ["allowALPNWithoutProtocols"]


def allowALPNWithoutProtocols(options: Any) -> Any:
    """
    Let a TLS server accept clients that offer ALPN (a default ``curl``,
    ``httpx``, ``requests``) when its factory offers no ALPN protocol, as
    Twisted before 26.0 does: the offer is then ignored instead of
    answered with an ``internal_error`` alert.

    Where the factory or *options* offer protocols (twisted.web's ``Site``
    offers ``h2`` and ``http/1.1``), Twisted's choice is kept: the
    preferred protocol the client also offers, and a fatal alert when
    there is none.  On Twisted releases that do not need it, it changes
    nothing.

    Call it once, before the server's first connection::

        options = allowALPNWithoutProtocols(certificate.options())
        reactor.listenSSL(8443, factory, options)

    :param options: Twisted's server
        :class:`~twisted.internet.ssl.CertificateOptions` (anything with a
        ``getContext()`` that returns the one Context all its connections
        use).
    :returns: *options*, for chaining.
    :raises ValueError: if its Context already made a connection (pyOpenSSL
        no longer lets its callbacks change then).

    .. versionadded:: 0.2.0
    """
    protocolsFor = alpnProtocolsFor()
    if protocolsFor is None:
        return options  # older releases ignore the offer themselves
    context: SSL.Context = options.getContext()
    static: Sequence[bytes] = optionsProtocols(options)

    def select(conn: SSL.Connection, offered: list[bytes]) -> Any:
        acceptable = protocolsFor(conn.get_app_data(), static)
        if not acceptable:
            return SSL.NO_OVERLAPPING_PROTOCOLS
        for name in acceptable:
            if name in offered:
                return name
        # What Twisted answers: no overlap with what the server speaks.
        return b""

    context.set_alpn_select_callback(select)
    return options
