"""``parse_toc``: decompress the TOC found through the footer, bounded, and index it."""

from __future__ import annotations

import codecs
import hashlib
import hmac
import io
import tarfile
import zlib
from collections.abc import Iterator

import zstandard

from ._chunks import Codec
from ._footer import Footer, FooterKind
from ._index import (
    DEFAULT_MAX_CHUNK_SIZE,
    DEFAULT_MAX_ENTRIES,
    index_toc_json,
    index_toc_pieces,
)
from ._toc import TOC
from .errors import NeedsExternalTOC, TOCDigestMismatch, TOCError

__all__ = ["DEFAULT_MAX_TOC_SIZE", "TOC_TAR_NAME", "parse_toc", "parse_toc_json", "toc_digests", "verify_toc"]

DEFAULT_MAX_TOC_SIZE = 256 << 20
TOC_TAR_NAME = "stargz.index.json"
_BLOCK = 512
_PIECE = 256 << 10  # decompressed TOC JSON is walked in pieces of this size


def parse_toc(
    data: bytes,
    footer: Footer,
    *,
    max_uncompressed: int = DEFAULT_MAX_TOC_SIZE,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
) -> TOC:
    """Decompress and index the TOC; ``data`` = ``blob[footer.toc_offset:footer.toc_end]``.

    The result is not yet trusted: check it with :func:`verify_toc` against the digest from the
    image manifest before serving any byte through it. CPU-bound (about 1 s per 100k entries on
    one core): call it from a worker thread in async code.

    Raises:
        NeedsExternalTOC: the footer says the TOC is in a separate TOC image.
        TOCError: truncated or corrupt TOC, over ``max_uncompressed`` bytes of JSON, more than
            ``max_entries`` entries, a chunk over ``max_chunk_size``, or an entry that lies.
    """
    raw, codec, manifest_checksum = _toc_json_pieces(data, footer, max_uncompressed)
    # The JSON is decompressed, hashed, decoded and walked piece by piece: neither its bytes nor
    # its text exist whole (they were ~2/5 of the peak memory of indexing).
    hasher = hashlib.sha256()
    json_size = 0

    def texts() -> Iterator[str]:
        nonlocal json_size
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for piece in raw:
                hasher.update(piece)
                json_size += len(piece)
                yield decoder.decode(piece)
            yield decoder.decode(b"", True)
        except UnicodeDecodeError as exc:
            raise TOCError(f"TOC JSON is not valid UTF-8: {exc}") from None

    toc, _ = index_toc_pieces(texts(), footer, codec=codec, max_entries=max_entries,
                              max_chunk_size=max_chunk_size)
    toc.digest = "sha256:" + hasher.hexdigest()
    toc.manifest_checksum = manifest_checksum
    toc.json_size = json_size
    return toc


def toc_digests(data: bytes, footer: Footer, *, max_uncompressed: int = DEFAULT_MAX_TOC_SIZE
                ) -> tuple[str, ...]:
    """The digests :func:`verify_toc` accepts for this TOC, without indexing it.

    ``data`` is as for :func:`parse_toc`. Decompresses and hashes the JSON piece by piece (a few
    hundredths of a second per MB of JSON, in C): a caller can check the TOC against the image
    manifest before paying for :func:`parse_toc`. A TOC that matches may still fail to parse.

    Raises:
        NeedsExternalTOC, TOCError: as :func:`parse_toc`, for the footer and the compression.
    """
    raw, _, manifest_checksum = _toc_json_pieces(data, footer, max_uncompressed)
    hasher = hashlib.sha256()
    for piece in raw:
        hasher.update(piece)
    digest = "sha256:" + hasher.hexdigest()
    return (digest, manifest_checksum) if manifest_checksum else (digest,)


def _toc_json_pieces(data: bytes, footer: Footer, limit: int
                     ) -> tuple[Iterator[bytes], Codec, str | None]:
    """The TOC JSON in pieces, the chunks' codec and, for zstd:chunked, the manifest checksum."""
    if footer.kind is FooterKind.EXTERNAL_TOC:
        raise NeedsExternalTOC("the blob's TOC is stored in a separate TOC image (STARGZEXTERNALTOC)")
    expected_len = footer.toc_end - footer.toc_offset
    if len(data) != expected_len:
        raise TOCError(f"TOC data is {len(data)} bytes but the footer says {expected_len}")
    if footer.kind.is_zstd:
        return (_unzstd_toc_pieces(data, footer, limit), Codec.ZSTD,
                "sha256:" + hashlib.sha256(data).hexdigest())
    return _gunzip_toc_pieces(data, limit), Codec.GZIP, None


def parse_toc_json(
    json_bytes: bytes,
    footer: Footer,
    *,
    codec: Codec,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
) -> TOC:
    """Index already-decompressed TOC JSON (e.g. from an external TOC image).

    Raises:
        TOCError: as :func:`parse_toc`.
    """
    toc, _ = index_toc_json(
        json_bytes, footer, codec=codec, max_entries=max_entries, max_chunk_size=max_chunk_size
    )
    toc.digest = "sha256:" + hashlib.sha256(json_bytes).hexdigest()
    toc.manifest_checksum = None
    toc.json_size = len(json_bytes)
    return toc


def verify_toc(toc: TOC, expected_digest: str) -> None:
    """Check the TOC against the digest from the image manifest.

    Accepts the ``containerd.io/snapshot/stargz/toc.digest`` form (sha256 of the uncompressed
    JSON) and, for zstd:chunked, the ``manifest-checksum`` form (sha256 of the compressed TOC):
    both are hashes of bytes this TOC was built from.

    Raises:
        TOCDigestMismatch: neither digest matches.
    """
    candidates = [toc.digest] + ([toc.manifest_checksum] if toc.manifest_checksum else [])
    if not any(hmac.compare_digest(c, expected_digest) for c in candidates):
        raise TOCDigestMismatch(
            f"TOC digest mismatch: expected {expected_digest}, got {' or '.join(candidates)}"
        )


def _gunzip_toc_pieces(data: bytes, limit: int) -> Iterator[bytes]:
    """The JSON inside the TOC gzip member (one tar entry named stargz.index.json), in pieces of
    at most ``_PIECE`` bytes; the tar header is checked before the first piece is asked for."""
    reader = _BoundedGunzip(data)
    header = reader.read(_BLOCK)
    if len(header) < _BLOCK:
        raise TOCError(f"TOC member decompresses to {len(header)} bytes, less than one tar header")
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.TarError as exc:
        raise TOCError(f"TOC member does not start with a tar header: {exc}") from None
    if info.name != TOC_TAR_NAME or not info.isreg():
        raise TOCError(f"TOC tar entry is {info.name!r}, expected a regular file {TOC_TAR_NAME!r}")
    if info.size > limit:
        raise TOCError(f"TOC JSON of {info.size} bytes exceeds the {limit}-byte limit")
    return _gunzip_body(reader, info.size)


def _gunzip_body(reader: _BoundedGunzip, size: int) -> Iterator[bytes]:
    got = 0
    while got < size:
        piece = reader.read(min(_PIECE, size - got))
        if not piece:
            break
        got += len(piece)
        yield piece
    if got != size:
        raise TOCError(f"TOC JSON is truncated: {got} of {size} bytes")


class _BoundedGunzip:
    """Reads a gzip stream (possibly several members) exactly as far as asked, never further."""

    def __init__(self, data: bytes) -> None:
        self._input = data
        self._decoder = zlib.decompressobj(wbits=31)

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        try:
            while n > 0:
                if self._decoder.eof:
                    if not self._decoder.unused_data:
                        break
                    self._input = self._decoder.unused_data
                    self._decoder = zlib.decompressobj(wbits=31)
                piece = self._decoder.decompress(self._input, n)
                self._input = self._decoder.unconsumed_tail
                parts.append(piece)
                n -= len(piece)
                if not piece and not self._input and not self._decoder.eof:
                    break  # input exhausted mid-member: truncated
        except zlib.error as exc:
            raise TOCError(f"TOC gzip stream is corrupt: {exc}") from None
        return b"".join(parts)


def _unzstd_toc_pieces(data: bytes, footer: Footer, limit: int) -> Iterator[bytes]:
    size = footer.toc_uncompressed_size or 0
    if size > limit:
        raise TOCError(f"TOC JSON of {size} bytes exceeds the {limit}-byte limit")
    return _unzstd_body(data, size)


def _unzstd_body(data: bytes, size: int) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    got = 0
    try:
        while got <= size:
            piece = reader.read(min(_PIECE, size + 1 - got))
            if not piece:
                break
            got += len(piece)
            if got > size:
                break
            yield piece
    except zstandard.ZstdError as exc:
        raise TOCError(f"TOC zstd frame is corrupt: {exc}") from None
    if got != size:
        raise TOCError(
            f"TOC decompresses to {'more than ' if got > size else ''}{got} bytes, the footer says {size}"
        )
