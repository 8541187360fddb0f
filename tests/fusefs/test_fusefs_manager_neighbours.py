"""Neighbour resolution: best effort (no failure may end the FUSE session's nursery), and read once.

The index of a layer read ahead as a neighbour is what its own mount uses, even when the mount
comes while that read is still in flight: one read of the blob's tail, one parse.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FuseConfig, FusefsConfig
from fusefs.errors import IntegrityError
from fusefs.manager import LayerManager
from fusefs.sources.base import BlobSource
from fusefs.sources.file import FileSource, FileSourceFactory
from fusefs.spec import LayerSpec
from tests.fusefs.fixtures import FIXTURES, layer_case

_SELF = "sha256:" + "a" * 64
_NEIGHBOURS = ("sha256:" + "b" * 64, "sha256:" + "c" * 64)


class _BrokenReaderFactory:
    """Opens nothing: stands for a reader or source with a bug (not a LayerError)."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    async def open(self, spec: LayerSpec) -> BlobSource:
        self.opened.append(spec.digest)
        raise NameError("a bug in the TOC reader")


def test_unexpected_error_resolving_a_neighbour_is_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    factory = _BrokenReaderFactory()
    config = FusefsConfig(cache=CacheConfig(dir=tmp_path / "cache"),
                          fuse=FuseConfig(mountpoint=tmp_path / "fuse"))

    async def main() -> None:
        # no FUSE session is needed to resolve neighbours; the nursery is the one that would end
        async with trio.open_nursery() as nursery:
            manager = LayerManager(config, nursery, factory, ChunkCache(config.cache))
            await manager.resolve_neighbours(LayerSpec(ref="127.0.0.1:1/x:y", digest=_SELF,
                                                       neighbours=(_SELF, *_NEIGHBOURS)))
            manager.cache.close()

    with caplog.at_level(logging.ERROR, logger="fusefs.manager"):
        trio.run(main)
    assert sorted(factory.opened) == sorted(_NEIGHBOURS)
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(logged) == len(_NEIGHBOURS)
    assert all("unexpected error resolving neighbour" in r.getMessage() for r in logged)


class _GatedFileSource(FileSource):
    """A layer file whose tail reads wait for a gate and are counted."""

    def __init__(self, inner: FileSource, tails: list[str], gate: trio.Event) -> None:
        super().__init__(inner.path, inner.digest)
        self._tails, self._gate = tails, gate

    async def read_tail(self, length: int) -> bytes:
        self._tails.append(self.digest)
        await self._gate.wait()
        return await super().read_tail(length)


class _GatedFactory:
    def __init__(self) -> None:
        self.files = FileSourceFactory([FIXTURES / "esgz-default"])
        self.tails: list[str] = []
        self.gate = trio.Event()

    async def open(self, spec: LayerSpec) -> BlobSource:
        return _GatedFileSource(await self.files.open(spec), self.tails, self.gate)


def test_a_mount_during_its_neighbour_read_waits_for_that_read(tmp_path: Path) -> None:
    layer0, layer1 = layer_case("esgz-default", 0), layer_case("esgz-default", 1)
    factory = _GatedFactory()
    config = FusefsConfig(cache=CacheConfig(dir=tmp_path / "cache"),
                          fuse=FuseConfig(mountpoint=tmp_path / "fuse"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            manager = LayerManager(config, nursery, factory, ChunkCache(config.cache))
            nursery.start_soon(manager.resolve_neighbours,
                               LayerSpec(ref="r/x:y", digest=layer1.digest, neighbours=(layer0.digest,)))
            with trio.fail_after(10):
                while not factory.tails:  # the cache lookup before it runs in a thread
                    await trio.sleep(0.01)
            assert factory.tails == [layer0.digest]  # the read ahead is in flight, held at the gate
            spec = LayerSpec(ref="r/x:y", digest=layer0.digest, toc_digest=layer0.toc_digest)
            async with trio.open_nursery() as waiters:
                waiters.start_soon(manager._verified_index, spec)
                await trio.testing.wait_all_tasks_blocked()
                factory.gate.set()
            index, resolution = await manager._verified_index(spec)
            assert index.node_count > 1 and resolution.size == layer0.blob.stat().st_size
            assert factory.tails == [layer0.digest]  # one read for the neighbour and both callers
            with pytest.raises(IntegrityError):  # the shared index is still verified per mount
                await manager._verified_index(LayerSpec(ref="r/x:y", digest=layer0.digest,
                                                        toc_digest="sha256:" + "0" * 64))
            manager.cache.close()

    trio.run(main)
