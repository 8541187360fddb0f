"""Which file of a layer the dynamic loader would load for a needed soname.

The loader's order, as far as one layer can tell it: the needing file's ``DT_RUNPATH`` (or
``DT_RPATH``) with ``$ORIGIN`` expanded, then ``/etc/ld.so.cache``, then the default directories.
Paths are looked up in this layer only, following its symlinks (Debian's ``/etc/alternatives``
links); a library that lives in another layer is not found, and nothing is fetched for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fusefs.index import ROOT, LayerIndex, NodeId

_DEFAULT_DIRECTORIES = (
    *(prefix + triplet for triplet in (b"/x86_64-linux-gnu", b"/aarch64-linux-gnu", b"")
      for prefix in (b"lib", b"usr/lib", b"usr/local/lib")),
    b"lib64", b"usr/lib64",
)


class LibraryFinder:
    """Finds needed libraries in one layer; ``cache`` is the layer's parsed ``ld.so.cache``."""

    def __init__(self, index: LayerIndex, directory_of: Callable[[NodeId], NodeId],
                 name_of: Callable[[NodeId], bytes], cache: dict[bytes, bytes]) -> None:
        self._index = index
        self._directory_of = directory_of
        self._name_of = name_of
        self._cache = cache

    def find(self, needing: NodeId | None, soname: bytes, search: Sequence[bytes]) -> NodeId | None:
        """The regular file that loading ``soname`` for ``needing`` (a file of this layer, or
        None for one of another layer) reads, or None."""
        if not soname or b"/" in soname:
            return None
        candidates: list[bytes] = []
        for entry in search:
            if b"$ORIGIN" in entry or b"${ORIGIN}" in entry:
                if needing is None:
                    continue
                origin = self.path_of(self._directory_of(needing))
                if origin is None:
                    continue
                entry = entry.replace(b"${ORIGIN}", origin).replace(b"$ORIGIN", origin)
            candidates.append(entry + b"/" + soname)
        cached = self._cache.get(soname)
        if cached is not None:
            candidates.append(cached)
            if cached.startswith(b"/lib"):  # merged /usr: /lib is a link in some other layer
                candidates.append(b"/usr" + cached)
        candidates += [directory + b"/" + soname for directory in _DEFAULT_DIRECTORIES]
        for path in candidates:
            node = self._index.resolve(path)
            if node is not None and node != needing and self._is_file(node):
                return node
        return None

    def path_of(self, node: NodeId) -> bytes | None:
        """``node``'s path from the layer's root (``/usr/lib``), by way of its directories."""
        names: list[bytes] = []
        for _ in range(256):
            if node == ROOT:
                return b"/" + b"/".join(reversed(names))
            names.append(self._name_of(node))
            node = self._directory_of(node)
        return None

    def _is_file(self, node: NodeId) -> bool:
        return (not self._index.is_dir(node) and self._index.readlink(node) is None
                and self._index.size(node) > 0)
