"""Speculative fetch on a file's first miss: the rest of the file, its directory's small files, and
on a directory's second miss the first chunk of the siblings of the same kind.

Each goes out as a request of its own next to the miss, which waits only for its own chunks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig
from fusefs.fetch import STEP_BYTES, ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.index import LayerIndex, NodeId
from fusefs.sources.file import FileSource
from tests.fusefs.test_fusefs_fetch import BIG, CASE, GatedSource

# each kind of speculation alone is switched on by the test that needs it
ON = FetchConfig(neighbour_bytes=0, speculate_file_bytes=16 << 20, speculate_dir_bytes=512 << 10,
                 speculate_scan_bytes=0)
SCAN = FetchConfig(neighbour_bytes=0, speculate_file_bytes=0, speculate_dir_bytes=0,
                   speculate_scan_bytes=4 << 20)


def _fetcher(tmp_path: Path, config: FetchConfig) -> tuple[GatedSource, ChunkFetcher]:
    source = GatedSource(CASE.blob, CASE.digest)
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    return source, ChunkFetcher(CASE.digest, index, source, cache, config, PriorityGate())


def _node(index: LayerIndex, path: str) -> NodeId:
    return next(n for p, n in index.walk() if p == path)


def _cached(fetcher: ChunkFetcher, path: str) -> bool:
    node = _node(fetcher.index, path)
    return all(fetcher.is_cached(c) for c in fetcher.index.chunk_ids(node))


async def _settled(fetcher: ChunkFetcher, source: GatedSource, calls: int) -> None:
    with trio.fail_after(10):
        while len(source.calls) < calls or fetcher._inflight:
            await trio.sleep(0.01)


def test_first_miss_fetches_the_rest_of_the_file_alongside(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, replace(ON, speculate_dir_bytes=0))
    node = _node(fetcher.index, BIG)
    chunks = fetcher.index.chunk_ids(node)
    assert len(chunks) == 6

    async def main() -> None:
        await fetcher.read(node, 0, 4096)
        assert len(source.calls[0]) == 1  # the miss asked for its own chunk only
        await _settled(fetcher, source, 2)
        assert all(fetcher.is_cached(c) for c in chunks)
        # and the other five came alongside, in requests of at most STEP_BYTES
        assert 2 <= len(source.calls) <= 3 and all(n <= STEP_BYTES for (_, n), in source.calls[1:])
        calls = len(source.calls)
        await fetcher.read(node, 3 << 20, 4096)  # a later miss in the file: nothing to fetch
        assert len(source.calls) == calls

    trio.run(main)


def test_a_file_larger_than_the_bound_is_not_fetched_whole(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, replace(ON, speculate_dir_bytes=0, speculate_file_bytes=1 << 20))
    node = _node(fetcher.index, BIG)

    async def main() -> None:
        await fetcher.read(node, 0, 4096)
        await trio.sleep(0.1)
        assert len(source.calls) == 1
        assert sum(fetcher.is_cached(c) for c in fetcher.index.chunk_ids(node)) == 1

    trio.run(main)


def test_first_miss_in_a_directory_fetches_its_small_files(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, replace(ON, speculate_file_bytes=0, small_file_bytes=8192))
    node = _node(fetcher.index, "data/one-byte")

    async def main() -> None:
        await fetcher.read(node, 0, 1)
        await _settled(fetcher, source, 2)
        assert _cached(fetcher, "data/exactly-4096.bin")  # small sibling: taken along
        assert not _cached(fetcher, "data/text-200KiB.txt")  # over small_file_bytes
        assert not _cached(fetcher, BIG)
        assert not _cached(fetcher, "etc/hostname")  # another directory
        calls = len(source.calls)
        await fetcher.read(_node(fetcher.index, "data/exactly-4096.bin"), 0, 4096)
        assert len(source.calls) == calls  # served from the cache

    trio.run(main)


def test_the_directory_budget_bounds_what_is_taken(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, replace(ON, speculate_file_bytes=0, speculate_dir_bytes=100))
    node = _node(fetcher.index, "data/one-byte")

    async def main() -> None:
        await fetcher.read(node, 0, 1)
        await trio.sleep(0.1)
        assert len(source.calls) == 1
        assert not _cached(fetcher, "data/exactly-4096.bin")

    trio.run(main)


def test_a_large_file_does_not_speak_for_its_directory(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, replace(ON, speculate_file_bytes=0, small_file_bytes=8192))
    node = _node(fetcher.index, BIG)

    async def main() -> None:
        await fetcher.read(node, 0, 4096)
        await trio.sleep(0.1)
        assert len(source.calls) == 1
        assert not _cached(fetcher, "data/exactly-4096.bin")

    trio.run(main)


def test_a_second_miss_in_a_directory_fetches_the_heads_of_its_siblings_of_that_kind(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, SCAN)
    index = fetcher.index
    zeros = index.chunk_ids(_node(index, "data/zeros-1.5MiB.bin"))
    assert len(zeros) == 2

    async def main() -> None:
        await fetcher.read(_node(index, "data/exactly-4096.bin"), 0, 4096)
        await trio.sleep(0.1)
        assert len(source.calls) == 1  # one miss in data/: no pattern yet
        await fetcher.read(_node(index, BIG), 0, 4096)  # the second .bin read from data/
        await _settled(fetcher, source, 3)
        assert len(source.calls) == 3  # the miss, and the scan alongside
        # the other .bin file's first chunk came; its second chunk, and other kinds, did not
        assert fetcher.is_cached(zeros[0]) and not fetcher.is_cached(zeros[1])
        assert not _cached(fetcher, "data/text-200KiB.txt") and not _cached(fetcher, "data/one-byte")
        calls = len(source.calls)
        await fetcher.read(_node(index, "data/text-200KiB.txt"), 0, 4096)  # a third miss: no second scan
        await trio.sleep(0.1)
        assert len(source.calls) == calls + 1

    trio.run(main)


def test_a_scan_keeps_to_its_budget(tmp_path: Path) -> None:
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    head = index.chunk_blob_range(index.chunk_ids(_node(index, "data/zeros-1.5MiB.bin"))[0])
    source, fetcher = _fetcher(tmp_path, replace(SCAN, speculate_scan_bytes=head[1] - head[0] - 1))

    async def main() -> None:
        await fetcher.read(_node(index, "data/exactly-4096.bin"), 0, 4096)
        await fetcher.read(_node(index, BIG), 0, 4096)
        await trio.sleep(0.1)
        assert len(source.calls) == 2  # the only candidate is over the budget
        assert not any(fetcher.is_cached(c) for c in index.chunk_ids(_node(index, "data/zeros-1.5MiB.bin")))

    trio.run(main)


def test_misses_of_different_kinds_are_no_pattern(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, SCAN)
    index = fetcher.index
    zeros = index.chunk_ids(_node(index, "data/zeros-1.5MiB.bin"))

    async def main() -> None:
        await fetcher.read(_node(index, "data/exactly-4096.bin"), 0, 4096)
        await fetcher.read(_node(index, "data/text-200KiB.txt"), 0, 4096)  # like libc.so.6, then libz.so.1
        await trio.sleep(0.1)
        assert len(source.calls) == 2 and not fetcher.is_cached(zeros[0])
        await fetcher.read(_node(index, BIG), 0, 4096)  # the second .bin: now a pattern
        await _settled(fetcher, source, 4)
        assert len(source.calls) == 4 and fetcher.is_cached(zeros[0])

    trio.run(main)


@pytest.mark.parametrize(("bound", "scanned"), [(2, False), (3, True)])
def test_a_directory_with_more_files_of_the_kind_than_the_bound_is_not_scanned(
        tmp_path: Path, bound: int, scanned: bool) -> None:
    """data/ holds three .bin files: a collection above the bound (like Python's standard
    library) is not scanned; at the bound it is."""
    source, fetcher = _fetcher(tmp_path, replace(SCAN, speculate_scan_files=bound))
    index = fetcher.index
    zeros = index.chunk_ids(_node(index, "data/zeros-1.5MiB.bin"))

    async def main() -> None:
        await fetcher.read(_node(index, "data/exactly-4096.bin"), 0, 4096)
        await fetcher.read(_node(index, BIG), 0, 4096)
        await _settled(fetcher, source, 3 if scanned else 2)
        await trio.sleep(0.1)
        assert len(source.calls) == (3 if scanned else 2)
        assert fetcher.is_cached(zeros[0]) is scanned

    trio.run(main)
