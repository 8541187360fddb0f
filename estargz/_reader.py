"""A synchronous reader over any random-access byte source, for the CLI, tests and tools.

``BlobReader`` is a convenience built on the sans-I/O core: it asks ``read_at`` for the footer,
the TOC and each chunk's compressed range, and decodes and verifies them. Async callers (the FUSE
layer) drive the core functions directly instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator

from ._chunks import decode_chunk, verify_digest
from ._footer import MAX_FOOTER_SIZE, Footer, parse_footer
from ._parse import DEFAULT_MAX_TOC_SIZE, parse_toc, verify_toc
from ._toc import TOC, Chunk, Entry, EntryType
from .errors import ChunkDigestMismatch, ChunkError, EstargzError

__all__ = ["BlobFile", "BlobReader"]

ReadAt = Callable[[int, int], bytes]


class BlobReader:
    """Reads an eStargz / zstd:chunked blob through ``read_at(offset, length) -> bytes``.

    The footer and TOC are read and indexed on construction. When ``expected_toc_digest`` is
    given the TOC is verified against it before anything else can be read.

    Raises (from the constructor):
        FooterError, TOCError, NeedsExternalTOC, TOCDigestMismatch: see :mod:`estargz.errors`.
    """

    def __init__(
        self,
        read_at: ReadAt,
        size: int,
        *,
        expected_toc_digest: str | None = None,
        max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    ) -> None:
        self._read_at = read_at
        self.size = size
        tail_len = min(size, MAX_FOOTER_SIZE)
        self.footer: Footer = parse_footer(self._read(size - tail_len, tail_len), size)
        if self.footer.needs_external_toc:
            self.toc: TOC = parse_toc(b"", self.footer)  # raises NeedsExternalTOC
        data = self._read(self.footer.toc_offset, self.footer.toc_end - self.footer.toc_offset)
        self.toc = parse_toc(data, self.footer, max_uncompressed=max_toc_size)
        if expected_toc_digest is not None:
            verify_toc(self.toc, expected_toc_digest)

    def _read(self, offset: int, length: int) -> bytes:
        data = self._read_at(offset, length)
        if len(data) != length:
            raise EstargzError(f"short read at blob offset {offset}: {len(data)} of {length} bytes")
        return data

    def read_chunks(self, index: int) -> Iterator[bytes]:
        """The content of regular file ``index`` chunk by chunk; nothing unverified is yielded.

        Chunks with their own digest are verified one by one. When some chunk has none (legacy
        multi-chunk files) the whole file is decoded, checked against the file digest, and only
        then yielded. The file digest, when present, is always checked at the end as well.

        Raises:
            ChunkError / ChunkDigestMismatch: a chunk cannot be decoded or verified, or the file
                has neither chunk digests nor a file digest to verify against.
        """
        toc = self.toc
        target = toc.link_target(index)
        if toc.type(target) != EntryType.REG:
            raise ChunkError(f"{toc.path(index)!r} is a {toc.type(target).label}, not a regular file")
        file_digest = toc.file_digest(target)
        chunks = toc.chunks(target)
        if any(c.digest is None for c in chunks):
            if file_digest is None:
                raise ChunkError(f"{toc.path(index)!r} has chunks without digests and no file digest")
            data = b"".join(self._decode(index, c) for c in chunks)
            verify_digest(data, file_digest, what=f"file {toc.path(index)!r}")
            yield data
            return
        whole = hashlib.sha256()
        for chunk in chunks:
            data = self._decode(index, chunk)
            whole.update(data)
            yield data
        if file_digest is not None and "sha256:" + whole.hexdigest() != file_digest:
            raise ChunkDigestMismatch(
                f"{toc.path(index)!r}: content is sha256:{whole.hexdigest()}, the TOC says {file_digest}"
            )

    def _decode(self, index: int, chunk: Chunk) -> bytes:
        """One chunk's bytes, checked against its own digest when it has one."""
        where = f"{self.toc.path(index)!r} at file offset {chunk.file_offset}"
        if chunk.hole:
            data = bytes(chunk.size)
            if chunk.digest is not None:
                verify_digest(data, chunk.digest, what=f"chunk of {where}")
            return data
        raw = self._read(chunk.compressed_offset, chunk.compressed_end - chunk.compressed_offset)
        try:
            return decode_chunk(
                raw,
                codec=self.toc.codec,
                inner_offset=chunk.inner_offset,
                size=chunk.size,
                expected_digest=chunk.digest,
            )
        except ChunkError as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def read_file(self, path: str) -> bytes:
        """The whole content of the regular file at ``path``, every chunk verified.

        Raises:
            FileNotFoundError: no such entry. ChunkError: as :meth:`read_chunks`.
        """
        index = self.toc.lookup(path)
        if index is None:
            raise FileNotFoundError(path)
        return b"".join(self.read_chunks(index))

    def iter_tree(self) -> Iterator[Entry]:
        """Every entry of the layer (root and hidden landmarks excluded), parents first."""
        for i in self.toc.iter_tree():
            yield self.toc.entry(i)


class BlobFile:
    """A local blob file as a ``read_at`` source; use as a context manager to close it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise EstargzError(f"read of {length} bytes at {offset} is outside the {self.size}-byte blob")
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BlobFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
