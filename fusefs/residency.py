"""How much of a mounted layer is local: per file and per layer, from the index and the cache.

A chunk counts as resident when the chunk cache holds it. Everything here reads the index and
asks the cache one ``contains`` per chunk: it never fetches, and runs on any thread.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from fusefs.fetch import ChunkFetcher
from fusefs.index import ROOT, NodeId, split_path

MAX_TREE_ENTRIES = 100_000


@dataclass(frozen=True)
class FileResidency:
    """One node of a layer tree: ``cached`` of ``size`` bytes are local (regular files only)."""

    path: str
    type: str
    size: int
    cached: int


@dataclass(frozen=True)
class LayerResidency:
    """A layer's totals: uncompressed file bytes, how many of them are cached, and chunks."""

    uncompressed: int
    cached: int
    chunks: int
    chunks_cached: int


def _type_name(mode: int, rdev: int) -> str:
    if stat.S_ISCHR(mode) and rdev == 0:
        return "whiteout"  # overlayfs's marker for a file deleted by this layer
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo")):
        if test(mode):
            return name
    return "other"


def node_cached_bytes(fetcher: ChunkFetcher, node: NodeId) -> int:
    """Bytes of regular file ``node`` whose chunks are cached."""
    index = fetcher.index
    return sum(index.chunk_size(cid) for cid in index.chunk_ids(node) if fetcher.is_cached(cid))


def layer_residency(fetcher: ChunkFetcher) -> LayerResidency:
    """Totals over every chunk of the layer (shared chunks count once per occurrence)."""
    index = fetcher.index
    total = cached = cached_chunks = 0
    for cid in range(index.chunk_count):
        size = index.chunk_size(cid)
        total += size
        if fetcher.is_cached(cid):
            cached += size
            cached_chunks += 1
    return LayerResidency(total, cached, index.chunk_count, cached_chunks)


def find(fetcher: ChunkFetcher, path: str) -> NodeId | None:
    """The node at ``path`` (``/`` or empty for the root), or None; FormatError for a bad path."""
    node = ROOT
    for name in split_path(path):
        found = fetcher.index.lookup(node, name)
        if found is None:
            return None
        node = found
    return node


def tree(fetcher: ChunkFetcher, path: str = "", limit: int = MAX_TREE_ENTRIES) -> list[FileResidency]:
    """``path`` and everything below it, depth first, at most ``limit`` entries.

    Raises:
        KeyError: no such path in the layer.
        FormatError: the path is malformed (``..``, NUL).
    """
    index = fetcher.index
    start = find(fetcher, path)
    if start is None:
        raise KeyError(path)
    prefix = "/".join(p.decode("utf-8", "surrogateescape") for p in split_path(path))
    out = [_entry(fetcher, "/" + prefix, start)]
    if not index.is_dir(start):
        return out
    stack: list[tuple[str, NodeId]] = [(prefix, start)]
    while stack and len(out) < limit:
        base, node = stack.pop()
        subdirs: list[tuple[str, NodeId]] = []
        for _, name, child in index.children(node):
            child_path = f"{base}/{name.decode('utf-8', 'surrogateescape')}".lstrip("/")
            out.append(_entry(fetcher, "/" + child_path, child))
            if len(out) >= limit:
                break
            if index.is_dir(child):
                subdirs.append((child_path, child))
        stack.extend(reversed(subdirs))
    return out


def _entry(fetcher: ChunkFetcher, path: str, node: NodeId) -> FileResidency:
    attr = fetcher.index.attr(node)
    kind = _type_name(attr.mode, attr.rdev)
    cached = node_cached_bytes(fetcher, node) if kind == "file" else 0
    return FileResidency(path, kind, attr.size if kind == "file" else 0, cached)
