"""The TOC as a compact, read-only index: parallel arrays indexed by entry number.

A layer with 100k entries must not cost a Python object per field, so every per-entry field
lives in an :mod:`array` (or a packed ``bytes`` blob) and is read through accessor methods that
take the entry index. Entry 0 is the layer root. Only entries that carry xattrs cost a Python
object of their own. :class:`Entry` is a convenience view built on demand.

The index is immutable after :func:`estargz.parse_toc` builds it and may be read from any thread.
"""

from __future__ import annotations

import enum
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._chunks import Codec
    from ._footer import Footer

__all__ = ["ROOT", "TOC", "Chunk", "Entry", "EntryType", "TOCStatistics"]

ROOT = 0


class EntryType(enum.IntEnum):
    """File type of an entry (``chunk`` entries are folded into their file)."""

    DIR = 0
    REG = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    EntryType.DIR: "dir",
    EntryType.REG: "reg",
    EntryType.SYMLINK: "symlink",
    EntryType.HARDLINK: "hardlink",
    EntryType.CHAR: "char",
    EntryType.BLOCK: "block",
    EntryType.FIFO: "fifo",
}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently decodable piece of a regular file.

    Attributes:
        file_offset: where the chunk starts in the file.
        size: uncompressed bytes of the chunk.
        compressed_offset: blob offset of the gzip member / zstd frame that holds it.
        compressed_end: blob offset where that compressed stream ends (exclusive).
        inner_offset: uncompressed bytes to skip after decoding from ``compressed_offset``.
        digest: ``sha256:<hex>`` of the chunk's bytes, or None when the TOC gives no way to
            verify this chunk alone (legacy multi-chunk files: verify the whole file).
        hole: the chunk is ``size`` zero bytes with nothing in the blob (zstd:chunked ``zeros``).
    """

    file_offset: int
    size: int
    compressed_offset: int
    compressed_end: int
    inner_offset: int
    digest: str | None
    hole: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    """A materialised view of one entry (built on demand; the TOC does not store these)."""

    index: int
    path: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime: int
    mtime_nsec: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    digest: str | None
    nlink: int


class TOC:
    """A parsed, indexed eStargz / zstd:chunked TOC. Build it with :func:`estargz.parse_toc`.

    Attributes:
        digest: ``sha256:`` of the uncompressed TOC JSON (the ``stargz/toc.digest`` annotation).
        manifest_checksum: ``sha256:`` of the compressed TOC for zstd:chunked, else None.
        footer: the footer the TOC was found through.
        codec: how data chunks are compressed.
        json_size: bytes of the uncompressed TOC JSON.
        prefetch_landmark_offset: blob offset of ``.prefetch.landmark``: ``[0, offset)`` is the
            prioritized set to prefetch. None when the blob has no such landmark.
        no_prefetch_landmark: the blob has ``.no.prefetch.landmark`` (converted without a profile).
        tar_split_digest: the ``tarSplitDigest`` field of containers/storage TOCs, if any.
    """

    __slots__ = (
        "_child_list",
        "_child_start",
        "_chunk_digest",
        "_chunk_end",
        "_chunk_file_off",
        "_chunk_flags",
        "_chunk_inner",
        "_chunk_off",
        "_chunk_size",
        "_chunk_start",
        "_dev",
        "_digest",
        "_gid",
        "_gname",
        "_hardlinks",
        "_link",
        "_link_blob",
        "_link_off",
        "_mode",
        "_mtime",
        "_mtime_nsec",
        "_name_blob",
        "_name_off",
        "_owner_names",
        "_parent",
        "_size",
        "_type",
        "_uid",
        "_uname",
        "_xattrs",
        "codec",
        "digest",
        "footer",
        "json_size",
        "manifest_checksum",
        "no_prefetch_landmark",
        "prefetch_landmark_offset",
        "tar_split_digest",
    )

    # Filled field by field by the builder in _index.py.
    _type: array[int]
    _mode: array[int]
    _uid: array[int]
    _gid: array[int]
    _uname: array[int]
    _gname: array[int]
    _owner_names: list[str]
    _size: array[int]
    _mtime: array[int]
    _mtime_nsec: array[int]
    _dev: array[int]
    _parent: array[int]
    _link: array[int]
    _hardlinks: dict[int, int]
    _name_off: array[int]
    _name_blob: bytes
    _link_off: array[int]
    _link_blob: bytes
    _digest: bytes
    _xattrs: dict[int, tuple[tuple[str, bytes], ...]]
    _chunk_start: array[int]
    _chunk_file_off: array[int]
    _chunk_size: array[int]
    _chunk_off: array[int]
    _chunk_end: array[int]
    _chunk_inner: array[int]
    _chunk_flags: array[int]
    _chunk_digest: bytes
    _child_start: array[int]
    _child_list: array[int]
    digest: str
    manifest_checksum: str | None
    footer: Footer
    codec: Codec
    json_size: int
    prefetch_landmark_offset: int | None
    no_prefetch_landmark: bool
    tar_split_digest: str | None

    def __len__(self) -> int:
        """Number of entries, root and implicit directories included."""
        return len(self._type)

    # -- per-entry fields -------------------------------------------------------------------
    def name_bytes(self, i: int) -> bytes:
        """The last path component of entry ``i`` as UTF-8 (b"" for the root)."""
        return self._name_blob[self._name_off[i] : self._name_off[i + 1]]

    def name(self, i: int) -> str:
        return self.name_bytes(i).decode()

    def path(self, i: int) -> str:
        """Normalised path: no leading or trailing ``/``, never ``..``; "" for the root."""
        parts: list[bytes] = []
        while i > ROOT:
            parts.append(self.name_bytes(i))
            i = self._parent[i]
        return b"/".join(reversed(parts)).decode()

    def type(self, i: int) -> EntryType:
        return EntryType(self._type[i])

    def mode(self, i: int) -> int:
        """Permission bits including setuid, setgid and sticky (never the file type bits)."""
        return self._mode[i]

    def uid(self, i: int) -> int:
        return self._uid[i]

    def gid(self, i: int) -> int:
        return self._gid[i]

    def uname(self, i: int) -> str:
        """User name (informational, filled in per uid as upstream does), or ""."""
        k = self._uname[i]
        return self._owner_names[k] if k >= 0 else ""

    def gname(self, i: int) -> str:
        k = self._gname[i]
        return self._owner_names[k] if k >= 0 else ""

    def size(self, i: int) -> int:
        """File size of a regular file (0 for other types, hardlinks included)."""
        return self._size[i]

    def mtime(self, i: int) -> tuple[int, int]:
        """Modification time as (seconds since the epoch, nanoseconds)."""
        return self._mtime[i], self._mtime_nsec[i]

    def linkname(self, i: int) -> str:
        """Symlink target as written, or the normalised path a hardlink points to."""
        return self._link_blob[self._link_off[i] : self._link_off[i + 1]].decode()

    def link_target(self, i: int) -> int:
        """For a hardlink, the index of the entry that holds the data; else ``i`` itself."""
        target = self._link[i]
        return target if target >= 0 else i

    def device(self, i: int) -> tuple[int, int]:
        """(major, minor) of a char or block device; (0, 0) otherwise."""
        return self._dev[2 * i], self._dev[2 * i + 1]

    def xattrs(self, i: int) -> dict[str, bytes]:
        return dict(self._xattrs.get(i, ()))

    def file_digest(self, i: int) -> str | None:
        """``sha256:<hex>`` of a regular file's whole content, or None if the TOC gives none."""
        raw = self._digest[32 * i : 32 * i + 32]
        return None if raw == _NO_DIGEST else "sha256:" + raw.hex()

    def nlink(self, i: int) -> int:
        """Link count: hardlinks share their target's count; directories count subdirectories."""
        if self._type[i] == EntryType.DIR:
            return 2 + sum(1 for c in self.children(i) if self._type[c] == EntryType.DIR)
        return 1 + self._hardlinks.get(self.link_target(i), 0)

    def chunk_count(self, i: int) -> int:
        i = self.link_target(i)
        return self._chunk_start[i + 1] - self._chunk_start[i]

    def chunks(self, i: int) -> list[Chunk]:
        """The chunks of a regular file (through a hardlink: of its target), in file order."""
        i = self.link_target(i)
        return [self._chunk(k) for k in range(self._chunk_start[i], self._chunk_start[i + 1])]

    def _chunk(self, k: int) -> Chunk:
        flags = self._chunk_flags[k]
        raw = self._chunk_digest[32 * k : 32 * k + 32]
        return Chunk(
            file_offset=self._chunk_file_off[k],
            size=self._chunk_size[k],
            compressed_offset=self._chunk_off[k],
            compressed_end=self._chunk_end[k],
            inner_offset=self._chunk_inner[k],
            digest=None if raw == _NO_DIGEST else "sha256:" + raw.hex(),
            hole=bool(flags & CHUNK_HOLE),
        )

    def entry(self, i: int) -> Entry:
        """All fields of entry ``i`` in one object."""
        sec, nsec = self.mtime(i)
        major, minor = self.device(i)
        return Entry(
            index=i,
            path=self.path(i),
            type=self.type(i),
            mode=self.mode(i),
            uid=self.uid(i),
            gid=self.gid(i),
            uname=self.uname(i),
            gname=self.gname(i),
            size=self.size(i),
            mtime=sec,
            mtime_nsec=nsec,
            linkname=self.linkname(i),
            devmajor=major,
            devminor=minor,
            xattrs=self.xattrs(i),
            digest=self.file_digest(i),
            nlink=self.nlink(i),
        )

    # -- tree -------------------------------------------------------------------------------
    def parent(self, i: int) -> int:
        """Parent directory index (the root is its own parent)."""
        return self._parent[i]

    def children(self, i: int) -> array[int]:
        """Indices of the entries directly under directory ``i``, sorted by UTF-8 name."""
        return self._child_list[self._child_start[i] : self._child_start[i + 1]]

    def lookup(self, path: str) -> int | None:
        """Index of the entry at ``path`` (leading/trailing ``/`` ignored), or None."""
        i = ROOT
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if self._type[i] != EntryType.DIR:
                return None
            want = part.encode(errors="surrogateescape")
            lo, hi = self._child_start[i], self._child_start[i + 1]
            k = bisect_left(self._child_list, want, lo, hi, key=self.name_bytes)
            if k == hi or self.name_bytes(self._child_list[k]) != want:
                return None
            i = self._child_list[k]
        return i

    def iter_tree(self) -> Iterator[int]:
        """Every entry reachable from the root (root excluded), parents before children."""
        stack = [ROOT]
        while stack:
            i = stack.pop()
            kids = self.children(i)
            yield from kids
            stack.extend(reversed([k for k in kids if self._type[k] == EntryType.DIR]))

    def statistics(self) -> TOCStatistics:
        """Sizes of the index (for benchmarks and metrics)."""
        total = len(self._name_blob) + len(self._link_blob) + len(self._digest) + len(self._chunk_digest)
        for name in _ARRAY_FIELDS:
            arr: array[int] = getattr(self, name)
            total += arr.itemsize * len(arr)
        return TOCStatistics(entries=len(self), chunks=len(self._chunk_off), buffer_bytes=total)


@dataclass(frozen=True, slots=True)
class TOCStatistics:
    """Size of a :class:`TOC`: entries (root and implicit dirs included), chunks, and the bytes of
    its arrays and blobs (the xattr dict and owner names are not counted)."""

    entries: int
    chunks: int
    buffer_bytes: int


_ARRAY_FIELDS = (
    "_type",
    "_mode",
    "_uid",
    "_gid",
    "_uname",
    "_gname",
    "_size",
    "_mtime",
    "_mtime_nsec",
    "_dev",
    "_parent",
    "_link",
    "_name_off",
    "_link_off",
    "_chunk_start",
    "_chunk_file_off",
    "_chunk_size",
    "_chunk_off",
    "_chunk_end",
    "_chunk_inner",
    "_chunk_flags",
    "_child_start",
    "_child_list",
)
CHUNK_HOLE = 1
_NO_DIGEST = bytes(32)
