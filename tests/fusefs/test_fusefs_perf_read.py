"""The read path's tuning: chunk read-ahead for sequential readers, the session's read-ahead window."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig
from fusefs.fetch import STEP_BYTES, ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.index import LayerIndex, NodeId
from fusefs.readahead import READ_AHEAD_KIB, session_device
from fusefs.sources.file import FileSource
from tests.fusefs import contract
from tests.fusefs.fixtures import FIXTURES, MISS_ONLY, layer_case
from tests.fusefs.fuse_client import FuseServer, force_unmount

# 1 MiB chunks: data/random-5MiB.bin is 6 chunks, adjacent in the blob
CASE = layer_case("esgz-prefetch", 0)
BIG = "data/random-5MiB.bin"
MIB = 1 << 20


class CountingSource(FileSource):
    def __init__(self, path: Path, digest: str) -> None:
        super().__init__(path, digest)
        self.calls: list[tuple[tuple[int, int], ...]] = []

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls.append(tuple(ranges))
        return await super().read_ranges(ranges)


def _setup(tmp_path: Path) -> tuple[LayerIndex, CountingSource, ChunkFetcher, NodeId]:
    source = CountingSource(CASE.blob, CASE.digest)
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    fetcher = ChunkFetcher(CASE.digest, index, source, cache, MISS_ONLY, PriorityGate())
    node = next(n for p, n in index.walk() if p == BIG)
    return index, source, fetcher, node


def test_sequential_reads_fetch_the_following_chunks_ahead_in_steps(tmp_path: Path) -> None:
    index, source, fetcher, node = _setup(tmp_path)
    chunks = list(index.chunk_ids(node))
    assert len(chunks) == 6
    blob = CASE.blob.read_bytes()

    async def main() -> bytes:
        first = await fetcher.read(node, 0, 128 << 10)
        second = await fetcher.read(node, 128 << 10, 128 << 10, sequential=True)
        await trio.testing.wait_all_tasks_blocked()
        while fetcher._ahead_running:  # the read-ahead runs in a system task
            await trio.sleep(0.01)
        return first + second

    data = trio.run(main)
    assert len(data) == 256 << 10
    # the chunk read, then the rest of the file (5 chunks, within the window) in contiguous
    # requests of at most STEP_BYTES each: as few as that bound allows
    start = index.chunk_blob_range(chunks[1])[0]
    end = index.chunk_blob_range(chunks[-1])[1]
    ahead = source.calls[1:]
    assert all(len(call) == 1 and call[0][1] <= STEP_BYTES for call in ahead)
    assert [r for (r,) in ahead] == sorted(r for (r,) in ahead)
    assert ahead[0][0][0] == start and sum(n for ((_, n),) in ahead) == end - start
    assert len(ahead) == 2  # 5 chunks of ~840 kB: four in the first step, one in the second
    assert all(fetcher.is_cached(cid) for cid in chunks)
    calls = len(source.calls)
    tail = trio.run(fetcher.read, node, 3 * MIB, 2 * MIB)
    assert len(source.calls) == calls and len(tail) == 2 * MIB
    assert tail == _decoded(blob, index, node)[3 * MIB:5 * MIB]


def _decoded(blob: bytes, index: LayerIndex, node: NodeId) -> bytes:
    from fusefs import codecs

    out = b""
    for cid in index.chunk_ids(node):
        c = index.chunk(cid)
        out += codecs.decode(c, blob[c.blob_offset:c.blob_end])
    return out


def test_non_sequential_reads_fetch_only_what_they_need(tmp_path: Path) -> None:
    index, source, fetcher, node = _setup(tmp_path)

    async def main() -> None:
        await fetcher.read(node, 2 * MIB, 4096)
        await fetcher.read(node, 0, 4096)
        await trio.testing.wait_all_tasks_blocked()

    trio.run(main)
    assert len(source.calls) == 2
    assert sum(fetcher.is_cached(cid) for cid in index.chunk_ids(node)) == 2
    assert not fetcher._ahead_running


def test_session_device_reads_the_last_fuse_mount_at_a_path(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "90 22 0:51 / /tmp/a\\040b rw,nosuid shared:40 - fuse.lazysnap lazysnap rw,user_id=0\n"
        "91 22 0:52 / /tmp/a\\040b rw,nosuid shared:41 - fuse.lazysnap lazysnap rw,user_id=0\n"
        "92 22 0:53 / /tmp/other rw shared:42 - tmpfs tmpfs rw\n")
    assert session_device("/tmp/a b", info) == "0:52"
    assert session_device("/tmp/other", info) is None
    assert session_device("/tmp/none", info) is None


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = Path(tmp_path_factory.mktemp("fuse"))
    yield path
    force_unmount(path)


@pytest.mark.root
def test_the_session_reads_ahead_in_large_requests(work: Path) -> None:
    case = layer_case("esgz-default", 0)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        assert server.mount(case, work / "l0")["ok"]
        dev = os.stat(work / "l0").st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert int(bdi.read_text()) == 128  # what the kernel leaves a FUSE session at INIT
        rows, _ = contract.tree_from_fs(str(work / "l0"))  # opens every file
        assert rows
        assert int(bdi.read_text()) == READ_AHEAD_KIB
    assert server.returncode == 0, server.log_text()


# chunk buffers made on worker threads, freed on the main one, small long-lived blocks between
_CHURN = """
import sys, threading, queue
from fusefs.allocator import bound_large_allocations
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
if sys.argv[1] == "bound":
    assert bound_large_allocations()
q = queue.Queue()
pinned = []
def produce():
    for i in range(30):
        q.put(bytes(4 << 20) + bytes([i]))
        pinned.append(bytes(3000) + bytes([i]))
        q.put(bytearray(6 << 20))
base = rss()
threads = [threading.Thread(target=produce) for _ in range(3)]
for t in threads: t.start()
held = []
n = 0
while n < 180:
    held.append(q.get()); n += 1
    if len(held) > 4: held.pop(0)
for t in threads: t.join()
held.clear()
print(rss() - base)
"""


def _rss_growth_kib(mode: str) -> int:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True,
                         check=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout)


def test_freed_chunk_buffers_go_back_to_the_kernel() -> None:
    bound, unbound = _rss_growth_kib("bound"), _rss_growth_kib("none")
    assert bound < 8 << 10, f"{bound} KiB still resident"
    assert unbound > bound + (32 << 10)  # glibc's default keeps them: what the bound is for


class OverlapSource(FileSource):
    """Counts how many reads are in flight at once, across every source sharing ``state``."""

    def __init__(self, path: Path, digest: str, state: dict[str, int]) -> None:
        super().__init__(path, digest)
        self.state = state

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self.state["now"] += 1
        self.state["max"] = max(self.state["max"], self.state["now"])
        try:
            await trio.sleep(0.01)
            return await super().read_ranges(ranges)
        finally:
            self.state["now"] -= 1


def test_background_steps_of_several_layers_take_turns(tmp_path: Path) -> None:
    from fusefs import prefetch
    from fusefs.config import PrefetchConfig

    gate = PriorityGate()
    state = {"now": 0, "max": 0}
    index = trio.run(read_estargz, FileSource(CASE.blob, CASE.digest)).verify(CASE.toc_digest)
    fetchers = []
    for i in range(3):  # three mounts of the layer, each with its own cache: three layers' work
        cache = ChunkCache(CacheConfig(tmp_path / f"cache{i}", fsync=False))
        fetchers.append(ChunkFetcher(CASE.digest, index, OverlapSource(CASE.blob, CASE.digest, state),
                                     cache, FetchConfig(), gate))
    config = PrefetchConfig(prefetch=False, background=True, background_step_bytes=1 << 20)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for f in fetchers:
                nursery.start_soon(prefetch.run, f, config, None)

    trio.run(main)
    for f in fetchers:
        assert all(f.is_cached(cid) for cid in range(index.chunk_count))
    assert state["max"] == 1
