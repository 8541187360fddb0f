"""eStargz and zstd:chunked layers → LayerIndex, through the ``estargz`` format library.

Reads the blob tail in one request (large enough that small layers' TOCs come with it), parses
the footer and the TOC in a worker thread, and maps the TOC into an :class:`IndexBuilder`:
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

import os
import stat
import threading

import trio

import estargz
from fusefs.errors import FormatError, UnsupportedFormat
from fusefs.index import TRUSTED_OPAQUE_XATTR, Codec, EntryHandle, IndexBuilder, UnverifiedIndex
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
    size = await source.size()
    tail_len = min(size, TAIL_FETCH)
    if tail_len == 0:
        raise UnsupportedFormat(f"{source.digest} is empty")
    tail_start = size - tail_len
    (tail,) = await source.read_ranges([(tail_start, tail_len)])
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
        return _index(toc_bytes, footer, blob_size, opaque_xattr, digest)


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
    codec = _CODECS[toc.codec]
    builder = IndexBuilder(blob_size=blob_size, opaque_xattr=opaque_xattr)
    root_mtime = toc.mtime(estargz.ROOT)
    builder.add("", stat.S_IFDIR, mode=toc.mode(estargz.ROOT) or 0o755, uid=toc.uid(estargz.ROOT),
                gid=toc.gid(estargz.ROOT), mtime_ns=root_mtime[0] * 10**9 + root_mtime[1])
    dirs: dict[int, EntryHandle] = {estargz.ROOT: builder.root}
    later: list[int] = []  # hardlinks and whiteouts: after every entry they may refer to
    for i in toc.iter_tree():  # parents before children
        kind = toc.type(i)
        name = toc.name_bytes(i)
        if kind is estargz.EntryType.HARDLINK or name.startswith(b".wh."):
            later.append(i)
            continue
        sec, nsec = toc.mtime(i)
        major, minor = toc.device(i)
        handle = builder.add_child(
            dirs[toc.parent(i)], name, _TYPES[kind], mode=toc.mode(i), uid=toc.uid(i), gid=toc.gid(i),
            size=toc.size(i), mtime_ns=sec * 10**9 + nsec,
            target=toc.linkname(i) if kind is estargz.EntryType.SYMLINK else "",
            rdev=os.makedev(major, minor) if kind in (estargz.EntryType.CHAR, estargz.EntryType.BLOCK) else 0,
            xattrs={k.encode("utf-8", "surrogateescape"): v for k, v in toc.xattrs(i).items()},
        )
        if kind is estargz.EntryType.DIR:
            dirs[i] = handle
        elif kind is estargz.EntryType.REG:
            for c in toc.chunks(i):
                if c.hole:
                    raise UnsupportedFormat(f"{digest}: {toc.path(i)!r} has a hole chunk (not supported)")
                if c.digest is None:
                    raise UnsupportedFormat(f"{digest}: {toc.path(i)!r} has a chunk with no digest (legacy)")
                builder.add_chunk_to(handle, file_offset=c.file_offset, size=c.size,
                                     blob_offset=c.compressed_offset, blob_end=c.compressed_end,
                                     codec=codec, digest=c.digest, inner_offset=c.inner_offset)
    for i in later:
        path = toc.path(i)
        if builder.add_tar_entry_name(path):
            continue
        builder.add_hardlink(path, toc.path(toc.link_target(i)))
    also = (toc.manifest_checksum,) if toc.manifest_checksum else ()
    # ``.no.prefetch.landmark`` wins over ``.prefetch.landmark``, as upstream: an empty prefix
    prefetch_end = 0 if toc.no_prefetch_landmark else toc.prefetch_landmark_offset
    return builder.build(toc_digest=toc.digest, also_accept=also, prefetch_end=prefetch_end)
