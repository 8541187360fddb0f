"""LayerIndex: building, lookups, links, whiteouts, refusals and the memory bound."""

from __future__ import annotations

import hashlib
import os
import stat
from array import array

import pytest

from fusefs.errors import FormatError, IntegrityError, UnsupportedFormat
from fusefs.index import (
    ROOT,
    USER_OPAQUE_XATTR,
    Codec,
    Columns,
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


def test_what_cannot_be_recorded_is_refused_at_once() -> None:
    b = IndexBuilder(blob_size=100, max_entries=3)
    b.add("f", stat.S_IFREG, size=10)
    with pytest.raises(FormatError):  # not a sha256 digest
        b.add_chunk("f", file_offset=0, size=10, blob_offset=0, blob_end=10, codec=Codec.RAW, digest="md5:00")
    with pytest.raises(FormatError):  # no room for a negative offset in the columns
        b.add_chunk("f", file_offset=0, size=10, blob_offset=-1, blob_end=10, codec=Codec.RAW, digest=DIGEST)
    with pytest.raises(FormatError):
        b.add_chunk("f", file_offset=0, size=10, blob_offset=0, blob_end=10, codec=99, digest=DIGEST)
    with pytest.raises(FormatError):
        b.add("owner", stat.S_IFREG, uid=1 << 32)
    with pytest.raises(FormatError):
        b.add_hardlink("g", "missing")
    with pytest.raises(FormatError):
        b.add("f/under-a-file", stat.S_IFREG)
    b.add("g", stat.S_IFDIR)
    with pytest.raises(FormatError):
        b.add_chunk("g", file_offset=0, size=10, blob_offset=0, blob_end=10, codec=Codec.RAW, digest=DIGEST)
    b.add("h", stat.S_IFDIR)
    with pytest.raises(FormatError):  # over max_entries
        b.add("i", stat.S_IFDIR)
    b.add_chunk("f", file_offset=0, size=10, blob_offset=0, blob_end=10, codec=Codec.RAW, digest=DIGEST)
    index = b.build(toc_digest=DIGEST).verify(DIGEST)  # the refused calls left nothing behind
    assert [p for p, _ in index.walk()] == ["f", "g", "h"] and index.chunk_count == 1


def _file(b: IndexBuilder, size: int, *chunks: tuple[int, int, int, int], inner: int = 0) -> None:
    b.add("d/f", stat.S_IFREG, size=size)
    for file_offset, chunk_size, blob_offset, blob_end in chunks:
        b.add_chunk("d/f", file_offset=file_offset, size=chunk_size, blob_offset=blob_offset,
                    blob_end=blob_end, codec=Codec.GZIP, digest=DIGEST, inner_offset=inner)


BLOB = 4 << 20
BAD_VALUES = {  # what build() refuses, whichever reader fed the builder (see test_fusefs_estargz too)
    "blob range beyond the blob": lambda b: _file(b, 10, (0, 10, BLOB - 5, BLOB + 1)),
    "empty blob range": lambda b: _file(b, 10, (0, 10, 90, 90)),
    "chunks short of the file": lambda b: _file(b, 10, (0, 4, 0, 10)),
    "chunks past the file": lambda b: _file(b, 10, (0, 6, 0, 10), (6, 6, 10, 20)),
    "chunks overlap": lambda b: _file(b, 10, (0, 6, 0, 10), (4, 6, 10, 20)),
    "chunks leave a gap": lambda b: _file(b, 10, (0, 4, 0, 10), (6, 4, 10, 20)),
    "chunks start late": lambda b: _file(b, 10, (2, 8, 0, 10)),
    "file without chunks": lambda b: _file(b, 10),
    "chunk over the size limit": lambda b: _file(b, 200, (0, 200, 0, 10)),
    "empty chunk": lambda b: _file(b, 10, (0, 0, 0, 10), (0, 10, 10, 20)),
    "compressed chunk too large": lambda b: _file(b, 10, (0, 10, 0, 2 * 100 + (1 << 20) + 1)),
    "inner offset out of bounds": lambda b: _file(b, 10, (0, 10, 0, 10), inner=1 << 50),
    "absurd file size": lambda b: b.add("d/f", stat.S_IFREG, size=1 << 60),
    "empty symlink target": lambda b: b.add("d/f", stat.S_IFLNK, target=""),
    "long symlink target": lambda b: b.add("d/f", stat.S_IFLNK, target="x" * 4097),
    "empty xattr name": lambda b: b.add("d/f", stat.S_IFDIR, xattrs={b"": b""}),
    "long xattr name": lambda b: b.add("d/f", stat.S_IFDIR, xattrs={b"n" * 256: b""}),
    "large xattr value": lambda b: b.add("d/f", stat.S_IFDIR, xattrs={b"user.x": bytes(65537)}),
    "socket": lambda b: b.add("d/f", stat.S_IFSOCK),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_by_build(case: str) -> None:
    b = IndexBuilder(blob_size=BLOB, max_chunk_size=100)  # compressed chunks: up to 2 * 100 + 1 MiB
    BAD_VALUES[case](b)
    with pytest.raises(FormatError, match="'d/f'"):
        b.build(toc_digest=DIGEST)


def test_entries_replaced_later_are_not_checked() -> None:
    b = IndexBuilder(blob_size=BLOB)
    BAD_VALUES["blob range beyond the blob"](b)
    BAD_VALUES["long symlink target"](b)  # replaces the bad file, is replaced in turn
    b.add("d/f", stat.S_IFREG, size=0)
    assert b.build(toc_digest=DIGEST).verify(DIGEST).node_count == 3


def test_a_chunk_without_a_digest_is_not_served_lazily() -> None:
    b = IndexBuilder(blob_size=1000)
    b.add("f", stat.S_IFREG, size=10)
    b.add_chunk("f", file_offset=0, size=10, blob_offset=0, blob_end=10, codec=Codec.GZIP,
                digest="sha256:" + "0" * 64)
    with pytest.raises(UnsupportedFormat, match="no digest"):
        b.build(toc_digest=DIGEST)


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


# -- a whole tree in columns (IndexBuilder.load), then entries one by one -----------------------


def _loaded(skip: frozenset[int] = frozenset({4})) -> IndexBuilder:
    """/a (dir, xattr), /a/f (file, 2 chunks), /l (symlink), /a/.wh.g (left to the caller)."""
    d = bytes.fromhex(DIGEST[7:])
    b = IndexBuilder(blob_size=1000)
    b.load(Columns(
        mode=array("I", [stat.S_IFDIR | 0o700, stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644,
                         stat.S_IFLNK | 0o777, stat.S_IFREG]),
        uid=array("I", [0, 1, 2, 3, 0]), gid=array("I", [0, 5, 6, 7, 0]), size=array("Q", [0, 0, 10, 0, 0]),
        mtime_ns=array("q", [0, 1, 2, 3, 0]), rdev=array("Q", [0] * 5),
        targets={3: b"a/f"}, xattrs={1: {b"user.x": b"y"}},
        names=b"afl.wh.g", name_off=array("Q", [0, 0, 1, 2, 3, 8]),
        child_start=array("I", [0, 2, 4, 4, 4, 4]), child_list=array("I", [1, 3, 4, 2]),
        chunk_start=array("I", [0, 0, 0, 2, 2, 2]), chunk_file_offset=array("Q", [0, 6]),
        chunk_size=array("Q", [6, 4]), chunk_blob_offset=array("Q", [0, 10]),
        chunk_blob_end=array("Q", [10, 20]), chunk_inner_offset=array("Q", [0, 0]),
        codec=Codec.GZIP, digests=d + d, skip=skip,
    ))
    return b


def _one_by_one() -> IndexBuilder:
    b = IndexBuilder(blob_size=1000)
    b.add("", stat.S_IFDIR, mode=0o700)
    b.add("a", stat.S_IFDIR, mode=0o755, uid=1, gid=5, mtime_ns=1, xattrs={b"user.x": b"y"})
    b.add("a/f", stat.S_IFREG, size=10, uid=2, gid=6, mtime_ns=2)
    b.add_chunk("a/f", file_offset=6, size=4, blob_offset=10, blob_end=20, codec=Codec.GZIP, digest=DIGEST)
    b.add_chunk("a/f", file_offset=0, size=6, blob_offset=0, blob_end=10, codec=Codec.GZIP, digest=DIGEST)
    b.add("l", stat.S_IFLNK, mode=0o777, uid=3, gid=7, mtime_ns=3, target="a/f")
    return b


def test_a_loaded_tree_packs_as_the_same_entries_added_one_by_one() -> None:
    loaded, one_by_one = _loaded(), _one_by_one()
    for b in (loaded, one_by_one):  # then the same entries one by one on both
        assert b.add_tar_entry_name("a/.wh.g")
        b.add_hardlink("a/h", "a/f")
        b.set_opaque("a")
        b.add("new/x", stat.S_IFREG, size=3)
        b.add_chunk("new/x", file_offset=0, size=3, blob_offset=20, blob_end=30, codec=Codec.RAW,
                    digest=DIGEST)
    got = loaded.build(toc_digest=DIGEST).verify(DIGEST)
    want = one_by_one.build(toc_digest=DIGEST).verify(DIGEST)
    assert vars(got) == vars(want)
    assert [p for p, _ in got.walk()] == ["a", "l", "new", "a/f", "a/g", "a/h", "new/x"]
    assert got.xattrs(_path(got, "a")) == {b"trusted.overlay.opaque": b"y", b"user.x": b"y"}
    assert got.attr(_path(got, "a/h")).nlink == 2 and got.readlink(_path(got, "l")) == b"a/f"


def test_a_loaded_tree_is_checked_as_any() -> None:
    b = _loaded(skip=frozenset())  # the .wh.g entry stays an ordinary empty file
    b.add_chunk("a/.wh.g", file_offset=0, size=1, blob_offset=990, blob_end=1001, codec=Codec.RAW,
                digest=DIGEST)
    with pytest.raises(FormatError, match=r"'a/\.wh\.g'.*out of bounds"):
        b.build(toc_digest=DIGEST)


def test_load_wants_a_fresh_builder_and_whole_columns() -> None:
    b = _loaded()
    with pytest.raises(ValueError):
        b.load(_loaded()._tree)  # type: ignore[arg-type]
    tree = _loaded()._tree
    assert tree is not None
    tree.mode = array("H", tree.mode)
    with pytest.raises(ValueError):
        IndexBuilder(blob_size=10).load(tree)
    tree.mode = array("I", [stat.S_IFREG] * 5)
    with pytest.raises(FormatError):
        IndexBuilder(blob_size=10).load(tree)
