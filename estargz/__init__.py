"""eStargz and zstd:chunked: a format library, reader and writer, with no I/O policy.

The reading core is sans-I/O: callers fetch byte ranges however they like (HTTP range requests,
a local file) and hand the bytes to pure functions::

    tail = blob[-min(size, MAX_FOOTER_SIZE):]
    footer = parse_footer(tail, size)                 # FooterError, kind EXTERNAL_TOC
    toc = parse_toc(blob[footer.toc_offset:footer.toc_end], footer)   # TOCError, NeedsExternalTOC
    verify_toc(toc, annotation_digest)                # TOCDigestMismatch: never skip this
    toc_digests(blob[footer.toc_offset:footer.toc_end], footer)   # what verify_toc accepts,
                                                      # before paying for parse_toc
    for chunk in toc.chunks(toc.lookup("bin/sh")):
        data = decode_chunk(blob[chunk.compressed_offset:chunk.compressed_end], codec=toc.codec,
                            inner_offset=chunk.inner_offset, size=chunk.size,
                            expected_digest=chunk.digest)   # ChunkError, ChunkDigestMismatch

``TOC`` is a compact index (parallel arrays, one names blob; no object per entry). Entry 0 is the
root; every accessor takes an entry index: ``path``, ``name``, ``type`` (:class:`EntryType`),
``mode`` (permission bits incl. setuid/setgid/sticky), ``uid``, ``gid``, ``uname``, ``gname``,
``size``, ``mtime`` ((sec, nsec)), ``linkname``, ``link_target`` (hardlink → data entry),
``device``, ``xattrs``, ``file_digest``, ``nlink``, ``chunks`` (list of :class:`Chunk`:
file_offset, size, compressed_offset, compressed_end, inner_offset, digest, hole), ``parent``,
``children`` (sorted by name), ``lookup(path)``, ``iter_tree()``, ``entry(i)`` (all fields).
TOC-level: ``digest`` (sha256 of the uncompressed JSON = the ``containerd.io/snapshot/stargz/
toc.digest`` annotation, for gzip and zstd), ``manifest_checksum`` (zstd:chunked: sha256 of the
compressed TOC = the ``…zstd-chunked.manifest-checksum`` annotation), ``codec``, ``footer``,
``prefetch_landmark_offset``, ``no_prefetch_landmark``.

Decisions on untrusted TOCs (every violation is a TOCError naming the entry):

* names are cleaned (``./``, ``//``, trailing ``/``); ``..``, absolute names and NUL are refused;
  missing parent directories are created with mode 0755, uid/gid 0;
* a later duplicate replaces an earlier one (tar semantics, as upstream's reader), but a
  directory and a non-directory may not replace each other; a repeated directory keeps its
  children and takes the later metadata;
* hardlinks must name an earlier non-directory entry and resolve to the entry holding the data;
* ``mode`` is masked with 0o7777 (some writers leave type bits in it); type comes from ``type``;
* every payload's (offset, innerOffset) must strictly increase in TOC order and lie below the TOC;
  a chunk's compressed extent ends at the next payload's offset (the last one at the TOC);
* chunks must tile their file exactly; a chunk larger than ``max_chunk_size`` (256 MiB), more
  than ``max_entries`` entries, or JSON over ``max_uncompressed`` (256 MiB) is refused;
* ``.prefetch.landmark``, ``.no.prefetch.landmark`` and ``stargz.index.json`` at the layer root
  are hidden from the tree (they stay in the TOC the digest covers).

A chunk's ``digest`` is ``chunkDigest``, or for single-chunk files of TOCs without any chunk
entries (legacy stargz), the file's ``digest``, as upstream accepts.

Thread safety: every function is pure and a built ``TOC`` is immutable, so any thread may read it.
``parse_toc`` is CPU-bound (about 1 s per 100k entries) and pauses the cyclic GC while it runs:
call it from a worker thread in async code.

Also here: :class:`BlobReader`, a synchronous convenience over ``read_at(offset, length)``
(``read_file``, ``read_chunks``, ``iter_tree``) with :class:`BlobFile` for local files;
:func:`extract` (tree to a directory through dir fds, never outside it); :func:`convert` /
:func:`convert_file`, the writer (tar, tar.gz or tar.zst in; eStargz or zstd:chunked out; chunk size,
level, prioritized files + ``.prefetch.landmark``; returns a :class:`ConvertResult` with TOC digest,
diffID, sizes and the layer annotations; raises :class:`InputError`). ``python -m estargz``
(``toc``, ``ls``, ``extract``, ``convert``) is the command line.
"""

from __future__ import annotations

from ._chunks import Codec as Codec
from ._chunks import decode_chunk as decode_chunk
from ._extract import extract as extract
from ._footer import MAX_FOOTER_SIZE as MAX_FOOTER_SIZE
from ._footer import Footer as Footer
from ._footer import FooterKind as FooterKind
from ._footer import parse_footer as parse_footer
from ._parse import DEFAULT_MAX_TOC_SIZE as DEFAULT_MAX_TOC_SIZE
from ._parse import parse_toc as parse_toc
from ._parse import parse_toc_json as parse_toc_json
from ._parse import toc_digests as toc_digests
from ._parse import verify_toc as verify_toc
from ._reader import BlobFile as BlobFile
from ._reader import BlobReader as BlobReader
from ._toc import ROOT as ROOT
from ._toc import TOC as TOC
from ._toc import Chunk as Chunk
from ._toc import Entry as Entry
from ._toc import EntryType as EntryType
from ._toc import TOCStatistics as TOCStatistics
from ._writer import ConvertResult as ConvertResult
from ._writer import convert as convert
from ._writer import convert_file as convert_file
from .errors import ChunkDigestMismatch as ChunkDigestMismatch
from .errors import ChunkError as ChunkError
from .errors import EstargzError as EstargzError
from .errors import FooterError as FooterError
from .errors import InputError as InputError
from .errors import NeedsExternalTOC as NeedsExternalTOC
from .errors import TOCDigestMismatch as TOCDigestMismatch
from .errors import TOCError as TOCError
from .errors import UnsupportedFormat as UnsupportedFormat

__all__ = [
    "DEFAULT_MAX_TOC_SIZE",
    "MAX_FOOTER_SIZE",
    "ROOT",
    "TOC",
    "BlobFile",
    "BlobReader",
    "Chunk",
    "ChunkDigestMismatch",
    "ChunkError",
    "Codec",
    "ConvertResult",
    "Entry",
    "EntryType",
    "EstargzError",
    "Footer",
    "FooterError",
    "FooterKind",
    "InputError",
    "NeedsExternalTOC",
    "TOCDigestMismatch",
    "TOCError",
    "TOCStatistics",
    "UnsupportedFormat",
    "convert",
    "convert_file",
    "decode_chunk",
    "extract",
    "parse_footer",
    "parse_toc",
    "parse_toc_json",
    "toc_digests",
    "verify_toc",
]
