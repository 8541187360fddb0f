"""Chunk decoding and verification: compressed blob bytes → the exact, verified chunk bytes.

Pure CPU work with bounded output; callers run it in a worker thread for large chunks.
"""

from __future__ import annotations

import hashlib
import zlib

import zstandard

from fusefs.errors import FormatError, IntegrityError, UnsupportedFormat
from fusefs.index import Chunk, Codec


def decode(chunk: Chunk, compressed: bytes | memoryview) -> bytes:
    """Decode ``compressed`` (the chunk's blob range) and return its verified bytes.

    Raises:
        IntegrityError: undecodable data, a short stream or a digest mismatch (the source
            returned wrong bytes; the caller must neither serve nor cache anything).
        UnsupportedFormat: a codec this build cannot decode.
    """
    want = chunk.inner_offset + chunk.size
    try:
        if chunk.codec == Codec.GZIP:
            out = _gunzip_prefix(compressed, want)
        elif chunk.codec == Codec.ZSTD:
            out = _unzstd_prefix(compressed, want)
        elif chunk.codec == Codec.RAW:
            out = bytes(compressed[:want])
        else:
            raise UnsupportedFormat(f"codec {chunk.codec.name} is not supported yet")
    except (zlib.error, zstandard.ZstdError) as exc:
        raise IntegrityError(f"chunk at blob offset {chunk.blob_offset} does not decode: {exc}") from exc
    data = out[chunk.inner_offset:want]
    if len(data) != chunk.size:
        raise IntegrityError(
            f"chunk at blob offset {chunk.blob_offset} decodes to {len(data)} bytes, expected {chunk.size}"
        )
    verify(chunk, data)
    return data


def verify(chunk: Chunk, data: bytes) -> None:
    """Raise IntegrityError unless sha256(data) is the chunk's digest."""
    if hashlib.sha256(data).digest() != chunk.digest:
        raise IntegrityError(
            f"chunk at blob offset {chunk.blob_offset} (file offset {chunk.file_offset}) "
            f"does not match sha256:{chunk.digest_hex}"
        )


def _gunzip_prefix(data: bytes | memoryview, want: int) -> bytes:
    # Concatenated members continue the stream (innerOffset layouts span several members).
    parts: list[bytes] = []
    have = 0
    while have < want and data:
        d = zlib.decompressobj(wbits=31)
        part = d.decompress(data, want - have)
        parts.append(part)
        have += len(part)
        if have >= want or not d.eof:
            break
        data = d.unused_data
    return b"".join(parts)


def _unzstd_prefix(data: bytes | memoryview, want: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    parts: list[bytes] = []
    have = 0
    while have < want:
        part = reader.read(want - have)
        if not part:
            break
        parts.append(part)
        have += len(part)
    if have > want:
        raise FormatError("zstd reader returned more than asked")
    return b"".join(parts)
