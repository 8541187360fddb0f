"""The directory layout of snapshots and the mounts containerd is told to perform, as containerd's
overlayfs snapshotter composes them.

    <root>/snapshots/<id>/fs     the snapshot's files (upperdir when active; a lowerdir once committed)
    <root>/snapshots/<id>/work   overlayfs workdir (active snapshots only)

Mounts: an active snapshot without parent is a rw bind of ``fs``; with parents an overlay with
``lowerdir`` (nearest parent first), ``upperdir`` and ``workdir``. A view of one parent is a ro bind
of the parent's ``fs``; of several an overlay with only ``lowerdir`` (read-only by construction).
Paths are absolute, like containerd's: at 128 layers ``lowerdir`` exceeds a page, and containerd's
``mount.All`` shortens it itself (it changes directory to the common prefix and mounts relative
paths), so a snapshotter must not try to be clever here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

from snapshotter import syscalls
from snapshotter.store import Kind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount for containerd to perform, as in ``containerd.types.Mount``."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OverlayOptions:
    """Host-dependent overlay options, detected once at start."""

    index_off: bool = False
    userxattr: bool = False


class Layout:
    """Paths of snapshot directories under ``<root>/snapshots``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.snapshots = os.path.join(self.root, "snapshots")

    def dir(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid))

    def fs(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid), "fs")

    def work(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid), "work")


def compose(layout: Layout, opts: OverlayOptions, kind: Kind, sid: int, parent_ids: list[int]) -> list[Mount]:
    """The mounts for an active or view snapshot ``sid`` with ``parent_ids`` (nearest first)."""
    if not parent_ids:
        flag = "ro" if kind == Kind.VIEW else "rw"
        return [Mount("bind", layout.fs(sid), (flag, "rbind"))]
    if kind == Kind.VIEW and len(parent_ids) == 1:
        return [Mount("bind", layout.fs(parent_ids[0]), ("ro", "rbind"))]
    options: list[str] = []
    if opts.index_off:
        options.append("index=off")
    if opts.userxattr:
        options.append("userxattr")
    if kind == Kind.ACTIVE:
        options += [f"workdir={layout.work(sid)}", f"upperdir={layout.fs(sid)}"]
    options.append("lowerdir=" + ":".join(layout.fs(p) for p in parent_ids))
    return [Mount("overlay", "overlay", tuple(options))]


def detect_overlay_options(root: str) -> OverlayOptions:
    """What containerd's overlay snapshotter would pass on this host, for snapshots under ``root``.

    ``index=off`` whenever the kernel knows the parameter; ``userxattr`` only inside a user
    namespace (the initial namespace's root uses trusted xattrs), and only if a test mount with it
    succeeds on ``root``'s filesystem. Blocks (may mount).
    """
    index_off = os.path.exists("/sys/module/overlay/parameters/index")
    return OverlayOptions(index_off=index_off, userxattr=_needs_userxattr(root))


def in_user_namespace() -> bool:
    """False for the initial user namespace (uid_map maps all 2^32 ids one to one)."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def _needs_userxattr(root: str) -> bool:
    if not in_user_namespace():
        return False
    if filesystem_type(root) == "tmpfs":
        return False  # tmpfs does not allow user.* xattrs for overlay
    with tempfile.TemporaryDirectory(prefix="userxattr-check-", dir=root) as td:
        dirs = {name: os.path.join(td, name) for name in ("lower1", "lower2", "upper", "work", "merged")}
        for d in dirs.values():
            os.mkdir(d)
        data = (f"lowerdir={dirs['lower2']}:{dirs['lower1']},upperdir={dirs['upper']},"
                f"workdir={dirs['work']},userxattr")
        try:
            syscalls.mount("overlay", dirs["merged"], "overlay", 0, data)
        except OSError as exc:
            log.info("overlay rejects userxattr here (%s); not using it", exc)
            return False
        syscalls.unmount(dirs["merged"])
        return True


def filesystem_type(path: str) -> str:
    """The filesystem type of the mount holding ``path``, from mountinfo."""
    path = os.path.realpath(path)
    best, best_type = "", ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split(" ")[4] if len(left.split(" ")) > 4 else ""
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, best_type = point, right.split(" ")[0]
    return best_type
