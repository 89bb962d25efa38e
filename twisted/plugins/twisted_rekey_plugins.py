"""
twistd plugins of twisted_rekey: ``rekey-echo`` and ``rekey-tunnel``.

This file is found by Twisted's plugin system (``twisted/plugins/`` has no
``__init__.py``, on purpose) and must stay cheap to import: ``twistd
--help`` imports every plugin file, and the service modules are imported
only when one of these commands runs.
"""

from __future__ import annotations

from twisted.application.service import ServiceMaker

rekeyEcho = ServiceMaker(
    "twisted_rekey echo server",
    "twisted_rekey.apps.echo",
    "A TLS echo server that rotates its keys by policy (TLS 1.3 KeyUpdate, "
    "TLS 1.2 renegotiation), logging each rotation.",
    "rekey-echo",
)

rekeyTunnel = ServiceMaker(
    "twisted_rekey tunnel",
    "twisted_rekey.apps.tunnel",
    "A TLS tunnel whose keys rotate by policy, in front of a plain TCP "
    "service (--listen ssl:... --connect tcp:...) or towards a TLS one "
    "(--listen tcp:... --connect tls:...); mutual TLS, certificates "
    "reloaded on SIGHUP, Prometheus metrics.",
    "rekey-tunnel",
)
