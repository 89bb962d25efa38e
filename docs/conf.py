"""
Sphinx configuration for twisted_rekey's documentation.

The build must pass with warnings as errors, with every cross-reference
resolved (``nitpicky``), and without network access (tests/test_docs.py
builds it that way).  Links into the Python, Twisted, pyOpenSSL and
cryptography documentation therefore come from inventories shipped in
``docs/inventories/`` (see the README there for where each comes from);
nothing is ever fetched.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from docutils import nodes
from sphinx.ext.intersphinx import InventoryAdapter
from sphinx.ext.intersphinx import missing_reference as intersphinx_missing_reference

if TYPE_CHECKING:
    from docutils.nodes import Element
    from sphinx.addnodes import pending_xref
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment

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

# Shipped inventories: name -> documentation URL.  Each is read from
# docs/inventories/<name>/objects.inv, never from the URL.
_INVENTORIES = {
    "python": "https://docs.python.org/3/",
    "twisted": "https://docs.twisted.org/en/stable/api/",
    "pyopenssl": "https://www.pyopenssl.org/en/stable/",
    "cryptography": "https://cryptography.io/en/latest/",
    "zope.interface": "https://zopeinterface.readthedocs.io/en/latest/",
}
_HERE = os.path.dirname(os.path.abspath(__file__))

extensions.append("sphinx.ext.intersphinx")
intersphinx_mapping = {
    name: (url, os.path.join(_HERE, "inventories", name, "objects.inv"))
    for name, url in _INVENTORIES.items()
}
# Only the shipped files are read; never wait on a network.
intersphinx_timeout = 1

nitpicky = True
primary_domain = "py"

autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_typehints = "signature"
# Defaults as written in the source (``time.monotonic``), not their repr
# (``<built-in function monotonic>``, which is no Python a reader can use).
autodoc_preserve_defaults = True
# Names the library imports only for type checkers.
autodoc_type_aliases = {
    "ITransport": "twisted.internet.interfaces.ITransport",
}
autoclass_content = "class"

exclude_patterns = ["_build", "inventories"]
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


def _unwrapInterfaces(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    returnAnnotation: str | None,
) -> tuple[str | None, str | None]:
    # A zope.interface in an annotation (``clock: IReactorTime | None``) is
    # an object, not a class: autodoc writes its repr, ``<InterfaceClass
    # twisted.internet.interfaces.IReactorTime>``, which links nowhere.
    # Write its dotted name, which intersphinx resolves.
    def unwrap(text: str | None) -> str | None:
        if text is None:
            return None
        return re.sub(r"<InterfaceClass ([\w.]+)>", r"\1", text)

    return unwrap(signature), unwrap(returnAnnotation)


def _documentedAttribute(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Element
) -> Element | None:
    """
    Resolve ``:attr:`` references to attributes that a class documents in its
    own docstring (``:ivar name:``) or inherits from a documented base.

    Sphinx gives neither a target of its own.  An ``:ivar:`` attribute links
    to its class's entry; an inherited one to the base's entry (here or in an
    inventory).  Any other name stays unresolved, so nitpicky still catches
    a misspelled one.
    """
    if node.get("refdomain") != "py" or node.get("reftype") != "attr":
        return None
    target = node["reftarget"]
    owner, _, attribute = target.rpartition(".")
    if not owner:
        context = node.get("py:class")
        module = node.get("py:module")
        if not context or not module:
            return None
        owner = f"{module}.{context}"
    try:
        cls = import_module(owner.rpartition(".")[0])
        for part in owner.split(".")[len(cls.__name__.split(".")) :]:
            cls = getattr(cls, part)
    except (ImportError, AttributeError, ValueError):
        return None
    if not isinstance(cls, type):
        return None
    domain = env.get_domain("py")
    for base in cls.__mro__:
        where = f"{base.__module__}.{base.__qualname__}"
        if base is not cls:
            candidate = node.deepcopy()
            candidate["reftarget"] = f"{where}.{attribute}"
            found = domain.resolve_xref(
                env,
                node["refdoc"],
                app.builder,
                "attr",
                candidate["reftarget"],
                candidate,
                contnode,
            ) or intersphinx_missing_reference(app, env, candidate, contnode)
            if found is not None:
                return found
        if re.search(rf":ivar {re.escape(attribute)}:", base.__doc__ or ""):
            public = where
            if where.startswith("twisted_rekey.") and base.__name__ in getattr(
                import_module("twisted_rekey"), "__all__", ()
            ):
                public = f"twisted_rekey.{base.__name__}"
            return domain.resolve_xref(
                env, node["refdoc"], app.builder, "class", public, node, contnode
            )
    return None


def _externalNames(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Element
) -> Element | None:
    """
    Resolve what intersphinx misses for reasons of form, not of substance:

    - an attribute's annotation holding a zope interface, which autodoc
      writes as ``<InterfaceClass dotted.name>`` (its repr);
    - a zope interface named as a class (``Bases: zope.interface.Interface``):
      zope.interface's own inventory files it under ``py:interface``, a type
      of its Sphinx extension that a role of this build does not search.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    match = re.fullmatch(r"<InterfaceClass ([\w.]+)>", target)
    if match is not None:
        target = match.group(1)
    found = InventoryAdapter(env).main_inventory.get("py:interface", {}).get(target)
    if found is None and match is None:
        return None
    text = nodes.literal(target, target.rpartition(".")[2])
    if found is None:
        candidate = node.deepcopy()
        candidate["reftarget"] = target
        candidate["reftype"] = "class"
        return intersphinx_missing_reference(app, env, candidate, text)
    # An _InventoryItem from Sphinx 8.2 on, a plain tuple before.
    if hasattr(found, "uri"):
        project, release, uri = found.project_name, found.project_version, found.uri
    else:
        project, release, uri = found[:3]
    reference = nodes.reference("", "", internal=False, refuri=uri)
    reference["reftitle"] = f"(in {project} v{release})"
    reference.append(text)
    return reference


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-signature", _unwrapInterfaces)
    app.connect("missing-reference", _documentedAttribute)
    app.connect("missing-reference", _externalNames)
