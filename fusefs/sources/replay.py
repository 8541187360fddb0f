"""A source wrapper that records the ranges a format reader reads, and can replay them offline.

When a layer's index is read, the manager wraps the real source in a :class:`RecordingSource`
and, once the index verified, persists the recorded ranges (footer, TOC...) in the cache. After
a restart :class:`RecordingSource` is built from those bytes: the reader is served from them
with no request to the registry, and the index is verified again exactly as the first time, so
the persisted bytes need no more trust than the registry's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fusefs.errors import FormatError
from fusefs.sources.base import BlobSource, read_tail_by_size

_MAGIC = b"lazysnap-index-ranges-v1\n"
MAX_RECORDED_BYTES = 512 << 20
_MAX_RANGES = 64


class RecordingSource:
    """Delegates to ``source`` except for ranges it already holds; remembers every range read."""

    def __init__(self, source: BlobSource, blob_size: int | None = None,
                 ranges: dict[tuple[int, int], bytes] | None = None) -> None:
        self._source = source
        self._size = blob_size
        self._ranges: dict[tuple[int, int], bytes] = dict(ranges or {})
        self.source_reads = 0

    @property
    def digest(self) -> str:
        return self._source.digest

    async def size(self) -> int:
        if self._size is None:
            self._size = await self._source.size()
        return self._size

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out: list[bytes | None] = [self._lookup(r) for r in ranges]
        missing = [r for r, data in zip(ranges, out, strict=True) if data is None]
        if missing:
            self.source_reads += 1
            fetched = await self._source.read_ranges(missing)
            for r, data in zip(missing, fetched, strict=True):
                self._ranges[(r[0], r[1])] = data
            out = [self._lookup(r) for r in ranges]
        return [d for d in out if d is not None]

    def _lookup(self, wanted: tuple[int, int]) -> bytes | None:
        offset, length = wanted
        for (start, size), data in self._ranges.items():
            if start <= offset and offset + length <= start + size:
                return data[offset - start:offset - start + length]
        return None

    async def read_tail(self, length: int) -> bytes:
        if self._size is not None:
            return await read_tail_by_size(self, length)
        self.source_reads += 1
        data = await self._source.read_tail(length)
        self._size = await self._source.size()  # known now: no request
        self._ranges[(self._size - len(data), len(data))] = data
        return data

    async def check(self) -> None:
        await self._source.check()

    async def aclose(self) -> None:
        await self._source.aclose()

    def dump(self) -> bytes:
        """Serialize the blob size and every recorded range (see ``load``)."""
        items = sorted(self._ranges.items())
        header = {"blob_size": self._size, "ranges": [[o, len(d)] for (o, _), d in items]}
        return _MAGIC + json.dumps(header).encode() + b"\n" + b"".join(d for _, d in items)

    @classmethod
    def load(cls, source: BlobSource, data: bytes) -> RecordingSource:
        """Rebuild from ``dump`` output. Raises FormatError on anything inconsistent."""
        if not data.startswith(_MAGIC) or len(data) > MAX_RECORDED_BYTES:
            raise FormatError("persisted index ranges: bad magic or too large")
        header_end = data.find(b"\n", len(_MAGIC))
        try:
            header = json.loads(data[len(_MAGIC):header_end])
            blob_size = int(header["blob_size"])
            spans = [(int(o), int(n)) for o, n in header["ranges"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"persisted index ranges: bad header: {exc}") from exc
        if header_end < 0 or len(spans) > _MAX_RANGES:
            raise FormatError("persisted index ranges: bad header")
        pos = header_end + 1
        ranges: dict[tuple[int, int], bytes] = {}
        for offset, length in spans:
            if offset < 0 or length < 0 or offset + length > blob_size or pos + length > len(data):
                raise FormatError("persisted index ranges: range out of bounds")
            ranges[(offset, length)] = data[pos:pos + length]
            pos += length
        if pos != len(data):
            raise FormatError("persisted index ranges: trailing bytes")
        return cls(source, blob_size, ranges)
