"""The seam between the snapshotter and whatever serves layers lazily (``fusefs``).

The snapshotter knows a layer filesystem only through :class:`LayerFilesystem`: mount a layer
described by a :class:`~fusefs.spec.LayerSpec` on a directory, check that it is still served, and
release it. ``fusefs`` satisfies the protocol structurally and never imports ``snapshotter``.
"""

from __future__ import annotations

from typing import Protocol

from fusefs.spec import LayerSpec

REMOTE_LABEL = "containerd.io/snapshot/remote"
"""Label on a committed snapshot whose files are served by a :class:`LayerFilesystem`."""

REMOTE_LABEL_VALUE = "remote snapshot"

REMOTE_PREPARED_LOG_KEY = "remote-snapshot-prepared"
"""Log field set on every Prepare that had a remote candidate: ``true`` or ``false`` plus a reason."""


class LayerFilesystem(Protocol):
    """Mounts layers lazily. All methods run on the trio loop.

    Contract: ``mount`` either leaves ``mountpoint`` serving the layer's files read-only or raises
    and leaves ``mountpoint`` as it found it (an empty directory). ``start_mount`` is ``mount``
    that may return once the layer is known to be servable (its TOC matches the manifest's
    digest) and finish in the background; ``check`` waits for that end (``wait=False``: passes
    while it is under way). ``check`` raises if the layer is not served (source gone, FUSE
    session dead, or a started mount that failed).
    ``unmount`` releases the layer and leaves ``mountpoint`` an ordinary empty directory; it
    raises if it cannot.
    """

    async def mount(self, spec: LayerSpec, mountpoint: str) -> None: ...

    async def start_mount(self, spec: LayerSpec, mountpoint: str) -> None: ...

    async def check(self, mountpoint: str, *, wait: bool = True) -> None: ...

    async def unmount(self, mountpoint: str) -> None: ...
