"""Where a file's chunks sit in a pushed eStargz layer blob, read with the `estargz` library.

    chunks = file_chunks(registry.direct_host, "lazysnap/busybox", layer_digest, "data/big.bin")
    chunks[0].blob_offset, chunks[0].blob_end, chunks[0].digest   # compressed extent, sha256:...
    start, end = toc_extent(registry.direct_host, "lazysnap/busybox", layer_digest)

Fault tests use it to corrupt exactly one chunk (or the TOC) in flight and to find that chunk in
the cache.
The blob is read by HTTP range requests straight from the registry (not through a proxy under
test), and the TOC is verified against the layer's TOC digest when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

import estargz

from .procs import HarnessError

__all__ = ["ChunkSpan", "file_chunks", "toc_extent"]


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a file: its compressed extent in the blob and its verified content digest."""

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    digest: str


def _open(host: str, name: str, layer_digest: str, toc_digest: str | None) -> estargz.BlobReader:
    url = f"http://{host}/v2/{name}/blobs/{layer_digest}"
    with httpx.Client(timeout=30) as client:
        head = client.head(url, follow_redirects=True)
        if head.status_code != 200:
            raise HarnessError(f"HEAD {url}: {head.status_code}")
        size = int(head.headers["Content-Length"])

        def read_at(offset: int, length: int) -> bytes:
            r = client.get(url, headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                           follow_redirects=True)
            if r.status_code != 206:
                raise HarnessError(f"GET {url} range {offset}+{length}: {r.status_code}")
            return r.content

        return estargz.BlobReader(read_at, size, expected_toc_digest=toc_digest)


def toc_extent(host: str, name: str, layer_digest: str) -> tuple[int, int]:
    """The blob range ``[start, end)`` holding the compressed TOC of blob ``layer_digest``."""
    footer = _open(host, name, layer_digest, None).footer
    return footer.toc_offset, footer.toc_end


def file_chunks(host: str, name: str, layer_digest: str, path: str,
                toc_digest: str | None = None) -> list[ChunkSpan]:
    """The chunks of regular file ``path`` in blob ``layer_digest`` of repository ``name``.

    Raises HarnessError when the blob cannot be read or the file is not in its TOC, and the
    estargz library's errors when the blob is not eStargz or the TOC does not match ``toc_digest``.
    """
    toc = _open(host, name, layer_digest, toc_digest).toc
    index = toc.lookup(path)
    if index is None:
        raise HarnessError(f"{path} is not in the TOC of {layer_digest}")
    spans = []
    for c in toc.chunks(index):
        if c.digest is None:
            raise HarnessError(f"{path}: chunk at file offset {c.file_offset} has no digest")
        spans.append(ChunkSpan(c.file_offset, c.size, c.compressed_offset, c.compressed_end, c.digest))
    return spans
