"""Mount what lazysnapd mounts, under whatever capability limits this process was started with.

Usage: ``python hardened_mounts.py DIR``. Serves a one-file FUSE filesystem with pyfuse3 at
DIR/fuse (``allow_other``, as lazysnapd does), stacks an overlay on it (FUSE dir as lowerdir),
reads the file through the overlay, writes a new one, unmounts both, and prints
``ok <effective capabilities in hex>``. Run by test_operator_hardening.py under ``setpriv`` with
the unit's CapabilityBoundingSet and NoNewPrivileges.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from typing import Any

import pyfuse3
import trio

CONTENT = b"served lazily\n"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class OneFile(pyfuse3.Operations):  # type: ignore[misc]
    """A read-only root holding the single file ``hello``."""

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode, attrs.st_size, attrs.st_nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            attrs.st_mode, attrs.st_size, attrs.st_nlink = stat.S_IFREG | 0o644, len(CONTENT), 1
        attrs.entry_timeout = attrs.attr_timeout = 300
        return attrs

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != b"hello":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"hello", self._attrs(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return CONTENT[off : off + size]

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


def exercise_overlay(base: str) -> None:
    merged = os.path.join(base, "merged")
    options = f"lowerdir={base}/fuse,upperdir={base}/upper,workdir={base}/work"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, merged], check=True)
    try:
        with open(os.path.join(merged, "hello"), "rb") as f:
            if f.read() != CONTENT:
                raise SystemExit("wrong content through the overlay")
        with open(os.path.join(merged, "written"), "wb") as f:
            f.write(b"upper\n")
    finally:
        subprocess.run(["umount", merged], check=True)


async def serve_and_check(base: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        await trio.to_thread.run_sync(exercise_overlay, base)
        pyfuse3.terminate()


def main(base: str) -> int:
    for sub in ("fuse", "upper", "work", "merged"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    options = set(pyfuse3.default_options) | {"fsname=lazysnap-test", "allow_other", "ro"}
    pyfuse3.init(OneFile(), os.path.join(base, "fuse"), options)
    try:
        trio.run(serve_and_check, base)
    finally:
        pyfuse3.close(unmount=True)
    with open("/proc/self/status") as status:
        cap_eff = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    print("ok", cap_eff)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
