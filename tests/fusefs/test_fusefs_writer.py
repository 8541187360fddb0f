"""Write-behind of verified chunks: served at once, stored off the read path, bounded, never refetched."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import trio
import trio.testing

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.sources.file import FileSource
from fusefs.writer import CacheWriter
from tests.fusefs.fixtures import MISS_ONLY, layer_case
from tests.fusefs.test_fusefs_fetch import BIG, CASE, GatedSource, _node


class SlowDiskCache(ChunkCache):
    """A ChunkCache whose puts wait (in the writer's thread) until the test releases the disk."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
        self.disk = threading.Event()
        self.puts = 0

    def put(self, layer_digest: str, key: str, data: bytes) -> bool:
        self.disk.wait(30)
        self.puts += 1
        return super().put(layer_digest, key, data)


def _fetcher(tmp_path: Path, cache: ChunkCache, writer: CacheWriter | None = None
             ) -> tuple[GatedSource, ChunkFetcher]:
    source = GatedSource(CASE.blob, CASE.digest)
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    return source, ChunkFetcher(CASE.digest, index, source, cache, replace(MISS_ONLY, neighbour_bytes=0),
                                PriorityGate(), writer)


def test_a_chunk_is_served_before_it_is_written_and_never_fetched_twice(tmp_path: Path) -> None:
    cache = SlowDiskCache(CacheConfig(tmp_path / "cache", fsync=True))
    source, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)

    async def main() -> None:
        with trio.fail_after(20):
            first = await fetcher.read(node, 0, 4096)  # returns although the disk is held
            cid = fetcher.index.chunks_in(node, 0, 1)[0]
            assert fetcher.is_cached(cid)
            assert not cache.contains(CASE.digest, fetcher.index.chunk_key(cid))
            again = await fetcher.read(node, 4096, 4096)  # same chunk, from memory
            assert len(source.calls) == 1 and len(first + again) == 8192
            cache.disk.set()
            await fetcher.flush()
            assert cache.contains(CASE.digest, fetcher.index.chunk_key(cid))
            assert await fetcher.read(node, 0, 8192) == first + again  # now from the disk
            assert len(source.calls) == 1

    trio.run(main)


def test_the_queue_is_bounded(tmp_path: Path) -> None:
    cache = SlowDiskCache(CacheConfig(tmp_path / "cache", fsync=False))
    writer = CacheWriter(cache, budget=1)  # one chunk queued at a time
    done: list[bool] = []

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(writer.submit, CASE.digest, f"k{i}", b"x" * 10, done.append)
                await trio.testing.wait_all_tasks_blocked()
                assert writer.pending <= 2  # one being written, one queued; the third waits
                cache.disk.set()
            await writer.flush()
            assert done == [True, True, True] and writer.pending == 0 and cache.puts == 3

    trio.run(main)


def test_a_chunk_the_cache_refuses_is_held_in_memory(tmp_path: Path) -> None:
    cache = ChunkCache(CacheConfig(tmp_path / "cache", max_bytes=1, fsync=False))
    cache.pin(CASE.digest)
    source, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)

    async def main() -> None:
        data = await fetcher.read(node, 0, 4096)
        await fetcher.flush()
        assert fetcher.not_kept == 1
        cid = fetcher.index.chunks_in(node, 0, 1)[0]
        assert not fetcher.is_cached(cid)
        assert await fetcher.read(node, 0, 4096) == data  # from the in-memory LRU: no refetch
        assert len(source.calls) == 1

    trio.run(main)


def test_a_new_trio_run_gets_a_new_worker(tmp_path: Path) -> None:
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    writer = CacheWriter(cache)
    done: list[bool] = []

    async def one(key: str) -> None:
        await writer.submit(layer_case("esgz-default", 0).digest, key, b"y", done.append)
        await writer.flush()

    trio.run(one, "a")
    trio.run(one, "b")
    assert done == [True, True]
