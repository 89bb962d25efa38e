"""
A minimal, read-only ELF symbol-table reader.

cryptography's Linux wheels link OpenSSL statically into one extension module
and keep its ``.symtab``: the OpenSSL functions that cryptography's cffi
``lib`` does not expose are still there, as local symbols.  This module finds
a handful of named symbols in such a file quickly (a general-purpose walk over
its ~36,000 symbols takes over a second; this takes a few milliseconds) by
searching the string table for the names first and the symbol table for those
string offsets second, both with ``bytes.find``.

It only reads files.  It never loads, maps for execution, or calls anything:
turning a symbol's value into a callable address is ``_binding``'s job, and
``_binding`` verifies that address before it trusts it.
"""

from __future__ import annotations

import array
import mmap
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ElfError", "ElfSymbol", "find_symbols"]

_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHT_NOBITS = 8
_STT_FUNC = 2


class ElfError(Exception):
    """The file is not an ELF file this reader understands."""


@dataclass(frozen=True)
class ElfSymbol:
    """
    One symbol as the file describes it.

    :ivar value: the symbol's address relative to the load base.
    :ivar size: its size in bytes.
    :ivar is_function: whether it is ``STT_FUNC``.
    :ivar file_offset: where its bytes start in the file, or ``None`` when its
        section has no bytes in the file.
    :ivar table: ``".symtab"`` or ``".dynsym"``.
    """

    name: str
    value: int
    size: int
    is_function: bool
    file_offset: int | None
    table: str


@dataclass(frozen=True)
class _Section:
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


def _sections(data: mmap.mmap) -> tuple[list[_Section], str, bool]:
    if data[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ElfError("unknown ELF class or byte order")
    is64 = ei_class == 2
    end = "<" if ei_data == 1 else ">"
    if is64:
        shoff, shentsize, shnum = (
            struct.unpack_from(end + "Q", data, 0x28)[0],
            struct.unpack_from(end + "H", data, 0x3A)[0],
            struct.unpack_from(end + "H", data, 0x3C)[0],
        )
        shfmt = end + "IIQQQQIIQQ"
    else:
        shoff, shentsize, shnum = (
            struct.unpack_from(end + "I", data, 0x20)[0],
            struct.unpack_from(end + "H", data, 0x2E)[0],
            struct.unpack_from(end + "H", data, 0x30)[0],
        )
        shfmt = end + "IIIIIIIIII"
    if shoff == 0 or shnum == 0:
        raise ElfError("the file has no section headers")
    if shoff + shnum * shentsize > len(data) or shentsize < struct.calcsize(shfmt):
        raise ElfError("section headers run past the end of the file")
    sections = []
    for i in range(shnum):
        (_, typ, _, addr, offset, size, link, _, _, entsize) = struct.unpack_from(
            shfmt, data, shoff + i * shentsize
        )
        sections.append(_Section(typ, addr, offset, size, link, entsize))
    return sections, end, is64


def _symbol(
    name: str,
    table_name: str,
    symbols: bytes,
    pos: int,
    entry: struct.Struct,
    sections: list[_Section],
) -> ElfSymbol | None:
    if entry.size == 24:  # ELF64
        _, info, _, shndx, value, size = entry.unpack_from(symbols, pos)
    else:
        _, value, size, info, _, shndx = entry.unpack_from(symbols, pos)
    if shndx == 0:  # SHN_UNDEF: a reference to the name, not a definition
        return None
    file_offset = None
    if shndx < len(sections):
        sec = sections[shndx]
        if sec.type != _SHT_NOBITS and sec.addr <= value < sec.addr + sec.size:
            file_offset = value - sec.addr + sec.offset
    is_function = (info & 0xF) == _STT_FUNC
    return ElfSymbol(name, value, size, is_function, file_offset, table_name)


def _symbols_in(
    data: mmap.mmap,
    sections: list[_Section],
    table: _Section,
    table_name: str,
    end: str,
    is64: bool,
    wanted: set[str],
) -> dict[str, list[ElfSymbol]]:
    if table.link >= len(sections):
        raise ElfError(f"{table_name} names a missing string table")
    strtab = sections[table.link]
    if strtab.offset + strtab.size > len(data) or table.offset + table.size > len(data):
        raise ElfError(f"{table_name} runs past the end of the file")
    strings = data[strtab.offset : strtab.offset + strtab.size]
    symbols = data[table.offset : table.offset + table.size]
    entsize = table.entsize or (24 if is64 else 16)
    if is64:
        entry = struct.Struct(end + "IBBHQQ")
    else:
        entry = struct.Struct(end + "IIIBBH")

    # st_name is the first word of every entry: pull that column out once so
    # each search scans a fifth (ELF64) of the table, and never misaligned.
    words = array.array("I")
    usable = len(symbols) - len(symbols) % entsize
    if entsize % 4 or words.itemsize != 4:
        raise ElfError(f"{table_name} has an unusual entry size")
    words.frombytes(symbols[:usable])
    if (end == "<") != (sys.byteorder == "little"):
        words.byteswap()
    column = words[:: entsize // 4].tobytes()
    native = "<" if sys.byteorder == "little" else ">"

    found: dict[str, list[ElfSymbol]] = {}
    for name in wanted:
        needle = name.encode("ascii") + b"\0"
        # Linkers share string-table tails ("foo" may live inside "_x_foo"),
        # so every occurrence is a possible st_name, not just those after NUL.
        pos = strings.find(needle)
        while pos != -1:
            key = struct.pack(native + "I", pos)
            hit = column.find(key)
            while hit != -1:
                if hit % 4 == 0:
                    symbol = _symbol(
                        name, table_name, symbols, hit // 4 * entsize, entry, sections
                    )
                    if symbol is not None:
                        found.setdefault(name, []).append(symbol)
                hit = column.find(key, hit + 1)
            pos = strings.find(needle, pos + 1)
    return found


def find_symbols(path: str, names: Iterable[str]) -> dict[str, list[ElfSymbol]]:
    """
    Look up defined symbols by name in the ``.symtab`` and ``.dynsym`` of
    the ELF file at *path*.

    :param path: the file to read.
    :param names: the symbol names wanted.
    :returns: for each name found, every definition of it (static functions of
        the same name in different objects can appear more than once; callers
        must treat an ambiguous name as not found).
    :raises ElfError: if the file is not an ELF file or is malformed.
    :raises OSError: if the file cannot be read.
    """
    wanted = set(names)
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise ElfError(str(e)) from None
    with data:
        sections, end, is64 = _sections(data)
        result: dict[str, list[ElfSymbol]] = {}
        for sec in sections:
            if sec.type in (_SHT_SYMTAB, _SHT_DYNSYM):
                name = ".symtab" if sec.type == _SHT_SYMTAB else ".dynsym"
                for sym_name, syms in _symbols_in(
                    data, sections, sec, name, end, is64, wanted
                ).items():
                    result.setdefault(sym_name, []).extend(syms)
        return result


def read_bytes(path: str, offset: int, size: int) -> bytes:
    """
    Read *size* bytes at *offset* of the file at *path*.

    :returns: the bytes (fewer at the end of the file).
    """
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
