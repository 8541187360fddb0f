"""ChunkFetcher and prefetch over a real fixture blob: single flight, coalescing, failures, priority."""

from __future__ import annotations

import hashlib
import stat
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs import prefetch
from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig, PrefetchConfig
from fusefs.errors import IntegrityError, SourceError
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.index import LayerIndex, NodeId
from fusefs.sources.base import PieceSink
from fusefs.sources.file import FileSource
from tests.fusefs import contract
from tests.fusefs.fixtures import MISS_ONLY, layer_case

# 1 MiB chunks: data/random-5MiB.bin is 6 chunks, adjacent in the blob
CASE = layer_case("esgz-prefetch", 0)
BIG = "data/random-5MiB.bin"


class GatedSource(FileSource):
    """A FileSource whose reads wait until the test opens the gate; counts calls itself."""

    def __init__(self, path: Path, digest: str) -> None:
        super().__init__(path, digest)
        self.gate = trio.Event()
        self.gate.set()
        self.calls: list[tuple[tuple[int, int], ...]] = []
        self.fail_with: Exception | None = None

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls.append(tuple(ranges))
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return await super().read_ranges(ranges)


Setup = tuple[LayerIndex, GatedSource, ChunkFetcher]


def _setup(tmp_path: Path, blob: Path | None = None, silence: float = 0.0, **fetch: float) -> Setup:
    source = GatedSource(blob or CASE.blob, CASE.digest)
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    # speculation off unless asked: these tests count the requests of the miss path itself
    fetch = {"speculate_file_bytes": 0, "speculate_dir_bytes": 0, **fetch}
    fetcher = ChunkFetcher(CASE.digest, index, source, cache, FetchConfig(**fetch),  # type: ignore[arg-type]
                           PriorityGate(silence))
    return index, source, fetcher


def _node(index: LayerIndex, path: str) -> NodeId:
    return next(n for p, n in index.walk() if p == path)


def _expected(path: str) -> str:
    return contract.load_tsv(CASE.expected).rows[path].content


def test_concurrent_readers_of_one_missing_chunk_share_one_fetch(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path)
    node = _node(index, BIG)
    results: list[bytes] = []

    async def reader(offset: int) -> None:
        results.append(await fetcher.read(node, offset, 4096))

    async def main() -> None:
        source.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(reader, 4096 * i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.calls) == 1  # one leader asked; nine wait on its flight
            source.gate.set()

    trio.run(main)
    assert len(source.calls) == 1 and len(results) == 10
    assert all(len(r) == 4096 for r in results)


def test_adjacent_missing_chunks_are_one_range(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path)
    node = _node(index, BIG)
    size = index.attr(node).size
    data = trio.run(fetcher.read, node, 0, size)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == _expected(BIG)
    assert len(source.calls) == 1 and len(source.calls[0]) == 1
    ids = index.chunk_ids(node)
    start, _ = index.chunk_blob_range(ids[0])
    _, end = index.chunk_blob_range(ids[-1])
    assert source.calls[0][0] == (start, end - start)
    # a second read is all cache hits
    assert trio.run(fetcher.read, node, 1 << 20, 10) == data[1 << 20:(1 << 20) + 10]
    assert len(source.calls) == 1


def test_coalescing_respects_the_range_limit(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path, max_range_bytes=2 << 20)
    node = _node(index, BIG)
    trio.run(fetcher.read, node, 0, index.attr(node).size)
    assert len(source.calls) == 1
    assert len(source.calls[0]) >= 3 and all(length <= 2 << 20 for _, length in source.calls[0])


def test_cache_hit_path_does_not_checkpoint(tmp_path: Path) -> None:
    index, _, fetcher = _setup(tmp_path)
    node = _node(index, BIG)

    async def main() -> None:
        await fetcher.read(node, 0, 8192)
        with trio.testing.assert_no_checkpoints():
            await fetcher.read(node, 100, 4096)

    trio.run(main)


def test_bad_chunk_fails_fast_then_is_retried(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    data = bytearray(CASE.blob.read_bytes())
    index0 = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    cid = index0.chunk_ids(_node(index0, BIG))[1]
    start, _ = index0.chunk_blob_range(cid)
    data[start + 100] ^= 0x40
    bad.write_bytes(bytes(data))
    index, source, fetcher = _setup(tmp_path, blob=bad, failure_ttl=0.3)
    node = _node(index, BIG)

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await fetcher.read(node, 1 << 20, 10)
        with pytest.raises(IntegrityError):  # remembered: no new request
            await fetcher.read(node, 1 << 20, 10)
        assert len(source.calls) == 1
        assert not fetcher.is_cached(cid)
        bad.write_bytes(CASE.blob.read_bytes())  # the source heals
        await trio.sleep(0.35)
        assert len(await fetcher.read(node, 1 << 20, 10)) == 10
        assert len(source.calls) == 2 and fetcher.is_cached(cid)

    trio.run(main)
    # the chunk before it was fine and remains readable from its own fetch
    assert fetcher.statistics().integrity_failures == 1


def test_source_errors_reach_every_waiter(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path)
    node = _node(index, BIG)
    errors: list[Exception] = []

    async def reader() -> None:
        try:
            await fetcher.read(node, 0, 10)
        except SourceError as exc:
            errors.append(exc)

    async def main() -> None:
        source.gate = trio.Event()
        source.fail_with = SourceError("registry down")
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            source.gate.set()

    trio.run(main)
    assert len(errors) == 3 and len(source.calls) == 1


def test_background_waits_for_on_demand_reads(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path)
    node = _node(index, BIG)
    order: list[str] = []

    async def main() -> None:
        source.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            async def on_demand() -> None:
                await fetcher.read(node, 0, 10)
                order.append("on-demand")

            async def background() -> None:
                await fetcher.ensure([index.chunk_ids(_node(index, "etc/hostname"))[0]], background=True)
                order.append("background")

            nursery.start_soon(on_demand)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(background)
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.calls) == 1  # the background fetch has not been sent
            source.gate.set()

    trio.run(main)
    assert sorted(order) == ["background", "on-demand"] and len(source.calls) == 2
    big_start = index.chunk_blob_range(index.chunk_ids(node)[0])[0]
    assert source.calls[0][0][0] == big_start  # the on-demand request went first


def test_prefetch_then_background_fills_the_cache(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path)
    assert index.prefetch_end == 14018  # the .prefetch.landmark of this fixture

    trio.run(prefetch.run, fetcher, PrefetchConfig(background=False), None)
    prefetched = [c for c in range(index.chunk_count) if fetcher.is_cached(c)]
    assert prefetched and all(index.chunk_blob_range(c)[0] < 14018 for c in prefetched)
    assert len(source.calls) == 1  # the prioritized prefix is one request

    trio.run(prefetch.run, fetcher, PrefetchConfig(background_step_bytes=1 << 20), None)
    assert all(fetcher.is_cached(c) for c in range(index.chunk_count))
    calls = len(source.calls)
    for _, node in index.walk():  # everything is now served from the cache
        if stat.S_ISREG(index.attr(node).mode):
            trio.run(fetcher.read, node, 0, index.attr(node).size)
    assert len(source.calls) == calls


def test_chunks_the_cache_cannot_keep_are_not_refetched_per_small_read(tmp_path: Path) -> None:
    source = GatedSource(CASE.blob, CASE.digest)
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    cache = ChunkCache(CacheConfig(tmp_path / "cache", max_bytes=1000, fsync=False))
    cache.pin(CASE.digest)
    fetcher = ChunkFetcher(CASE.digest, index, source, cache, MISS_ONLY, PriorityGate())
    node = _node(index, BIG)
    size = index.attr(node).size

    async def main() -> bytes:
        parts = [await fetcher.read(node, off, 128 << 10) for off in range(0, size, 128 << 10)]
        return b"".join(parts)

    data = trio.run(main)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == _expected(BIG)
    assert cache.statistics().bytes_cached <= 1000 and cache.statistics().not_kept >= 5
    assert len(source.calls) == len(index.chunk_ids(node))  # one fetch per chunk, not per read


def test_background_waits_out_the_silence_after_on_demand_reads() -> None:
    """A background step may start only `silence` seconds after the last on-demand fetch ended."""
    silence = 0.5
    gate = PriorityGate(silence=silence)
    ended: list[float] = []
    released: list[float] = []

    async def background() -> None:
        await gate.wait_idle()
        released.append(time.monotonic())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with gate.on_demand():
                nursery.start_soon(background)
                await trio.sleep(0.2)
            await trio.sleep(silence / 2)
            assert released == []  # quiet, but not for long enough
            with gate.on_demand():  # another burst: the silence starts again from its end
                await trio.sleep(0.1)
            ended.append(time.monotonic())
        assert released[0] - ended[0] >= silence

        gate.touch()  # a layer was mounted: its reads are coming
        mounted = time.monotonic()
        await background()
        assert released[1] - mounted >= silence

    trio.run(main)


def test_a_reader_never_waits_on_a_background_fetch_sitting_out_the_silence(tmp_path: Path) -> None:
    """Background waits at the gate before it claims chunks, so an on-demand read of the same
    chunk fetches it at once instead of inheriting the background's wait (here 600 s)."""
    index, source, fetcher = _setup(tmp_path, silence=600.0)
    node = _node(index, "etc/hostname")
    cid = index.chunk_ids(node)[0]

    async def main() -> None:
        fetcher._gate.touch()  # a layer was just mounted
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: fetcher.ensure([cid], background=True))
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(60):  # the inverted wait would be 600 s
                assert await fetcher.read(node, 0, 5) == b"fixtu"
            assert len(source.calls) == 1  # the read's own request; background has sent none
            nursery.cancel_scope.cancel()

    trio.run(main)


def _small_files_in_blob_order(index: LayerIndex) -> list[NodeId]:
    files = [node for _, node in index.walk()
             if stat.S_ISREG(index.attr(node).mode) and len(index.chunk_ids(node)) == 1
             and index.attr(node).size < 4096]
    by_chunk = {index.chunk_ids(n)[0]: n for n in files}  # hardlinks share their chunk
    return [by_chunk[c] for c in sorted(by_chunk, key=index.chunk_blob_range)]


def test_a_miss_takes_the_following_small_files_in_the_same_request(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path)
    first, second = _small_files_in_blob_order(index)[:2]
    trio.run(fetcher.read, first, 0, 1)
    assert len(source.calls) == 1
    assert fetcher.is_cached(index.chunk_ids(second)[0])  # it came along
    assert trio.run(fetcher.read, second, 0, 10**6) and len(source.calls) == 1


def test_neighbour_window_zero_fetches_only_what_was_asked(tmp_path: Path) -> None:
    index, source, fetcher = _setup(tmp_path, neighbour_bytes=0)
    first, second = _small_files_in_blob_order(index)[:2]
    trio.run(fetcher.read, first, 0, 1)
    assert not fetcher.is_cached(index.chunk_ids(second)[0])
    trio.run(fetcher.read, second, 0, 1)
    assert len(source.calls) == 2


class StreamingFileSource(FileSource):
    """A FileSource that hands each range over in pieces, as a registry body arrives.

    ``hold``: the last piece waits for it (a long body still coming). ``restart_after``: after
    that many bytes of the first range, the range starts again from its head (a retried request,
    as the registry source does after a body cut short). ``short``: the last piece never comes.
    """

    def __init__(self, path: Path, digest: str, piece: int = 64 << 10) -> None:
        super().__init__(path, digest)
        self.piece = piece
        self.hold = trio.Event()
        self.hold.set()
        self.restart_after: int | None = None
        self.short = False
        self.streams = 0

    async def stream_ranges(self, ranges: Sequence[tuple[int, int]], sink: PieceSink) -> None:
        self.streams += 1
        for i, (data, (offset, _)) in enumerate(zip(await self.read_ranges(ranges), ranges, strict=True)):
            last_range = i == len(ranges) - 1
            pos = 0
            while pos < len(data):
                if self.restart_after is not None and i == 0 and pos >= self.restart_after:
                    self.restart_after, pos = None, 0
                end = min(pos + self.piece, len(data))
                if last_range and end == len(data):
                    if self.short:
                        return
                    await self.hold.wait()
                await sink(offset + pos, data[pos:end])
                pos = end


def _streaming_setup(tmp_path: Path, cache: ChunkCache | None = None
                     ) -> tuple[LayerIndex, StreamingFileSource, ChunkFetcher]:
    source = StreamingFileSource(CASE.blob, CASE.digest)
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    cache = cache or ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    fetcher = ChunkFetcher(CASE.digest, index, source, cache,
                           FetchConfig(speculate_file_bytes=0, speculate_dir_bytes=0), PriorityGate(0.0))
    return index, source, fetcher


def _join_a_held_fetch(fetcher: ChunkFetcher, source: StreamingFileSource, node: NodeId, *, collect: bool,
                       offset: int, before: Callable[[], None] = lambda: None,
                       check: Callable[[], None] = lambda: None) -> bytes:
    """Start one streamed fetch of all of ``node`` with its last piece held back, read 4 KiB at
    ``offset`` (joining that fetch's flight; ``before`` runs first), run ``check`` while the
    piece is still held, then let it come; return what the read got."""
    got: list[bytes] = []

    async def main() -> None:
        source.hold = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(fetcher.ensure, fetcher.index.chunk_ids(node), collect=collect))
            await trio.testing.wait_all_tasks_blocked()
            assert source.streams == 1
            before()
            got.append(await fetcher.read(node, offset, 4096))
            assert not source.hold.is_set() and source.streams == 1
            check()
            source.hold.set()

    trio.run(main)
    return got[0]


@pytest.mark.parametrize("collect", [False, True], ids=["nobody-waits", "a-reader-leads"])
def test_a_chunk_is_served_as_soon_as_its_bytes_arrived_not_the_whole_request(tmp_path: Path,
                                                                              collect: bool) -> None:
    index, source, fetcher = _streaming_setup(tmp_path)
    node = _node(index, BIG)
    ids = index.chunk_ids(node)

    def first_chunk_only() -> None:
        assert fetcher.is_cached(ids[0]) and not fetcher.is_cached(ids[-1])

    # one request for the whole 6 MiB file; the read joins the flight of its first chunk
    first = _join_a_held_fetch(fetcher, source, node, collect=collect, offset=0, check=first_chunk_only)
    assert all(fetcher.is_cached(c) for c in ids)
    data = trio.run(fetcher.read, node, 0, index.attr(node).size)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == _expected(BIG)
    assert first == data[:4096]


def test_bytes_handed_over_again_by_a_retry_are_taken_once(tmp_path: Path) -> None:
    index, source, fetcher = _streaming_setup(tmp_path)
    node = _node(index, BIG)
    source.restart_after = (5 << 20) // 2  # mid-chunk: some chunks done, one half assembled
    data = trio.run(fetcher.read, node, 0, index.attr(node).size)
    assert source.restart_after is None  # the restart happened
    assert "sha256:" + hashlib.sha256(data).hexdigest() == _expected(BIG)
    assert source.streams == 1


def test_chunks_a_stream_never_brought_fail_their_waiters(tmp_path: Path) -> None:
    index, source, fetcher = _streaming_setup(tmp_path)
    node = _node(index, BIG)
    ids = index.chunk_ids(node)
    source.short = True
    with pytest.raises(SourceError, match="ended before"):
        trio.run(fetcher.read, node, index.attr(node).size - 10, 10)
    source.short = False
    assert not fetcher.is_cached(ids[-1])
    assert len(trio.run(partial(fetcher.read, node, 0, 10))) == 10


class ReadRecordingCache(ChunkCache):
    """A ChunkCache that records the length of every read (None: the whole chunk)."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
        self.lengths: list[int | None] = []

    def read(self, layer_digest: str, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        self.lengths.append(length)
        return super().read(layer_digest, key, offset, length)


def test_a_reader_whose_chunk_a_prefetch_cached_reads_its_part_not_the_chunk(tmp_path: Path) -> None:
    """A reader that joined a prefetch's flight finds the chunk in the cache when it lands, and
    reads the bytes it asked for from there: not the whole (here 1 MiB) chunk into memory."""
    cache = ReadRecordingCache(CacheConfig(tmp_path / "cache", fsync=False))
    index, source, fetcher = _streaming_setup(tmp_path, cache)
    node = _node(index, BIG)
    # collect=False, as the prefetch fetches
    got = _join_a_held_fetch(fetcher, source, node, collect=False, offset=100, before=cache.lengths.clear)
    assert len(got) == 4096
    assert cache.lengths and None not in cache.lengths  # ranged reads only (4 KiB, and 64 KiB
    # of the library walk's look at the file's head)
    data = trio.run(fetcher.read, node, 0, index.attr(node).size)
    assert got == data[100:4196]
