"""eStargz and zstd:chunked layers → LayerIndex, through the ``estargz`` format library.

Reads the blob tail in one request (large enough that small layers' TOCs come with it), parses
the footer and the TOC in a worker thread (one at a time), and loads the TOC's arrays into an
:class:`IndexBuilder` as columns (no Python object per entry), then applies the entries that
change the tree one by one through the builder: ``.wh.<name>`` entries become whiteouts (char
0/0 ``name``), ``.wh..wh..opq`` marks its directory opaque, hardlinks share their target's node.
The builder checks and packs the result as it does for any reader. The library already hides
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import compress, repeat

import trio

import estargz
from fusefs.allocator import release_free_memory
from fusefs.errors import FormatError, UnsupportedFormat
from fusefs.index import (
    TRUSTED_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    Codec,
    Columns,
    IndexBuilder,
    UnverifiedIndex,
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


async def read_estargz(source: BlobSource, *, opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR,
                       on_toc: Callable[[tuple[str, ...]], None] | None = None) -> UnverifiedIndex:
    """Read and index the TOC of an eStargz or zstd:chunked blob (see module docstring).

    ``on_toc`` gets the TOC's digests once its bytes are in, before the index is built.

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
    elif footer.toc_end > tail_start:  # just the TOC head: the tail has the rest (minbase: 47 of 309 KB)
        (head,) = await source.read_ranges([(footer.toc_offset, tail_start - footer.toc_offset)])
        toc_bytes = head + tail[:footer.toc_end - tail_start]
    else:
        (toc_bytes,) = await source.read_ranges([(footer.toc_offset, toc_len)])
    del tail
    if on_toc is not None:
        on_toc(await trio.to_thread.run_sync(_toc_digests, toc_bytes, footer, source.digest))
    # handed over, not kept here: the parse drops the compressed TOC before the index is packed
    held = [toc_bytes]
    del toc_bytes
    return await trio.to_thread.run_sync(_index_one_at_a_time, held, footer, size, opaque_xattr,
                                         source.digest)


def _index_one_at_a_time(held: list[bytes], footer: estargz.Footer, blob_size: int, opaque_xattr: bytes,
                         digest: str) -> UnverifiedIndex:
    """Index the compressed TOC that ``held`` holds (emptied: the caller keeps no reference)."""
    with _BUILD_LOCK:
        try:
            return _index(held, footer, blob_size, opaque_xattr, digest)
        finally:
            # the build's transient (~10x the index it leaves) is freed by now, but scattered
            # through the heaps: give it back before fetch buffers start to come and go
            release_free_memory()


def _toc_digests(toc_bytes: bytes, footer: estargz.Footer, digest: str) -> tuple[str, ...]:
    with _toc_errors(digest):
        return estargz.toc_digests(toc_bytes, footer)


@contextmanager
def _toc_errors(digest: str) -> Iterator[None]:
    """The format library's TOC errors as the reader's (``UnsupportedFormat``: fall back)."""
    try:
        yield
    except estargz.NeedsExternalTOC as exc:
        raise UnsupportedFormat(str(exc)) from exc
    except estargz.UnsupportedFormat as exc:
        raise UnsupportedFormat(f"{digest}: {exc}") from exc
    except estargz.EstargzError as exc:
        raise FormatError(f"{digest}: invalid TOC: {exc}") from exc


def _index(held: list[bytes], footer: estargz.Footer, blob_size: int, opaque_xattr: bytes,
           digest: str) -> UnverifiedIndex:
    with _toc_errors(digest):
        toc = estargz.parse_toc(held.pop(), footer)
    if any(toc._chunk_flags):  # in any file of the TOC, in the tree or not
        k = next(k for k, flags in enumerate(toc._chunk_flags) if flags)
        path = toc.path(bisect.bisect_right(toc._chunk_start, k) - 1)
        raise UnsupportedFormat(f"{digest}: {path!r} has a hole chunk (not supported)")
    builder = IndexBuilder(blob_size=blob_size, opaque_xattr=opaque_xattr)
    later = _load(builder, toc)
    # Whiteouts, opaque markers and hardlinks apply after every other entry, in tree order (parents
    # before children, each directory's entries by name), as a tar reader's would.
    for i in later:
        path = toc.path(i)
        if not builder.add_tar_entry_name(path):
            builder.add_hardlink(path, toc.path(toc.link_target(i)))
    toc_digest = toc.digest
    also = (toc.manifest_checksum,) if toc.manifest_checksum else ()
    # ``.no.prefetch.landmark`` wins over ``.prefetch.landmark``, as upstream: an empty prefix
    prefetch_end = 0 if toc.no_prefetch_landmark else toc.prefetch_landmark_offset
    del toc  # what the builder did not take over (file digests, parents, types) goes before packing
    return builder.build(toc_digest=toc_digest, also_accept=also, prefetch_end=prefetch_end)


_WHITEOUT_PREFIX = WHITEOUT_PREFIX.encode()
_SYMLINK, _HARDLINK = int(estargz.EntryType.SYMLINK), int(estargz.EntryType.HARDLINK)
# stat.S_IF* by EntryType value (a hardlink is never a node of its own)
_S_IF = [_TYPES.get(t, 0) for t in sorted(estargz.EntryType)]


def _load(builder: IndexBuilder, toc: estargz.TOC) -> list[int]:
    """Load the parsed TOC's tree into ``builder`` as columns (the TOC already holds it in arrays,
    children sorted by UTF-8 name as the index wants them): no Python object per entry.

    Returns the entries left for the caller to apply one by one: ``.wh.`` names and hardlinks.
    The builder takes the TOC's arrays over and appends to some: after this, the TOC serves for
    names and paths only.
    """
    types, n = toc._type, len(toc)
    mode = array("I", map(operator.or_, map(_S_IF.__getitem__, types), toc._mode))
    mode[estargz.ROOT] = stat.S_IFDIR | ((toc._mode[estargz.ROOT] or 0o755) & 0o7777)
    mtime_ns = array("q", map(operator.add, map(operator.mul, toc._mtime, repeat(1_000_000_000)),
                              toc._mtime_nsec))
    dev = toc._dev  # major, minor of each entry: 0, 0 but for devices
    rdev = array("Q", map(os.makedev, dev[0::2], dev[1::2]) if any(dev) else bytes(8 * n))
    link_blob, link_off = toc._link_blob, toc._link_off
    targets = {i: link_blob[link_off[i]:link_off[i + 1]]
               for i in compress(range(n), map(_SYMLINK.__eq__, types))}
    xattrs = {i: {key.encode("utf-8", "surrogateescape"): value for key, value in pairs}
              for i, pairs in toc._xattrs.items() if i != estargz.ROOT}  # a TOC's root takes none
    later = _later(toc)
    builder.load(Columns(
        mode=mode, uid=toc._uid, gid=toc._gid, size=toc._size, mtime_ns=mtime_ns, rdev=rdev,
        targets=targets, xattrs=xattrs, names=toc._name_blob, name_off=toc._name_off,
        child_start=toc._child_start, child_list=toc._child_list, skip=frozenset(later),
        chunk_start=toc._chunk_start, chunk_file_offset=toc._chunk_file_off, chunk_size=toc._chunk_size,
        chunk_blob_offset=toc._chunk_off, chunk_blob_end=toc._chunk_end, chunk_inner_offset=toc._chunk_inner,
        codec=_CODECS[toc.codec], digests=toc._chunk_digest,
    ))
    return later


def _later(toc: estargz.TOC) -> list[int]:
    """The ``.wh.`` entries and hardlinks of the tree, in tree order (``TOC.iter_tree``'s)."""
    types, names, name_off = toc._type, toc._name_blob, toc._name_off
    found = set(compress(range(len(types)), map(_HARDLINK.__eq__, types)))
    pos = names.find(_WHITEOUT_PREFIX)
    while pos >= 0:
        i = bisect.bisect_right(name_off, pos) - 1  # the entry whose name holds ``pos``
        if name_off[i] == pos:
            found.add(i)
        pos = names.find(_WHITEOUT_PREFIX, pos + 1)
    return [i for i in toc.iter_tree() if i in found] if found else []
