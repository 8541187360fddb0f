"""The format reader protocol: a blob's own index (TOC, zTOC, bootstrap) → an UnverifiedIndex."""

from __future__ import annotations

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
    """

    async def __call__(self, source: BlobSource, *, opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR
                       ) -> UnverifiedIndex: ...
