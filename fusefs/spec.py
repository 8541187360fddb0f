"""What the snapshotter asks fusefs to mount: one layer, described by where it lives and what it is.

The snapshotter builds a :class:`LayerSpec` from containerd's labels (``snapshotter.labels``);
fusefs turns it into a mounted, lazily fetched file tree. Nothing here is trusted: every field
comes from labels that a registry or an image author controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerSpec:
    """One layer to mount lazily.

    Attributes:
        ref: image reference the layer belongs to, e.g. ``127.0.0.1:5000/lib/app:v1``.
        digest: the layer blob digest (``sha256:<hex>``), also its identity in the cache.
        size: compressed blob size in bytes, or ``None`` when no label said it.
        urls: alternative locations (``remote/urls``), including ``ipfs://<cid>``.
        toc_digest: expected TOC digest (``containerd.io/snapshot/stargz/toc.digest``), if any.
        media_type: the layer media type when known (gzip, zstd, nydus...).
        neighbours: digests of other layers of the same image, from the labels (for parallel
            resolution). containerd lists a layer and those above it, never those below.
        lower: digests of the layers below this one in its image, nearest first (the snapshot's
            parent chain): mounted already, and where its files' libraries and modules often are.
        prefetch_size: bytes of the landmark prefix to prefetch, from ``remote/stargz.prefetch``.
        format_hints: format-specific labels passed through unparsed (nydus, SOCI).
    """

    ref: str
    digest: str
    size: int | None = None
    urls: tuple[str, ...] = ()
    toc_digest: str | None = None
    media_type: str | None = None
    neighbours: tuple[str, ...] = ()
    lower: tuple[str, ...] = ()
    prefetch_size: int | None = None
    format_hints: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
