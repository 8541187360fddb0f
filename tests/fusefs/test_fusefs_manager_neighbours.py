"""Neighbour resolution is best effort: no failure in it may end the FUSE session's nursery."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FuseConfig, FusefsConfig
from fusefs.manager import LayerManager
from fusefs.sources.base import BlobSource
from fusefs.spec import LayerSpec

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
