"""The layer table of the FUSE session: which layers are served, under which name and inodes.

The session root (``pyfuse3.ROOT_INODE``) lists one directory per mounted layer. Layer ``slot``
owns the inodes ``slot << 32 .. (slot << 32) + 2**32 - 1``; inode = base + node id. Slots are
never reused within a process, so an inode the kernel still remembers from a released layer
can never name a node of another layer. Everything here runs on the trio thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusefs.fetch import ChunkFetcher
from fusefs.index import LayerIndex, NodeId

ROOT_INODE = 1
SLOT_SHIFT = 32
_NODE_MASK = (1 << SLOT_SHIFT) - 1


@dataclass(eq=False)
class MountedLayer:
    """One served layer."""

    name: bytes
    slot: int
    digest: str
    index: LayerIndex
    fetcher: ChunkFetcher
    mountpoints: set[str] = field(default_factory=set)
    binding: int = 0  # bind mounts in progress: the layer must stay served until they finish

    @property
    def base(self) -> int:
        return self.slot << SLOT_SHIFT

    def inode(self, node: NodeId) -> int:
        return self.base + node


class LayerTable:
    """Name → layer and inode → (layer, node) for the one FUSE session."""

    def __init__(self) -> None:
        self._by_name: dict[bytes, MountedLayer] = {}
        self._by_slot: dict[int, MountedLayer] = {}
        self._next_slot = 1

    def add(self, name: bytes, digest: str, index: LayerIndex, fetcher: ChunkFetcher) -> MountedLayer:
        """Serve ``index`` as the top-level directory ``name`` (ValueError if taken)."""
        if name in self._by_name:
            raise ValueError(f"layer name {name!r} already served")
        if index.node_count > _NODE_MASK:
            raise ValueError("index has too many nodes for one inode range")
        layer = MountedLayer(name, self._next_slot, digest, index, fetcher)
        self._next_slot += 1
        self._by_name[name] = layer
        self._by_slot[layer.slot] = layer
        return layer

    def remove(self, name: bytes) -> MountedLayer | None:
        layer = self._by_name.pop(name, None)
        if layer is not None:
            del self._by_slot[layer.slot]
        return layer

    def by_name(self, name: bytes) -> MountedLayer | None:
        return self._by_name.get(name)

    def resolve(self, inode: int) -> tuple[MountedLayer, NodeId] | None:
        """The layer and node of a (non-root) inode, or None if no longer served."""
        layer = self._by_slot.get(inode >> SLOT_SHIFT)
        if layer is None:
            return None
        node = inode & _NODE_MASK
        if node >= layer.index.node_count:
            return None
        return layer, NodeId(node)

    def layers_from(self, slot: int) -> list[MountedLayer]:
        """Served layers with a slot greater than ``slot``, in slot order (readdir of the root)."""
        return [self._by_slot[s] for s in sorted(self._by_slot) if s > slot]

    def __len__(self) -> int:
        return len(self._by_name)

    def total_nodes(self) -> int:
        return sum(layer.index.node_count for layer in self._by_name.values())
