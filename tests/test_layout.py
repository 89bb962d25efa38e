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
        # the TLS options, for ALPN
        "_acceptableProtocols",
        "protosFromProtocol",
    }
)


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _attributes(tree: ast.AST) -> set[str]:
    """
    Attribute names the module reads or sets: ``x.name``, the constant
    name given to ``getattr``/``setattr``/``hasattr``, and any string
    constant spelled as a private name (a table of names to route).
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("_")
            and node.value.isidentifier()
        ):
            names.add(node.value)
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


def test_only_twistedtls_imports_twisted_private_modules() -> None:
    # twisted.internet._sslverify, twisted.internet._newtls, ...: modules
    # Twisted may change in any release.
    def private(module: str, names: tuple[str, ...]) -> bool:
        parts = module.split(".")
        return parts[0] == "twisted" and any(
            part.startswith("_") for part in [*parts, *names]
        )

    offenders = {
        name: sorted(
            m for m, n in _absoluteImports(tree, "twisted_rekey") if private(m, n)
        )
        for name, tree in _modules().items()
        if name != "_twistedtls.py"
    }
    assert {name: found for name, found in offenders.items() if found} == {}


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


def test_only_infocallback_counts_recv() -> None:
    # Assigning conn.recv or conn.__class__: the one place counting what a
    # Connection's recv returns (for the Twisted layer, on any Connection).
    # The other class swap, of the TLS protocol, is _twistedtls's.
    owners = {"recv": {"_infocallback.py"}}
    owners["__class__"] = owners["recv"] | {"_twistedtls.py"}
    offenders = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute)
                and t.attr in owners
                and name not in owners[t.attr]
                for t in node.targets
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
    # the policy's driver, below the mixin: it talks to a Rotator
    "_driver": 5,
    # the Deferreds waiting on the peer; the KeyUpdate and the TLS 1.2
    # renegotiation state the mixin's watcher makes on first need
    "_waiter": 5,
    "_keyupdates": 6,
    "_renegotiation": 6,
    "_protocol": 7,
    "_rotation": 8,
    "_alpn": 9,
    "_metrics": 9,
    # the public API imports the pyOpenSSL layer only, the rest on first use
    "__init__": 4,
    # ``python -m twisted_rekey``: the one library module that names the
    # applications (twisted_rekey.apps.cli)
    "__main__": 10,
}

#: The one module whose deferred imports go up the layers: the public API,
#: which loads the Twisted layer on first use.
LAZY_UPWARD = frozenset({"__init__"})

#: The applications (``twisted_rekey/apps/``: the twistd plugins, the probe,
#: the command line) and their layers among themselves.  They use the
#: library's public API only, as any application would; the two plugins
#: share ``_common`` and not each other.
APPS = {
    "__init__": 0,
    "_certs": 0,
    "probe": 0,
    "_common": 1,
    "cli": 1,
    "echo": 2,
    "tunnel": 2,
}

#: What the applications may import from the library.
APP_PUBLIC_MODULES = frozenset({"twisted_rekey", "twisted_rekey.exceptions"})

TWISTED_FREE = frozenset(
    {"exceptions", "_elf", "_policy", "_wheel", "_binding", "_infocallback"}
    | {"_connection"}
)
TWISTED_FREE_APPS = frozenset({"_certs", "probe"})
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
    """The library's modules (not the applications'), by name."""
    return {
        name.removesuffix(".py"): tree
        for name, tree in _modules().items()
        if not name.startswith("apps/")
    }


def _appModules() -> dict[str, ast.Module]:
    """The applications' modules, by name within ``twisted_rekey.apps``."""
    return {
        name.removeprefix("apps/").removesuffix(".py"): tree
        for name, tree in _modules().items()
        if name.startswith("apps/")
    }


def _absoluteImports(
    tree: ast.Module, package: str
) -> set[tuple[str, tuple[str, ...]]]:
    """
    Every import of *tree* (at run time or not), as ``(module, names)`` with
    relative imports resolved against *package*: ``import a.b`` is
    ``("a.b", ())``, ``from a import b, c`` is ``("a", ("b", "c"))``.
    """
    found: set[tuple[str, tuple[str, ...]]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.add((module, tuple(alias.name for alias in node.names)))
    return found


def test_every_module_has_a_layer() -> None:
    assert set(_byModule()) == set(LAYERS)


def test_imports_run_one_way() -> None:
    upward = []
    for name, tree in _byModule().items():
        for imported in _own(_imports(tree)):
            if LAYERS[imported] >= LAYERS[name]:
                upward.append((name, imported))
    assert upward == []


def test_deferred_imports_run_one_way_too() -> None:
    # No import inside a function (or for type checking) climbs back up: the
    # mixin reaches neither RotatingFactory's module nor anything above it,
    # and the policy's driver knows the mixin only as a Rotator.
    upward = []
    for name, tree in _byModule().items():
        if name in LAZY_UPWARD:
            continue
        for imported in _own(_imports(tree, atRunTime=False)):
            if LAYERS[imported] >= LAYERS[name]:
                upward.append((name, imported))
    assert upward == []


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
    for name, tree in {**_byModule(), **_appModules()}.items():
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
        for name, tree in {**_byModule(), **_appModules()}.items()
        if "twisted.internet.reactor" in _imports(tree)
    ]
    assert importing == []


def test_apps_use_only_the_public_api() -> None:
    # twisted_rekey and twisted_rekey.exceptions, and of twisted_rekey
    # only the names it lists in __all__; nothing private of the library.
    import twisted_rekey

    reach = set()
    for name, tree in _appModules().items():
        package = "twisted_rekey.apps"
        for module, names in _absoluteImports(tree, package):
            if module.startswith("twisted_rekey.apps") or not (
                module == "twisted_rekey" or module.startswith("twisted_rekey.")
            ):
                continue
            if module not in APP_PUBLIC_MODULES:
                reach.add((name, module))
            elif module == "twisted_rekey":
                reach.update(
                    (name, f"twisted_rekey.{n}")
                    for n in names
                    if n not in twisted_rekey.__all__ and n != "__file__"
                )
    assert reach == set()


def test_every_app_module_has_a_layer() -> None:
    assert set(_appModules()) == set(APPS)


def test_app_imports_run_one_way() -> None:
    # Among the applications: the plugins share _common, neither imports
    # the other.
    upward = []
    for name, tree in _appModules().items():
        for module, names in _absoluteImports(tree, "twisted_rekey.apps"):
            if module == "twisted_rekey.apps":
                imported = set(names)
            elif module.startswith("twisted_rekey.apps."):
                imported = {module.removeprefix("twisted_rekey.apps.").split(".")[0]}
            else:
                continue
            upward.extend(
                (name, other) for other in imported if APPS[other] >= APPS[name]
            )
    assert upward == []


def test_twisted_free_apps() -> None:
    # The probe runs over plain sockets, and the command line imports no
    # reactor for it.
    trees = _appModules()
    assert {
        name: "twisted"
        for name in TWISTED_FREE_APPS
        if "twisted" in _top(_imports(trees[name], atRunTime=False))
    } == {}


def test_library_does_not_import_the_apps() -> None:
    reach = set()
    for name, tree in _byModule().items():
        for module, names in _absoluteImports(tree, "twisted_rekey"):
            for full in (module, *(f"{module}.{n}" for n in names)):
                if full == "twisted_rekey.apps" or full.startswith(
                    "twisted_rekey.apps."
                ):
                    reach.add((name, module))
    # python -m twisted_rekey runs the command line.
    assert reach == {("__main__", "twisted_rekey.apps.cli")}
