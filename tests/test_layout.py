"""
The layout of the package: which module owns what.  Each rule is checked on
the source (the AST), so that a change that puts a concern in a second place
fails the suite.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "twisted_rekey"

#: Twisted's private attributes of its TLS protocol (and of twisted.web's
#: HTTP/2 stream) that twisted_rekey relies on; only _twistedtls reaches them.
TWISTED_INTERNALS = frozenset(
    {
        "_write",
        "_bufferedWrite",
        "_flushSendBIO",
        "_aggregator",
        "_lostTLSConnection",
        "_tlsConnection",
        "_tlsShutdownFinished",
        "_appSendBuffer",
        "_unbufferPendingWrites",
        "_shutdownTLS",
        "_aborted",
        "failVerification",
        "_conn",
    }
)


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _attributes(tree: ast.AST) -> set[str]:
    """
    Attribute names the module reads or sets: ``x.name`` and the constant
    name given to ``getattr``/``setattr``/``hasattr``.
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            names.add(node.args[1].value)
    return names


def test_twisted_internals_in_one_module() -> None:
    touched = {
        name: sorted(_attributes(tree) & TWISTED_INTERNALS)
        for name, tree in _modules().items()
        if name != "_twistedtls.py"
    }
    assert {name: found for name, found in touched.items() if found} == {}


def test_twisted_internals_module_touches_them() -> None:
    # The list above names what the module really reaches: a name no
    # longer used there is dropped from it.
    tree = _modules()["_twistedtls.py"]
    assert TWISTED_INTERNALS <= _attributes(tree)


def test_only_twistedtls_reads_the_factory_clock() -> None:
    # factory._clock: "_clock" is also a name of our own classes'
    # attributes, so this one is checked as tls.factory._clock / getattr(
    # ...factory, "_clock").
    offenders = []
    for name, tree in _modules().items():
        if name == "_twistedtls.py":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "_clock"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "factory"
            ) or (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and isinstance(node.args[0], ast.Attribute)
                and node.args[0].attr == "factory"
            ):
                offenders.append((name, node.lineno))
    assert offenders == []


def test_only_twistedtls_wraps_recv() -> None:
    # Assigning conn.recv: the one wrapper counting what OpenSSL hands Twisted.
    offenders = []
    for name, tree in _modules().items():
        if name == "_twistedtls.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "recv" for t in node.targets
            ):
                offenders.append((name, node.lineno))
    assert offenders == []
