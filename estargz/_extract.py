"""Extract a blob's tree to a directory through the TOC, every chunk verified.

Every path is opened relative to a directory file descriptor, component by component with
``O_NOFOLLOW``, so neither names nor symlinks in the layer can make it write outside the target.
Ownership, devices and xattrs are applied only when running as root.
"""

from __future__ import annotations

import logging
import os
import stat

from ._reader import BlobReader
from ._toc import ROOT, TOC, EntryType
from .errors import EstargzError

__all__ = ["extract"]

log = logging.getLogger(__name__)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def extract(reader: BlobReader, root: str | os.PathLike[str]) -> None:
    """Write the layer's tree under ``root`` (created if missing; must not hold the same names).

    Raises:
        ChunkError / ChunkDigestMismatch: a file's bytes do not verify (the file is left partial).
        OSError: the target refused a write (e.g. an existing name).
    """
    os.makedirs(root, exist_ok=True)
    _Extractor(reader, os.open(root, _DIR_FLAGS)).run()


class _Extractor:
    def __init__(self, reader: BlobReader, root_fd: int) -> None:
        self.reader = reader
        self.toc: TOC = reader.toc
        self.root_fd = root_fd
        self.cached: tuple[int, int] | None = None  # (dir index, fd)
        self.privileged = os.geteuid() == 0

    def run(self) -> None:
        toc = self.toc
        links: list[int] = []
        dirs: list[int] = []
        try:
            for i in toc.iter_tree():
                kind = toc.type(i)
                if kind == EntryType.HARDLINK:
                    links.append(i)  # after every target exists, whatever the tree order
                    continue
                self._create(i, kind)
                if kind == EntryType.DIR:
                    dirs.append(i)
            for i in links:
                target = toc.link_target(i)
                src_fd = self._open_path(toc.parent(target))
                try:
                    os.link(
                        toc.name_bytes(target),
                        toc.name_bytes(i),
                        src_dir_fd=src_fd,
                        dst_dir_fd=self._dir_fd(toc.parent(i)),
                        follow_symlinks=False,
                    )
                finally:
                    os.close(src_fd)
            for i in reversed(dirs):  # deepest last-created first; modes may drop write access
                fd = self._open_path(i)
                try:
                    self._set_meta(i, b".", fd)
                finally:
                    os.close(fd)
        finally:
            self._drop_cache()
            os.close(self.root_fd)

    def _create(self, i: int, kind: EntryType) -> None:
        toc = self.toc
        name = toc.name_bytes(i)
        parent = self._dir_fd(toc.parent(i))
        if kind == EntryType.DIR:
            os.mkdir(name, 0o700, dir_fd=parent)
            return
        if kind == EntryType.SYMLINK:
            os.symlink(toc.linkname(i), name, dir_fd=parent)
            if self.privileged:
                os.chown(name, toc.uid(i), toc.gid(i), dir_fd=parent, follow_symlinks=False)
            return
        if kind == EntryType.REG:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(name, flags, 0o600, dir_fd=parent), "wb") as out:
                for data in self.reader.read_chunks(i):
                    out.write(data)
        elif kind == EntryType.FIFO:
            os.mkfifo(name, 0o600, dir_fd=parent)
        elif not self.privileged:
            log.warning("skipping device %r: creating devices needs root", toc.path(i))
            return
        else:
            kind_bits = stat.S_IFCHR if kind == EntryType.CHAR else stat.S_IFBLK
            os.mknod(name, 0o600 | kind_bits, os.makedev(*toc.device(i)), dir_fd=parent)
        self._set_meta(i, name, parent)

    def _set_meta(self, i: int, name: bytes, dir_fd: int) -> None:
        toc = self.toc
        if self.privileged:
            os.chown(name, toc.uid(i), toc.gid(i), dir_fd=dir_fd, follow_symlinks=False)
            for key, value in toc.xattrs(i).items():
                if name == b".":
                    os.setxattr(dir_fd, key, value)
                else:  # the magic link resolves to the directory; ``name`` itself is not followed
                    os.setxattr(
                        f"/proc/self/fd/{dir_fd}/{os.fsdecode(name)}", key, value, follow_symlinks=False
                    )
        os.chmod(name, toc.mode(i), dir_fd=dir_fd)
        sec, nsec = toc.mtime(i)
        ns = sec * 1_000_000_000 + nsec
        os.utime(name, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)

    def _dir_fd(self, i: int) -> int:
        """fd of directory ``i``; the last one is cached (siblings come together in tree order)."""
        if i == ROOT:
            return self.root_fd
        if self.cached is not None and self.cached[0] == i:
            return self.cached[1]
        self._drop_cache()
        fd = self._open_path(i)
        self.cached = (i, fd)
        return fd

    def _drop_cache(self) -> None:
        if self.cached is not None:
            os.close(self.cached[1])
            self.cached = None

    def _open_path(self, i: int) -> int:
        chain: list[bytes] = []
        while i != ROOT:
            chain.append(self.toc.name_bytes(i))
            i = self.toc.parent(i)
        fd = os.dup(self.root_fd)
        try:
            for name in reversed(chain):
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            os.close(fd)
            path = os.fsdecode(b"/".join(reversed(chain)))
            raise EstargzError(f"cannot open directory {path!r}: {exc}") from exc
        return fd
