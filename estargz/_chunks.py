"""Decoding one chunk: a gzip member or a zstd frame, bounded and verified.

Pure functions over bytes: no I/O. ``decode_chunk`` never produces more than
``inner_offset + size`` bytes whatever the compressed input claims, so a compression bomb in a
chunk costs at most the chunk size the (verified) TOC allows.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import zlib

import zstandard

from .errors import ChunkDigestMismatch, ChunkError

__all__ = ["Codec", "decode_chunk", "verify_digest"]


class Codec(enum.Enum):
    """How a blob's payloads are compressed."""

    GZIP = "gzip"
    ZSTD = "zstd"


def decode_chunk(
    compressed: bytes,
    *,
    codec: Codec,
    inner_offset: int,
    size: int,
    expected_digest: str | None,
) -> bytes:
    """Decode ``compressed`` = ``blob[chunk.compressed_offset:chunk.compressed_end]``.

    Skips ``inner_offset`` decoded bytes and returns the next ``size`` bytes, checked against
    ``expected_digest`` (``sha256:<hex>``) when one is given. Runs in the calling thread; zlib and
    zstd release the GIL, so large chunks may be decoded in a worker thread.

    Raises:
        ChunkError: corrupt stream, or fewer than ``inner_offset + size`` bytes decoded.
        ChunkDigestMismatch: the decoded bytes do not match ``expected_digest``.
    """
    if inner_offset < 0 or size < 0:
        raise ChunkError(f"invalid chunk request: inner_offset={inner_offset} size={size}")
    want = inner_offset + size
    out = _gunzip_prefix(compressed, want) if codec is Codec.GZIP else _unzstd_prefix(compressed, want)
    if len(out) < want:
        raise ChunkError(
            f"{codec.value} chunk decoded to {len(out)} bytes, expected at least {want} "
            f"(inner offset {inner_offset} + size {size}); the compressed range is truncated"
        )
    data = out[inner_offset:want] if inner_offset else out
    if expected_digest is not None:
        verify_digest(data, expected_digest, what="chunk")
    return data


def verify_digest(data: bytes, expected: str, *, what: str) -> None:
    """Raise ChunkDigestMismatch unless ``sha256(data)`` equals ``expected`` (``sha256:<hex>``)."""
    algo, _, want = expected.partition(":")
    if algo != "sha256":
        raise ChunkError(f"{what} digest {expected!r} uses an unsupported algorithm")
    got = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(got, want):
        raise ChunkDigestMismatch(f"{what} digest mismatch: expected {expected}, got sha256:{got}")


def _gunzip_prefix(compressed: bytes, want: int) -> bytes:
    parts: list[bytes] = []
    have = 0
    rest = compressed
    try:
        while have < want and rest:
            decoder = zlib.decompressobj(wbits=31)
            piece = decoder.decompress(rest, want - have)
            parts.append(piece)
            have += len(piece)
            if not decoder.eof:
                if have >= want:
                    break
                raise ChunkError("gzip chunk ends in the middle of a member")
            rest = decoder.unused_data
    except zlib.error as exc:
        raise ChunkError(f"corrupt gzip chunk: {exc}") from exc
    return b"".join(parts)


def _unzstd_prefix(compressed: bytes, want: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True)
    try:
        out = bytearray()
        while len(out) < want:
            piece = reader.read(want - len(out))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise ChunkError(f"corrupt zstd chunk: {exc}") from exc
    return bytes(out)
