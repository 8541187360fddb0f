"""ChunkCache: only what is put is read back, bounded with LRU of unpinned layers, persistent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig
from fusefs.errors import FormatError

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def _cache(path: Path, max_bytes: int = 1000) -> ChunkCache:
    return ChunkCache(CacheConfig(path, max_bytes=max_bytes, fsync=False))


def test_put_read_partial_and_miss(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    assert cache.read(A, "k1") is None
    assert cache.put(A, "k1", b"0123456789")
    assert cache.read(A, "k1") == b"0123456789"
    assert cache.read(A, "k1", 3, 4) == b"3456"
    assert cache.read(A, "k1", 8, 100) == b"89"
    assert cache.read(B, "k1") is None
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.bytes_cached, stats.chunks_cached) == (3, 2, 10, 1)


def test_lru_eviction_spares_pinned_layers(tmp_path: Path) -> None:
    cache = _cache(tmp_path, max_bytes=300)
    cache.pin(A)
    assert cache.put(A, "a1", b"a" * 100)
    assert cache.put(B, "b1", b"b" * 100)
    assert cache.put(B, "b2", b"b" * 100)
    assert cache.read(B, "b1") is not None  # b1 is now more recent than b2
    assert cache.put(A, "a2", b"a" * 100)  # evicts b2, the least recently used unpinned chunk
    assert cache.read(B, "b2") is None and cache.read(B, "b1") is not None
    assert not (tmp_path / "chunks" / B[7:] / "b2").exists()
    assert cache.put(A, "a3", b"a" * 100)  # evicts b1
    assert cache.read(B, "b1") is None
    # only pinned chunks left: serve-but-don't-keep
    assert not cache.put(A, "a4", b"a" * 100)
    assert cache.read(A, "a4") is None
    assert cache.statistics().bytes_cached == 300 and cache.statistics().not_kept == 1
    cache.unpin(A)
    assert cache.put(B, "b3", b"b" * 100)  # A is evictable again
    assert cache.statistics().bytes_cached <= 300


def test_restart_rebuilds_accounting_and_drops_partial_writes(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.put(A, "k1", b"x" * 10)
    cache.put(B, "k2", b"y" * 20)
    cache.save_index(A, b"index bytes")
    cache.close()
    leftover = tmp_path / "chunks" / A[7:] / ".tmp-k3-0000"
    leftover.write_bytes(b"partial")
    again = _cache(tmp_path)
    assert again.statistics().bytes_cached == 30
    assert again.read(A, "k1") == b"x" * 10 and again.read(B, "k2") == b"y" * 20
    assert not leftover.exists()
    assert again.load_index(A) == b"index bytes"
    smaller = _cache(tmp_path, max_bytes=20)  # restarting with a smaller bound evicts at once
    assert smaller.statistics().bytes_cached <= 20


def test_forget_layer_removes_everything(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.put(A, "k1", b"x" * 10)
    cache.save_index(A, b"idx")
    cache.forget_layer(A)
    assert cache.read(A, "k1") is None and cache.load_index(A) is None
    assert cache.statistics().bytes_cached == 0
    assert not (tmp_path / "chunks" / A[7:]).exists()


def test_a_forgotten_layer_stores_nothing_until_it_is_mounted_again(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.put(A, "k1", b"x" * 10)
    cache.forget_layer(A)
    # a speculative fetch of the released layer that was still running
    assert not cache.put(A, "k2", b"y" * 10)
    assert cache.read(A, "k2") is None and cache.statistics().bytes_cached == 0
    assert not (tmp_path / "chunks" / A[7:]).exists()
    cache.pin(A)  # pulled and mounted again
    assert cache.put(A, "k2", b"y" * 10) and cache.read(A, "k2") == b"y" * 10


def test_a_layer_forgotten_during_a_write_keeps_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(tmp_path)
    rename = os.rename

    def rename_then_forget(src: Path, dst: Path) -> None:
        rename(src, dst)
        cache.forget_layer(A)  # released while the chunk was being written

    monkeypatch.setattr(os, "rename", rename_then_forget)
    assert not cache.put(A, "k1", b"x" * 10)
    assert cache.statistics().bytes_cached == 0
    assert not (tmp_path / "chunks" / A[7:] / "k1").exists()


def test_failed_write_is_not_fatal(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    (tmp_path / "chunks" / A[7:]).write_bytes(b"not a directory")
    assert not cache.put(A, "k1", b"data")
    assert cache.read(A, "k1") is None and cache.statistics().bytes_cached == 0


def test_truncated_cache_file_is_a_miss(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    cache.put(A, "k1", b"x" * 10)
    os.truncate(tmp_path / "chunks" / A[7:] / "k1", 3)  # damaged behind the cache's back
    assert cache.read(A, "k1") is None
    assert cache.statistics().bytes_cached == 0
    assert not (tmp_path / "chunks" / A[7:] / "k1").exists()


@pytest.mark.parametrize("digest", ["sha256:../../etc", "sha512:" + "a" * 64, "a" * 64])
def test_layer_digests_are_validated(tmp_path: Path, digest: str) -> None:
    with pytest.raises(FormatError):
        _cache(tmp_path).put(digest, "k", b"x")


def test_keys_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _cache(tmp_path).put(A, "../x", b"x")


def _tmp_files(path: Path) -> list[str]:
    return [p.name for p in (path / "chunks").rglob(".tmp-*")]


def test_a_staged_chunk_is_read_from_its_file_and_visible_only_once_committed(tmp_path: Path) -> None:
    cache = _cache(tmp_path, max_bytes=25)
    staged = cache.stage(A, "k1", 10, [b"01234", b"56789"])
    assert staged is not None and len(staged) == 10
    assert staged.pread(2, 3) == b"234" and staged.pread(8, 100) == b"89"
    assert not cache.contains(A, "k1") and cache.read(A, "k1") is None
    assert cache.statistics().bytes_cached == 10  # reserved while staged
    assert cache.stage(A, "k2", 20, [b"x" * 20]) is None  # the reservation counts against the bound
    assert cache.commit(staged)
    assert cache.read(A, "k1") == b"0123456789" and _tmp_files(tmp_path) == []
    assert staged.pread(0, 4) == b"0123"  # still open: readable until closed
    staged.close()
    assert staged.pread(0, 4) is None
    with pytest.raises(ValueError, match="already committed"):
        cache.commit(staged)
    cache.discard(staged)  # settled: nothing to give back
    assert cache.statistics().bytes_cached == 10 and cache.read(A, "k1") == b"0123456789"


def test_a_discarded_or_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    staged = cache.stage(A, "k1", 4, [b"abcd"])
    assert staged is not None
    cache.discard(staged)
    assert staged.pread(0, 1) is None and _tmp_files(tmp_path) == []
    assert cache.statistics().bytes_cached == 0 and not cache.contains(A, "k1")

    def failing() -> Iterator[bytes]:
        yield b"ab"
        raise RuntimeError("digest mismatch")

    with pytest.raises(RuntimeError):
        cache.stage(A, "k2", 4, failing())
    assert cache.stage(A, "k3", 4, [b"abc"]) is None  # pieces short of the size
    assert cache.stage(A, "k3", 4, [b"abc", b"de"]) is None  # and past it
    assert _tmp_files(tmp_path) == [] and cache.statistics().bytes_cached == 0


def test_a_staged_chunk_of_a_forgotten_layer_is_not_kept(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    staged = cache.stage(A, "k1", 4, [b"abcd"])
    assert staged is not None
    cache.forget_layer(A)
    assert not cache.commit(staged)
    staged.close()
    assert cache.statistics().bytes_cached == 0 and cache.read(A, "k1") is None
