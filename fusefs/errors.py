"""Errors raised below "mount this layer".

    LayerError                      anything that stops a layer from being mounted or read
    ├── SourceError                 the blob could not be read from where it lives
    │   ├── BlobNotFound            the registry/IPFS says it does not exist (404)
    │   ├── AuthError               credentials missing, refused or expired beyond refresh
    │   └── TransientSourceError    timeouts, 5xx, resets: worth retrying later
    ├── IntegrityError              bytes did not match the digest that vouches for them
    ├── FormatError                 the layer claims a format but its index is malformed or lies
    └── UnsupportedFormat           the layer is not lazily mountable: fall back to a normal unpack

Third-party exceptions (httpx, zstd, zlib, sqlite) are translated where they are called, chained
with ``raise ... from exc``. The FUSE operations map every LayerError to EIO.
"""

from __future__ import annotations


class LayerError(Exception):
    """Base of every fusefs failure."""


class SourceError(LayerError):
    """The blob could not be read from its source."""


class BlobNotFound(SourceError):
    """The source answered that the blob does not exist."""


class AuthError(SourceError):
    """Authentication was required and could not be satisfied."""


class TransientSourceError(SourceError):
    """A failure that may go away on retry (timeouts, 5xx, connection resets)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IntegrityError(LayerError):
    """Bytes did not match their expected digest; they are never served or cached."""


class FormatError(LayerError):
    """A layer index (TOC, zTOC, bootstrap) is malformed or inconsistent."""


class UnsupportedFormat(LayerError):
    """The layer is not in a lazily mountable format."""
