"""Chunk decoding: whole and piece by piece, bounded by the chunk's size, verified at the end."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from fusefs import codecs
from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig
from fusefs.errors import IntegrityError
from fusefs.index import Chunk, Codec

LAYER = "sha256:" + "c" * 64
# a mix that compresses and does not: several pieces of output, several of input
DATA = os.urandom(300_000) + bytes(700_000) + os.urandom(50_000)


def _chunk(data: bytes, compressed: bytes, codec: Codec, inner: int = 0,
           digest: bytes | None = None) -> Chunk:
    return Chunk(file_offset=0, size=len(data), blob_offset=0, blob_end=len(compressed), inner_offset=inner,
                 codec=codec, digest=digest if digest is not None else hashlib.sha256(data).digest())


def _pieced(chunk: Chunk, compressed: bytes) -> bytes:
    pieces = list(codecs.decoded_pieces(chunk, compressed))
    assert all(len(p) <= codecs.PIECE_BYTES for p in pieces)
    return b"".join(pieces)


DECODERS: list[Callable[[Chunk, bytes], bytes]] = [codecs.decode, _pieced]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("codec", [Codec.GZIP, Codec.ZSTD, Codec.RAW])
def test_each_codec_round_trips(decoder: Callable[[Chunk, bytes], bytes], codec: Codec) -> None:
    compressed = {Codec.GZIP: gzip.compress, Codec.ZSTD: zstandard.ZstdCompressor().compress,
                  Codec.RAW: bytes}[codec](DATA)
    assert decoder(_chunk(DATA, compressed, codec), compressed) == DATA


@pytest.mark.parametrize("decoder", DECODERS)
def test_an_inner_offset_chunk_spans_gzip_members(decoder: Callable[[Chunk, bytes], bytes]) -> None:
    # three members; the chunk starts inside the first and ends inside the third
    parts = [os.urandom(200_000), os.urandom(400_000), os.urandom(300_000)]
    compressed = b"".join(gzip.compress(p) for p in parts)
    stream = b"".join(parts)
    want = stream[150_000:750_000]
    assert decoder(_chunk(want, compressed, Codec.GZIP, inner=150_000), compressed) == want


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_short_stream_is_an_integrity_error(decoder: Callable[[Chunk, bytes], bytes]) -> None:
    compressed = gzip.compress(DATA)
    with pytest.raises(IntegrityError, match=r"decodes to|does not decode"):
        decoder(_chunk(DATA, compressed, Codec.GZIP), compressed[:len(compressed) // 2])


@pytest.mark.parametrize("decoder", DECODERS)
def test_wrong_bytes_are_an_integrity_error(decoder: Callable[[Chunk, bytes], bytes]) -> None:
    compressed = gzip.compress(DATA)
    with pytest.raises(IntegrityError, match="does not match"):
        decoder(_chunk(DATA, compressed, Codec.GZIP, digest=bytes(32)), compressed)


@pytest.mark.parametrize("decoder", DECODERS)
def test_garbage_is_an_integrity_error(decoder: Callable[[Chunk, bytes], bytes]) -> None:
    garbage = os.urandom(5000)
    with pytest.raises(IntegrityError, match="does not decode"):
        decoder(_chunk(DATA, garbage, Codec.GZIP), garbage)


def test_a_bomb_is_decoded_no_further_than_the_chunk() -> None:
    # 129 MiB of zeros in one member, for a chunk that claims its first 1 MiB
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = z.compress(bytes(1 << 20)) + b"".join(z.compress(bytes(1 << 24)) for _ in range(8)) + z.flush()
    want = bytes(1 << 20)
    chunk = _chunk(want, bomb, Codec.GZIP)
    total = sum(len(p) for p in codecs.decoded_pieces(chunk, bomb))
    assert total == len(want)
    assert codecs.decode(chunk, bomb) == want


def test_pieces_go_into_the_cache_and_only_verified_chunks_stay(tmp_path: Path) -> None:
    cache = ChunkCache(CacheConfig(tmp_path, max_bytes=10 << 20, fsync=False))
    compressed = gzip.compress(DATA)
    good = _chunk(DATA, compressed, Codec.GZIP)
    assert cache.put_pieces(LAYER, "good", good.size, codecs.decoded_pieces(good, compressed))
    assert cache.read(LAYER, "good") == DATA
    bad = _chunk(DATA, compressed, Codec.GZIP, digest=bytes(32))
    with pytest.raises(IntegrityError):
        cache.put_pieces(LAYER, "bad", bad.size, codecs.decoded_pieces(bad, compressed))
    assert cache.read(LAYER, "bad") is None
    assert cache.statistics().bytes_cached == len(DATA)
    assert sorted(p.name for p in (tmp_path / "chunks").rglob("*") if p.is_file()) == ["good"]


def test_pieces_that_do_not_add_up_are_not_kept(tmp_path: Path) -> None:
    cache = ChunkCache(CacheConfig(tmp_path, max_bytes=1000, fsync=False))
    assert not cache.put_pieces(LAYER, "short", 10, iter([b"12345"]))
    assert not cache.put_pieces(LAYER, "long", 10, iter([b"12345", b"678901"]))
    assert cache.put_pieces(LAYER, "exact", 10, iter([b"12345", b"67890"]))
    assert cache.read(LAYER, "exact") == b"1234567890"
    assert cache.read(LAYER, "short") is None and cache.read(LAYER, "long") is None
    assert cache.statistics().bytes_cached == 10
