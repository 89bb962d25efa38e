"""
Reaching OpenSSL's missing functions: each way is verified before it is
trusted, a failed check means "unavailable, because ...", never a call, and
no second OpenSSL is ever loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from memorypair import make_pair
from OpenSSL import SSL

import twisted_rekey
from twisted_rekey import FunctionUnavailable, _binding, _elf


def test_capabilities_on_this_machine() -> None:
    caps = twisted_rekey.capabilities()
    assert caps.key_update
    assert caps.renegotiation
    assert caps.abbreviated_renegotiation
    assert caps.openssl_version.startswith("OpenSSL ")
    assert caps.cryptography_version
    by_name = {f.name: f for f in caps.functions}
    for name in _binding.SIGNATURES:
        res = by_name[name]
        assert res.available, res.reason
        assert res.how in ("cffi", "dynamic", "symtab")
        assert res.address
        assert res.reason == ""


def test_resolved_key_update_is_the_real_one() -> None:
    """
    The address used is the one the file's symbol table names, at the same
    load base as cffi's own wrappers (checked independently of the resolver).
    """
    resolution, func = _binding.function("SSL_key_update")
    if resolution.how != "symtab":
        pytest.skip(f"found by {resolution.how}, not the symbol table")
    path = twisted_rekey.capabilities().module_path
    assert path is not None
    symbols = _elf.find_symbols(path, ["SSL_key_update", "_cffi_d_SSL_read"])
    base = int(
        _binding.ffi.cast("uintptr_t", _binding.ffi.addressof(_binding.lib, "SSL_read"))
    )
    base -= symbols["_cffi_d_SSL_read"][0].value
    assert resolution.address == base + symbols["SSL_key_update"][0].value
    assert int(_binding.ffi.cast("uintptr_t", func)) == resolution.address


def _fresh_resolver(monkeypatch: pytest.MonkeyPatch) -> _binding._Resolver:
    resolver = _binding._Resolver()
    monkeypatch.setattr(_binding, "_resolver", resolver)
    return resolver


def _missing_from_cffi() -> list[str]:
    return [n for n in _binding.SIGNATURES if not hasattr(_binding.lib, n)]


def _loaded_image(monkeypatch: pytest.MonkeyPatch) -> _binding._Image:
    resolver = _fresh_resolver(monkeypatch)
    module = resolver._module_of_openssl()
    assert module is not None
    image = resolver._load_image(module[0])
    assert isinstance(image, _binding._Image), image
    return image


def test_code_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the code at the address is not the symbol's code, never call it."""
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    image = _loaded_image(monkeypatch)
    image.code["SSL_key_update"] = bytes(b ^ 0xFF for b in image.code["SSL_key_update"])
    resolution, func = _binding.function("SSL_key_update")
    assert func is None
    assert not resolution.available
    assert "the code at SSL_key_update's address is not" in resolution.reason


def test_replaced_file_is_refused_by_build_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A module file replaced on disk since it was loaded (an upgrade)."""
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    image = _loaded_image(monkeypatch)
    if image.build_id_note is None:
        pytest.skip("this build of cryptography has no GNU build ID")
    note = image.build_id_note
    other = _elf.BuildIdNote(note.vaddr, note.size, b"\0" * len(note.build_id))
    monkeypatch.setattr(
        _binding._resolver, "_image", replace(image, build_id_note=other)
    )
    resolution, func = _binding.function("SSL_key_update")
    assert func is None
    assert "different build ID" in resolution.reason


def test_replaced_file_is_refused_by_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    _loaded_image(monkeypatch)
    monkeypatch.setattr(_binding, "_mapped_inode", lambda base: (0, 0))
    resolution, func = _binding.function("SSL_key_update")
    assert func is None
    assert "a different file" in resolution.reason


def test_base_disagreement_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    _fresh_resolver(monkeypatch)
    # dladdr "says" the module is loaded one page further on; the file
    # identity checks are taken as passed, so that the anchors must refuse.
    real_where = _binding._where

    def shifted(address: int) -> tuple[str, int] | None:
        where = real_where(address)
        return None if where is None else (where[0], where[1] + 4096)

    monkeypatch.setattr(_binding, "_where", shifted)
    monkeypatch.setattr(_binding._Resolver, "_same_file", lambda *args: "")
    resolution, func = _binding.function("SSL_get_key_update_type")
    assert func is None
    assert "does not agree" in resolution.reason


def test_unreadable_symbol_table_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    _fresh_resolver(monkeypatch)

    class Broken:
        def __init__(self, path: str) -> None:
            raise _elf.ElfError("not an ELF file")

    monkeypatch.setattr(_elf, "ElfFile", Broken)
    resolution, func = _binding.function("SSL_key_update")
    assert func is None
    assert "cannot read the symbol table" in resolution.reason


def test_unreadable_memory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    _fresh_resolver(monkeypatch)
    monkeypatch.setattr(_binding, "_read_memory", lambda address, size: None)
    resolution, func = _binding.function("SSL_key_update")
    assert func is None
    assert resolution.reason


def test_memory_reads_never_crash() -> None:
    """An unmapped address reads as None (through /proc/self/mem), no SIGSEGV."""
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("needs /proc/self/mem")
    assert _binding._read_memory(8, 16) is None


def test_unavailable_key_update_says_why_and_renegotiation_still_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No dladdr (as on Windows): key update is unavailable, clearly."""
    if not _missing_from_cffi():
        pytest.skip("cryptography's cffi lib already has every function")
    pair = make_pair()
    tls12 = make_pair(SSL.TLS1_2_VERSION)
    _fresh_resolver(monkeypatch)
    monkeypatch.setattr(_binding, "_dladdr", None)

    caps = twisted_rekey.capabilities()
    assert not caps.key_update
    assert caps.renegotiation
    by_name = {f.name: f for f in caps.functions}
    assert "dladdr is not available" in by_name["SSL_key_update"].reason

    with pytest.raises(FunctionUnavailable, match="SSL_key_update") as info:
        pair.client.key_update()
    assert isinstance(info.value, NotImplementedError)
    assert "dladdr" in info.value.reason

    tls12.server.renegotiate()
    tls12.pump()
    assert tls12.server.total_renegotiations() == 1


def test_no_second_openssl_is_loaded() -> None:
    """Resolving every function maps no libssl/libcrypto that was not there."""
    script = textwrap.dedent(
        """
        import re
        def libs():
            with open("/proc/self/maps") as f:
                return {l.split()[-1] for l in f
                        if re.search(r"lib(ssl|crypto)[.-]", l)}
        import OpenSSL.SSL
        before = libs()
        import twisted_rekey
        caps = twisted_rekey.capabilities()
        assert caps.key_update, caps
        print(sorted(libs() - before))
        """
    )
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc")
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"


# -- the ELF reader -------------------------------------------------------------


def test_elf_reader_finds_functions() -> None:
    path = twisted_rekey.capabilities().module_path
    assert path is not None
    found = _elf.find_symbols(path, ["_cffi_d_SSL_read", "no_such_symbol_at_all"])
    assert "no_such_symbol_at_all" not in found
    (sym,) = found["_cffi_d_SSL_read"]
    assert sym.is_function
    assert sym.size > 0
    assert sym.file_offset is not None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not an elf",
        b"\x7fELF" + b"\x00" * 12,
        b"\x7fELF\x02\x01",  # every length of a truncated ELF64 header
        *(b"\x7fELF\x02\x01" + b"\x00" * n for n in (1, 10, 34, 57, 58)),
        b"\x7fELF\x01\x01" + b"\x00" * 40,  # a truncated ELF32 header
    ],
)
def test_elf_reader_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.so"
    bad.write_bytes(content)
    with pytest.raises(_elf.ElfError):
        _elf.find_symbols(str(bad), ["SSL_key_update"])


def test_elf_reader_rejects_odd_symbol_entries(tmp_path: Path) -> None:
    """A symbol table whose entries are not the size of a symbol."""
    path = twisted_rekey.capabilities().module_path
    assert path is not None
    data = bytearray(Path(path).read_bytes())
    with _elf.ElfFile(path) as elf:
        shoff = int.from_bytes(data[0x28:0x30], "little")
        shentsize = int.from_bytes(data[0x3A:0x3C], "little")
        index = next(i for i, s in enumerate(elf.sections) if s.type == 2)
    entsize_at = shoff + index * shentsize + 0x38
    data[entsize_at : entsize_at + 8] = (8).to_bytes(8, "little")
    odd = tmp_path / "odd.so"
    odd.write_bytes(bytes(data))
    with pytest.raises(_elf.ElfError, match="entries of 8 bytes"):
        _elf.find_symbols(str(odd), ["SSL_key_update"])


@given(st.binary(max_size=256))
def test_elf_reader_fuzzed_headers(content: bytes) -> None:
    """Whatever the bytes, the reader answers or raises ElfError."""
    with tempfile.NamedTemporaryFile(suffix=".so") as f:
        f.write(b"\x7fELF\x02\x01\x01" + content)
        f.flush()
        try:
            _elf.find_symbols(f.name, ["SSL_key_update"])
        except _elf.ElfError:
            pass


def test_elf_reader_rejects_truncated_file(tmp_path: Path) -> None:
    path = twisted_rekey.capabilities().module_path
    assert path is not None
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    cut = tmp_path / "cut.so"
    cut.write_bytes(head)
    with pytest.raises(_elf.ElfError):
        _elf.find_symbols(str(cut), ["SSL_key_update"])


def test_elf_reader_on_a_shared_library_dynsym() -> None:
    """The same reader finds exported symbols in an ordinary shared library."""
    import ctypes.util

    libc = ctypes.util.find_library("c")
    candidates = [
        p
        for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6")
        if os.path.exists(p)
    ]
    if not candidates:
        pytest.skip(f"no glibc file found ({libc})")
    found = _elf.find_symbols(candidates[0], ["malloc"])
    assert any(s.table == ".dynsym" and s.is_function for s in found["malloc"])


# -- the dynamic way, exercised on libraries that are really there ----------


def test_dynamic_way_finds_exported_function_of_loaded_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Where OpenSSL is a shared library, its exports are found with dlsym on
    the already-loaded copy.  No shared-libssl build of cryptography is at
    hand, so the same code runs against the C library, which is loaded.
    """
    import ctypes

    malloc = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    assert malloc is not None
    libc = _binding._where(malloc)
    if libc is None:
        pytest.skip("dladdr cannot place malloc")
    resolver = _binding._Resolver()
    resolver._module, resolver._module_checked = libc, True
    address, reason = resolver._by_dynamic("malloc")
    assert reason == ""
    assert address == malloc
    address, reason = resolver._by_dynamic("SSL_no_such_function")
    assert address is None
    assert "does not export SSL_no_such_function" in reason


def test_dynamic_way_never_loads_a_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """RTLD_NOLOAD: a libssl that is not loaded stays unloaded."""
    candidates = [
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/usr/lib/aarch64-linux-gnu/libssl.so.3",
        )
        if os.path.exists(p)
    ]
    if not candidates or not os.path.exists("/proc/self/maps"):
        pytest.skip("no system libssl.so.3 to try")
    script = textwrap.dedent(
        f"""
        import twisted_rekey
        from twisted_rekey import _binding
        path = {candidates[0]!r}
        def mapped():
            with open("/proc/self/maps") as f:
                return path in f.read()
        assert not mapped(), "the system libssl is already loaded"
        resolver = _binding._Resolver()
        resolver._module, resolver._module_checked = (path, 1 << 40), True
        address, reason = resolver._by_dynamic("SSL_key_update")
        print(address, mapped(), reason)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    address, mapped, reason = out.stdout.strip().split(" ", 2)
    assert address == "None"
    assert mapped == "False"
    assert "does not export" in reason


def test_dynamic_way_refuses_the_static_module() -> None:
    resolver = _binding._Resolver()
    if resolver._cffi_module() != resolver._module_of_openssl():
        pytest.skip("OpenSSL is a shared library in this build")
    address, reason = resolver._by_dynamic("SSL_key_update")
    assert address is None
    assert reason == "OpenSSL is linked statically into cryptography"
