"""
The suite's warnings are the library's business only: pyproject.toml's
``filterwarnings`` ignores the upstream deprecations that Twisted's API
makes unavoidable, by exact message and module, and turns any warning from
the library's own modules into an error.

These tests check the filters themselves: that each upstream filter matches
what the installed pyOpenSSL really says (and hides nothing else), and that
a warning from ``twisted_rekey`` fails a test.  They hold on the newest and
on the oldest supported releases (where pyOpenSSL deprecates nothing of
this yet).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import ssl


def _filters(pytestconfig: pytest.Config, action: str) -> list[tuple[str, str]]:
    """``(message, module)`` regular expressions of the ini's filters."""
    found = []
    for entry in pytestconfig.getini("filterwarnings"):
        parts = entry.split(":")
        if parts[0] == action:
            parts += [""] * (5 - len(parts))
            found.append((parts[1], parts[3]))
    return found


def _module_of(filename: str) -> str:
    path = Path(filename).with_suffix("")
    for start in range(len(path.parts)):
        if path.parts[start] == "OpenSSL":
            return ".".join(path.parts[start:])
    return path.name


def test_upstream_filters_match_exactly_what_upstream_says(
    pytestconfig: pytest.Config, cert_files: Any
) -> None:
    """
    Twisted's CertificateOptions hands pyOpenSSL the X509 and PKey objects
    that newer pyOpenSSL deprecates.  Every DeprecationWarning that raises is
    matched by one of the ignore filters, by message and module.
    """
    ignores = [
        (message, where)
        for message, where in _filters(pytestconfig, "ignore")
        if where.startswith("OpenSSL")
    ]
    assert ignores
    pem = cert_files.server.private_key_and_cert_chain_pem.bytes()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ssl.PrivateCertificate.loadPEM(pem).options().getContext()
    upstream = [w for w in seen if issubclass(w.category, DeprecationWarning)]
    used = set()
    for warning in upstream:
        module = _module_of(warning.filename)
        matching = [
            (message, where)
            for message, where in ignores
            if re.match(message, str(warning.message), re.I) and re.match(where, module)
        ]
        assert matching, f"not filtered: {warning.message} ({module})"
        used.update(matching)
    if upstream:
        # Each filter is for a warning that really comes (none is stale).
        assert used == set(ignores)


@pytest.mark.parametrize(
    ("message", "module"),
    [
        (
            "Passing pyOpenSSL X509 objects is deprecated. You should use a "
            "cryptography.x509.Certificate instead.",
            "OpenSSL.SSL",
        ),
        (
            "Passing pyOpenSSL PKey objects is deprecated. You should use a "
            "cryptography private key instead.",
            "OpenSSL.SSL",
        ),
        (
            "'cgi' is deprecated and slated for removal in Python 3.13",
            "twisted.web.http",
        ),
    ],
)
def test_upstream_filters_hide_nothing_else(message: str, module: str) -> None:
    """
    The same message from another module, or another message from the same
    module, still shows.
    """
    with warnings.catch_warnings(record=True) as seen:
        # The suite's filters stay in force: only where warnings go changes.
        warnings.warn_explicit(message, DeprecationWarning, "m.py", 1, module)
        assert seen == []
        warnings.warn_explicit(message, DeprecationWarning, "x.py", 1, "elsewhere")
        warnings.warn_explicit(
            message + " And more.", DeprecationWarning, "m.py", 2, module
        )
        warnings.warn_explicit(
            "Another deprecation.", DeprecationWarning, "m.py", 3, module
        )
    assert len(seen) == 3


@pytest.mark.parametrize(
    "module",
    ["twisted_rekey", "twisted_rekey._connection", "twisted_rekey.apps._common"],
)
def test_a_warning_from_the_library_fails(module: str) -> None:
    with pytest.raises(UserWarning, match="from the library"):
        warnings.warn_explicit(
            "from the library", UserWarning, f"{module}.py", 1, module
        )


def test_warnings_from_elsewhere_are_not_errors() -> None:
    with warnings.catch_warnings(record=True) as seen:
        for module in ("twisted_rekeying", "tests.test_x", "twisted.internet"):
            warnings.warn_explicit("not ours", UserWarning, "x.py", 1, module)
    assert len(seen) == 3
