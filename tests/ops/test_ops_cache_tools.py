"""ChunkCache's operator tools on a real cache directory: usage per layer, prune, verify."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fusefs.cache import ChunkCache, PruneResult
from fusefs.config import CacheConfig

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def _put(cache: ChunkCache, layer: str, data: bytes) -> str:
    key = hashlib.sha256(data).hexdigest()
    assert cache.put(layer, key, data)
    return key


def _cache(path: Path) -> ChunkCache:
    return ChunkCache(CacheConfig(path, max_bytes=1 << 20, fsync=False))


def test_usage_and_prune_unused_spares_mounted_layers(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.pin(A)
    a = _put(cache, A, b"a" * 100)
    b1, b2 = _put(cache, B, b"b" * 200), _put(cache, B, b"c" * 300)
    assert cache.layer_usage() == {A: (1, 100), B: (2, 500)}
    assert cache.pinned_layers() == {A}

    assert cache.prune(400) == PruneResult(1, 200)  # least recently used first: b1
    assert not cache.contains(B, b1) and cache.contains(B, b2)
    result = cache.prune(0)
    assert (result.chunks, result.bytes) == (1, 300)
    assert cache.contains(A, a) and cache.statistics().bytes_cached == 100
    assert not (tmp_path / "chunks" / B[7:] / b2).exists()


def test_prune_including_mounted_layers_empties_the_cache(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.pin(A)
    a = _put(cache, A, b"a" * 100)
    _put(cache, B, b"b" * 200)
    result = cache.prune(0, include_pinned=True)
    assert (result.chunks, result.bytes) == (2, 300)
    assert cache.statistics().bytes_cached == 0 and cache.read(A, a) is None
    assert _put(cache, A, b"a" * 100) == a  # a mounted layer's chunk can be stored again


def test_verify_drops_only_corrupt_chunks(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    good = _put(cache, A, b"good" * 50)
    bad = _put(cache, A, b"bad!" * 50)
    assert cache.read(A, bad) == b"bad!" * 50  # an open descriptor must not hide the corruption
    path = tmp_path / "chunks" / A[7:] / bad
    path.write_bytes(b"BAD!" + path.read_bytes()[4:])

    result = cache.verify()
    assert result.checked == 2 and result.corrupt == (f"{A}/{bad}",)
    assert cache.read(A, bad) is None and not path.exists()
    assert cache.read(A, good) == b"good" * 50
    assert cache.verify().corrupt == ()
    assert ChunkCache(CacheConfig(tmp_path, max_bytes=1 << 20, fsync=False)).layer_usage() == {A: (1, 200)}
