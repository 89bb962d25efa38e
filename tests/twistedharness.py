"""
Pieces the Twisted-layer tests share: TLS options for our test certificates,
and an observer of twisted_rekey's log events (the ``events`` fixture in
conftest.py hands one out).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl


class Events:
    """twisted_rekey's log events, by ``rekey_event``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "rekey_event" in event:
            self.events.append(event)

    def names(self) -> list[str]:
        return [e["rekey_event"] for e in self.events]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["rekey_event"] == name]


def server_options(cert_files: Any, version: str | None = None) -> Any:
    """Twisted server options with the test server certificate."""
    pem = cert_files.server.private_key_and_cert_chain_pem.bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
    )
    if version == "1.2":
        # Not lowerMaximumSecurityTo=TLSv1_2: Twisted 23.10 excludes the
        # maximum itself too (twisted/twisted#10232, fixed later), so that
        # server offers no version at all.  Bound the Context directly;
        # CertificateOptions builds it once and keeps it.
        options.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
    return options


def client_options(cert_files: Any, host: str = "localhost") -> Any:
    """Twisted client options trusting the test CA, checking *host*."""
    return ssl.optionsForClientTLS(
        host, ssl.Certificate.loadPEM(cert_files.ca.cert_pem.bytes())
    )
