"""eStargz and zstd:chunked layers → LayerIndex, through the ``estargz`` format library.

Reads the blob tail in one request (large enough that small layers' TOCs come with it), parses
the footer and the TOC in a worker thread (one at a time), and packs the TOC's arrays straight
into a :class:`LayerIndex` with the semantics of an :class:`IndexBuilder` fed entry by entry:
``.wh.<name>`` entries become whiteouts (char 0/0 ``name``), ``.wh..wh..opq`` marks its
directory opaque, hardlinks share their target's node. The library already hides
``stargz.index.json`` and the landmark files; the index's ``prefetch_end`` is the
``.prefetch.landmark`` offset, 0 for a ``.no.prefetch.landmark`` layer and None for a layer with
neither. The TOC digest (sha256 of the JSON, or the
zstd:chunked manifest checksum) is what the manager verifies against ``spec.toc_digest``.

Not served lazily (``UnsupportedFormat``, so the snapshotter falls back to a full pull): blobs
with no eStargz/zstd:chunked footer, external-TOC blobs, legacy stargz files split into chunks
without per-chunk digests, and zstd:chunked ``zeros`` hole chunks.
"""

from __future__ import annotations

import bisect
import operator
import os
import stat
import threading
from array import array

import trio

import estargz
from fusefs.allocator import release_free_memory
from fusefs.errors import FormatError, UnsupportedFormat
from fusefs.index import (
    DEFAULT_MAX_CHUNK_SIZE,
    MAX_FILE_SIZE,
    MAX_NAME,
    MAX_PATH,
    MAX_XATTR_VALUE,
    OPAQUE_MARKER,
    TRUSTED_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    Codec,
    LayerIndex,
    UnverifiedIndex,
    split_path,
)
from fusefs.sources.base import BlobSource

TAIL_FETCH = 256 << 10  # first request: the footer, and the whole TOC of most small layers
MAX_COMPRESSED_TOC = 64 << 20

# One index build at a time, process-wide: a build is CPU-bound (two cores gain little from two
# at once) and its transient memory is several times the TOC JSON, so the layer being mounted and
# the neighbours the manager resolves in parallel would otherwise add their peaks up.
_BUILD_LOCK = threading.Lock()

_TYPES = {
    estargz.EntryType.DIR: stat.S_IFDIR,
    estargz.EntryType.REG: stat.S_IFREG,
    estargz.EntryType.SYMLINK: stat.S_IFLNK,
    estargz.EntryType.CHAR: stat.S_IFCHR,
    estargz.EntryType.BLOCK: stat.S_IFBLK,
    estargz.EntryType.FIFO: stat.S_IFIFO,
}
_CODECS = {estargz.Codec.GZIP: Codec.GZIP, estargz.Codec.ZSTD: Codec.ZSTD}


async def read_estargz(source: BlobSource, *, opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR) -> UnverifiedIndex:
    """Read and index the TOC of an eStargz or zstd:chunked blob (see module docstring).

    Raises:
        UnsupportedFormat: not an eStargz/zstd:chunked blob, or a variant served by full pull.
        FormatError: the footer or TOC is malformed, oversized or inconsistent.
        SourceError: as raised by ``source``.
    """
    tail = await source.read_tail(TAIL_FETCH)
    size = await source.size()
    if not tail:
        raise UnsupportedFormat(f"{source.digest} is empty")
    tail_len = len(tail)
    tail_start = size - tail_len
    try:
        footer = estargz.parse_footer(tail[-min(size, estargz.MAX_FOOTER_SIZE):], size)
    except estargz.FooterError as exc:
        raise UnsupportedFormat(f"{source.digest} has no eStargz or zstd:chunked footer: {exc}") from exc
    if footer.needs_external_toc:
        raise UnsupportedFormat(f"{source.digest} keeps its TOC in a separate image (not supported)")
    toc_len = footer.toc_end - footer.toc_offset
    if not 0 < toc_len <= MAX_COMPRESSED_TOC:
        raise FormatError(f"{source.digest}: compressed TOC of {toc_len} bytes is out of bounds")
    if footer.toc_offset >= tail_start:
        toc_bytes = tail[footer.toc_offset - tail_start:footer.toc_end - tail_start]
    else:
        (toc_bytes,) = await source.read_ranges([(footer.toc_offset, toc_len)])
    return await trio.to_thread.run_sync(_index_one_at_a_time, toc_bytes, footer, size, opaque_xattr,
                                         source.digest)


def _index_one_at_a_time(toc_bytes: bytes, footer: estargz.Footer, blob_size: int, opaque_xattr: bytes,
                         digest: str) -> UnverifiedIndex:
    with _BUILD_LOCK:
        try:
            return _index(toc_bytes, footer, blob_size, opaque_xattr, digest)
        finally:
            # the build's transient (~10x the index it leaves) is freed by now, but scattered
            # through the heaps: give it back before fetch buffers start to come and go
            release_free_memory()


def _index(toc_bytes: bytes, footer: estargz.Footer, blob_size: int, opaque_xattr: bytes,
           digest: str) -> UnverifiedIndex:
    try:
        toc = estargz.parse_toc(toc_bytes, footer)
    except estargz.NeedsExternalTOC as exc:
        raise UnsupportedFormat(str(exc)) from exc
    except estargz.UnsupportedFormat as exc:
        raise UnsupportedFormat(f"{digest}: {exc}") from exc
    except estargz.EstargzError as exc:
        raise FormatError(f"{digest}: invalid TOC: {exc}") from exc
    also = (toc.manifest_checksum,) if toc.manifest_checksum else ()
    # ``.no.prefetch.landmark`` wins over ``.prefetch.landmark``, as upstream: an empty prefix
    prefetch_end = 0 if toc.no_prefetch_landmark else toc.prefetch_landmark_offset
    index = _TocPacker(toc, blob_size, opaque_xattr, digest).pack(prefetch_end)
    return UnverifiedIndex(index, toc.digest, also)


_WHITEOUT_PREFIX = WHITEOUT_PREFIX.encode()
_DIR, _REG, _SYMLINK, _HARDLINK, _CHAR, _BLOCK = (
    int(estargz.EntryType.DIR), int(estargz.EntryType.REG), int(estargz.EntryType.SYMLINK),
    int(estargz.EntryType.HARDLINK), int(estargz.EntryType.CHAR), int(estargz.EntryType.BLOCK))
# stat.S_IF* by EntryType value (a hardlink is never a node of its own)
_S_IF = [_TYPES.get(t, 0) for t in sorted(estargz.EntryType)]


class _TocPacker:
    """Packs a parsed TOC straight into a :class:`LayerIndex`, with the semantics of feeding an
    :class:`IndexBuilder` entry by entry but no Python object per entry.

    The TOC already holds the tree in arrays (children sorted by UTF-8 name, as the index wants
    them), so most directories are copied slice by slice. Only the rare entries that change the
    tree are applied as overrides of their directory, in TOC tree order as the builder would:
    ``.wh.<name>`` (a char 0/0 whiteout ``name``, replacing an entry of that name), ``.wh..wh..opq``
    (the directory gets the opaque xattr) and hardlinks (a second name of their target's node).
    Every check of the builder is kept (sizes, chunk bounds, file coverage, names, xattrs).
    """

    def __init__(self, toc: estargz.TOC, blob_size: int, opaque_xattr: bytes, digest: str) -> None:
        self.toc = toc
        self.blob_size = blob_size
        self.opaque_xattr = opaque_xattr
        self.digest = digest
        # directory entry -> {name: entry index, or a negative whiteout id}
        self.overrides: dict[int, dict[bytes, int]] = {}
        self.opaque: set[int] = set()
        self.whiteouts = 0

    # -- the tree-changing entries, as IndexBuilder.add_tar_entry_name / add_hardlink ----------

    def _is_later(self, i: int) -> bool:
        toc = self.toc
        return toc._type[i] == _HARDLINK or toc.name_bytes(i).startswith(_WHITEOUT_PREFIX)

    def _child(self, d: int, name: bytes) -> int | None:
        """The entry named ``name`` in directory entry ``d`` as the tree stands now, or None."""
        over = self.overrides.get(d)
        if over is not None and name in over:
            return over[name]
        toc = self.toc
        kids = toc._child_list
        lo, hi = toc._child_start[d], toc._child_start[d + 1]
        k = bisect.bisect_left(kids, name, lo, hi, key=toc.name_bytes)
        if k < hi and toc.name_bytes(kids[k]) == name and not self._is_later(kids[k]):
            return kids[k]
        return None

    def _is_dir(self, ref: int) -> bool:
        return ref >= 0 and self.toc._type[ref] == _DIR

    def _dir(self, parts: tuple[bytes, ...], path: str) -> int:
        """The directory entry at ``parts`` (IndexBuilder._parent: never a non-directory)."""
        d = estargz.ROOT
        for part in parts:
            ref = self._child(d, part)
            if ref is None or not self._is_dir(ref):
                # the TOC creates every parent, so only a whiteout or hardlink can be in the way
                raise FormatError(f"path goes through a non-directory: {path[:80]!r}")
            d = ref
        return d

    def _apply_later(self, i: int) -> None:
        toc = self.toc
        path = toc.path(i)
        head, _, base = path.rstrip("/").rpartition("/")
        if base == OPAQUE_MARKER:
            self.opaque.add(self._dir(split_path(head), head))
            return
        if base.startswith(WHITEOUT_PREFIX):
            name = base[len(WHITEOUT_PREFIX):]
            if not name or name in (".", ".."):
                raise FormatError(f"invalid whiteout {path[:80]!r}")
            target = f"{head}/{name}" if head else name
            parts = split_path(target)
            self.whiteouts += 1
            self.overrides.setdefault(self._dir(parts[:-1], target), {})[parts[-1]] = -self.whiteouts
            return
        target_path = toc.path(toc.link_target(i))
        node: int | None = estargz.ROOT
        for part in split_path(target_path):
            node = self._child(node, part) if node is not None and self._is_dir(node) else None
        if node is None or self._is_dir(node):
            raise FormatError(f"hardlink {path[:80]!r} to missing or directory entry {target_path[:80]!r}")
        parts = split_path(path)
        self.overrides.setdefault(self._dir(parts[:-1], path), {})[parts[-1]] = node

    # -- packing ---------------------------------------------------------------------------

    def pack(self, prefetch_end: int | None) -> LayerIndex:
        toc = self.toc
        types, kids, child_start = toc._type, toc._child_list, toc._child_start
        # The builder's first pass skips whiteouts and hardlinks; they apply after every entry,
        # in tree order (parents before children, each directory's entries by name).
        later = [i for i in toc.iter_tree() if types[i] == _HARDLINK
                 or toc._name_blob.startswith(_WHITEOUT_PREFIX, toc._name_off[i])]
        for i in later:
            self._apply_later(i)

        idx = LayerIndex.__new__(LayerIndex)
        idx._init_empty(self.blob_size, prefetch_end)
        node_of: dict[int, int] = {estargz.ROOT: 0}
        order: list[int] = [estargz.ROOT]
        nlink: list[int] = [2]
        e_node = idx._e_node
        e_name_off, e_name_len = idx._e_name_off, idx._e_name_len
        child_start_out, child_count_out = idx._child_start, idx._child_count
        name_blob, name_off = toc._name_blob, toc._name_off
        names = bytearray()
        later_set = set(later)
        pos = 0
        while pos < len(order):
            ref = order[pos]
            node = pos
            pos += 1
            child_start_out.append(len(e_node))
            if ref >= 0 and types[ref] == _DIR:
                over = self.overrides.get(ref)
                base = kids[child_start[ref]:child_start[ref + 1]]
                if over is None:
                    entries: list[tuple[bytes, int]] | None = None
                    if later_set:
                        base = array("I", [k for k in base if k not in later_set])
                else:
                    merged = {name_blob[name_off[k]:name_off[k + 1]]: k for k in base if k not in later_set}
                    merged.update(over)
                    entries = sorted(merged.items())
                for name, child in (entries if entries is not None
                                    else ((name_blob[name_off[k]:name_off[k + 1]], k) for k in base)):
                    cid = node_of.get(child)
                    child_is_dir = child >= 0 and types[child] == _DIR
                    if cid is None:
                        cid = node_of[child] = len(order)
                        order.append(child)
                        nlink.append(2 if child_is_dir else 1)
                    elif not child_is_dir:
                        nlink[cid] += 1
                    if child_is_dir:
                        nlink[node] += 1
                    e_name_off.append(len(names))
                    e_name_len.append(len(name))
                    e_node.append(cid)
                    names += name
            child_count_out.append(len(e_node) - child_start_out[node])
        idx._nlink = array("I", nlink)
        idx._names = bytes(names)
        self._attributes(idx, order)
        self._chunks(idx, order)
        return idx

    def _attributes(self, idx: LayerIndex, order: list[int]) -> None:
        toc = self.toc
        types = toc._type
        mode_out, uid_out, gid_out = idx._mode, idx._uid, idx._gid
        size_out, mtime_out, rdev_out = idx._size, idx._mtime, idx._rdev
        t_mode, t_uid, t_gid, t_size = toc._mode, toc._uid, toc._gid, toc._size
        t_mtime, t_nsec, t_dev, t_xattrs = toc._mtime, toc._mtime_nsec, toc._dev, toc._xattrs
        s_if = _S_IF
        for node, ref in enumerate(order):
            if ref < 0:  # a whiteout: char 0/0, mode 0, root-owned
                mode_out.append(stat.S_IFCHR)
                uid_out.append(0)
                gid_out.append(0)
                size_out.append(0)
                mtime_out.append(0)
                rdev_out.append(0)
                continue
            kind = types[ref]
            perm = t_mode[ref] & 0o7777
            if ref == estargz.ROOT:
                perm = (t_mode[ref] or 0o755) & 0o7777
            mode_out.append(s_if[kind] | perm)
            uid_out.append(t_uid[ref])
            gid_out.append(t_gid[ref])
            mtime_out.append(t_mtime[ref] * 1_000_000_000 + t_nsec[ref])
            if kind == _REG:
                size = t_size[ref]
                if size > MAX_FILE_SIZE:
                    raise FormatError(f"absurd size {size} for {toc.path(ref)[:80]!r}")
                size_out.append(size)
            elif kind == _SYMLINK:
                target = toc.linkname(ref).encode("utf-8", "surrogateescape")
                if not target or len(target) > MAX_PATH:
                    raise FormatError(f"invalid symlink target for {toc.path(ref)[:80]!r}")
                idx._targets[node] = target
                size_out.append(len(target))
            else:
                size_out.append(0)
            rdev_out.append(os.makedev(t_dev[2 * ref], t_dev[2 * ref + 1]) if kind in (_CHAR, _BLOCK) else 0)
            xattrs: dict[bytes, bytes] = {}
            if ref != estargz.ROOT and ref in t_xattrs:  # the builder takes no xattrs for the root
                for key, value in t_xattrs[ref]:
                    name = key.encode("utf-8", "surrogateescape")
                    if not name or len(name) > MAX_NAME or len(value) > MAX_XATTR_VALUE:
                        raise FormatError(f"invalid xattr on {toc.path(ref)[:80]!r}")
                    xattrs[name] = value
            if ref in self.opaque:
                xattrs[self.opaque_xattr] = b"y"
            if xattrs:
                idx._xattrs[node] = dict(sorted(xattrs.items()))

    def _chunks(self, idx: LayerIndex, order: list[int]) -> None:
        toc = self.toc
        types, t_start = toc._type, toc._chunk_start
        t_file_off, t_size = toc._chunk_file_off, toc._chunk_size
        t_off, t_end = toc._chunk_off, toc._chunk_end
        t_inner, t_flags, t_digest = toc._chunk_inner, toc._chunk_flags, toc._chunk_digest
        c_file_off, c_off, c_end = idx._c_file_off, idx._c_blob_off, idx._c_blob_end
        c_size = array("Q")  # the TOC's width; narrowed to the index's once bounded below
        c_inner, c_digest = idx._c_inner, idx._c_digest
        start_out, count_out = idx._chunk_start, idx._chunk_count
        file_size = idx._size
        codec = _CODECS[toc.codec]
        for node, ref in enumerate(order):
            start_out.append(len(c_file_off))
            if ref < 0 or types[ref] != _REG:
                count_out.append(0)
                continue
            lo, hi = t_start[ref], t_start[ref + 1]
            count_out.append(hi - lo)
            if hi == lo:
                if file_size[node]:
                    raise FormatError(f"chunks of node {node} cover 0 bytes, file has {file_size[node]}")
                continue
            if any(t_flags[lo:hi]):
                raise UnsupportedFormat(f"{self.digest}: {toc.path(ref)!r} has a hole chunk (not supported)")
            if t_file_off[lo] != 0 or t_file_off[hi - 1] + t_size[hi - 1] != file_size[node]:
                raise FormatError(f"chunks of node {node} do not cover the file's {file_size[node]} bytes")
            c_file_off.extend(t_file_off[lo:hi])
            c_size.extend(t_size[lo:hi])
            c_off.extend(t_off[lo:hi])
            c_end.extend(t_end[lo:hi])
            c_inner.extend(t_inner[lo:hi])
            c_digest += t_digest[32 * lo:32 * hi]
        count = len(c_file_off)
        idx._c_codec = array("B", bytes([int(codec)]) * count)
        if not count:
            return
        # the TOC parser made each file's chunks continue one another; the checks of
        # IndexBuilder.add_chunk_to, over all chunks at once
        if min(c_size) <= 0 or max(c_size) > DEFAULT_MAX_CHUNK_SIZE:
            raise FormatError(f"chunk size {min(c_size)}..{max(c_size)} out of bounds")
        idx._c_size = array("I", c_size)
        del c_size
        if (not all(map(operator.lt, c_off, c_end)) or max(c_end) > self.blob_size
                or max(c_inner) > MAX_FILE_SIZE):
            raise FormatError("chunk blob range out of bounds")
        slack = 2 * DEFAULT_MAX_CHUNK_SIZE + (1 << 20)
        if not all(e - o <= slack + n for o, e, n in zip(c_off, c_end, c_inner, strict=True)):
            raise FormatError("compressed chunk too large")
        view = memoryview(c_digest)
        for k in range(count):
            if view[32 * k:32 * k + 32] == _NO_DIGEST:
                raise UnsupportedFormat(f"{self.digest}: a file has a chunk with no digest (legacy)")


_NO_DIGEST = bytes(32)
