"""Thin wrappers over the Linux mount syscalls and ``/proc/self/mountinfo``.

Every function blocks: call it from a worker thread, never on the trio loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from fusefs.mountinfo import unescape

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError with the errno and both paths."""
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or '-'} {source} on {target}: {os.strerror(err)}")


def bind_mount(source: str, target: str, readonly: bool = False) -> None:
    """Bind ``source`` on ``target``, read-only if asked (a bind needs a remount to become ro)."""
    mount(source, target, "", MS_BIND | MS_REC)
    if readonly:
        mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY)


def unmount(target: str, detach: bool = False) -> None:
    """umount2(2); ``detach`` is MNT_DETACH (lazy). Raises OSError."""
    rc = _libc.umount2(target.encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def mount_points() -> list[str]:
    """Mount points of this mount namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split(" ")
            if len(parts) > 4:
                points.append(unescape(parts[4]))
    return points


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    path = os.path.realpath(path)
    prefix = path.rstrip("/") + "/"
    found = [p for p in mount_points() if p == path or p.startswith(prefix)]
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` is itself a mount point (works for dead FUSE mounts, unlike stat)."""
    return os.path.realpath(path) in set(mount_points())
