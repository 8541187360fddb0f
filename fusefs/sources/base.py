"""The Source protocol: random access to the bytes of one blob, wherever it lives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeAlias, runtime_checkable

from fusefs.spec import LayerSpec


class BlobSource(Protocol):
    """Reads byte ranges of one immutable blob (registry over HTTP, IPFS, a local file).

    Implementations retry transient failures themselves and raise only ``fusefs.errors``
    exceptions. They never verify content: digests are checked by the caller, which knows
    what each range must hash to.
    """

    @property
    def digest(self) -> str:
        """The blob digest (``sha256:<hex>``)."""
        ...

    async def size(self) -> int:
        """The blob size in bytes (from the spec, or asked of the source once and remembered)."""
        ...

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Return the bytes of each ``(offset, length)`` range, in order.

        Ranges may be coalesced or sent as one multi-range request; each result has exactly
        ``length`` bytes or the call raises (a short read is a ``SourceError``).
        """
        ...

    async def read_tail(self, length: int) -> bytes:
        """The last ``min(length, size)`` bytes of the blob; ``size()`` is known afterwards.

        A source that does not know the size yet learns it from the same request (an HTTP
        suffix range): a format reader's first read costs one round trip, not two.
        """
        ...

    async def check(self) -> None:
        """Raise ``SourceError`` if the blob can no longer be reached (cheap: a HEAD or less)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


PieceSink: TypeAlias = Callable[[int, bytes], Awaitable[None]]
"""Takes ``(blob offset, bytes)`` pieces of a streamed read (see :func:`stream_ranges`)."""


@runtime_checkable
class StreamingSource(BlobSource, Protocol):
    """A source that can hand over a range's bytes while they are still arriving."""

    async def stream_ranges(self, ranges: Sequence[tuple[int, int]], sink: PieceSink) -> None:
        """As :func:`stream_ranges`."""
        ...


async def stream_ranges(source: BlobSource, ranges: Sequence[tuple[int, int]], sink: PieceSink) -> None:
    """Hand the bytes of each ``(offset, length)`` range to ``sink`` as ``(blob offset, bytes)``.

    A :class:`StreamingSource` calls ``sink`` as the bytes arrive, so the caller can use (and
    drop) the head of a long range before its tail is in. Its pieces come in blob order within
    one response, may hold bytes outside the ranges (the gaps of coalesced spans) and, after a
    retry, may repeat bytes already handed over: the sink keeps what it needs, once. Returns
    when every range was handed over at least once; raises as ``read_ranges`` does, possibly
    after handing some pieces over. Other sources: one ``read_ranges``, then one piece per range.
    """
    if isinstance(source, StreamingSource):
        await source.stream_ranges(ranges, sink)
    else:
        await hand_over_whole(source, ranges, sink)


async def hand_over_whole(source: BlobSource, ranges: Sequence[tuple[int, int]], sink: PieceSink) -> None:
    """``read_ranges``, then each range to ``sink`` in one piece: a stream that cannot stream."""
    for (offset, _), data in zip(ranges, await source.read_ranges(ranges), strict=True):
        await sink(offset, data)


async def read_tail_by_size(source: BlobSource, length: int) -> bytes:
    """``read_tail`` for a source whose size is known or cheap: the size, then one range."""
    size = await source.size()
    n = min(length, size)
    return (await source.read_ranges([(size - n, n)]))[0] if n else b""


class SourceFactory(Protocol):
    """Opens a BlobSource for the layer a LayerSpec describes."""

    async def open(self, spec: LayerSpec) -> BlobSource:
        """Return a source for ``spec.digest`` (registry, mirror or URL), without reading it yet."""
        ...
