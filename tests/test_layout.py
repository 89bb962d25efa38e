"""
The layout of the package: which module owns what, and who imports whom
(docs/concepts.rst, "How the code is laid out").  Each rule is checked on
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


# -- the import contracts ----------------------------------------------------------

#: Each module's layer: a module imports (at module level) only modules of
#: lower layers, so every import runs one way.  Imports inside functions
#: (deferred to break no cycle but to keep the reactor and the Twisted layer
#: out of ``import twisted_rekey``) and under ``TYPE_CHECKING`` are not
#: imports at run time, and are left out.
LAYERS = {
    # sans-IO and leaves: no Twisted, no pyOpenSSL
    "exceptions": 0,
    "_elf": 0,
    "_policy": 0,
    "_wheel": 0,
    "_interfaces": 0,
    # the binding layer: the only door to cffi function pointers and ELF
    "_binding": 1,
    # the pyOpenSSL layer
    "_infocallback": 2,
    "_connection": 3,
    # the Twisted layer
    "_scheduler": 4,
    "_twistedtls": 4,
    "_protocol": 5,
    "_rotation": 6,
    "_alpn": 7,
    "_metrics": 7,
    # the applications: twistd plugins, the probe, the command line
    "_certs": 7,
    "_probe": 8,
    "_tap": 8,
    "_echo": 9,
    "_tunnel": 10,
    "__main__": 10,
    # the public API imports the pyOpenSSL layer only, the rest on first use
    "__init__": 4,
}

APPS = frozenset({"_certs", "_probe", "_tap", "_echo", "_tunnel", "__main__"})

#: What the applications still take from the library's private modules
#: rather than its public API (``twisted_rekey`` and
#: ``twisted_rekey.exceptions``): each entry is a debt, and a new reach into
#: a private module fails the test.
APP_PRIVATE_REACH = frozenset(
    {
        ("_echo", "_metrics"),
        ("_echo", "_policy"),
        ("_echo", "_protocol"),
        ("_probe", "_binding"),
        ("_probe", "_connection"),
        ("_probe", "_policy"),
        ("_tap", "_alpn"),
        ("_tap", "_binding"),
        ("_tap", "_policy"),
        ("_tunnel", "_connection"),
        ("_tunnel", "_metrics"),
        ("_tunnel", "_policy"),
        ("_tunnel", "_protocol"),
        ("__main__", "_binding"),
    }
)

TWISTED_FREE = frozenset(
    {"exceptions", "_elf", "_policy", "_wheel", "_binding", "_infocallback"}
    | {"_connection", "_certs", "_probe"}
)
OPENSSL_FREE = frozenset(
    {"exceptions", "_elf", "_policy", "_wheel", "_interfaces", "_scheduler"}
    | {"_twistedtls"}
)


def _imports(tree: ast.Module, *, atRunTime: bool = True) -> set[str]:
    """
    The modules *tree* imports: ``.name`` for the package's own, the
    absolute name otherwise.  With *atRunTime*, only those imported when the
    module is (not in a function, not under ``TYPE_CHECKING``).
    """
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.module:
                        found.add("." + node.module)
                    else:
                        found.update("." + alias.name for alias in node.names)
                elif node.module:
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not atRunTime:
                    visit(node.body)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                if not atRunTime:
                    visit(node.body)
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def _own(imports: set[str]) -> set[str]:
    return {name[1:] for name in imports if name.startswith(".")} - {
        "__file__",
        "__version__",
    }


def _top(imports: set[str]) -> set[str]:
    return {name.split(".")[0] for name in imports if not name.startswith(".")}


def _byModule() -> dict[str, ast.Module]:
    return {name.removesuffix(".py"): tree for name, tree in _modules().items()}


def test_every_module_has_a_layer() -> None:
    assert set(_byModule()) == set(LAYERS)


def test_imports_run_one_way() -> None:
    upward = []
    for name, tree in _byModule().items():
        for imported in _own(_imports(tree)):
            if LAYERS[imported] >= LAYERS[name]:
                upward.append((name, imported))
    assert upward == []


def test_protocol_reaches_rotation_only_lazily() -> None:
    trees = _byModule()
    assert "_rotation" not in _own(_imports(trees["_protocol"]))
    assert "_rotation" in _own(_imports(trees["_protocol"], atRunTime=False))


def test_twisted_free_modules() -> None:
    trees = _byModule()
    assert {
        name: "twisted"
        for name in TWISTED_FREE
        if "twisted" in _top(_imports(trees[name], atRunTime=False))
    } == {}


def test_openssl_free_modules() -> None:
    trees = _byModule()
    assert {
        name: sorted(_top(_imports(trees[name])) & {"OpenSSL", "cryptography"})
        for name in OPENSSL_FREE
        if _top(_imports(trees[name])) & {"OpenSSL", "cryptography"}
    } == {}


def test_binding_is_the_only_door_to_cffi_and_elf() -> None:
    # cryptography's raw bindings, ctypes and the ELF reader: _binding
    # verifies every address before anyone calls through it.
    doors = {}
    for name, tree in _byModule().items():
        imports = _imports(tree, atRunTime=False)
        reached = {
            i
            for i in imports
            if i.startswith("cryptography.hazmat.bindings")
            or _top({i}) & {"ctypes", "cffi", "_cffi_backend"}
            or i == "._elf"
        }
        if reached:
            doors[name] = sorted(reached)
    assert set(doors) <= {"_binding", "_elf"}, doors
    assert "._elf" in doors["_binding"]


def test_no_module_imports_the_reactor_when_imported() -> None:
    importing = [
        name
        for name, tree in _byModule().items()
        if "twisted.internet.reactor" in _imports(tree)
    ]
    assert importing == []


def test_apps_reach_only_what_is_listed() -> None:
    reach = set()
    for name, tree in _byModule().items():
        if name not in APPS:
            continue
        for imported in _own(_imports(tree, atRunTime=False)):
            if imported not in APPS | {"exceptions"}:
                reach.add((name, imported))
    assert reach == APP_PRIVATE_REACH


def test_library_does_not_import_the_apps() -> None:
    reach = [
        (name, imported)
        for name, tree in _byModule().items()
        if name not in APPS
        for imported in _own(_imports(tree, atRunTime=False))
        if imported in APPS
    ]
    # _metrics's twistd options share the plugins' endpoint parsing.
    assert reach == [("_metrics", "_tap")]
