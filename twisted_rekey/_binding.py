"""
Reach the OpenSSL functions that cryptography's cffi ``lib`` does not expose,
in the very OpenSSL that cryptography (and so pyOpenSSL) already uses.

This is the only module that touches cffi function pointers, ``dladdr`` and
symbol tables.  Three ways are tried, in order, for each function:

``cffi``
    cryptography's own cffi ``lib`` has it (a future release may).
``dynamic``
    cryptography was built against a shared libssl: the library that holds
    OpenSSL's code is found with ``dladdr`` on a pointer OpenSSL itself
    returned, re-opened with ``RTLD_NOLOAD`` (so it can never load a second
    copy) and asked with ``dlsym``.
``symtab``
    cryptography's Linux wheels link OpenSSL statically into their extension
    module and keep its ELF ``.symtab``: the function is a local symbol there,
    at the module's load base plus the symbol's value.

Nothing found by the last two ways is called before it is verified:

* the address must lie in the very file that holds OpenSSL's code
  (``dladdr`` on a pointer OpenSSL returned, and on the address itself);
* for symbol-table addresses, the file read must be the module loaded in
  this process, not one replaced on disk since (say, by an upgrade): the GNU
  build ID in memory must equal the file's, and the file's device and inode
  those ``/proc/self/maps`` shows at the load base;
* the module's load base computed from several of cffi's own wrappers
  (``_cffi_d_*``, whose addresses cffi reports) must agree with each other and
  with the base ``dladdr`` reports for that file; and
* the machine code at the address in memory must be byte for byte the code
  the file holds for that symbol (read through ``/proc/self/mem`` where it
  exists, so that even a bad address is an error, not a crash).

Symbols, build ID and code are read from the file in one pass, through one
file descriptor.

This module must never load a second libssl or libcrypto, never call an
address that failed a check, and never raise while being imported: where no
way works, the function is reported unavailable, with the reason.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from . import _elf
from .exceptions import FunctionUnavailable

__all__ = [
    "Capabilities",
    "Resolution",
    "capabilities",
    "ffi",
    "function",
    "lib",
    "need",
    "verify_cert_error_string",
]

from cryptography import __version__ as _cryptography_version
from cryptography.hazmat.bindings._rust import _openssl

#: cryptography's raw cffi objects: the same ``ffi`` that types pyOpenSSL's
#: ``SSL *`` pointers, and the unfiltered ``lib`` whose function addresses
#: cffi can report.
ffi: Any = _openssl.ffi
lib: Any = _openssl.lib

#: The functions this module resolves, with their C types.
SIGNATURES = {
    "SSL_key_update": "int (*)(SSL *, int)",
    "SSL_get_key_update_type": "int (*)(const SSL *)",
    "SSL_renegotiate_abbreviated": "int (*)(SSL *)",
    "SSL_renegotiate": "int (*)(SSL *)",
    "SSL_renegotiate_pending": "int (*)(const SSL *)",
    "SSL_ctrl": "long (*)(SSL *, int, long, void *)",
    "SSL_clear_options": "uint64_t (*)(SSL *, uint64_t)",
    # In cryptography's lib only since 43-ish; per-connection hooks need it.
    "SSL_set_info_callback": "void (*)(SSL *, void (*)(const SSL *, int, int))",
    # The role of a connection whose handshake was not watched (startTLS).
    "SSL_is_server": "int (*)(const SSL *)",
    # A full renegotiation that no offered session can resume (_connection).
    "SSL_set_session_id_context": "int (*)(SSL *, const unsigned char *, unsigned int)",
}

# Functions cffi wraps in every release we support; their wrappers' addresses
# pin the extension module's load base.
_ANCHORS = ("SSL_do_handshake", "SSL_get_version", "SSL_write")

# How much of a function's code is compared between memory and file.
_CODE_CHECK_BYTES = 64


@dataclass(frozen=True)
class Resolution:
    """
    How one OpenSSL function was reached, or why it could not be.

    :ivar name: the C function's name.
    :ivar how: ``"cffi"``, ``"dynamic"``, ``"symtab"``, or ``None`` when
        unavailable.
    :ivar address: its address in this process, or ``None``.
    :ivar reason: why it is unavailable (empty when available).

    .. versionadded:: 0.1.0
    """

    name: str
    how: str | None
    address: int | None
    reason: str = ""

    @property
    def available(self) -> bool:
        """Whether the function can be called."""
        return self.how is not None


@dataclass(frozen=True)
class Capabilities:
    """
    What this process can do, as :func:`twisted_rekey.capabilities` reports it.

    :ivar key_update: whether TLS 1.3 KeyUpdate can be sent.
    :ivar renegotiation: whether TLS 1.2 renegotiation can be started.
    :ivar abbreviated_renegotiation: whether a resuming renegotiation can be
        started.
    :ivar functions: one :class:`Resolution` per function.
    :ivar openssl_version: the version string of the OpenSSL in use.
    :ivar cryptography_version: cryptography's version.
    :ivar module_path: the file that holds OpenSSL's code.

    .. versionadded:: 0.1.0
    """

    key_update: bool
    renegotiation: bool
    abbreviated_renegotiation: bool
    functions: tuple[Resolution, ...]
    openssl_version: str
    cryptography_version: str
    module_path: str | None


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _dladdr_function() -> Any:
    if sys.platform == "win32":
        return None
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    dladdr.restype = ctypes.c_int
    return dladdr


_dladdr = _dladdr_function()


def _where(address: int) -> tuple[str, int] | None:
    """The file mapped at *address* and its load base, per ``dladdr``."""
    if _dladdr is None or not address:
        return None
    info = _DlInfo()
    if not _dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
        return None
    if not info.dli_fname or info.dli_fbase is None:
        return None
    return os.fsdecode(info.dli_fname), int(info.dli_fbase)


def _address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def _read_memory(address: int, size: int) -> bytes | None:
    """
    *size* bytes of this process's memory at *address*, or ``None``.

    Through ``/proc/self/mem`` where there is one, so that an unmapped or
    unreadable address is an error, not a crash; elsewhere only addresses
    ``dladdr`` placed in a loaded module are passed here.
    """
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return bytes(ffi.buffer(ffi.cast("char *", address), size))
    try:
        data = os.pread(fd, size, address)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def _mapped_inode(base: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file mapped at *base*, per /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start = int(fields[0].split("-")[0], 16)
                if start == base and len(fields) >= 6:
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    return os.makedev(major, minor), int(fields[4])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class _Image:
    """What was read from the extension module's file, in one pass."""

    symbols: dict[str, list[_elf.ElfSymbol]]
    code: dict[str, bytes]
    build_id_note: _elf.BuildIdNote | None
    end: str
    stat: os.stat_result


class _Resolver:
    """Resolves and verifies each function once, on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[str, tuple[Resolution, Any]] = {}
        self._module: tuple[str, int] | None = None
        self._module_reason = ""
        self._module_checked = False
        self._image: _Image | None = None

    # -- where OpenSSL's code lives ------------------------------------------

    def _module_of_openssl(self) -> tuple[str, int] | None:
        """The file holding OpenSSL's code, and its base; checked once."""
        if self._module_checked:
            return self._module
        self._module_checked = True
        if _dladdr is None:
            self._module_reason = "dladdr is not available on this platform"
            return None
        # TLS_method() returns a pointer to a static table inside libssl's
        # own data: whatever file it lies in holds OpenSSL's SSL code.
        method = _where(_address(lib.TLS_method()))
        if method is None:
            self._module_reason = "dladdr cannot place OpenSSL's SSL code"
            return None
        self._module = method
        return method

    def _cffi_module(self) -> tuple[str, int] | None:
        return _where(_address(ffi.addressof(lib, _ANCHORS[0])))

    # -- the three ways --------------------------------------------------------

    def _by_dynamic(self, name: str) -> tuple[int | None, str]:
        module = self._module_of_openssl()
        if module is None:
            return None, self._module_reason
        path, base = module
        cffi_module = self._cffi_module()
        if cffi_module is not None and cffi_module[0] == path:
            return None, "OpenSSL is linked statically into cryptography"
        mode = getattr(os, "RTLD_NOLOAD", None)
        if mode is None:
            return None, "RTLD_NOLOAD is not available on this platform"
        try:
            # RTLD_NOLOAD: succeeds only for a library already loaded, so this
            # can never bring a second OpenSSL into the process.
            handle = ctypes.CDLL(path, mode=mode | os.RTLD_LAZY)
            pointer = getattr(handle, name)
        except (OSError, AttributeError):
            return None, f"{os.path.basename(path)} does not export {name}"
        address = ctypes.cast(pointer, ctypes.c_void_p).value
        if not address:
            return None, f"dlsym returned NULL for {name}"
        where = _where(address)
        if where is None or where[1] != base:
            return None, f"{name} from dlsym does not lie in {path}"
        return address, ""

    def _load_image(self, path: str) -> _Image | str:
        """
        Read, in one pass through one file descriptor, everything the checks
        compare with memory: the symbols, the build ID, and the first bytes
        of every function this module may resolve.
        """
        if self._image is not None:
            return self._image
        missing = [n for n in SIGNATURES if not hasattr(lib, n)]
        try:
            with _elf.ElfFile(path) as elf:
                symbols = elf.symbols([*missing, *(f"_cffi_d_{a}" for a in _ANCHORS)])
                code = {}
                for name in missing:
                    defs = [d for d in symbols.get(name, []) if d.is_function]
                    if len(defs) == 1 and defs[0].file_offset is not None:
                        size = min(defs[0].size, _CODE_CHECK_BYTES)
                        code[name] = elf.read(defs[0].file_offset, size)
                image = _Image(symbols, code, elf.build_id_note(), elf.end, elf.stat)
        except (OSError, _elf.ElfError) as e:
            return f"cannot read the symbol table of {path}: {e}"
        self._image = image
        return image

    def _same_file(self, image: _Image, path: str, base: int) -> str:
        """Why the mapped module is not the file that was read, or ''."""
        note = image.build_id_note
        if note is not None:
            # The build ID as loaded in memory must be the file's.
            in_memory = _read_memory(base + note.vaddr, note.size)
            if in_memory is None:
                return "cannot read the loaded module's build ID"
            if _elf.parse_build_id(in_memory, image.end) != note.build_id:
                return (
                    f"{path} on disk is not the module loaded in this process "
                    "(different build ID: replaced since it was loaded?)"
                )
        mapped = _mapped_inode(base)
        if mapped is not None and mapped != (image.stat.st_dev, image.stat.st_ino):
            return (
                f"{path} on disk is not the module loaded in this process "
                "(a different file: replaced since it was loaded?)"
            )
        return ""

    def _by_symtab(self, name: str) -> tuple[int | None, str]:
        module = self._module_of_openssl()
        if module is None:
            return None, self._module_reason
        path, base = module
        cffi_module = self._cffi_module()
        if cffi_module is None or cffi_module != module:
            return None, "OpenSSL is not linked into cryptography's extension"
        image = self._load_image(path)
        if isinstance(image, str):
            return None, image
        symbols = image.symbols
        reason = self._same_file(image, path, base)
        if reason:
            return None, reason

        # The load base, three ways: dladdr, and each cffi wrapper's address
        # minus its symbol value.  All must agree.
        agreeing = 0
        for anchor in _ANCHORS:
            defs = symbols.get(f"_cffi_d_{anchor}", [])
            if len(defs) != 1:
                continue
            if _address(ffi.addressof(lib, anchor)) - defs[0].value != base:
                return None, (
                    f"load base of {os.path.basename(path)} does not agree "
                    f"with cffi's address of {anchor}"
                )
            agreeing += 1
        if agreeing < 2:
            return None, (
                f"{os.path.basename(path)} has no symbol table "
                "(or too few cffi wrappers in it) to verify addresses against"
            )

        defs = [d for d in symbols.get(name, []) if d.is_function]
        if not defs:
            return None, f"{os.path.basename(path)} does not contain {name}"
        if len({d.value for d in defs}) != 1:
            return None, f"{name} is defined more than once; refusing to guess"
        sym = defs[0]
        on_disk = image.code.get(name)
        if sym.size <= 0 or on_disk is None:
            return None, f"{name} has no code in {os.path.basename(path)}"
        address = base + sym.value
        where = _where(address)
        if where is None or where != module:
            return None, f"{name} does not lie in the mapped {path}"
        if _read_memory(address, len(on_disk)) != on_disk:
            return None, f"the code at {name}'s address is not {name}"
        return address, ""

    # -- public ----------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Resolution, Any]:
        # Every rotation asks: a settled answer needs no lock (entries are
        # only ever added, whole, under the lock).
        found = self._done.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self._done.get(name)
            if found is not None:
                return found
            found = self._resolve(name)
            self._done[name] = found
            return found

    def _resolve(self, name: str) -> tuple[Resolution, Any]:
        signature = SIGNATURES[name]
        if hasattr(lib, name):
            func = getattr(lib, name)
            return Resolution(name, "cffi", _address(ffi.addressof(lib, name))), func
        reasons = []
        for how, way in (("dynamic", self._by_dynamic), ("symtab", self._by_symtab)):
            try:
                address, reason = way(name)
            except Exception as e:  # never let resolution break an import
                address, reason = None, f"{type(e).__name__}: {e}"
            if address is not None:
                return Resolution(name, how, address), ffi.cast(signature, address)
            reasons.append(f"{how}: {reason}")
        return Resolution(name, None, None, "; ".join(reasons)), None

    @property
    def module_path(self) -> str | None:
        with self._lock:
            module = self._module_of_openssl()
        return module[0] if module else None


_resolver = _Resolver()


def function(name: str) -> tuple[Resolution, Any]:
    """
    The verified cffi function for *name*, or ``None`` with the reason.

    :param name: a key of :data:`SIGNATURES`.
    :returns: ``(resolution, callable_or_None)``.
    """
    return _resolver.resolve(name)


def need(name: str) -> Any:
    """
    The verified cffi function for *name*.

    :param name: a key of :data:`SIGNATURES`.
    :raises FunctionUnavailable: with the reason, if it cannot be reached.
    """
    resolution, func = function(name)
    if func is None:
        raise FunctionUnavailable(name, resolution.reason)
    return func


def openssl_version() -> str:
    """The version string of the OpenSSL that cryptography uses."""
    return str(ffi.string(lib.OpenSSL_version(lib.OPENSSL_VERSION)).decode("ascii"))


def verify_cert_error_string(code: int) -> str:
    """
    OpenSSL's text for a certificate verification error *code*, such as the
    ``errnum`` a pyOpenSSL verify callback receives
    (``X509_verify_cert_error_string``).

    .. versionadded:: 0.2.0
    """
    text = ffi.string(lib.X509_verify_cert_error_string(code))
    return str(text.decode("ascii", "replace"))


def capabilities() -> Capabilities:
    """
    Resolve every function and report what this process can do.

    :returns: a :class:`Capabilities`.

    .. versionadded:: 0.1.0
    """
    resolutions = tuple(function(name)[0] for name in SIGNATURES)
    by_name = {r.name: r for r in resolutions}
    return Capabilities(
        key_update=by_name["SSL_key_update"].available
        and by_name["SSL_get_key_update_type"].available,
        renegotiation=by_name["SSL_renegotiate"].available,
        abbreviated_renegotiation=by_name["SSL_renegotiate_abbreviated"].available,
        functions=resolutions,
        openssl_version=openssl_version(),
        cryptography_version=_cryptography_version,
        module_path=_resolver.module_path,
    )
