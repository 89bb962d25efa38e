"""
``--tls-min``/``--tls-max`` of the plugins really bound what is negotiated,
on the server side (the Context) and on the tunnel's TLS client side (each
connection, through ``SSL_ctrl``), with Twisted 23.10 as with 26.10.
"""

from __future__ import annotations

from typing import Any

import pytest
from peers import CertFiles
from twisted.internet import protocol, task
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from twisted_rekey.apps import tunnel


def _options(cert_files: CertFiles, *extra: str) -> tunnel.Options:
    options = tunnel.Options()
    options.check(
        [
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--connect",
            "ssl:localhost:1",
            "--cafile",
            str(cert_files.ca_cert),
            *extra,
        ]
    )
    return options


def _negotiate(client_creator: Any, server_options: Any) -> str | None:
    """The version the client negotiated, or None if the handshake failed."""
    clock = task.Clock()
    sf = TLSMemoryBIOFactory(
        server_options, False, protocol.Factory.forProtocol(protocol.Protocol), clock
    )
    cf = TLSMemoryBIOFactory(
        client_creator, True, protocol.Factory.forProtocol(protocol.Protocol), clock
    )
    client, _, pump = iosim.connectedServerAndClient(
        lambda: sf.buildProtocol(None), lambda: cf.buildProtocol(None), clock=clock
    )
    pump.flush()
    handle = client.getHandle()
    if handle is None or not client.connected:
        return None
    version = str(handle.get_protocol_version_name())
    client.loseConnection()
    pump.flush()
    return version


def _server(cert_files: CertFiles, *extra: str) -> Any:
    # The tunnel's own server side, on the test certificate.
    options = tunnel.Options()
    options.check(
        [
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--connect",
            "tcp:localhost:1",
            "--cert",
            str(cert_files.server_cert),
            "--key",
            str(cert_files.server_key),
            *extra,
        ]
    )
    tls = options["certificate"].options(options["versions"])
    options.limitMaximum(tls.getContext())
    return tls


@pytest.mark.parametrize(
    ("client_max", "server_max", "expected"),
    [
        ("1.3", "1.3", "TLSv1.3"),
        ("1.2", "1.3", "TLSv1.2"),  # the client's cap, per connection
        ("1.3", "1.2", "TLSv1.2"),  # the server's cap, on its Context
    ],
)
def test_tls_max_bounds_what_is_negotiated(
    cert_files: CertFiles, client_max: str, server_max: str, expected: str
) -> None:
    client = _options(cert_files, "--tls-max", client_max)["clientOptions"]
    server = _server(cert_files, "--tls-max", server_max)
    assert _negotiate(client, server) == expected


def test_tls_min_bounds_what_is_negotiated(cert_files: CertFiles) -> None:
    client = _options(cert_files, "--tls-max", "1.2")["clientOptions"]
    server = _server(cert_files, "--tls-min", "1.3")
    # No version in common: the handshake fails.
    assert _negotiate(client, server) is None
