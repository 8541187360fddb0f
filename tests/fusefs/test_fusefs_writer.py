"""Write-behind of verified chunks: served at once, stored off the read path, bounded, never refetched."""

from __future__ import annotations

import functools
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs import fetch
from fusefs.cache import ChunkCache, StagedChunk
from fusefs.config import CacheConfig
from fusefs.errors import SourceError
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.sources.file import FileSource
from fusefs.writer import CacheWriter
from tests.fusefs.fixtures import MISS_ONLY, layer_case
from tests.fusefs.test_fusefs_fetch import BIG, CASE, GatedSource, _node


class SlowDiskCache(ChunkCache):
    """A ChunkCache whose commits (every store: ``put`` and staged chunks) wait, in the writer's
    thread, until the test releases the disk."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
        self.disk = threading.Event()
        self.puts = 0

    def commit(self, staged: StagedChunk) -> bool:
        self.disk.wait(30)
        self.puts += 1
        return super().commit(staged)


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
    writer = CacheWriter(cache, budget=25)  # two 10-byte chunks, queued or being written
    done: list[bool] = []

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(writer.submit, CASE.digest, f"k{i}", b"x" * 10, done.append)
                await trio.testing.wait_all_tasks_blocked()
                # the chunk being written counts: two held, the other two wait
                assert writer.pending == 2
                cache.disk.set()
            await writer.flush()
            assert done == [True] * 4 and writer.pending == 0 and cache.puts == 4

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


@pytest.mark.parametrize("staged", [False, True], ids=["in-memory", "staged"])
def test_a_chunk_is_served_while_the_rest_of_its_request_waits_for_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: bool) -> None:
    """Each chunk's waiters go on once it is verified, not when its whole request is stored.
    In memory, the second chunk waits for room at the writer; staged (the 1 MiB chunks are
    decoded into cache files), it costs the writer no memory and is queued at once."""
    if not staged:
        monkeypatch.setattr(fetch, "STAGE_BYTES", 1 << 30)
    cache = SlowDiskCache(CacheConfig(tmp_path / "cache", fsync=False))
    source, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)
    first, second = fetcher.index.chunk_ids(node)[:2]
    fetcher._writer = CacheWriter(cache, budget=fetcher.index.chunk_size(first))
    source.gate = trio.Event()  # hold the request until the reader has joined it

    async def main() -> None:
        with trio.fail_after(20):
            got: list[bytes] = []

            async def read_first() -> None:
                got.append(await fetcher.read(node, 0, 4096))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.ensure, [first, second])  # one request for both
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(read_first)  # joins the flight of the first chunk
                await trio.testing.wait_all_tasks_blocked()
                source.gate.set()
                # the disk holds the first chunk, so the second waits for room in the writer:
                # the reader of the first has its bytes all the same (decoding runs in a thread,
                # which trio does not count as blocked: poll)
                with trio.move_on_after(10):
                    while not got:
                        await trio.sleep(0.01)
                if not staged:
                    assert cache.puts == 0 and fetcher._writer.pending == 1
                else:
                    with trio.move_on_after(10):
                        while fetcher._writer.pending < 2:
                            await trio.sleep(0.01)
                    assert cache.puts == 0 and fetcher._writer.pending == 2
                    assert all(isinstance(fetcher._writing[c], StagedChunk) for c in (first, second))
                assert len(got) == 1 and len(got[0]) == 4096
                assert len(source.calls) == 1
                cache.disk.set()

    trio.run(main)


def test_a_reader_does_not_wait_behind_the_earlier_steps_of_an_unwaited_fetch(tmp_path: Path) -> None:
    """A fetch nobody waits on claims one step at a time: a chunk of a later step that a reader
    needs is fetched for the reader at once, and the step skips it."""
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    source, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)
    cids = list(fetcher.index.chunk_ids(node))  # six ~840 kB chunks: two steps
    last = cids[-1]
    size = fetcher.index.size(node)
    source.gate = trio.Event()

    async def main() -> None:
        with trio.fail_after(20):
            got: list[bytes] = []

            async def read_tail() -> None:
                got.append(await fetcher.read(node, size - 4096, 4096))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(fetcher.ensure, cids, collect=False))
                await trio.testing.wait_all_tasks_blocked()
                assert len(source.calls) == 1 and last not in fetcher._inflight  # the first step only
                nursery.start_soon(read_tail)
                await trio.testing.wait_all_tasks_blocked()
                # the reader asked for its chunk itself, while the first step is still held
                lo, hi = fetcher.index.chunk_blob_range(last)
                assert len(source.calls) == 2
                assert [start <= lo and hi <= start + n for start, n in source.calls[1]] == [True]
                source.gate.set()
            assert len(got) == 1 and len(got[0]) == 4096
            # the second step did not fetch the reader's chunks again
            fetched = [r for call in source.calls for r in call]
            assert sum(start <= lo < start + n for start, n in fetched) == 1
            assert all(fetcher.is_cached(cid) for cid in cids)

    trio.run(main)


@pytest.mark.parametrize("staged", [False, True], ids=["in-memory", "staged"])
def test_a_large_chunk_a_reader_waits_for_is_not_held_in_a_buffer_of_its_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staged: bool) -> None:
    """Staged, a 1 MiB chunk costs its compressed bytes and a decoded piece while it is read,
    not its decoded size on top, and the writer queue holds none of it."""
    if not staged:
        monkeypatch.setattr(fetch, "STAGE_BYTES", 1 << 30)
    cache = SlowDiskCache(CacheConfig(tmp_path / "cache", fsync=False))
    _, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)
    cid = fetcher.index.chunk_ids(node)[0]
    start, end = fetcher.index.chunk_blob_range(cid)
    size = fetcher.index.chunk_size(cid)

    async def main() -> None:
        with trio.fail_after(20):
            tracemalloc.start()
            try:
                data = await fetcher.read(node, 0, 4096)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            held = fetcher._writing[cid]
            assert len(data) == 4096 and cache.puts == 0  # served while the disk is held
            if staged:
                assert isinstance(held, StagedChunk)
                assert peak < (end - start) + size // 2, (peak, end - start, size)
            else:
                assert isinstance(held, bytearray) and peak > (end - start) + size
            cache.disk.set()
            await fetcher.flush()
            assert cid not in fetcher._writing and cache.contains(CASE.digest, fetcher.index.chunk_key(cid))

    trio.run(main)


def test_a_staged_chunk_is_read_from_the_cache_once_closed_and_fetched_again_once_evicted(
        tmp_path: Path) -> None:
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    source, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)
    cid = fetcher.index.chunk_ids(node)[0]

    async def main() -> None:
        with trio.fail_after(20):
            first = await fetcher.read(node, 0, 8192)
            staged = fetcher._writing[cid]
            assert isinstance(staged, StagedChunk)
            await fetcher.flush()
            assert staged.pread(0, 1) is None  # closed by the writer's completion
            assert fetcher._piece(staged, 0, 8192) == first  # now from the cache
            cache.prune(include_pinned=True)
            assert fetcher._piece(staged, 0, 8192) is None
            assert await fetcher.read(node, 0, 8192) == first
            assert len(source.calls) == 2

    trio.run(main)


def test_a_read_that_loses_its_chunk_asks_again_then_gives_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that joined a staged chunk's fetch may find it closed and evicted when it runs
    again: it asks for the chunk again (here still held, so no second request), and after three
    such losses in a row reports an error instead of looping."""
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    source, fetcher = _fetcher(tmp_path, cache)
    node = _node(fetcher.index, BIG)
    real_piece = fetcher._piece
    losses = {"left": 1}

    def piece(data: object, lo: int, hi: int) -> object:
        if losses["left"] > 0:
            losses["left"] -= 1
            return None
        return real_piece(data, lo, hi)  # type: ignore[arg-type]

    monkeypatch.setattr(fetcher, "_piece", piece)

    async def main() -> None:
        with trio.fail_after(20):
            data = await fetcher.read(node, 0, 4096)
            assert len(data) == 4096 and len(source.calls) == 1
            await fetcher.flush()
            losses["left"] = 10
            with pytest.raises(SourceError, match="evicted 3 times"):
                await fetcher.read(node, 2 << 20, 4096)  # a chunk not fetched yet

    trio.run(main)
