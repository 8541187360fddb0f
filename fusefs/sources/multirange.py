"""Byte-range plumbing: coalescing ranges into spans, Range headers, Content-Range and
``multipart/byteranges`` parsing. Pure functions over bytes; no I/O.

Every number parsed here comes from a server and is checked against what was asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fusefs.errors import SourceError

__all__ = [
    "Piece",
    "Span",
    "coalesce",
    "cut",
    "multipart_boundary",
    "parse_content_range",
    "parse_multipart_byteranges",
    "range_header",
    "suffix",
    "validate_ranges",
]

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d{1,19})-(\d{1,19})/(\d{1,19}|\*)\s*$", re.IGNORECASE)
_MAX_PART_HEADER = 4096


@dataclass(frozen=True, slots=True)
class Span:
    """A contiguous byte region ``[start, end)`` to fetch, covering one or more asked ranges.

    A negative ``start`` with ``end == 0`` is a suffix: the blob's last ``-start`` bytes, for a
    blob whose size is not known yet (``Range: bytes=-N``).
    """

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def is_suffix(self) -> bool:
        return self.start < 0


def suffix(length: int) -> Span:
    """The span of a blob's last ``length`` bytes (see :class:`Span`)."""
    if length <= 0:
        raise SourceError(f"invalid suffix length {length}")
    return Span(-length, 0)


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes a server returned, starting at blob offset ``start``."""

    start: int
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.data)


def validate_ranges(ranges: Sequence[tuple[int, int]], size: int | None) -> None:
    """Raise ``SourceError`` for negative or empty ranges, or ranges past ``size`` when known."""
    for offset, length in ranges:
        if offset < 0 or length <= 0:
            raise SourceError(f"invalid range offset={offset} length={length}")
        if size is not None and offset + length > size:
            raise SourceError(f"range {offset}+{length} exceeds blob size {size}")


def coalesce(ranges: Sequence[tuple[int, int]], gap: int, max_bytes: int) -> list[Span]:
    """Merge ``(offset, length)`` ranges whose gap is at most ``gap`` bytes into sorted spans.

    Overlapping ranges always merge; a merge that would make a span longer than ``max_bytes``
    starts a new span instead (a single range longer than that stays one span).
    """
    spans: list[Span] = []
    for offset, length in sorted(ranges):
        end = offset + length
        if spans:
            last = spans[-1]
            overlaps = offset <= last.end
            near = offset - last.end <= gap
            if overlaps or (near and max(end, last.end) - last.start <= max_bytes):
                spans[-1] = Span(last.start, max(end, last.end))
                continue
        spans.append(Span(offset, end))
    return spans


def range_header(spans: Sequence[Span]) -> str:
    """The ``Range`` header value asking for ``spans`` (inclusive ends, as HTTP wants)."""
    return "bytes=" + ",".join(f"-{s.length}" if s.is_suffix else f"{s.start}-{s.end - 1}" for s in spans)


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """Parse ``bytes a-b/total`` into ``(start, end_exclusive, total or None)``.

    Raises:
        SourceError: malformed, inverted, or past the stated total.
    """
    m = _CONTENT_RANGE.match(value)
    if not m:
        raise SourceError(f"malformed Content-Range {value[:100]!r}")
    start, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < start or (total is not None and last >= total):
        raise SourceError(f"inconsistent Content-Range {value[:100]!r}")
    return start, last + 1, total


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/byteranges`` content type, or ``None`` for any other type."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/byteranges":
        return None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if 0 < len(value) <= 200:
                return value.encode("latin-1", "replace")
    raise SourceError("multipart/byteranges response without a usable boundary")


def parse_multipart_byteranges(body: bytes, boundary: bytes) -> list[Piece]:
    """Split a ``multipart/byteranges`` body into pieces, each sized by its own Content-Range.

    Part lengths come from Content-Range rather than from searching for the boundary, so part
    data that happens to contain the boundary is still read correctly.

    Raises:
        SourceError: a part without Content-Range, a truncated part or a broken delimiter.
    """
    delim = b"--" + boundary
    pos = body.find(delim)
    if pos < 0:
        raise SourceError("multipart/byteranges body has no boundary")
    pieces: list[Piece] = []
    while True:
        pos += len(delim)
        if body.startswith(b"--", pos):
            return pieces
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0 or head_end - pos > _MAX_PART_HEADER:
            raise SourceError("multipart/byteranges part headers are missing or too long")
        content_range = None
        for line in body[pos:head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-range":
                content_range = value.decode("latin-1")
        if content_range is None:
            raise SourceError("multipart/byteranges part without Content-Range")
        start, end, _total = parse_content_range(content_range)
        data_start = head_end + 4
        data_end = data_start + (end - start)
        if data_end > len(body):
            raise SourceError("multipart/byteranges part is truncated")
        pieces.append(Piece(start, body[data_start:data_end]))
        pos = body.find(delim, data_end)
        if pos < 0 or pos - data_end > 2:
            raise SourceError("multipart/byteranges part is not followed by its boundary")


def cut(ranges: Sequence[tuple[int, int]], pieces: Sequence[Piece]) -> list[bytes | None]:
    """For each asked range, its bytes from the first piece that covers it wholly, else ``None``."""
    out: list[bytes | None] = []
    for offset, length in ranges:
        found = None
        for piece in pieces:
            if piece.start <= offset and offset + length <= piece.end:
                rel = offset - piece.start
                found = piece.data[rel:rel + length]
                break
        out.append(found)
    return out
