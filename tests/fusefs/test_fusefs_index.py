"""LayerIndex: building, lookups, links, whiteouts, refusals and the memory bound."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from fusefs.errors import FormatError, IntegrityError
from fusefs.index import (
    ROOT,
    USER_OPAQUE_XATTR,
    Codec,
    IndexBuilder,
    LayerIndex,
    NodeId,
    split_path,
)

DIGEST = "sha256:" + hashlib.sha256(b"x").hexdigest()


def _small(opaque: bytes | None = None) -> LayerIndex:
    b = IndexBuilder(blob_size=1000) if opaque is None else IndexBuilder(blob_size=1000, opaque_xattr=opaque)
    b.add("bin/", stat.S_IFDIR, mode=0o755)
    b.add("bin/sh", stat.S_IFREG, mode=0o4755, size=10, mtime_ns=5 * 10**9)
    b.add_chunk("bin/sh", file_offset=0, size=6, blob_offset=0, blob_end=10, codec=Codec.GZIP, digest=DIGEST)
    b.add_chunk("bin/sh", file_offset=6, size=4, blob_offset=10, blob_end=20, codec=Codec.GZIP, digest=DIGEST)
    b.add("etc/motd", stat.S_IFLNK, target="../bin/sh", mode=0o777)  # parent created implicitly
    b.add("dev/null", stat.S_IFCHR, mode=0o666, rdev=os.makedev(1, 3))
    b.add_hardlink("bin/sh2", "bin/sh")
    assert not b.add_tar_entry_name("etc/.whx")
    assert b.add_tar_entry_name("etc/.wh.gone")
    assert b.add_tar_entry_name("opaque/.wh..wh..opq")
    return b.build(toc_digest=DIGEST).verify(DIGEST)


def _path(index: LayerIndex, path: str) -> NodeId:
    node = ROOT
    for part in path.split("/"):
        found = index.lookup(node, part.encode())
        assert found is not None, path
        node = found
    return node


def test_tree_attributes_links_and_overlay_markers() -> None:
    index = _small()
    assert [p for p, _ in index.walk()] == ["bin", "dev", "etc", "opaque", "bin/sh", "bin/sh2", "dev/null",
                                            "etc/gone", "etc/motd"]
    sh = _path(index, "bin/sh")
    assert _path(index, "bin/sh2") == sh and index.attr(sh).nlink == 2
    assert index.attr(sh).mode == stat.S_IFREG | 0o4755 and index.attr(sh).mtime_ns == 5 * 10**9
    assert index.attr(_path(index, "etc")).mode == stat.S_IFDIR | 0o755
    assert index.readlink(_path(index, "etc/motd")) == b"../bin/sh"
    assert index.attr(_path(index, "dev/null")).rdev == os.makedev(1, 3)
    gone = index.attr(_path(index, "etc/gone"))
    assert stat.S_ISCHR(gone.mode) and gone.rdev == 0
    assert index.xattrs(_path(index, "opaque")) == {b"trusted.overlay.opaque": b"y"}
    assert index.lookup(ROOT, b"nope") is None and index.lookup(ROOT, b"") is None
    assert index.attr(ROOT).nlink == 2 + 4


def test_opaque_xattr_name_is_a_parameter() -> None:
    index = _small(USER_OPAQUE_XATTR)
    assert index.xattrs(_path(index, "opaque")) == {b"user.overlay.opaque": b"y"}


def test_chunk_lookup_by_file_offset() -> None:
    index = _small()
    sh = _path(index, "bin/sh")
    ids = index.chunk_ids(sh)
    assert len(ids) == 2
    assert list(index.chunks_in(sh, 0, 1)) == [ids[0]]
    assert list(index.chunks_in(sh, 5, 2)) == [ids[0], ids[1]]
    assert list(index.chunks_in(sh, 6, 100)) == [ids[1]]
    assert list(index.chunks_in(sh, 0, 0)) == []
    c = index.chunk(ids[1])
    assert (c.file_offset, c.size, c.blob_offset, c.blob_end, c.codec) == (6, 4, 10, 20, Codec.GZIP)
    assert index.chunk_key(ids[1]) == DIGEST[7:]


def test_readdir_positions_are_stable_and_sorted() -> None:
    index = _small()
    names = [name for _, name, _ in index.children(ROOT)]
    assert names == sorted(names)
    assert [name for _, name, _ in index.children(ROOT, 2)] == names[2:]


def test_unverified_index_needs_the_right_digest() -> None:
    b = IndexBuilder(blob_size=10)
    b.add("a", stat.S_IFDIR)
    unverified = b.build(toc_digest=DIGEST, also_accept=("sha256:" + "1" * 64,))
    with pytest.raises(IntegrityError):
        unverified.verify("sha256:" + "2" * 64)
    assert unverified.verify("sha256:" + "1" * 64) is unverified.verify(DIGEST)


@pytest.mark.parametrize("path", ["../x", "a/../../x", "a/" + "n" * 256, "a\0b", "/" + "x/" * 2100])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(FormatError):
        IndexBuilder(blob_size=10).add(path, stat.S_IFREG)


def test_clean_paths() -> None:
    assert split_path("./a//b/./c/") == (b"a", b"b", b"c")
    assert split_path("/") == ()


def test_inconsistent_entries_are_refused() -> None:
    b = IndexBuilder(blob_size=100, max_entries=3)
    b.add("f", stat.S_IFREG, size=10)
    with pytest.raises(FormatError):  # blob range beyond the blob
        b.add_chunk("f", file_offset=0, size=10, blob_offset=90, blob_end=101, codec=Codec.RAW, digest=DIGEST)
    with pytest.raises(FormatError):  # not a sha256 digest
        b.add_chunk("f", file_offset=0, size=10, blob_offset=0, blob_end=10, codec=Codec.RAW, digest="md5:00")
    with pytest.raises(FormatError):
        b.add_hardlink("g", "missing")
    with pytest.raises(FormatError):
        b.add("f/under-a-file", stat.S_IFREG)
    with pytest.raises(FormatError):
        b.add("huge", stat.S_IFREG, size=1 << 60)
    b.add_chunk("f", file_offset=0, size=4, blob_offset=0, blob_end=10, codec=Codec.RAW, digest=DIGEST)
    with pytest.raises(FormatError):  # chunks do not cover the file
        b.build(toc_digest=DIGEST)
    b.add("g", stat.S_IFDIR)
    b.add("h", stat.S_IFDIR)
    with pytest.raises(FormatError):  # over max_entries
        b.add("i", stat.S_IFDIR)


def test_100k_entries_stay_compact() -> None:
    n = 100_000
    b = IndexBuilder(blob_size=1 << 40)
    for d in range(100):
        b.add(f"dir{d:03d}", stat.S_IFDIR, mode=0o755)
    for i in range(n - 100):
        path = f"dir{i % 100:03d}/file-{i:06d}.txt"
        b.add(path, stat.S_IFREG, size=100, mtime_ns=i)
        b.add_chunk(path, file_offset=0, size=100, blob_offset=i * 100, blob_end=i * 100 + 100,
                    codec=Codec.GZIP, digest=DIGEST)
    index = b.build(toc_digest=DIGEST).verify(DIGEST)
    assert index.node_count == n + 1
    per_entry = index.nbytes() / n
    assert per_entry < 300, per_entry
    node = _path(index, "dir042/file-012342.txt")
    assert index.attr(node).mtime_ns == 12342


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"a\0b", b"n" * 256])
def test_add_child_refuses_bad_names(name: bytes) -> None:
    b = IndexBuilder(blob_size=10)
    with pytest.raises(FormatError):
        b.add_child(b.root, name, stat.S_IFREG)


def test_add_child_builds_the_same_tree_as_paths() -> None:
    b = IndexBuilder(blob_size=10)
    etc = b.add_child(b.root, b"etc", stat.S_IFDIR, mode=0o700)
    b.add_child(etc, b"hosts", stat.S_IFREG)
    b.add("etc/", stat.S_IFDIR, mode=0o755)  # declared again: keeps its children
    with pytest.raises(FormatError):
        b.add_child(b.add("etc/hosts", stat.S_IFREG), b"under-a-file", stat.S_IFREG)
    index = b.build(toc_digest=DIGEST).verify(DIGEST)
    assert [p for p, _ in index.walk()] == ["etc", "etc/hosts"]
    assert index.attr(_path(index, "etc")).mode == stat.S_IFDIR | 0o755
