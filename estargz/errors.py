"""Errors raised by the eStargz / zstd:chunked format library.

    EstargzError                anything wrong with a blob, its footer, its TOC or a chunk
    ├── FooterError             the tail of the blob is no footer we know, or it points nowhere
    ├── TOCError                the TOC is malformed, too large, or lies (offsets, names, links)
    ├── ChunkError              a chunk could not be decoded (corrupt stream, short output)
    │   └── ChunkDigestMismatch decoded bytes do not match the digest the TOC vouches for
    ├── TOCDigestMismatch       the TOC does not match the digest the image manifest vouches for
    ├── NeedsExternalTOC        the footer says the TOC lives in a separate "TOC image"
    ├── UnsupportedFormat       a valid blob in a variant this library does not read
    └── InputError              the writer's input tar is malformed or holds what eStargz cannot

Messages name the field and, where there is one, the TOC entry (its index and name), so an
operator can tell a truncated download from a lying TOC. Third-party exceptions (zlib, zstd,
json) are translated where they are raised, chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "ChunkDigestMismatch",
    "ChunkError",
    "EstargzError",
    "FooterError",
    "InputError",
    "NeedsExternalTOC",
    "TOCDigestMismatch",
    "TOCError",
    "UnsupportedFormat",
]


class EstargzError(Exception):
    """Base of every error this library raises on bad input."""


class FooterError(EstargzError):
    """The blob tail is not a footer we recognise, or its fields are out of range."""


class TOCError(EstargzError):
    """The TOC is malformed, exceeds a bound, or contradicts itself or the footer."""


class ChunkError(EstargzError):
    """A chunk's compressed bytes could not be decoded to the expected size."""


class ChunkDigestMismatch(ChunkError):
    """A decoded chunk does not match its digest; its bytes must not be served."""


class TOCDigestMismatch(EstargzError):
    """The TOC does not match the digest that vouches for it."""


class NeedsExternalTOC(EstargzError):
    """The blob keeps its TOC in a separate TOC image (``STARGZEXTERNALTOC`` footer)."""


class UnsupportedFormat(EstargzError):
    """The blob is well formed but in a variant this library does not support."""


class InputError(EstargzError):
    """The tar given to the writer is malformed, escapes its root, or uses unsupported features."""
