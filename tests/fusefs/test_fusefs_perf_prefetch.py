"""Prefetch follows the eStargz landmarks, and a layer's blob bytes are fetched at most once.

Blobs are written by the estargz writer; the source is a real file whose counters say what was
asked of it; the index is read and persisted the way the manager does it.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import trio

import estargz
from fusefs import prefetch
from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, PrefetchConfig
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.index import LayerIndex
from fusefs.sources.file import FileSource
from fusefs.sources.replay import RecordingSource
from tests.fusefs.fixtures import MISS_ONLY

LABEL_SIZE = 10 << 20  # what ``ctr-remote rpull`` puts in ``remote/stargz.prefetch``
FILES = {
    "bin/app": os.urandom(700_000),
    "lib/big.so": os.urandom(1_500_000),
    "etc/conf": b"x" * 3000,
    **{f"share/doc/{i}.txt": os.urandom(2000 + 97 * i) for i in range(40)},
    "tail/last.bin": os.urandom(150_000),
}


def _blob(tmp_path: Path, prioritized: tuple[str, ...] = ()) -> tuple[Path, str, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw.seek(0)
    out = io.BytesIO()
    result = estargz.convert(raw, out, chunk_size=256 << 10, prioritized=prioritized, workers=1)
    path = tmp_path / "blob"
    path.write_bytes(out.getvalue())
    return path, result.blob_digest, result.toc_digest


class _Layer:
    """A layer opened as the manager opens one: index read through a recorder, ranges persisted."""

    def __init__(self, tmp_path: Path, prioritized: tuple[str, ...] = ()) -> None:
        self.blob, digest, toc_digest = _blob(tmp_path, prioritized)
        self.source = FileSource(self.blob, digest)
        recorder = RecordingSource(self.source)
        self.index: LayerIndex = trio.run(read_estargz, recorder).verify(toc_digest)
        self.cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
        self.cache.pin(digest)
        self.cache.save_index(digest, recorder.dump())
        self.index_bytes = self.source.counters.bytes
        self.fetcher = ChunkFetcher(digest, self.index, self.source, self.cache, MISS_ONLY,
                                    PriorityGate())

    def fetched(self) -> int:
        """Bytes asked of the source since the index was read."""
        return self.source.counters.bytes - self.index_bytes

    def run(self, *, background: bool, prefetch_size: int | None = LABEL_SIZE) -> None:
        config = PrefetchConfig(prefetch=True, background=background)
        trio.run(prefetch.run, self.fetcher, config, prefetch_size)

    def cached(self) -> int:
        return sum(self.fetcher.is_cached(cid) for cid in range(self.index.chunk_count))


def test_no_prefetch_landmark_prefetches_nothing_despite_the_label(tmp_path: Path) -> None:
    layer = _Layer(tmp_path)
    assert layer.index.prefetch_end == 0
    layer.run(background=False)
    assert layer.fetched() == 0
    assert layer.fetcher.statistics().on_demand_fetches == 0


def test_prefetch_landmark_bounds_the_prefix_whatever_the_label(tmp_path: Path) -> None:
    layer = _Layer(tmp_path, prioritized=("etc/conf", "bin/app"))
    end = layer.index.prefetch_end
    assert end is not None and end > 700_000
    layer.run(background=False)
    prefix = [cid for cid in range(layer.index.chunk_count) if layer.index.chunk_blob_range(cid)[0] < end]
    assert all(layer.fetcher.is_cached(cid) for cid in prefix)
    assert 0 < layer.fetched() <= end
    # nothing past the landmark, although the label asked for 10 MiB
    assert layer.cached() < layer.index.chunk_count


def test_label_size_applies_only_without_landmark(tmp_path: Path) -> None:
    layer = _Layer(tmp_path)
    object.__setattr__(layer.index, "prefetch_end", None)  # a layer written without landmarks
    layer.run(background=False, prefetch_size=1 << 20)
    assert 0 < layer.fetched() <= (1 << 20) + (256 << 10)
    assert layer.cached() < layer.index.chunk_count


@pytest.mark.parametrize("prioritized", [(), ("bin/app",)], ids=["no-landmark", "landmark"])
def test_background_fetches_each_blob_byte_at_most_once(tmp_path: Path,
                                                         prioritized: tuple[str, ...]) -> None:
    layer = _Layer(tmp_path, prioritized)
    size = layer.blob.stat().st_size
    # on-demand reads first (as a container starting), then prefetch and background fetch
    node = next(n for p, n in layer.index.walk() if p == "lib/big.so")
    data = trio.run(layer.fetcher.read, node, 300_000, 100_000)
    assert data == FILES["lib/big.so"][300_000:400_000]
    layer.run(background=True)
    assert layer.cached() == len({layer.index.chunk_key(c) for c in range(layer.index.chunk_count)})
    total = layer.source.counters.bytes
    assert total <= size, f"{total} bytes fetched for a {size}-byte blob"
    chunk_bytes = sum(e - s for s, e in map(layer.index.chunk_blob_range, range(layer.index.chunk_count)))
    assert layer.fetched() < chunk_bytes  # the tail's chunks came with the index reads


def test_index_reads_are_adopted_only_when_they_verify(tmp_path: Path) -> None:
    layer = _Layer(tmp_path)
    digest = layer.fetcher.layer_digest
    persisted = layer.cache.load_index(digest)
    assert persisted is not None
    last = max(range(layer.index.chunk_count), key=layer.index.chunk_blob_range)
    start, end = layer.index.chunk_blob_range(last)
    at = persisted.find(layer.blob.read_bytes()[start:end])
    assert at > 0  # the last chunk came with the index reads
    broken = bytearray(persisted)
    broken[at + (end - start) // 2] ^= 0xFF
    layer.cache.save_index(digest, bytes(broken))

    adopted = trio.run(lambda: layer.fetcher.adopt_index_reads(fetch_head=False))
    assert adopted > 0 and not layer.fetcher.is_cached(last)
    assert layer.fetched() == 0
    node = next(n for p, n in layer.index.walk() if p == "tail/last.bin")
    assert trio.run(layer.fetcher.read, node, 0, 150_000) == FILES["tail/last.bin"]
    assert layer.fetched() == end - start


def test_index_reads_are_adopted_with_prefetch_and_background_off(tmp_path: Path) -> None:
    layer = _Layer(tmp_path)
    trio.run(prefetch.run, layer.fetcher, PrefetchConfig(prefetch=False, background=False), LABEL_SIZE)
    assert layer.fetched() == 0
    node = next(n for p, n in layer.index.walk() if p == "tail/last.bin")
    assert all(layer.fetcher.is_cached(cid) for cid in layer.index.chunk_ids(node))
    assert trio.run(layer.fetcher.read, node, 0, 150_000) == FILES["tail/last.bin"]
    assert layer.fetched() == 0


def test_the_prefix_does_not_wait_for_the_background_silence(tmp_path: Path) -> None:
    """The straddling chunk's head is a background request: it must not hold the prefix back."""
    layer = _Layer(tmp_path, prioritized=("etc/conf", "bin/app"))
    end = layer.index.prefetch_end
    assert end is not None
    gate = PriorityGate(silence=3600.0)
    gate.touch()  # a layer was just mounted: background requests wait an hour
    layer.fetcher = ChunkFetcher(layer.fetcher.layer_digest, layer.index, layer.source, layer.cache,
                                 MISS_ONLY, gate)
    prefix = [cid for cid in range(layer.index.chunk_count) if layer.index.chunk_blob_range(cid)[0] < end]

    async def main() -> None:
        with trio.move_on_after(5):  # the background part waits out the silence: stop it there
            await prefetch.run(layer.fetcher, PrefetchConfig(prefetch=True, background=True), LABEL_SIZE)
        assert all(layer.fetcher.is_cached(cid) for cid in prefix)

    trio.run(main)
