"""pyfuse3 Operations for the one session serving every mounted layer, read-only.

Each handler resolves the inode through the :class:`LayerTable`, asks the index or the layer's
fetcher, and answers; attributes come from one builder. All error mapping is in ``_errors``: a
missing name is ENOENT, a missing xattr ENODATA, a ``LayerError`` EIO (logged once per layer
and message), anything unexpected EIO with its traceback logged, because pyfuse3 stops serving
every layer when a non-FUSEError escapes a handler. Write operations answer EROFS.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pyfuse3

from fusefs.config import FuseConfig
from fusefs.errors import LayerError
from fusefs.fetch import ChunkFetcher
from fusefs.index import ROOT, NodeId
from fusefs.layers import ROOT_INODE, LayerTable, MountedLayer
from fusefs.readahead import READ_AHEAD_KIB, set_session_readahead

log = logging.getLogger(__name__)

_ROOT_MODE = stat.S_IFDIR | 0o755
_LOGGED_LIMIT = 4096
# readdir offsets 1 and 2; a directory's children follow from offset 3
_DOT_ENTRIES = ((b".", 1), (b"..", 2))
_STREAM_SLACK = READ_AHEAD_KIB << 10  # see _OpenFile.streaming


@dataclass(eq=False, slots=True)
class _OpenFile:
    fetcher: ChunkFetcher
    node: NodeId
    inode: int
    next_offset: int = 0  # where the previous read ended: a read starting there is sequential
    # The reads so far went forward from offset 0 without skipping more than the kernel's
    # read-ahead window (its requests may arrive a little out of order): a stream. A library's
    # page faults start mid-file and jump about, and one run of them that looks sequential
    # is no reason to fetch the next megabytes of the library.
    streaming: bool = True
    reach: int = 0  # the furthest end read so far


class LayerOperations(pyfuse3.Operations):
    """Read-only FUSE handlers over a :class:`LayerTable` (trio thread only)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, table: LayerTable, config: FuseConfig) -> None:
        super().__init__()
        self._table = table
        self._config = config
        self._lookups: dict[int, int] = {}
        self._files: dict[int, _OpenFile] = {}
        self._next_fh = 1
        self._op_calls: dict[str, int] = {}
        self._op_failures: dict[str, int] = {}
        self._op_seconds: dict[str, float] = {}
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._readahead_set = False
        # resolved now, before the session is mounted there: inside a handler, resolving a path
        # through our own mount would wait on ourselves
        self._session_path = os.path.realpath(config.mountpoint)

    # -- helpers --------------------------------------------------------------------------

    def op_counts(self) -> dict[str, tuple[int, int, float]]:
        """``{operation: (calls, failures, seconds)}`` since start, for metrics.

        Failures: answered with an errno other than ENOENT/ENODATA. Seconds: summed handler time,
        waits for fetches included.
        """
        return {op: (n, self._op_failures.get(op, 0), self._op_seconds.get(op, 0.0))
                for op, n in self._op_calls.items()}

    @contextmanager
    def _errors(self, op: str, inode: int) -> Iterator[None]:
        self._op_calls[op] = self._op_calls.get(op, 0) + 1
        start = time.perf_counter()
        try:
            yield
        except pyfuse3.FUSEError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODATA):  # answers, not failures
                self._op_failures[op] = self._op_failures.get(op, 0) + 1
            raise
        except LayerError as exc:
            self._op_failures[op] = self._op_failures.get(op, 0) + 1
            resolved = self._table.resolve(inode)
            digest = resolved[0].digest if resolved else "?"
            key = (digest, str(exc))
            if key not in self._logged:
                self._logged[key] = None
                if len(self._logged) > _LOGGED_LIMIT:
                    self._logged.popitem(last=False)
                log.warning("%s of inode %d in layer %s failed: %s", op, inode, digest, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception as exc:
            self._op_failures[op] = self._op_failures.get(op, 0) + 1
            log.exception("unexpected error in %s of inode %d", op, inode)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        finally:
            self._op_seconds[op] = self._op_seconds.get(op, 0.0) + time.perf_counter() - start

    def _resolve(self, inode: int) -> tuple[MountedLayer, NodeId]:
        resolved = self._table.resolve(inode)
        if resolved is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return resolved

    def _attrs(self, inode: int, layer: MountedLayer | None, node: NodeId) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = self._config.entry_timeout
        entry.attr_timeout = self._config.attr_timeout
        entry.st_blksize = 4096
        if layer is None:
            entry.st_mode = _ROOT_MODE
            entry.st_nlink = 2 + len(self._table)
            return entry
        attr = layer.index.attr(node)
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.mtime_ns
        return entry

    def _remember(self, inode: int) -> None:
        self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def _child(self, parent_inode: int, name: bytes) -> tuple[int, MountedLayer, NodeId] | None:
        if parent_inode == ROOT_INODE:
            layer = self._table.by_name(name)
            return None if layer is None else (layer.inode(ROOT), layer, ROOT)
        layer, node = self._resolve(parent_inode)
        if not layer.index.is_dir(node):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = layer.index.lookup(node, name)
        return None if child is None else (layer.inode(child), layer, child)

    # -- metadata -------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        with self._errors("lookup", parent_inode):
            found = self._child(parent_inode, name)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            inode, layer, node = found
            entry = self._attrs(inode, layer, node)
            self._remember(inode)
            return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        with self._errors("getattr", inode):
            if inode == ROOT_INODE:
                return self._attrs(inode, None, ROOT)
            layer, node = self._resolve(inode)
            return self._attrs(inode, layer, node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            count = self._lookups.get(inode, 0) - nlookup
            if count > 0:
                self._lookups[inode] = count
            else:
                self._lookups.pop(inode, None)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        with self._errors("readlink", inode):
            layer, node = self._resolve(inode)
            target = layer.index.readlink(node)
            if target is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return target

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with self._errors("getxattr", inode):
            if inode == ROOT_INODE:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            layer, node = self._resolve(inode)
            value = layer.index.xattrs(node).get(name)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        with self._errors("listxattr", inode):
            if inode == ROOT_INODE:
                return []
            layer, node = self._resolve(inode)
            return list(layer.index.xattrs(node))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = self._table.total_nodes() + 1
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # default_permissions makes the kernel check modes; only writing is refused here.
        return not mode & os.W_OK

    # -- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        with self._errors("opendir", inode):
            if inode != ROOT_INODE:
                layer, node = self._resolve(inode)
                if not layer.index.is_dir(node):
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode = fh
        with self._errors("readdir", inode):
            if inode == ROOT_INODE:
                # offsets are layer slots: stable while layers come and go
                for layer in self._table.layers_from(start_id):
                    root = layer.inode(ROOT)
                    if not pyfuse3.readdir_reply(token, layer.name, self._attrs(root, layer, ROOT),
                                                 layer.slot):
                        return
                    self._remember(root)
                return
            layer, node = self._resolve(inode)
            # "." and ".." as a disk filesystem lists them (`ls -a`, overlayfs passes a directory
            # of a single layer straight through). The kernel neither looks them up nor counts
            # them; ".." carries this directory's attributes, as the index keeps no parent links.
            own = self._attrs(inode, layer, node)
            for name, next_id in _DOT_ENTRIES[start_id:]:
                if not pyfuse3.readdir_reply(token, name, own, next_id):
                    return
            first = max(0, start_id - len(_DOT_ENTRIES))
            for pos, name, child in layer.index.children(node, first):
                child_inode = layer.inode(child)
                next_id = pos + 1 + len(_DOT_ENTRIES)
                if not pyfuse3.readdir_reply(token, name, self._attrs(child_inode, layer, child), next_id):
                    return
                self._remember(child_inode)

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        with self._errors("open", inode):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            layer, node = self._resolve(inode)
            if not stat.S_ISREG(layer.index.attr(node).mode):
                raise pyfuse3.FUSEError(errno.EINVAL)
            if not self._readahead_set:  # after INIT, which resets the session's read-ahead
                self._readahead_set = True
                set_session_readahead(self._session_path)
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = _OpenFile(layer.fetcher, node, inode)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        with self._errors("read", handle.inode):
            handle.streaming = handle.streaming and off <= handle.reach + _STREAM_SLACK
            sequential = off > 0 and off == handle.next_offset and handle.streaming
            handle.next_offset = off + size
            handle.reach = max(handle.reach, off + size)
            return await handle.fetcher.read(handle.node, off, size, sequential=sequential)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # -- everything that writes -----------------------------------------------------------

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)
