"""Disk usage of a directory tree, measured as containerd's ``fs.DiskUsage`` does it.

Size is the space allocated (``st_blocks`` x 512) and inodes the number of distinct (device,
inode) pairs, each hard link counted once; the root directory itself is included. Symlinks are
not followed. Blocks: run it in a worker thread.
"""

from __future__ import annotations

import os
import stat

from snapshotter.store import Usage


def disk_usage(root: str) -> Usage:
    """Usage of the tree at ``root``; raises OSError if ``root`` cannot be read."""
    seen: set[tuple[int, int]] = set()
    size = 0
    st = os.lstat(root)
    stack = [root]
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        path = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                est = entry.stat(follow_symlinks=False)
                ino = (est.st_dev, est.st_ino)
                if ino not in seen:
                    seen.add(ino)
                    size += est.st_blocks * 512
                if stat.S_ISDIR(est.st_mode):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))
