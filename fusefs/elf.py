"""What the dynamic loader reads of an ELF file, and which libraries it loads next.

Loading a library, ``ld.so`` reads its first page (headers), maps its segments, and then touches
at once the pages of the dynamic section and of the writable segment (relocations are written
there: ``.got``, ``.data.rel.ro``), which for a large library sit megabytes into the file; then it
loads each ``DT_NEEDED`` library the same way, one after another. On a lazily fetched layer
that is a round trip per step; knowing them from the headers, they can be fetched together.

Parsing only: 64-bit little-endian ELF (x86-64, aarch64); anything else, or anything that does
not add up, yields None. Also the ``ld.so.cache`` reader that maps a soname to its path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"\x7fELF"
HEADER_BYTES = 64
_PT_LOAD, _PT_DYNAMIC = 1, 2
_PF_W = 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29
_PHDR = struct.Struct("<IIQQQQQQ")
_DYN = struct.Struct("<qQ")
_MAX_PHDRS = 256
_MAX_DYNAMIC = 4096  # entries


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int
    writable: bool


@dataclass(frozen=True)
class Layout:
    """The loadable segments and the dynamic section (file offset and size) of an ELF file."""

    segments: tuple[Segment, ...]
    dynamic: tuple[int, int] | None

    def file_offset(self, vaddr: int) -> int | None:
        """The file offset of virtual address ``vaddr``, if a segment holds it in the file."""
        for segment in self.segments:
            if segment.vaddr <= vaddr < segment.vaddr + segment.filesz:
                return segment.offset + vaddr - segment.vaddr
        return None

    def touched(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of what the loader reads right after the headers: the dynamic
        section and the writable segments' file bytes."""
        ranges = [(s.offset, s.filesz) for s in self.segments if s.writable and s.filesz > 0]
        if self.dynamic is not None:
            ranges.append(self.dynamic)
        return ranges


@dataclass(frozen=True)
class Dynamic:
    """The dynamic section's string references: offsets into the string table at ``strtab``."""

    needed: tuple[int, ...]
    search: tuple[int, ...]  # DT_RUNPATH, or DT_RPATH without one
    strtab: int  # file offset
    strsz: int


def layout(head: bytes, size: int) -> Layout | None:
    """The layout of an ELF file of ``size`` bytes from its first bytes (headers included)."""
    if len(head) < HEADER_BYTES or head[:4] != MAGIC or head[4] != 2 or head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phentsize != _PHDR.size or phnum > _MAX_PHDRS or phoff + phnum * phentsize > len(head):
        return None
    segments: list[Segment] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, flags, offset, vaddr, _, filesz, _, _ = _PHDR.unpack_from(head, phoff + i * phentsize)
        if offset + filesz > size:
            return None
        if p_type == _PT_LOAD:
            segments.append(Segment(offset, vaddr, filesz, bool(flags & _PF_W)))
        elif p_type == _PT_DYNAMIC and filesz <= _MAX_DYNAMIC * _DYN.size:
            dynamic = (offset, filesz)
    return Layout(tuple(segments), dynamic)


def dynamic_entries(data: bytes, elf: Layout) -> Dynamic | None:
    """The needed libraries and search paths named by a dynamic section's bytes."""
    needed: list[int] = []
    runpath: list[int] = []
    rpath: list[int] = []
    strtab = strsz = None
    for pos in range(0, len(data) - _DYN.size + 1, _DYN.size):
        tag, value = _DYN.unpack_from(data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag == _DT_RUNPATH:
            runpath.append(value)
        elif tag == _DT_RPATH:
            rpath.append(value)
        elif tag == _DT_STRTAB:
            strtab = elf.file_offset(value)
        elif tag == _DT_STRSZ:
            strsz = value
    if strtab is None or strsz is None:
        return None
    return Dynamic(tuple(needed), tuple(runpath or rpath), strtab, strsz)


def string_at(strtab: bytes, offset: int) -> bytes | None:
    """The NUL-terminated string at ``offset`` of a string table, if it ends inside it."""
    end = strtab.find(b"\0", offset)
    return strtab[offset:end] if 0 <= offset < len(strtab) and end >= 0 else None


_CACHE_MAGIC = b"glibc-ld.so.cache1.1"
_CACHE_HEADER = struct.Struct("<20sII")
_CACHE_ENTRY = struct.Struct("<iIIIQ")


def ld_so_cache(data: bytes) -> dict[bytes, bytes]:
    """soname → absolute path, from an ``/etc/ld.so.cache`` (glibc's format; the first entry of
    a soname wins, as in the loader's lookup). Empty if the data is not such a cache."""
    start = data.find(_CACHE_MAGIC)
    if start < 0 or start + _CACHE_HEADER.size > len(data):
        return {}
    _, count, _ = _CACHE_HEADER.unpack_from(data, start)
    entries = start + 48
    if entries + count * _CACHE_ENTRY.size > len(data):
        return {}
    out: dict[bytes, bytes] = {}
    for i in range(count):
        _, key, value, _, _ = _CACHE_ENTRY.unpack_from(data, entries + i * _CACHE_ENTRY.size)
        name, path = string_at(data, start + key), string_at(data, start + value)
        if name and path and path.startswith(b"/"):
            out.setdefault(name, path)
    return out
