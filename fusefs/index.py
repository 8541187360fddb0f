"""LayerIndex: the format-neutral, compact, immutable file tree of one layer and its chunks.

Every format reader (eStargz, zstd:chunked, later SOCI and nydus) feeds an :class:`IndexBuilder`
with paths, attributes and chunks, and gets an :class:`UnverifiedIndex`. Only
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
import stat
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NewType

from fusefs.errors import FormatError, IntegrityError

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


@dataclass(slots=True)
class _Draft:
    """A node while the index is being built (temporary; packed away by ``build``)."""

    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, _Draft] | None = None
    chunks: list[tuple[int, int, int, int, int, int, bytes]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EntryHandle:
    """An entry being built, as returned by :meth:`IndexBuilder.add`."""

    draft: _Draft


class IndexBuilder:
    """Collects entries from a format reader; ``build`` packs them into an UnverifiedIndex.

    Later entries for the same path replace earlier ones (tar semantics), except that a
    directory re-declared as a directory keeps its children. Missing parents are created as
    0755 root-owned directories. Every method raises ``FormatError`` on input that cannot be a
    sane layer (escaping paths, sizes, counts, overlapping chunks).
    """

    def __init__(
        self,
        *,
        blob_size: int,
        opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    ) -> None:
        self._root = _Draft(mode=stat.S_IFDIR | 0o755, children={})
        self._blob_size = blob_size
        self._opaque_xattr = opaque_xattr
        self._max_entries = max_entries
        self._max_chunk_size = max_chunk_size
        self._count = 0

    # -- entries ------------------------------------------------------------------------

    @property
    def root(self) -> EntryHandle:
        """The layer root, as a parent for :meth:`add_child`."""
        return EntryHandle(self._root)

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
        draft = self._make_draft(path, file_type, mode, uid, gid, size, mtime_ns, target, rdev, xattrs)
        parts = split_path(path)
        if not parts:  # the root itself: keep its identity and children, take its attributes
            if file_type != stat.S_IFDIR:
                raise FormatError("layer root is not a directory")
            root = self._root
            root.mode, root.uid, root.gid, root.mtime_ns = draft.mode, draft.uid, draft.gid, draft.mtime_ns
            root.xattrs.update(draft.xattrs)
            return EntryHandle(root)
        return self._insert(self._parent(parts), parts[-1], draft)

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
                or parent.draft.children is None):
            raise FormatError(f"invalid entry name {name[:80]!r} or parent")
        what = name.decode("utf-8", "replace")
        draft = self._make_draft(what, file_type, mode, uid, gid, size, mtime_ns, target, rdev, xattrs)
        return self._insert(parent.draft, name, draft)

    def _make_draft(self, what: str, file_type: int, mode: int, uid: int, gid: int, size: int,
                    mtime_ns: int, target: str, rdev: int, xattrs: Mapping[bytes, bytes] | None) -> _Draft:
        if file_type not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                             stat.S_IFIFO):
            raise FormatError(f"unsupported file type {file_type:o} for {what[:80]!r}")
        if not 0 <= size <= MAX_FILE_SIZE:
            raise FormatError(f"absurd size {size} for {what[:80]!r}")
        if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
            raise FormatError(f"invalid owner for {what[:80]!r}")
        xa = dict(xattrs or {})
        for name, value in xa.items():
            if not name or len(name) > MAX_NAME or len(value) > MAX_XATTR_VALUE:
                raise FormatError(f"invalid xattr on {what[:80]!r}")
        draft = _Draft(
            mode=file_type | (mode & 0o7777), uid=uid, gid=gid,
            size=size if file_type == stat.S_IFREG else 0, mtime_ns=mtime_ns, rdev=rdev,
            target=target.encode("utf-8", "surrogateescape"), xattrs=xa,
        )
        if file_type == stat.S_IFLNK:
            if not draft.target or len(draft.target) > MAX_PATH:
                raise FormatError(f"invalid symlink target for {what[:80]!r}")
            draft.size = len(draft.target)
        if file_type == stat.S_IFDIR:
            draft.children = {}
        return draft

    def _insert(self, parent: _Draft, name: bytes, draft: _Draft) -> EntryHandle:
        assert parent.children is not None
        old = parent.children.get(name)
        if draft.children is not None and old is not None and old.children is not None:
            draft.children = old.children  # a directory declared again keeps its children
        if old is None:
            self._bump()
        parent.children[name] = draft
        return EntryHandle(draft)

    def add_hardlink(self, path: str, target: str) -> None:
        """Make ``path`` a second name of the earlier entry ``target``."""
        node = self._find(split_path(target))
        if node is None or node.children is not None:
            raise FormatError(f"hardlink {path[:80]!r} to missing or directory entry {target[:80]!r}")
        parts = split_path(path)
        if not parts:
            raise FormatError("hardlink at the layer root")
        parent = self._parent(parts)
        assert parent.children is not None
        if parts[-1] not in parent.children:
            self._bump()
        parent.children[parts[-1]] = node

    def add_whiteout(self, path: str) -> None:
        """Record that ``path`` is deleted by this layer (overlay: a char 0/0 device)."""
        self.add(path, stat.S_IFCHR, mode=0)

    def set_opaque(self, dir_path: str) -> None:
        """Hide everything lower layers have below ``dir_path`` (overlay opaque xattr)."""
        parts = split_path(dir_path)
        node = self._find(parts)
        if node is None:
            self.add(dir_path, stat.S_IFDIR, mode=0o755)
            node = self._find(parts)
        if node is None or node.children is None:
            raise FormatError(f"opaque marker in a non-directory {dir_path[:80]!r}")
        node.xattrs[self._opaque_xattr] = b"y"

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
        node = self._find(split_path(path))
        if node is None:
            raise FormatError(f"chunk for a missing file {path[:80]!r}")
        self.add_chunk_to(EntryHandle(node), **chunk)

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
        """Attach a chunk to a regular file; ``digest`` is ``sha256:<hex>`` of its bytes."""
        node = handle.draft
        if not stat.S_ISREG(node.mode):
            raise FormatError("chunk for a non-regular file")
        if not 0 < size <= self._max_chunk_size:
            raise FormatError(f"chunk size {size} out of bounds")
        if not 0 <= blob_offset < blob_end <= self._blob_size or not 0 <= inner_offset <= MAX_FILE_SIZE:
            raise FormatError(f"chunk blob range [{blob_offset}, {blob_end}) out of bounds")
        if blob_end - blob_offset > 2 * self._max_chunk_size + inner_offset + (1 << 20):
            raise FormatError(f"compressed chunk at {blob_offset} too large")
        node.chunks.append((file_offset, size, blob_offset, blob_end, inner_offset, int(codec),
                            parse_sha256(digest)))

    # -- packing ------------------------------------------------------------------------

    def build(self, *, toc_digest: str, also_accept: tuple[str, ...] = (),
              prefetch_end: int | None = None) -> UnverifiedIndex:
        """Pack the tree.

        ``toc_digest`` is the digest of the index bytes the reader parsed; ``also_accept`` other
        digests of those same bytes that a label may carry (e.g. zstd:chunked's checksum of the
        compressed TOC). ``prefetch_end`` is the blob offset ending the prioritized prefix:
        0 for a layer marked ``.no.prefetch.landmark``, None for a layer with no landmark at all.
        """
        index = _pack(self._root, self._blob_size, prefetch_end)
        return UnverifiedIndex(index, toc_digest, also_accept)

    def _bump(self) -> None:
        self._count += 1
        if self._count > self._max_entries:
            raise FormatError(f"index has more than {self._max_entries} entries")

    def _find(self, parts: tuple[bytes, ...]) -> _Draft | None:
        node = self._root
        for part in parts:
            if node.children is None:
                return None
            nxt = node.children.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

    def _parent(self, parts: tuple[bytes, ...]) -> _Draft:
        node = self._root
        for part in parts[:-1]:
            assert node.children is not None
            nxt = node.children.get(part)
            if nxt is None:
                nxt = _Draft(mode=stat.S_IFDIR | 0o755, children={})
                self._bump()
                node.children[part] = nxt
            elif nxt.children is None:
                raise FormatError(f"path goes through a non-directory: {b'/'.join(parts)[:80]!r}")
            node = nxt
        return node


def parse_sha256(digest: str) -> bytes:
    """``sha256:<64 hex>`` → 32 raw bytes; anything else is a FormatError."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise FormatError(f"unsupported or malformed digest {digest[:80]!r}")
    try:
        return bytes.fromhex(hexpart)
    except ValueError as exc:
        raise FormatError(f"malformed digest {digest[:80]!r}") from exc


def _pack(root: _Draft, blob_size: int, prefetch_end: int | None) -> LayerIndex:
    ids: dict[int, int] = {id(root): 0}
    order: list[_Draft] = [root]
    nlink: list[int] = [2]
    idx = LayerIndex.__new__(LayerIndex)
    idx._init_empty(blob_size, prefetch_end)
    names = bytearray()
    # Breadth-first: a directory's entries are contiguous in the entry table.
    pos = 0
    while pos < len(order):
        draft = order[pos]
        node = pos
        pos += 1
        idx._mode.append(draft.mode)
        idx._uid.append(draft.uid)
        idx._gid.append(draft.gid)
        idx._size.append(draft.size)
        idx._mtime.append(draft.mtime_ns)
        idx._rdev.append(draft.rdev)
        if draft.xattrs:
            idx._xattrs[node] = dict(sorted(draft.xattrs.items()))
        if stat.S_ISLNK(draft.mode):
            idx._targets[node] = draft.target
        idx._chunk_start.append(len(idx._c_file_off))
        if stat.S_ISREG(draft.mode):
            _pack_chunks(idx, draft, node)
        idx._chunk_count.append(len(idx._c_file_off) - idx._chunk_start[node])
        idx._child_start.append(len(idx._e_node))
        if draft.children is not None:
            for name in sorted(draft.children):
                child = draft.children[name]
                cid = ids.get(id(child))
                if cid is None:
                    cid = len(order)
                    ids[id(child)] = cid
                    order.append(child)
                    nlink.append(2 if child.children is not None else 1)
                elif child.children is None:
                    nlink[cid] += 1
                if child.children is not None:
                    nlink[node] += 1
                idx._e_name_off.append(len(names))
                idx._e_name_len.append(len(name))
                idx._e_node.append(cid)
                names += name
        idx._child_count.append(len(idx._e_node) - idx._child_start[node])
    idx._nlink = array("I", nlink)
    idx._names = bytes(names)
    return idx


def _pack_chunks(idx: LayerIndex, draft: _Draft, node: int) -> None:
    chunks = sorted(draft.chunks)
    expect = 0
    for file_off, size, b_off, b_end, inner, codec, digest in chunks:
        if file_off != expect:
            raise FormatError(f"chunks of node {node} leave a gap or overlap at {file_off}")
        expect = file_off + size
        idx._c_file_off.append(file_off)
        idx._c_size.append(size)
        idx._c_blob_off.append(b_off)
        idx._c_blob_end.append(b_end)
        idx._c_inner.append(inner)
        idx._c_codec.append(codec)
        idx._c_digest += digest
    if expect != draft.size:
        raise FormatError(f"chunks of node {node} cover {expect} bytes, file has {draft.size}")


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
        parent = array("I", bytes(4 * self.node_count))
        seen = bytearray(self.node_count)
        for d in range(self.node_count):
            start = self._child_start[d]
            for pos in range(start, start + self._child_count[d]):
                child = self._e_node[pos]
                if not seen[child]:
                    seen[child] = 1
                    parent[child] = d
        return parent

    def readlink(self, node: NodeId) -> bytes | None:
        return self._targets.get(node)

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
        if not any(hmac.compare_digest(expected.encode(), d.encode()) for d in self._accepted):
            raise IntegrityError(f"TOC digest {self.toc_digest} does not match expected {expected}")
        return self._index

    def skip_verification(self, reason: str) -> LayerIndex:
        """Return the index without a TOC digest check; logged, for explicitly allowed cases."""
        log.warning("serving layer index %s without TOC verification: %s", self.toc_digest, reason)
        return self._index
