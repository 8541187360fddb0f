"""The contract every format reader must meet, and tree comparison against ``expected*.tsv``.

A format's test module builds :class:`Case` values from its upstream fixtures and calls the
``check_*`` functions (tree equal to the expected listing when read through the fetch path,
wrong TOC digest refused, truncated blob refused, a corrupted chunk never served). The same
row normalisation is used for trees read back through the kernel (:func:`tree_from_fs`), so the
FUSE tests compare against the very same expectations.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig
from fusefs.errors import FormatError, IntegrityError, LayerError, UnsupportedFormat
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.base import FormatReader
from fusefs.index import TRUSTED_OPAQUE_XATTR, LayerIndex, NodeId
from fusefs.sources.file import FileSource


@dataclass(frozen=True)
class Row:
    """One entry, normalised: type, permission bits, owner, size (reg only), content, xattrs."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    content: str  # sha256:<hex> for reg, target for symlink, major:minor for devices
    xattrs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Tree:
    rows: dict[str, Row]
    hardlinks: dict[str, str]  # link path -> path it must share an inode with


@dataclass(frozen=True)
class Case:
    """One fixture blob a reader must index exactly."""

    name: str
    blob: Path
    toc_digest: str
    expected: Path

    @property
    def digest(self) -> str:
        return "sha256:" + self.blob.name


WHITEOUT = Row("char", 0, 0, 0, 0, "0:0", ())


def load_tsv(path: Path, opaque_xattr: bytes = TRUSTED_OPAQUE_XATTR) -> Tree:
    """Read an expected listing, turning tar whiteouts into what overlayfs expects of a lower."""
    rows: dict[str, Row] = {}
    links: dict[str, str] = {}
    opaque: list[str] = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            p, kind = rec["path"], rec["type"]
            head, _, base = p.rpartition("/")
            if base == ".wh..wh..opq":
                opaque.append(head)
                continue
            if base.startswith(".wh."):
                rows[f"{head}/{base[4:]}" if head else base[4:]] = WHITEOUT
                continue
            if kind == "hardlink":
                links[p] = rec["sha256|target|dev"]
                continue
            pairs = (x.partition("=") for x in rec["xattrs"].split(";") if x)
            xattrs = tuple(sorted((k, v) for k, _, v in pairs))
            rows[p] = Row(kind, int(rec["mode"], 8), int(rec["uid"]), int(rec["gid"]),
                          int(rec["size"]) if kind == "reg" else 0,
                          rec["sha256|target|dev"], xattrs)
    for p in opaque:
        r = rows[p]
        xattrs = tuple(sorted((*r.xattrs, (opaque_xattr.decode(), b"y".hex()))))
        rows[p] = Row(r.type, r.mode, r.uid, r.gid, r.size, r.content, xattrs)
    for link, target in links.items():
        rows[link] = rows[target]
    return Tree(rows, links)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "reg"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo")):
        if test(mode):
            return name
    raise AssertionError(f"unexpected mode {mode:o}")


def _row(mode: int, uid: int, gid: int, size: int, rdev: int, content: str,
         xattrs: dict[bytes, bytes]) -> Row:
    kind = _kind(mode)
    if kind in ("char", "block"):
        content = f"{os.major(rdev)}:{os.minor(rdev)}"
    perm = stat.S_IMODE(mode)
    if (kind, perm, content) == ("char", 0, "0:0"):
        return WHITEOUT
    return Row(kind, perm, uid, gid, size if kind == "reg" else 0, content,
               tuple(sorted((k.decode(), v.hex()) for k, v in xattrs.items())))


Listing = tuple[dict[str, Row], dict[str, int]]


def tree_from_index(index: LayerIndex, read: Callable[[NodeId], bytes]) -> Listing:
    """Rows of an index (file contents through ``read``) and each path's node id."""
    rows: dict[str, Row] = {}
    nodes: dict[str, int] = {}
    for path, node in index.walk():
        a = index.attr(node)
        content = ""
        if stat.S_ISREG(a.mode):
            content = "sha256:" + hashlib.sha256(read(node)).hexdigest()
        elif stat.S_ISLNK(a.mode):
            content = (index.readlink(node) or b"").decode()
        rows[path] = _row(a.mode, a.uid, a.gid, a.size, a.rdev, content, dict(index.xattrs(node)))
        nodes[path] = node
    return rows, nodes


def tree_from_fs(root: str) -> Listing:
    """Rows of a directory tree as the kernel shows it (lstat, readlink, xattrs, sha256)."""
    rows: dict[str, Row] = {}
    inodes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            content = ""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for x in os.listxattr(full, follow_symlinks=False):
                    xattrs[x.encode()] = os.getxattr(full, x, follow_symlinks=False)
            rows[rel] = _row(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_rdev, content, xattrs)
            inodes[rel] = st.st_ino
    return rows, inodes


def assert_tree(rows: dict[str, Row], ids: dict[str, int], expected: Tree) -> None:
    """Same paths, same rows, and every hardlink shares its target's inode/node."""
    missing = sorted(set(expected.rows) - set(rows))
    extra = sorted(set(rows) - set(expected.rows))
    assert not missing and not extra, f"missing {missing}, unexpected {extra}"
    wrong = {p: (rows[p], expected.rows[p]) for p in rows if rows[p] != expected.rows[p]}
    assert not wrong, f"entries differ (got, expected): {wrong}"
    for link, target in expected.hardlinks.items():
        assert ids[link] == ids[target], f"{link} does not share an inode with {target}"


# -- the reader contract ---------------------------------------------------------------------


async def _read_all(reader: FormatReader, case: Case, cache_dir: Path) -> Listing:
    source = FileSource(case.blob, case.digest)
    index = (await reader(source)).verify(case.toc_digest)
    fetcher = ChunkFetcher(case.digest, index, source, ChunkCache(CacheConfig(cache_dir, fsync=False)),
                           FetchConfig(), PriorityGate())
    contents: dict[int, bytes] = {}
    for _, node in index.walk():
        a = index.attr(node)
        if stat.S_ISREG(a.mode):
            contents[node] = await fetcher.read(node, 0, a.size + 1)
    return tree_from_index(index, contents.__getitem__)


def check_tree(reader: FormatReader, case: Case, tmp_path: Path) -> None:
    """The verified index, read through the fetch path, equals the expected listing."""
    rows, ids = trio.run(_read_all, reader, case, tmp_path / "cache")
    assert_tree(rows, ids, load_tsv(case.expected))


def check_wrong_toc_digest(reader: FormatReader, case: Case) -> None:
    async def run() -> None:
        unverified = await reader(FileSource(case.blob, case.digest))
        with pytest.raises(IntegrityError):
            unverified.verify("sha256:" + "0" * 64)
        assert unverified.verify(case.toc_digest) is not None
    trio.run(run)


def check_truncated_blob(reader: FormatReader, case: Case, tmp_path: Path) -> None:
    """A blob cut anywhere in its TOC or footer is refused with a LayerError, never indexed."""
    data = case.blob.read_bytes()
    for cut in (1, 20, 60, len(data) // 2):
        short = tmp_path / f"cut-{cut}"
        short.write_bytes(data[:-cut])
        with pytest.raises((FormatError, UnsupportedFormat)):
            trio.run(reader, FileSource(short, case.digest))


def check_corrupt_chunk(reader: FormatReader, case: Case, tmp_path: Path) -> None:
    """A flipped byte inside a chunk fails that chunk's read and caches nothing for it."""
    async def run() -> None:
        source = FileSource(case.blob, case.digest)
        index = (await reader(source)).verify(case.toc_digest)
        node = max((n for _, n in index.walk() if stat.S_ISREG(index.attr(n).mode)),
                   key=lambda n: index.attr(n).size)
        cid = index.chunk_ids(node)[0]
        start, end = index.chunk_blob_range(cid)
        bad = bytearray(case.blob.read_bytes())
        bad[(start + end) // 2] ^= 0xFF
        copy = tmp_path / "corrupt"
        copy.write_bytes(bytes(bad))
        cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
        fetcher = ChunkFetcher(case.digest, index, FileSource(copy, case.digest), cache, FetchConfig(),
                               PriorityGate())
        with pytest.raises(LayerError):
            await fetcher.read(node, 0, 4096)
        assert not cache.contains(case.digest, index.chunk_key(cid))
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    trio.run(run)
