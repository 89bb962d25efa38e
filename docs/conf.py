"""
Sphinx configuration for twisted_rekey's documentation.

The build must pass with warnings as errors and without network access
(tests/test_docs.py builds it that way).  Links into the Python, Twisted and
pyOpenSSL documentation therefore come from inventories already on disk:
Debian's python3-doc, twisted-doc and python-openssl-doc packages install
them.  A mapping whose inventory is not on this machine is left out, so that
its references render as plain text instead of failing the build; nothing is
ever fetched.  Set TWISTED_REKEY_DOCS_INTERSPHINX=0 to leave them all out.
"""

from __future__ import annotations

import glob
import os
import sys
from importlib.metadata import PackageNotFoundError, version

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "twisted_rekey"
author = "twisted_rekey developers"
copyright = "the twisted_rekey developers; MIT License"
try:
    release = version("twisted_rekey")
except PackageNotFoundError:  # a source tree that is not installed
    release = "0+unknown"
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

# Inventories on disk: name -> (documentation URL, candidate local files).
_LOCAL_INVENTORIES = {
    "python": (
        "https://docs.python.org/3/",
        [
            "/usr/share/doc/python3/html/objects.inv",
            *sorted(
                glob.glob("/usr/share/doc/python3.*/html/objects.inv"), reverse=True
            ),
        ],
    ),
    "twisted": (
        "https://docs.twisted.org/en/stable/api/",
        ["/usr/share/doc/twisted-doc/html/api/objects.inv"],
    ),
    "pyopenssl": (
        "https://www.pyopenssl.org/en/stable/",
        ["/usr/share/doc/python-openssl-doc/html/objects.inv"],
    ),
}

intersphinx_mapping: dict[str, tuple[str, str]] = {}
if os.environ.get("TWISTED_REKEY_DOCS_INTERSPHINX", "1") != "0":
    for _name, (_url, _candidates) in _LOCAL_INVENTORIES.items():
        _found = next((p for p in _candidates if os.path.isfile(p)), None)
        if _found is not None:
            intersphinx_mapping[_name] = (_url, _found)
if intersphinx_mapping:
    extensions.append("sphinx.ext.intersphinx")
    # Only the local files above are read; never wait on a network.
    intersphinx_timeout = 1

nitpicky = False
primary_domain = "py"

autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autoclass_content = "class"

exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "alabaster"
html_theme_options = {
    "description": "Rotate TLS traffic keys without reconnecting",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
html_title = f"twisted_rekey {release}"


def _load_lazy_names() -> None:
    # The package serves its Twisted names lazily, through a module
    # __getattr__: autodoc lists a module's members with dir(), which does
    # not show them until they are first used.  Use every name in __all__
    # once, so that the reference follows __all__ whatever is lazy.
    import twisted_rekey

    for name in twisted_rekey.__all__:
        getattr(twisted_rekey, name)


_load_lazy_names()
