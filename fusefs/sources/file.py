"""A BlobSource over a local file: OCI layout directories, plain blob directories, air-gapped use.

The file is opened for every ``read_ranges`` call, so replacing it by rename takes effect on the
next read. Content is not trusted more than a registry's: callers verify every chunk.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from fusefs.errors import BlobNotFound, SourceError
from fusefs.sources.base import read_tail_by_size
from fusefs.spec import LayerSpec

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass
class SourceCounters:
    """What a source was asked, for metrics and tests."""

    calls: int = 0
    ranges: int = 0
    bytes: int = 0


class FileSource:
    """Random access to one blob stored as a local file."""

    def __init__(self, path: Path, digest: str, expected_size: int | None = None) -> None:
        self._path = path
        self._digest = digest
        self._expected_size = expected_size
        self.counters = SourceCounters()
        # the ranges of the latest calls, oldest first (bounded)
        self.history: deque[tuple[tuple[int, int], ...]] = deque(maxlen=1000)

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def path(self) -> Path:
        return self._path

    async def size(self) -> int:
        try:
            size = os.stat(self._path).st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(f"{self._path} does not exist") from exc
        except OSError as exc:
            raise SourceError(f"cannot stat {self._path}: {exc}") from exc
        if self._expected_size is not None and size != self._expected_size:
            raise SourceError(f"{self._path} has {size} bytes, the layer descriptor says "
                              f"{self._expected_size}")
        return size

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        wanted = tuple(ranges)
        self.counters.calls += 1
        self.counters.ranges += len(wanted)
        self.counters.bytes += sum(length for _, length in wanted)
        self.history.append(wanted)
        return await trio.to_thread.run_sync(self._read_sync, wanted)

    def _read_sync(self, ranges: tuple[tuple[int, int], ...]) -> list[bytes]:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise BlobNotFound(f"{self._path} does not exist") from exc
        except OSError as exc:
            raise SourceError(f"cannot open {self._path}: {exc}") from exc
        try:
            out: list[bytes] = []
            for offset, length in ranges:
                if offset < 0 or length < 0:
                    raise SourceError(f"invalid range ({offset}, {length})")
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise SourceError(f"short read of {self._path} at {offset}: "
                                      f"{len(data)} of {length} bytes")
                out.append(data)
            return out
        except OSError as exc:
            raise SourceError(f"cannot read {self._path}: {exc}") from exc
        finally:
            os.close(fd)

    async def read_tail(self, length: int) -> bytes:
        return await read_tail_by_size(self, length)

    async def check(self) -> None:
        await self.size()

    async def aclose(self) -> None:
        return None


class FileSourceFactory:
    """Finds a layer blob by digest in OCI layout dirs (``blobs/sha256/<hex>``) or plain dirs."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self._roots = tuple(roots)

    async def open(self, spec: LayerSpec) -> FileSource:
        m = _DIGEST_RE.fullmatch(spec.digest)
        if m is None:
            raise BlobNotFound(f"not a sha256 digest: {spec.digest[:100]!r}")
        hexpart = m.group(1)
        for root in self._roots:
            for candidate in (root / "blobs" / "sha256" / hexpart, root / hexpart):
                if candidate.is_file():
                    return FileSource(candidate, spec.digest, spec.size)
        raise BlobNotFound(f"{spec.digest} not found under {', '.join(map(str, self._roots))}")
