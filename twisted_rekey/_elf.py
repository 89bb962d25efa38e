"""
A minimal, read-only ELF reader: named symbols, a function's code, and the
GNU build ID.

cryptography's Linux wheels link OpenSSL statically into one extension module
and keep its ``.symtab``: the OpenSSL functions that cryptography's cffi
``lib`` does not expose are still there, as local symbols.  This module finds
a handful of named symbols in such a file quickly (a general-purpose walk over
its ~36,000 symbols takes over a second; this takes a few milliseconds) by
searching the string table for the names first and the symbol table's name
column for those string offsets second, both with ``bytes.find``.

Everything is read with ``os.pread`` through one open file descriptor, and
every offset and size taken from the file is checked against the file's
length before use: a malformed or truncated file is an :class:`ElfError`,
never a crash (no ``mmap``, so a file truncated meanwhile cannot raise
``SIGBUS``).

It only reads files.  It never loads, maps for execution, or calls anything:
turning a symbol's value into a callable address is ``_binding``'s job, and
``_binding`` verifies that address before it trusts it.
"""

from __future__ import annotations

import array
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ElfError", "ElfFile", "ElfSymbol", "find_symbols", "parse_build_id"]

_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHT_NOBITS = 8
_STT_FUNC = 2
_PT_NOTE = 4
_NT_GNU_BUILD_ID = 3

# Far beyond any real extension module; a header claiming more is garbage.
_MAX_TABLE = 1 << 30


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


@dataclass(frozen=True)
class BuildIdNote:
    """
    Where the ``PT_NOTE`` segment holding the GNU build ID is, and the ID.

    :ivar vaddr: the segment's address relative to the load base.
    :ivar size: the segment's size.
    :ivar build_id: the ID's bytes.
    """

    vaddr: int
    size: int
    build_id: bytes


def parse_build_id(notes: bytes, end: str = "<") -> bytes | None:
    """
    The GNU build ID among the ELF notes in *notes* (a ``PT_NOTE``
    segment's bytes, from the file or from memory), or ``None``.
    """
    offset = 0
    while offset + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from(end + "III", notes, offset)
        offset += 12
        name_end = offset + namesz
        desc_start = offset + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if desc_end > len(notes):
            return None
        if kind == _NT_GNU_BUILD_ID and notes[offset:name_end] == b"GNU\0":
            return bytes(notes[desc_start:desc_end])
        offset = desc_start + ((descsz + 3) & ~3)
    return None


class ElfFile:
    """
    One ELF file, open for reading.  Use as a context manager.

    :raises ElfError: if the file is not an ELF file this reader
        understands, or is malformed.
    :raises OSError: if it cannot be opened or read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.stat = os.fstat(self._fd)
            self.size = self.stat.st_size
            self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> ElfFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, offset: int, size: int) -> bytes:
        """Exactly *size* bytes at *offset*, or :class:`ElfError`."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ElfError(f"{size} bytes at {offset} lie outside the file")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ElfError("the file is shorter than it says (changed meanwhile?)")
        return data

    def _read_header(self) -> None:
        ident = self.read(0, 16) if self.size >= 16 else b""
        if ident[:4] != b"\x7fELF":
            raise ElfError("not an ELF file")
        ei_class, ei_data = ident[4], ident[5]
        if ei_class not in (1, 2) or ei_data not in (1, 2):
            raise ElfError("unknown ELF class or byte order")
        self.is64 = ei_class == 2
        self.end = end = "<" if ei_data == 1 else ">"
        header = self.read(0, 0x40 if self.is64 else 0x34)
        if self.is64:
            phoff, shoff = struct.unpack_from(end + "QQ", header, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(
                end + "HHHH", header, 0x36
            )
            self._shfmt = struct.Struct(end + "IIQQQQIIQQ")
            self._phfmt = struct.Struct(end + "IIQQQQQQ")
            self.entry = struct.Struct(end + "IBBHQQ")
        else:
            phoff, shoff = struct.unpack_from(end + "II", header, 0x1C)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(
                end + "HHHH", header, 0x2A
            )
            self._shfmt = struct.Struct(end + "IIIIIIIIII")
            self._phfmt = struct.Struct(end + "IIIIIIII")
            self.entry = struct.Struct(end + "IIIBBH")
        self._ph = (phoff, phentsize, phnum)
        if shoff == 0 or shnum == 0:
            raise ElfError("the file has no section headers")
        if shentsize < self._shfmt.size:
            raise ElfError("section header entries are too small")
        table = self.read(shoff, shnum * shentsize)
        self.sections = []
        for i in range(shnum):
            (_, typ, _, addr, offset, size, link, _, _, entsize) = (
                self._shfmt.unpack_from(table, i * shentsize)
            )
            self.sections.append(_Section(typ, addr, offset, size, link, entsize))

    # -- symbols ------------------------------------------------------------

    def symbols(self, names: Iterable[str]) -> dict[str, list[ElfSymbol]]:
        """
        Every definition of each name in ``.symtab`` and ``.dynsym``.

        Static functions of the same name in different objects can appear
        more than once; callers must treat an ambiguous name as not found.
        """
        wanted = set(names)
        result: dict[str, list[ElfSymbol]] = {}
        for sec in self.sections:
            if sec.type in (_SHT_SYMTAB, _SHT_DYNSYM):
                table = ".symtab" if sec.type == _SHT_SYMTAB else ".dynsym"
                for name, found in self._symbols_in(sec, table, wanted).items():
                    result.setdefault(name, []).extend(found)
        return result

    def _symbols_in(
        self, table: _Section, table_name: str, wanted: set[str]
    ) -> dict[str, list[ElfSymbol]]:
        entry = self.entry
        if table.entsize not in (0, entry.size):
            raise ElfError(f"{table_name} has entries of {table.entsize} bytes")
        if table.link >= len(self.sections):
            raise ElfError(f"{table_name} names a missing string table")
        strtab = self.sections[table.link]
        if max(strtab.size, table.size) > _MAX_TABLE:
            raise ElfError(f"{table_name} is implausibly large")
        strings = self.read(strtab.offset, strtab.size)
        symbols = self.read(table.offset, table.size - table.size % entry.size)

        # st_name is the first word of every entry: pull that column out once
        # so each search scans a sixth (ELF64) of the table, never misaligned.
        words = array.array("I")
        if words.itemsize != 4:
            raise ElfError("this platform has no 4-byte array type")
        words.frombytes(symbols)
        if (self.end == "<") != (sys.byteorder == "little"):
            words.byteswap()
        column = words[:: entry.size // 4].tobytes()
        native = "<" if sys.byteorder == "little" else ">"

        found: dict[str, list[ElfSymbol]] = {}
        for name in wanted:
            needle = name.encode("ascii") + b"\0"
            # Linkers share string-table tails ("foo" may live inside
            # "_x_foo"): every occurrence is a possible st_name.
            pos = strings.find(needle)
            while pos != -1:
                key = struct.pack(native + "I", pos)
                hit = column.find(key)
                while hit != -1:
                    if hit % 4 == 0:
                        symbol = self._symbol(
                            name, table_name, symbols, hit // 4 * entry.size
                        )
                        if symbol is not None:
                            found.setdefault(name, []).append(symbol)
                    hit = column.find(key, hit + 1)
                pos = strings.find(needle, pos + 1)
        return found

    def _symbol(
        self, name: str, table_name: str, symbols: bytes, pos: int
    ) -> ElfSymbol | None:
        if self.is64:
            _, info, _, shndx, value, size = self.entry.unpack_from(symbols, pos)
        else:
            _, value, size, info, _, shndx = self.entry.unpack_from(symbols, pos)
        if shndx == 0:  # SHN_UNDEF: a reference to the name, not a definition
            return None
        file_offset = None
        if shndx < len(self.sections):
            sec = self.sections[shndx]
            if (
                sec.type != _SHT_NOBITS
                and sec.addr <= value
                and value + size <= sec.addr + sec.size
                and sec.offset + sec.size <= self.size
            ):
                file_offset = value - sec.addr + sec.offset
        is_function = (info & 0xF) == _STT_FUNC
        return ElfSymbol(name, value, size, is_function, file_offset, table_name)

    # -- build ID -----------------------------------------------------------

    def build_id_note(self) -> BuildIdNote | None:
        """The ``PT_NOTE`` segment with the GNU build ID, if the file has one."""
        phoff, phentsize, phnum = self._ph
        if phoff == 0 or phnum == 0:
            return None
        if phentsize < self._phfmt.size:
            raise ElfError("program header entries are too small")
        headers = self.read(phoff, phnum * phentsize)
        for i in range(phnum):
            fields = self._phfmt.unpack_from(headers, i * phentsize)
            if self.is64:
                kind, _, offset, vaddr, _, filesz, _, _ = fields
            else:
                kind, offset, vaddr, _, filesz, _, _, _ = fields
            if kind != _PT_NOTE or filesz > 1 << 16:
                continue
            build_id = parse_build_id(self.read(offset, filesz), self.end)
            if build_id is not None:
                return BuildIdNote(vaddr, filesz, build_id)
        return None


def find_symbols(path: str, names: Iterable[str]) -> dict[str, list[ElfSymbol]]:
    """
    Look up defined symbols by name in the ``.symtab`` and ``.dynsym`` of
    the ELF file at *path*.

    :param path: the file to read.
    :param names: the symbol names wanted.
    :returns: for each name found, every definition of it.
    :raises ElfError: if the file is not an ELF file or is malformed.
    :raises OSError: if the file cannot be read.
    """
    with ElfFile(path) as elf:
        return elf.symbols(names)
