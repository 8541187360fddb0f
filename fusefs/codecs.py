"""Chunk decoding and verification: compressed blob bytes → the exact, verified chunk bytes.

Pure CPU work with bounded output; callers run it in a worker thread for large chunks.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from typing import TypeAlias

import zstandard

from fusefs.errors import FormatError, IntegrityError, UnsupportedFormat
from fusefs.index import Chunk, Codec

ChunkBytes: TypeAlias = bytes | bytearray  # a verified chunk: decoded here, or read from the cache

# Streaming: decoded output and compressed input per step. A piece is a quarter MiB of heap,
# where a whole 4 MiB chunk decoded at once costs twice its size (zlib joins its output blocks).
PIECE_BYTES = 256 * 1024
_INPUT_BYTES = 64 * 1024


def decode(chunk: Chunk, compressed: bytes | memoryview) -> bytearray:
    """Decode ``compressed`` (the chunk's blob range) and return its verified bytes.

    The bytes are decoded in pieces into one buffer of the chunk's size: a chunk costs its
    size once, not twice as zlib's one-shot output would while it joins its blocks.

    Raises:
        IntegrityError: undecodable data, a short stream or a digest mismatch (the source
            returned wrong bytes; the caller must neither serve nor cache anything).
        UnsupportedFormat: a codec this build cannot decode.
    """
    out = bytearray(chunk.size)
    with memoryview(out) as view:
        pos = 0
        for piece in _pieces(chunk, compressed, PIECE_BYTES, _INPUT_BYTES):
            view[pos:pos + len(piece)] = piece
            pos += len(piece)
    verify(chunk, out)
    return out


def decoded_pieces(chunk: Chunk, compressed: bytes | memoryview) -> Iterator[bytes]:
    """Yield the chunk's bytes in pieces of at most ``PIECE_BYTES``, for a writer that keeps
    nothing visible until the end: the size and digest are checked only after the last piece,
    where IntegrityError is raised as by :func:`decode`.
    """
    digest = hashlib.sha256()
    for piece in _pieces(chunk, compressed, PIECE_BYTES, _INPUT_BYTES):
        digest.update(piece)
        yield piece
    if digest.digest() != chunk.digest:
        raise _mismatch(chunk)


def verify(chunk: Chunk, data: bytes | bytearray) -> None:
    """Raise IntegrityError unless sha256(data) is the chunk's digest."""
    if hashlib.sha256(data).digest() != chunk.digest:
        raise _mismatch(chunk)


def _mismatch(chunk: Chunk) -> IntegrityError:
    return IntegrityError(f"chunk at blob offset {chunk.blob_offset} (file offset {chunk.file_offset}) "
                          f"does not match sha256:{chunk.digest_hex}")


def _pieces(chunk: Chunk, compressed: bytes | memoryview, out_step: int, in_step: int) -> Iterator[bytes]:
    """The chunk's decoded bytes (its ``inner_offset`` skipped), at most ``out_step`` at a time;
    raises IntegrityError when they do not decode or come out short."""
    want = chunk.inner_offset + chunk.size
    if chunk.codec == Codec.GZIP:
        raw = _gunzip(compressed, want, out_step, in_step)
    elif chunk.codec == Codec.ZSTD:
        raw = _unzstd(compressed, want, out_step)
    elif chunk.codec == Codec.RAW:
        view = memoryview(compressed)[:want]
        raw = (bytes(view[i:i + out_step]) for i in range(0, len(view), out_step))
    else:
        raise UnsupportedFormat(f"codec {chunk.codec.name} is not supported yet")
    skip, got = chunk.inner_offset, 0
    try:
        for piece in raw:
            if skip:
                if len(piece) <= skip:
                    skip -= len(piece)
                    continue
                piece, skip = piece[skip:], 0
            got += len(piece)
            yield piece
    except (zlib.error, zstandard.ZstdError) as exc:
        raise IntegrityError(f"chunk at blob offset {chunk.blob_offset} does not decode: {exc}") from exc
    if got != chunk.size:
        raise IntegrityError(
            f"chunk at blob offset {chunk.blob_offset} decodes to {got} bytes, expected {chunk.size}"
        )


def _gunzip(data: bytes | memoryview, want: int, out_step: int, in_step: int) -> Iterator[bytes]:
    # Concatenated members continue the stream (innerOffset layouts span several members).
    view = memoryview(data)
    pos = have = 0
    d = zlib.decompressobj(wbits=31)
    pending: bytes | memoryview = b""
    while have < want:
        if not pending:
            if pos >= len(view):
                return  # input ends first: short
            pending = view[pos:pos + in_step]
            pos += len(pending)
        part = d.decompress(pending, min(out_step, want - have))
        pending = d.unconsumed_tail
        if part:
            have += len(part)
            yield part
        if d.eof:
            pos -= len(d.unused_data) + len(pending)  # the next member starts after this one
            pending = b""
            if pos >= len(view):
                return
            d = zlib.decompressobj(wbits=31)


def _unzstd(data: bytes | memoryview, want: int, out_step: int) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    have = 0
    while have < want:
        part = reader.read(min(out_step, want - have))
        if not part:
            return
        if len(part) > want - have:
            raise FormatError("zstd reader returned more than asked")
        have += len(part)
        yield part
