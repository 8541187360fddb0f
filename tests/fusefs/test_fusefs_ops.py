"""LayerOperations called directly (no kernel): inode ranges, lookup counts, errno mapping."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig, FuseConfig
from fusefs.errors import SourceError
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.layers import ROOT_INODE, SLOT_SHIFT, LayerTable
from fusefs.ops import LayerOperations
from fusefs.sources.file import FileSource
from tests.fusefs.fixtures import layer_case

CTX = pyfuse3.RequestContext()


class BrokenSource(FileSource):
    """A real file source whose reads fail, or raise a non-fusefs bug, on demand."""

    failure: Exception | None = None

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if self.failure is not None:
            raise self.failure
        return await super().read_ranges(ranges)


def _ops(tmp_path: Path) -> tuple[LayerOperations, LayerTable, BrokenSource]:
    case = layer_case("esgz-default", 0)
    source = BrokenSource(case.blob, case.digest)
    index = trio.run(read_estargz, source).verify(case.toc_digest)
    cache = ChunkCache(CacheConfig(tmp_path, fsync=False))
    cache.pin(case.digest)
    table = LayerTable()
    fetcher = ChunkFetcher(case.digest, index, source, cache, FetchConfig(failure_ttl=0), PriorityGate())
    table.add(b"layer0", case.digest, index, fetcher)
    return LayerOperations(table, FuseConfig(tmp_path / "fuse")), table, source


async def _lookup_path(ops: LayerOperations, path: str) -> int:
    inode = ROOT_INODE
    for part in ["layer0", *path.split("/")]:
        inode = (await ops.lookup(inode, part.encode(), CTX)).st_ino
    return inode


def test_inodes_lookup_counts_and_forget(tmp_path: Path) -> None:
    ops, table, _ = _ops(tmp_path)

    async def main() -> None:
        inode = await _lookup_path(ops, "bin/hello.sh")
        assert inode >> SLOT_SHIFT == 1
        link = await _lookup_path(ops, "links/hardlink-to-hello")
        assert link == inode
        attr = await ops.getattr(inode, CTX)
        assert attr.st_size == 42 and attr.st_nlink == 2 and attr.attr_timeout >= 3600
        assert ops._lookups[inode] == 2
        await ops.forget([(inode, 1)])
        assert ops._lookups[inode] == 1
        await ops.forget([(inode, 1)])
        assert inode not in ops._lookups

        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.lookup(ROOT_INODE, b"nope", CTX)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.getxattr(inode, b"user.nope", CTX)
        assert info.value.errno == errno.ENODATA
        xattr_dir = await _lookup_path(ops, "xattr")
        assert await ops.getxattr(xattr_dir, b"user.dirattr", CTX) == b"dir-value"
        assert await ops.readlink(await _lookup_path(ops, "links/rel-symlink"), CTX) == b"../etc/hostname"
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(inode, os.O_RDWR, CTX)
        assert info.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.mkdir(ROOT_INODE, b"x", 0o755, CTX)
        assert info.value.errno == errno.EROFS

        table.remove(b"layer0")  # a released layer: its inodes are stale, never another layer's
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.getattr(inode, CTX)
        assert info.value.errno == errno.ESTALE
        assert (await ops.statfs(CTX)).f_namemax == 255

    trio.run(main)


def test_layer_errors_and_bugs_become_eio(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ops, _, source = _ops(tmp_path)

    async def main() -> None:
        inode = await _lookup_path(ops, "etc/hostname")
        fh = (await ops.open(inode, os.O_RDONLY, CTX)).fh
        source.failure = SourceError("registry unreachable")
        for _ in range(2):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await ops.read(fh, 0, 100)
            assert info.value.errno == errno.EIO
        source.failure = RuntimeError("a bug")
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.read(fh, 0, 100)
        assert info.value.errno == errno.EIO
        source.failure = None
        assert await ops.read(fh, 0, 100) == b"fixture\n"
        await ops.release(fh)

    with caplog.at_level(logging.WARNING):
        trio.run(main)
    layer_logs = [r for r in caplog.records if "registry unreachable" in r.getMessage()]
    assert len(layer_logs) == 1  # logged once, not per read
    bug = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(bug) == 1 and bug[0].exc_info is not None


def test_only_a_stream_from_the_start_counts_as_sequential(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetcher's read-ahead is asked for by reads that continue a stream from offset 0,
    not by a run of contiguous reads after a jump (an mmapped library's page faults)."""
    ops, _, _ = _ops(tmp_path)
    flags: list[bool] = []

    async def main() -> None:
        inode = await _lookup_path(ops, "data/random-5MiB.bin")
        stream = await ops.open(inode, os.O_RDONLY, CTX)
        faults = await ops.open(inode, os.O_RDONLY, CTX)
        real = ops._files[stream.fh].fetcher.read

        async def spy(node: int, off: int, size: int, *, sequential: bool = False) -> bytes:
            flags.append(sequential)
            return await real(node, off, size, sequential=sequential)  # type: ignore[arg-type]

        monkeypatch.setattr(ops._files[stream.fh].fetcher, "read", spy)
        for off in (0, 128 << 10, 256 << 10):
            await ops.read(stream.fh, off, 128 << 10)
        assert flags == [False, True, True]
        flags.clear()
        # the loader reads the header, then the kernel faults pages in far into the file
        await ops.read(faults.fh, 0, 16 << 10)
        for off in ((4 << 20) + (512 << 10), (4 << 20) + (640 << 10)):
            await ops.read(faults.fh, off, 128 << 10)
        assert flags == [False, False, False]

    trio.run(main)
