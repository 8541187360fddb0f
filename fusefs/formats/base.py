"""The format reader protocol: a blob's own index (TOC, zTOC, bootstrap) → an UnverifiedIndex."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fusefs.index import TRUSTED_OPAQUE_XATTR, UnverifiedIndex
from fusefs.sources.base import BlobSource


class FormatReader(Protocol):
    """Reads the index of one layer format.

    Implementations read only what they need from ``source`` (typically the footer, then the
    TOC), bound every size before allocating, and raise ``UnsupportedFormat`` when the blob is
    not in their format (so the next reader, or the full-pull fallback, takes over),
    ``FormatError`` when it is but the index is malformed, and ``SourceError`` as the source
    raised it. The result is unverified: its ``toc_digest`` is the digest of the index bytes.

    A reader that can hash the index bytes before indexing them calls ``on_toc`` with the digests
    the result will accept (``UnverifiedIndex.verify``), as soon as it has them: the caller may
    then accept the layer while the index is built. Readers that cannot simply never call it.
    """

    async def __call__(self, source: BlobSource, *, opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR,
                       on_toc: Callable[[tuple[str, ...]], None] | None = None) -> UnverifiedIndex: ...
