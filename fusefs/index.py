"""LayerIndex: the format-neutral, compact, immutable file tree of one layer and its chunks.

Every format reader (eStargz, zstd:chunked, later SOCI and nydus) feeds an :class:`IndexBuilder`
with paths, attributes and chunks, one entry at a time or a whole tree in :class:`Columns`, and
gets an :class:`UnverifiedIndex`; the builder's ``build`` is the one place that checks what a
reader read (sizes, symlink targets, xattrs, chunk bounds and coverage) and packs it. Only
:meth:`UnverifiedIndex.verify` (the TOC digest equals the expected one) or an explicit, logged
:meth:`UnverifiedIndex.skip_verification` yields a :class:`LayerIndex`, the only type the FUSE
side accepts.

Memory layout: nodes are integers (root = 0, breadth-first order, children sorted by name), their
attributes live in parallel ``array.array`` columns, directory entries are contiguous slices of
an entry table whose names sit in one ``bytes`` blob, and chunks are parallel columns plus one
packed buffer of 32-byte digests. Only rare things (xattrs, symlink targets) use dicts. A
hardlink is a second entry pointing at the same node. Whiteouts are char 0/0 nodes and opaque
directories carry the overlay opaque xattr, as overlayfs expects of a lower layer.
"""

from __future__ import annotations

import bisect
import enum
import hmac
import logging
import operator
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate, chain, compress, islice, pairwise, repeat
from typing import Any, NewType, NoReturn

from fusefs.errors import FormatError, IntegrityError, UnsupportedFormat

log = logging.getLogger(__name__)

NodeId = NewType("NodeId", int)
ChunkId = NewType("ChunkId", int)

ROOT = NodeId(0)
TRUSTED_OPAQUE_XATTR = b"trusted.overlay.opaque"
USER_OPAQUE_XATTR = b"user.overlay.opaque"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

MAX_NAME = 255
MAX_PATH = 4096
MAX_FILE_SIZE = 1 << 44  # 16 TiB: anything larger is a lie in the index
DEFAULT_MAX_CHUNK_SIZE = 64 << 20
DEFAULT_MAX_ENTRIES = 4_000_000
MAX_XATTR_VALUE = 64 << 10


class Codec(enum.IntEnum):
    """How a chunk's compressed bytes decode."""

    RAW = 0
    GZIP = 1  # one gzip member (possibly followed by more)
    ZSTD = 2  # one zstd frame
    DEFLATE_ZRAN = 3  # raw deflate resumed from a zran checkpoint (SOCI, nydus zran)
    LZ4_BLOCK = 4  # nydus


@dataclass(frozen=True, slots=True)
class NodeAttr:
    """The attributes of one node, as FUSE reports them."""

    mode: int  # including the S_IFMT type bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    nlink: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One verifiable piece of a regular file.

    ``file_offset``/``size`` are uncompressed; the compressed bytes are
    ``blob[blob_offset:blob_end]``, decoded with ``codec``; the chunk starts ``inner_offset``
    bytes into the decoded stream; ``digest`` is the raw sha256 of the ``size`` bytes.
    """

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    inner_offset: int
    codec: Codec
    digest: bytes

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()


def split_path(path: str) -> tuple[bytes, ...]:
    """Clean a path from an index into name components; refuse escapes and absurd names.

    Raises:
        FormatError: ``..`` components, empty result for a non-root, overlong names or paths.
    """
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PATH or b"\0" in raw:
        raise FormatError(f"invalid path in index: {path[:80]!r}")
    parts: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise FormatError(f"path escapes the layer root: {path[:200]!r}")
        if len(part) > MAX_NAME:
            raise FormatError(f"name longer than {MAX_NAME} bytes: {path[:80]!r}")
        parts.append(part)
    return tuple(parts)


_S_IFMT = 0o170000
_NODE_TYPES = frozenset({stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO})
_ENTRY_TYPECODES = "IIIQqQ"  # the entry columns: mode, uid, gid, size, mtime_ns, rdev
_CHUNK_TYPECODES = "QQQQQ"  # file offset, size, blob offset, blob end, inner offset
_NO_DIGEST = bytes(32)
# chunk columns (file offset, size, blob offset, blob end, inner offset, codec) and 32-byte digests
_ChunkColumns = tuple[tuple["array[int]", ...], bytes | bytearray]


@dataclass(slots=True)
class Columns:
    """A whole layer tree in columns, for :meth:`IndexBuilder.load`: no Python object per entry.

    Entries are numbered from 0, the root (a directory). Per entry: ``mode`` (the ``S_IF*`` type
    and the 0o7777 bits), ``uid``, ``gid``, ``size`` (of a regular file; 0 for the others),
    ``mtime_ns`` and ``rdev``, in arrays of typecodes ``I I I Q q Q``; ``targets`` holds every
    symlink's target, ``xattrs`` the entries that have some.

    The tree: the entries of directory ``d`` are ``child_list[child_start[d]:child_start[d + 1]]``,
    sorted by name, names unique and valid (the reader's own invariants, not checked again); entry
    ``e`` is named ``names[name_off[e]:name_off[e + 1]]``.
    Entries in ``skip`` are left out (the reader applies them afterwards through the builder's
    methods: whiteouts, hardlinks).

    The chunks of regular file ``e`` are ``chunk_start[e]:chunk_start[e + 1]`` of the chunk
    columns (typecode ``Q``), in file order, all decoded with ``codec``; ``digests`` holds the 32
    raw sha256 bytes of each.

    The builder takes the arrays and dicts over (it appends the entries added later to them) and
    checks every value when it packs, as for entries added one by one.
    """

    mode: array[int]
    uid: array[int]
    gid: array[int]
    size: array[int]
    mtime_ns: array[int]
    rdev: array[int]
    targets: dict[int, bytes]
    xattrs: dict[int, dict[bytes, bytes]]
    names: bytes
    name_off: array[int]
    child_start: array[int]
    child_list: array[int]
    chunk_start: array[int]
    chunk_file_offset: array[int]
    chunk_size: array[int]
    chunk_blob_offset: array[int]
    chunk_blob_end: array[int]
    chunk_inner_offset: array[int]
    codec: Codec
    digests: bytes
    skip: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class EntryHandle:
    """An entry being built, as returned by :meth:`IndexBuilder.add`."""

    ref: int


class IndexBuilder:
    """Collects the entries of a layer; ``build`` checks them and packs them into an UnverifiedIndex.

    Two ways in, one packing: entry by entry (:meth:`add`, :meth:`add_child`,
    :meth:`add_chunk_to`, ...) for readers that meet entries one at a time, or a whole tree in
    columns (:meth:`load`, for readers whose index already is one, like the eStargz TOC: no
    Python object per entry) followed by entries one at a time. Entries live in columns either
    way; a directory's entries are its loaded, sorted slice overlaid by the names added since.

    Later entries for the same path replace earlier ones (tar semantics), except that a
    directory re-declared as a directory keeps its children. Missing parents are created as
    0755 root-owned directories. The methods refuse what cannot be recorded (bad names, paths
    through a non-directory, hardlinks to missing entries or directories, malformed digests,
    integers the columns cannot hold, too many entries); :meth:`build` checks every value of the
    resulting tree, whichever way it came in (file types, sizes, symlink targets, xattrs, chunk
    bounds, chunk coverage of each file). Bad input raises ``FormatError``, or
    ``UnsupportedFormat`` for a chunk without a digest.
    """

    def __init__(
        self,
        *,
        blob_size: int,
        opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    ) -> None:
        self._blob_size = blob_size
        self._opaque_xattr = opaque_xattr
        self._max_entries = max_entries
        self._max_chunk_size = max_chunk_size
        self._count = 0
        # entries, by ref (0: the root)
        self._mode = array("I", [stat.S_IFDIR | 0o755])
        self._uid = array("I", [0])
        self._gid = array("I", [0])
        self._size = array("Q", [0])
        self._mtime = array("q", [0])
        self._rdev = array("Q", [0])
        self._targets: dict[int, bytes] = {}
        self._xattrs: dict[int, dict[bytes, bytes]] = {}
        # directory entries: the loaded tree's (refs below ``_loaded``), overlaid by ``_added``
        self._tree: Columns | None = None
        self._loaded = 0
        self._added: dict[int, dict[bytes, int]] = {}
        # chunks, by chunk id: a loaded file owns a range of them, the others list theirs
        self._c_file_off = array("Q")
        self._c_size = array("Q")
        self._c_blob_off = array("Q")
        self._c_blob_end = array("Q")
        self._c_inner = array("Q")
        self._c_codec = array("B")
        self._c_digest: bytes | bytearray = bytearray()
        self._file_chunks: dict[int, list[int]] = {}

    # -- a whole tree at once ------------------------------------------------------------

    def load(self, tree: Columns) -> None:
        """Start from a tree in columns (see :class:`Columns`); only on a fresh builder."""
        n = len(tree.mode)
        columns = (tree.mode, tree.uid, tree.gid, tree.size, tree.mtime_ns, tree.rdev)
        chunks = (tree.chunk_file_offset, tree.chunk_size, tree.chunk_blob_offset, tree.chunk_blob_end,
                  tree.chunk_inner_offset)
        if (self._tree is not None or len(self._mode) != 1 or self._added or self._xattrs
                or self._c_size):
            raise ValueError("IndexBuilder.load needs a fresh builder")
        if ("".join(c.typecode for c in columns) != _ENTRY_TYPECODES
                or "".join(c.typecode for c in chunks) != _CHUNK_TYPECODES
                or any(len(c) != n for c in columns)
                or not len(tree.name_off) == len(tree.child_start) == len(tree.chunk_start) == n + 1
                or any(len(c) != len(tree.chunk_size) for c in chunks)
                or len(tree.digests) != 32 * len(tree.chunk_size)):
            raise ValueError("IndexBuilder.load: columns of the wrong type or length")
        if not n or tree.mode[ROOT] & _S_IFMT != stat.S_IFDIR:
            raise FormatError("layer root is not a directory")
        self._bump(len(tree.child_list) - len(tree.skip))
        self._mode, self._uid, self._gid, self._size, self._mtime, self._rdev = columns
        self._targets, self._xattrs = tree.targets, tree.xattrs
        self._c_file_off, self._c_size, self._c_blob_off, self._c_blob_end, self._c_inner = chunks
        self._c_codec = array("B", bytes([tree.codec]) * len(tree.chunk_size))
        self._c_digest = tree.digests
        self._tree = tree
        self._loaded = n

    # -- entries one at a time -------------------------------------------------------------

    @property
    def root(self) -> EntryHandle:
        """The layer root, as a parent for :meth:`add_child`."""
        return EntryHandle(ROOT)

    def add(
        self,
        path: str,
        file_type: int,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime_ns: int = 0,
        target: str = "",
        rdev: int = 0,
        xattrs: Mapping[bytes, bytes] | None = None,
    ) -> EntryHandle:
        """Add one entry; ``file_type`` is an ``stat.S_IF*`` constant, ``mode`` the 0o7777 bits.

        Returns a handle for :meth:`add_chunk_to` and :meth:`add_child`.
        """
        parts = split_path(path)
        if not parts:  # the root itself: keep its identity and children, take its attributes
            if file_type != stat.S_IFDIR:
                raise FormatError("layer root is not a directory")
            self._put(ROOT, path, (file_type | (mode & 0o7777), uid, gid, 0, mtime_ns, self._rdev[ROOT]))
            if xattrs:
                self._xattrs.setdefault(ROOT, {}).update(xattrs)
            return EntryHandle(ROOT)
        return self._insert(self._parent(parts), parts[-1], path, file_type, mode, uid, gid, size, mtime_ns,
                            target, rdev, xattrs)

    def add_child(
        self,
        parent: EntryHandle,
        name: bytes,
        file_type: int,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime_ns: int = 0,
        target: str = "",
        rdev: int = 0,
        xattrs: Mapping[bytes, bytes] | None = None,
    ) -> EntryHandle:
        """Like :meth:`add`, under an already added directory: no path to split and resolve."""
        if (not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > MAX_NAME
                or not self._is_dir(parent.ref)):
            raise FormatError(f"invalid entry name {name[:80]!r} or parent")
        return self._insert(parent.ref, name, name.decode("utf-8", "replace"), file_type, mode, uid, gid,
                            size, mtime_ns, target, rdev, xattrs)

    def _insert(self, parent: int, name: bytes, what: str, file_type: int, mode: int, uid: int, gid: int,
                size: int, mtime_ns: int, target: str, rdev: int,
                xattrs: Mapping[bytes, bytes] | None) -> EntryHandle:
        if file_type != stat.S_IFREG:
            size = 0
        row = (file_type | (mode & 0o7777), uid, gid, size, mtime_ns, rdev)
        old = self._child(parent, name)
        if file_type == stat.S_IFDIR and old is not None and self._is_dir(old):
            ref = self._put(old, what, row)  # a directory declared again keeps its children
            self._xattrs.pop(ref, None)
        else:
            ref = self._put(None, what, row)
            if old is None:
                self._bump()
            self._added.setdefault(parent, {})[name] = ref
        if xattrs:
            self._xattrs[ref] = dict(xattrs)
        if file_type == stat.S_IFLNK:
            self._targets[ref] = target.encode("utf-8", "surrogateescape")
        return EntryHandle(ref)

    def _put(self, ref: int | None, what: str, row: tuple[int, ...]) -> int:
        """Write an entry's columns at ``ref``, or as a new entry if None; returns its ref."""
        columns = (self._mode, self._uid, self._gid, self._size, self._mtime, self._rdev)
        new = len(self._mode)
        try:
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        except (OverflowError, TypeError):
            for column in columns:
                del column[new:]
            raise FormatError(f"attribute out of range for {what[:80]!r}: {row}") from None
        if ref is None:
            return new
        for column in columns:
            column[ref] = column.pop()
        return ref

    def add_hardlink(self, path: str, target: str) -> None:
        """Make ``path`` a second name of the earlier entry ``target``."""
        ref = self._find(split_path(target))
        if ref is None or self._is_dir(ref):
            raise FormatError(f"hardlink {path[:80]!r} to missing or directory entry {target[:80]!r}")
        parts = split_path(path)
        if not parts:
            raise FormatError("hardlink at the layer root")
        parent = self._parent(parts)
        if self._child(parent, parts[-1]) is None:
            self._bump()
        self._added.setdefault(parent, {})[parts[-1]] = ref

    def add_whiteout(self, path: str) -> None:
        """Record that ``path`` is deleted by this layer (overlay: a char 0/0 device)."""
        self.add(path, stat.S_IFCHR, mode=0)

    def set_opaque(self, dir_path: str) -> None:
        """Hide everything lower layers have below ``dir_path`` (overlay opaque xattr)."""
        parts = split_path(dir_path)
        ref = self._find(parts)
        if ref is None:
            ref = self.add(dir_path, stat.S_IFDIR, mode=0o755).ref
        if not self._is_dir(ref):
            raise FormatError(f"opaque marker in a non-directory {dir_path[:80]!r}")
        self._xattrs.setdefault(ref, {})[self._opaque_xattr] = b"y"

    def add_tar_entry_name(self, path: str) -> bool:
        """Apply the tar whiteout convention to ``path``; True if it was a whiteout marker."""
        head, _, base = path.rstrip("/").rpartition("/")
        if base == OPAQUE_MARKER:
            self.set_opaque(head)
            return True
        if base.startswith(WHITEOUT_PREFIX):
            name = base[len(WHITEOUT_PREFIX):]
            if not name or name in (".", ".."):
                raise FormatError(f"invalid whiteout {path[:80]!r}")
            self.add_whiteout(f"{head}/{name}" if head else name)
            return True
        return False

    def add_chunk(self, path: str, **chunk: Any) -> None:
        """Attach a chunk to the regular file at ``path`` (see :meth:`add_chunk_to`)."""
        ref = self._find(split_path(path))
        if ref is None:
            raise FormatError(f"chunk for a missing file {path[:80]!r}")
        self.add_chunk_to(EntryHandle(ref), **chunk)

    def add_chunk_to(
        self,
        handle: EntryHandle,
        *,
        file_offset: int,
        size: int,
        blob_offset: int,
        blob_end: int,
        codec: Codec,
        digest: str,
        inner_offset: int = 0,
    ) -> None:
        """Attach a chunk to a regular file; ``digest`` is ``sha256:<hex>`` of its bytes.

        Its bounds and the file's coverage are checked by :meth:`build`.
        """
        if self._mode[handle.ref] & _S_IFMT != stat.S_IFREG:
            raise FormatError("chunk for a non-regular file")
        raw = parse_sha256(digest)
        columns = (self._c_file_off, self._c_size, self._c_blob_off, self._c_blob_end, self._c_inner,
                   self._c_codec)
        k = len(self._c_size)
        try:
            row = (file_offset, size, blob_offset, blob_end, inner_offset, int(Codec(codec)))
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        except (OverflowError, TypeError, ValueError):
            for column in columns:
                del column[k:]
            raise FormatError(f"chunk at file offset {file_offset!r}: a field is out of range") from None
        if not isinstance(self._c_digest, bytearray):
            self._c_digest = bytearray(self._c_digest)
        self._c_digest += raw
        self._file_chunks.setdefault(handle.ref, []).append(k)

    def _bump(self, count: int = 1) -> None:
        self._count += count
        if self._count > self._max_entries:
            raise FormatError(f"index has more than {self._max_entries} entries")

    # -- the tree as it stands -------------------------------------------------------------

    def _is_dir(self, ref: int) -> bool:
        return self._mode[ref] & _S_IFMT == stat.S_IFDIR

    def _loaded_name(self, ref: int) -> bytes:
        tree = self._tree
        assert tree is not None
        return tree.names[tree.name_off[ref]:tree.name_off[ref + 1]]

    def _child(self, parent: int, name: bytes) -> int | None:
        """The entry ``name`` of directory ``parent`` as the tree stands now, or None."""
        added = self._added.get(parent)
        if added is not None and name in added:
            return added[name]
        tree = self._tree
        if tree is None or parent >= self._loaded:
            return None
        kids = tree.child_list
        lo, hi = tree.child_start[parent], tree.child_start[parent + 1]
        pos = bisect.bisect_left(kids, name, lo, hi, key=self._loaded_name)
        if pos < hi and kids[pos] not in tree.skip and self._loaded_name(kids[pos]) == name:
            return kids[pos]
        return None

    def _find(self, parts: tuple[bytes, ...]) -> int | None:
        ref: int | None = ROOT
        for part in parts:
            if ref is None or not self._is_dir(ref):
                return None
            ref = self._child(ref, part)
        return ref

    def _parent(self, parts: tuple[bytes, ...]) -> int:
        ref: int = ROOT
        for part in parts[:-1]:
            nxt = self._child(ref, part)
            if nxt is None:
                self._bump()
                nxt = self._put(None, part.decode("utf-8", "replace"), (stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0))
                self._added.setdefault(ref, {})[part] = nxt
            elif not self._is_dir(nxt):
                raise FormatError(f"path goes through a non-directory: {b'/'.join(parts)[:80]!r}")
            ref = nxt
        return ref

    # -- packing: every check of the tree's values, whichever way it came in ---------------

    def build(self, *, toc_digest: str, also_accept: tuple[str, ...] = (),
              prefetch_end: int | None = None) -> UnverifiedIndex:
        """Check and pack the tree.

        ``toc_digest`` is the digest of the index bytes the reader parsed; ``also_accept`` other
        digests of those same bytes that a label may carry (e.g. zstd:chunked's checksum of the
        compressed TOC). ``prefetch_end`` is the blob offset ending the prioritized prefix:
        0 for a layer marked ``.no.prefetch.landmark``, None for a layer with no landmark at all.
        """
        idx = LayerIndex.__new__(LayerIndex)
        idx._init_empty(self._blob_size, prefetch_end)
        order = self._pack_tree(idx)
        kinds = self._pack_nodes(idx, order)
        self._pack_chunks(idx, order, kinds)
        return UnverifiedIndex(idx, toc_digest, also_accept)

    def _pack_tree(self, idx: LayerIndex) -> list[int]:
        """Number the reachable entries breadth-first (a directory's entries are contiguous in
        the entry table, sorted by name); fill the entry table and the link counts. Returns the
        entry (ref) of each node."""
        ifmt, ifdir = _S_IFMT, stat.S_IFDIR
        mode, added = self._mode, self._added
        tree, loaded = self._tree, self._loaded
        kids, kid_start, name_off = (tree.child_list, tree.child_start, tree.name_off) if tree else ((),) * 3
        name_blob, skip = (tree.names, tree.skip) if tree else (b"", frozenset())
        # the entries that may have several names: only they need looking up
        linked = {ref for entries in added.values() for ref in entries.values()}
        node_of: dict[int, int] = {}  # of the linked entries met so far
        order: list[int] = [ROOT]
        nlink: list[int] = [2]
        e_node, e_name_off, e_name_len = idx._e_node, idx._e_name_off, idx._e_name_len
        child_start, child_count = idx._child_start, idx._child_count
        names = bytearray()
        pos = 0
        while pos < len(order):
            ref = order[pos]
            node = pos
            pos += 1
            child_start.append(len(e_node))
            if mode[ref] & ifmt == ifdir:
                over = added.get(ref)
                base = kids[kid_start[ref]:kid_start[ref + 1]] if ref < loaded else ()
                entries: Iterable[tuple[bytes, int]]
                if over:
                    merged = {name_blob[name_off[k]:name_off[k + 1]]: k for k in base if k not in skip}
                    merged.update(over)
                    entries = sorted(merged.items())
                else:  # the common case: a loaded directory as it was loaded
                    entries = ((name_blob[name_off[k]:name_off[k + 1]], k) for k in base
                               if not skip or k not in skip)
                for name, child in entries:
                    child_is_dir = mode[child] & ifmt == ifdir
                    cid = node_of.get(child) if linked and child in linked else None
                    if cid is None:
                        cid = len(order)
                        order.append(child)
                        nlink.append(2 if child_is_dir else 1)
                        if linked and child in linked:
                            node_of[child] = cid
                    elif not child_is_dir:
                        nlink[cid] += 1  # a hardlink: one more name of the node
                    if child_is_dir:
                        nlink[node] += 1
                    e_name_off.append(len(names))
                    e_name_len.append(len(name))
                    e_node.append(cid)
                    names += name
            child_count.append(len(e_node) - child_start[node])
        idx._nlink = array("I", nlink)
        idx._names = bytes(names)
        return order

    def _pack_nodes(self, idx: LayerIndex, order: list[int]) -> array[int]:
        """Copy the attributes in node order and check them; returns each node's S_IFMT type.

        Loops over columns run in C (``map``); Python loops only over symlinks and xattrs.
        """
        idx._mode = mode = array("I", map(self._mode.__getitem__, order))
        idx._uid = array("I", map(self._uid.__getitem__, order))
        idx._gid = array("I", map(self._gid.__getitem__, order))
        idx._size = size = array("Q", map(self._size.__getitem__, order))
        idx._mtime = array("q", map(self._mtime.__getitem__, order))
        idx._rdev = array("Q", map(self._rdev.__getitem__, order))
        kinds = array("I", map(stat.S_IFMT, mode))
        if not set(kinds) <= _NODE_TYPES:
            node = next(n for n, kind in enumerate(kinds) if kind not in _NODE_TYPES)
            raise FormatError(f"unsupported file type {kinds[node]:o} for {_node_path(idx, node)!r}")
        targets, targets_out = self._targets, idx._targets
        for node in compress(range(len(kinds)), map(stat.S_IFLNK.__eq__, kinds)):
            target = targets.get(order[node], b"")
            if not target or len(target) > MAX_PATH:
                raise FormatError(f"invalid symlink target ({len(target)} bytes) for "
                                  f"{_node_path(idx, node)!r}")
            targets_out[node] = target
            size[node] = len(target)
        if max(size) > MAX_FILE_SIZE:
            node = next(n for n, s in enumerate(size) if s > MAX_FILE_SIZE)
            raise FormatError(f"absurd size {size[node]} for {_node_path(idx, node)!r}")
        for node in compress(range(len(order)), map(self._xattrs.__contains__, order)):
            xattrs = self._xattrs[order[node]]
            for name, value in xattrs.items():
                if not name or len(name) > MAX_NAME or len(value) > MAX_XATTR_VALUE:
                    raise FormatError(f"invalid xattr {name[:80]!r} on {_node_path(idx, node)!r}")
            if xattrs:
                idx._xattrs[node] = dict(sorted(xattrs.items()))
        return kinds

    def _chunk_layout(self, order: list[int]) -> tuple[array[int], array[int], _ChunkColumns]:
        """Each node's chunks, in file order: node ``k`` has chunks ``lo[k]:hi[k]`` of the
        columns returned with ``lo`` and ``hi``. The loaded tree's chunks are laid out so
        already; chunks added one by one are copied into place, in node order."""
        n, loaded = len(self._mode), self._loaded
        loaded_starts = self._tree.chunk_start if self._tree is not None else array("I", [0])
        columns = (self._c_file_off, self._c_size, self._c_blob_off, self._c_blob_end, self._c_inner,
                   self._c_codec)
        digests = self._c_digest
        if not self._file_chunks:
            starts = array("Q", loaded_starts)
            starts.extend(repeat(loaded_starts[-1], n - loaded))
            lo = array("Q", map(starts.__getitem__, order))
            hi = array("Q", map(starts.__getitem__, map((1).__add__, order)))
            return lo, hi, (columns, digests)
        lo, hi, layout = array("Q"), array("Q"), array("Q")
        file_off = self._c_file_off
        file_chunks = self._file_chunks
        for ref in order:
            lo.append(len(layout))
            ids: Iterable[int] = range(loaded_starts[ref], loaded_starts[ref + 1]) if ref < loaded else ()
            more = file_chunks.get(ref)
            if more is not None:
                ids = [*ids, *more]
                if len(ids) > 1:
                    ids.sort(key=file_off.__getitem__)
            layout.extend(ids)
            hi.append(len(layout))
        return lo, hi, (tuple(array(c.typecode, map(c.__getitem__, layout)) for c in columns),
                        b"".join([digests[32 * k:32 * k + 32] for k in layout]))

    def _pack_chunks(self, idx: LayerIndex, order: list[int], kinds: array[int]) -> None:
        """Copy the chunks in node order; check their bounds and that they cover each file."""
        lo, hi, (columns, digests) = self._chunk_layout(order)
        idx._chunk_count = counts = array("I", map(operator.sub, hi, lo))
        idx._chunk_start = starts = array("I", accumulate(counts, initial=0))
        starts.pop()
        # Copied run by run: the files of a directory mostly have their chunks one after the other
        lo, hi = array("Q", compress(lo, counts)), array("Q", compress(hi, counts))
        breaks = compress(range(1, len(lo)), map(operator.ne, islice(lo, 1, None), hi))
        outs = (idx._c_file_off, array("Q"), idx._c_blob_off, idx._c_blob_end, idx._c_inner, idx._c_codec)
        digests_out = idx._c_digest
        for a, b in pairwise((0, *breaks, len(lo)) if lo else ()):
            first, last = lo[a], hi[b - 1]
            for out, column in zip(outs, columns, strict=True):
                out += column[first:last]
            digests_out += digests[32 * first:32 * last]
        del lo, hi, columns, digests
        file_off, size, off, end, inner, _ = outs  # size: narrowed to the index's once bounded
        if size:
            # each check over all chunks at once; the first bad chunk is looked for on failure only
            max_size, blob_size = self._max_chunk_size, self._blob_size
            slack = 2 * max_size + (1 << 20)
            if min(size) <= 0 or max(size) > max_size:
                _refuse_chunk(idx, (not 0 < s <= max_size for s in size),
                              lambda k: f"size {size[k]} out of bounds (max {max_size})")
            if not all(map(operator.lt, off, end)) or max(end) > blob_size:
                _refuse_chunk(idx, (not o < e <= blob_size for o, e in zip(off, end, strict=True)),
                              lambda k: f"blob range [{off[k]}, {end[k]}) out of bounds ({blob_size})")
            if max(file_off) > MAX_FILE_SIZE or max(inner) > MAX_FILE_SIZE:
                _refuse_chunk(idx, (max(f, n) > MAX_FILE_SIZE for f, n in zip(file_off, inner, strict=True)),
                              lambda k: f"offset {file_off[k]} or inner offset {inner[k]} out of bounds")
            within = map(operator.le, map(operator.sub, end, off), map(operator.add, inner, repeat(slack)))
            if max(map(operator.sub, end, off)) > slack and not all(within):  # the max: a quick pass
                _refuse_chunk(idx, (e - o > n + slack for o, e, n in zip(off, end, inner, strict=True)),
                              lambda k: f"compressed size {end[k] - off[k]} at {off[k]} too large")
        idx._c_size = array("I", size)
        ends = array("Q", map(operator.add, file_off, size))
        if not _cover(kinds, starts, counts, idx._size, file_off, ends):
            _refuse_coverage(idx, kinds, ends)
        # a chunk without a digest (all zeros) cannot be verified: no lazy serving
        digests = idx._c_digest
        pos = digests.find(_NO_DIGEST)
        while pos >= 0 and pos % 32:
            pos = digests.find(_NO_DIGEST, pos + 1)
        if pos >= 0:
            raise UnsupportedFormat(f"{_chunk_where(idx, pos // 32)} has no digest (legacy layer)")


def _cover(kinds: array[int], starts: array[int], counts: array[int], file_size: array[int],
           file_off: array[int], ends: array[int]) -> bool:
    """Whether the chunks of each regular file start at 0, continue one another and end at its
    size, and only regular files have chunks (over all nodes at once; a False is explained by
    :func:`_refuse_coverage`)."""
    if not all(map(stat.S_IFREG.__eq__, compress(kinds, counts))):
        return False
    first = array("I", compress(starts, counts))  # of each file that has chunks, in chunk order
    size = array("Q", compress(file_size, counts))
    if sum(compress(file_size, map(stat.S_IFREG.__eq__, kinds))) != sum(size):
        return False  # a file with bytes and no chunks
    if not first:
        return True
    if any(map(file_off.__getitem__, first)):
        return False
    last = map((-1).__add__, chain(islice(first, 1, None), (len(file_off),)))
    if not all(map(operator.eq, map(ends.__getitem__, last), size)):
        return False
    # past each file's first chunk, every chunk starts where the one before ends
    jumps = array("I", compress(range(1, len(file_off)), map(operator.ne, islice(file_off, 1, None), ends)))
    return jumps == first[1:]


def _refuse_coverage(idx: LayerIndex, kinds: array[int], ends: array[int]) -> NoReturn:
    file_off = idx._c_file_off
    for node, kind in enumerate(kinds):
        start, count = idx._chunk_start[node], idx._chunk_count[node]
        if kind != stat.S_IFREG:
            if count:
                raise FormatError(f"chunks for {_node_path(idx, node)!r}, not a regular file")
            continue
        covered = 0
        for k in range(start, start + count):
            if file_off[k] != covered:
                raise FormatError(f"{_chunk_where(idx, k)}: leaves a gap or overlap at file offset "
                                  f"{file_off[k]}")
            covered = ends[k]
        if covered != idx._size[node]:
            raise FormatError(f"chunks of {_node_path(idx, node)!r} cover {covered} bytes, "
                              f"the file has {idx._size[node]}")
    raise FormatError("chunks do not cover their files")


def _node_path(idx: LayerIndex, node: int) -> str:
    """A path of ``node`` in an index whose entry table is complete (for error messages)."""
    parents, entries = idx.links()
    parts: list[bytes] = []
    while node != ROOT:
        parts.append(idx.entry_name(entries[node]))
        node = parents[node]
    return b"/".join(reversed(parts)).decode("utf-8", "replace")[:200]


def _chunk_where(idx: LayerIndex, k: int) -> str:
    node = bisect.bisect_right(idx._chunk_start, k) - 1
    return f"chunk {k - idx._chunk_start[node]} of {_node_path(idx, node)!r}"


def _refuse_chunk(idx: LayerIndex, bad: Iterable[bool], message: Callable[[int], str]) -> NoReturn:
    k = next(k for k, is_bad in enumerate(bad) if is_bad)
    raise FormatError(f"{_chunk_where(idx, k)}: {message(k)}")


def parse_sha256(digest: str) -> bytes:
    """``sha256:<64 hex>`` → 32 raw bytes; anything else is a FormatError."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise FormatError(f"unsupported or malformed digest {digest[:80]!r}")
    try:
        return bytes.fromhex(hexpart)
    except ValueError as exc:
        raise FormatError(f"malformed digest {digest[:80]!r}") from exc


class LayerIndex:
    """A verified, immutable layer tree; safe to serve. All methods are cheap and non-blocking.

    Node ids are ``0..node_count-1`` (0 is the root). Entry positions within a directory are
    stable (sorted by name) and serve as readdir offsets.
    """

    _mode: array[int]
    _uid: array[int]
    _gid: array[int]
    _size: array[int]
    _mtime: array[int]
    _rdev: array[int]
    _nlink: array[int]
    _child_start: array[int]
    _child_count: array[int]
    _e_name_off: array[int]
    _e_name_len: array[int]
    _e_node: array[int]
    _names: bytes
    _chunk_start: array[int]
    _chunk_count: array[int]
    _c_file_off: array[int]
    _c_size: array[int]
    _c_blob_off: array[int]
    _c_blob_end: array[int]
    _c_inner: array[int]
    _c_codec: array[int]
    _c_digest: bytearray
    _xattrs: dict[int, dict[bytes, bytes]]
    _targets: dict[int, bytes]

    def _init_empty(self, blob_size: int, prefetch_end: int | None) -> None:
        self.blob_size = blob_size
        self.prefetch_end = prefetch_end
        for col in ("_mode", "_uid", "_gid", "_nlink", "_child_start", "_child_count", "_e_name_off",
                    "_e_node", "_chunk_start", "_chunk_count", "_c_size"):
            setattr(self, col, array("I"))
        for col in ("_size", "_c_file_off", "_c_blob_off", "_c_blob_end", "_c_inner", "_rdev"):
            setattr(self, col, array("Q"))
        self._mtime = array("q")
        self._e_name_len = array("B")
        self._c_codec = array("B")
        self._c_digest = bytearray()
        self._xattrs = {}
        self._targets = {}
        self._names = b""

    # -- tree -----------------------------------------------------------------------------

    @property
    def node_count(self) -> int:
        return len(self._mode)

    @property
    def chunk_count(self) -> int:
        return len(self._c_size)

    def attr(self, node: NodeId) -> NodeAttr:
        """Attributes of ``node`` (IndexError if it does not exist)."""
        return NodeAttr(self._mode[node], self._uid[node], self._gid[node], self._size[node],
                        self._mtime[node], self._rdev[node], self._nlink[node])

    def size(self, node: NodeId) -> int:
        return self._size[node]

    def is_dir(self, node: NodeId) -> bool:
        return stat.S_ISDIR(self._mode[node])

    def lookup(self, parent: NodeId, name: bytes) -> NodeId | None:
        """The child ``name`` of directory ``parent``, or None."""
        start = self._child_start[parent]
        end = start + self._child_count[parent]
        pos = bisect.bisect_left(range(start, end), name, key=self._entry_name) + start
        if pos < end and self._entry_name(pos) == name:
            return NodeId(self._e_node[pos])
        return None

    def child_count(self, parent: NodeId) -> int:
        return self._child_count[parent]

    def children(self, parent: NodeId, start: int = 0) -> Iterator[tuple[int, bytes, NodeId]]:
        """``(position, name, node)`` of the entries of ``parent`` from position ``start``."""
        base = self._child_start[parent]
        for pos in range(start, self._child_count[parent]):
            yield pos, self._entry_name(base + pos), NodeId(self._e_node[base + pos])

    def parents(self) -> array[int]:
        """Each node's directory (the first one for a hardlinked file; the root's is itself).

        Built on each call (one pass over the entries): callers that need it keep it.
        """
        return self.links()[0]

    def links(self) -> tuple[array[int], array[int]]:
        """Each node's directory and its entry there (the position :meth:`entry_name` takes):
        the first of a hardlinked file's; the root's are itself and 0. Built on each call."""
        parent = array("I", bytes(4 * self.node_count))
        entry = array("I", bytes(4 * self.node_count))
        seen = bytearray(self.node_count)
        for d in range(self.node_count):
            start = self._child_start[d]
            for pos in range(start, start + self._child_count[d]):
                child = self._e_node[pos]
                if not seen[child]:
                    seen[child] = 1
                    parent[child] = d
                    entry[child] = pos
        return parent, entry

    def entry_name(self, pos: int) -> bytes:
        """The name of the entry at ``pos`` (see :meth:`links`)."""
        return self._entry_name(pos)

    def readlink(self, node: NodeId) -> bytes | None:
        return self._targets.get(node)

    def resolve(self, path: bytes, hops: int = 8) -> NodeId | None:
        """The node at ``path`` (from the root), following symlinks that stay in this layer
        (absolute targets from its root, at most ``hops`` of them); None if it leads out of it."""
        node = ROOT
        parents: list[NodeId] = []
        parts = [p for p in path.split(b"/") if p and p != b"."]
        parts.reverse()
        while parts:
            part = parts.pop()
            if part == b"..":
                node = parents.pop() if parents else ROOT
                continue
            child = self.lookup(node, part) if self.is_dir(node) else None
            if child is None:
                return None
            target = self.readlink(child)
            if target is None:
                parents.append(node)
                node = child
                continue
            hops -= 1
            if hops < 0:
                return None
            if target.startswith(b"/"):
                node, parents = ROOT, []
            parts.extend(reversed([p for p in target.split(b"/") if p and p != b"."]))
        return node

    def xattrs(self, node: NodeId) -> Mapping[bytes, bytes]:
        return self._xattrs.get(node, {})

    def walk(self) -> Iterator[tuple[str, NodeId]]:
        """Every ``(path, node)`` below the root, depth first, hardlinks under each name."""
        stack: list[tuple[str, NodeId]] = [("", ROOT)]
        while stack:
            prefix, node = stack.pop()
            subdirs: list[tuple[str, NodeId]] = []
            for _, name, child in self.children(node):
                path = prefix + name.decode("utf-8", "surrogateescape")
                yield path, child
                if self.is_dir(child):
                    subdirs.append((path + "/", child))
            stack.extend(reversed(subdirs))

    def _entry_name(self, pos: int) -> bytes:
        off = self._e_name_off[pos]
        return self._names[off:off + self._e_name_len[pos]]

    # -- chunks ---------------------------------------------------------------------------

    def chunk_ids(self, node: NodeId) -> range:
        start = self._chunk_start[node]
        return range(start, start + self._chunk_count[node])

    def chunks_in(self, node: NodeId, offset: int, length: int) -> range:
        """The chunk ids of ``node`` that hold bytes ``[offset, offset+length)``."""
        start = self._chunk_start[node]
        end = start + self._chunk_count[node]
        if length <= 0 or start == end:
            return range(0)
        first = bisect.bisect_right(self._c_file_off, offset, start, end) - 1
        last = bisect.bisect_left(self._c_file_off, offset + length, start, end)
        return range(max(first, start), last)

    def chunk(self, cid: int) -> Chunk:
        return Chunk(self._c_file_off[cid], self._c_size[cid], self._c_blob_off[cid],
                     self._c_blob_end[cid], self._c_inner[cid], Codec(self._c_codec[cid]),
                     bytes(self._c_digest[cid * 32:cid * 32 + 32]))

    def chunk_key(self, cid: int) -> str:
        """The cache key of a chunk: its digest in hex (identical chunks share one entry)."""
        return self._c_digest[cid * 32:cid * 32 + 32].hex()

    def chunk_file_offset(self, cid: int) -> int:
        return self._c_file_off[cid]

    def chunk_size(self, cid: int) -> int:
        return self._c_size[cid]

    def chunk_blob_range(self, cid: int) -> tuple[int, int]:
        return self._c_blob_off[cid], self._c_blob_end[cid]

    def nbytes(self) -> int:
        """Approximate memory held by the packed columns (for budgets and tests)."""
        total = len(self._names) + len(self._c_digest)
        for value in vars(self).values():
            if isinstance(value, array):
                total += value.itemsize * len(value)
        total += sum(len(k) + len(v) + 64 for xs in self._xattrs.values() for k, v in xs.items())
        total += sum(len(v) + 64 for v in self._targets.values())
        return total


def digest_accepted(expected: str, accepted: Iterable[str]) -> bool:
    """Whether ``expected`` (from the image manifest) is one of the ``accepted`` TOC digests."""
    return any(hmac.compare_digest(expected.encode(), d.encode()) for d in accepted)


class UnverifiedIndex:
    """A freshly read index whose TOC digest has not been checked yet: not mountable."""

    def __init__(self, index: LayerIndex, toc_digest: str, also_accept: tuple[str, ...] = ()) -> None:
        self._index = index
        self.toc_digest = toc_digest
        self._accepted = (toc_digest, *also_accept)

    def verify(self, expected: str) -> LayerIndex:
        """Return the mountable index if the TOC digest equals ``expected``.

        Raises:
            IntegrityError: the digests differ (the snapshotter then falls back to a full pull).
        """
        if not digest_accepted(expected, self._accepted):
            raise IntegrityError(f"TOC digest {self.toc_digest} does not match expected {expected}")
        return self._index

    def skip_verification(self, reason: str) -> LayerIndex:
        """Return the index without a TOC digest check; logged, for explicitly allowed cases."""
        log.warning("serving layer index %s without TOC verification: %s", self.toc_digest, reason)
        return self._index
