"""The eStargz / zstd:chunked reader against the ctr-remote fixtures: the shared reader contract."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import trio

from fusefs.errors import FormatError, UnsupportedFormat
from fusefs.formats import READERS
from fusefs.formats.estargz import read_estargz
from fusefs.sources.file import FileSource
from tests.fusefs import contract
from tests.fusefs.fixtures import CASES

ids = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_tree_equals_expected_listing(case: contract.Case, tmp_path: Path) -> None:
    contract.check_tree(read_estargz, case, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_wrong_toc_digest_is_refused(case: contract.Case) -> None:
    contract.check_wrong_toc_digest(read_estargz, case)


@pytest.mark.parametrize("case", CASES[:1] + CASES[4:5], ids=[CASES[0].name, CASES[4].name])
def test_truncated_blob_is_refused(case: contract.Case, tmp_path: Path) -> None:
    contract.check_truncated_blob(read_estargz, case, tmp_path)


@pytest.mark.parametrize("case", CASES[::2], ids=ids[::2])
def test_corrupt_chunk_is_never_served(case: contract.Case, tmp_path: Path) -> None:
    contract.check_corrupt_chunk(read_estargz, case, tmp_path)


def test_registered_by_name() -> None:
    assert READERS["estargz"] is read_estargz


def _estargz_with_toc(entries: list[dict[str, object]]) -> bytes:
    """A minimal eStargz blob: one gzip member holding the TOC tar entry, then the footer."""
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        tar.addfile(info, io.BytesIO(toc))
    member = gzip.compress(tar_buf.getvalue())
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016xSTARGZ" % 0
    footer = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + (26).to_bytes(2, "little") + extra
              + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)
    assert len(footer) == 51
    return member + footer


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/../x"])
def test_path_escaping_the_root_is_refused(name: str, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(_estargz_with_toc([{"name": name, "type": "dir", "mode": 0o755}]))
    with pytest.raises((FormatError, UnsupportedFormat)):
        trio.run(read_estargz, FileSource(blob, "sha256:" + "1" * 64))


def test_crafted_blob_parses_when_sane(tmp_path: Path) -> None:
    """The crafted-blob helper itself is valid, so the refusals above are about the names."""
    blob = tmp_path / "blob"
    blob.write_bytes(_estargz_with_toc([{"name": "ok/", "type": "dir", "mode": 0o755}]))
    unverified = trio.run(read_estargz, FileSource(blob, "sha256:" + "1" * 64))
    index = unverified.skip_verification("test")
    assert [p for p, _ in index.walk()] == ["ok"]


def test_oversized_chunk_counts_are_refused(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    entries: list[dict[str, object]] = [{"name": "big", "type": "reg", "size": 1 << 62, "offset": 0,
                                         "chunkDigest": "sha256:" + "0" * 64}]
    blob.write_bytes(_estargz_with_toc(entries))
    with pytest.raises((FormatError, UnsupportedFormat)):
        trio.run(read_estargz, FileSource(blob, "sha256:" + "1" * 64))


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=[CASES[0].name, CASES[4].name])
def test_toc_outside_the_first_tail_request_takes_one_more(case: contract.Case, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import fusefs.formats.estargz as reader_module

    monkeypatch.setattr(reader_module, "TAIL_FETCH", 64)
    source = FileSource(case.blob, case.digest)
    trio.run(read_estargz, source).verify(case.toc_digest)
    assert source.counters.calls == 2 and source.history[0][0][1] == 64
    (head,) = source.history[1]  # the TOC up to where the tail starts: no byte fetched twice
    assert head[0] + head[1] == os.path.getsize(case.blob) - 64
    contract.check_tree(read_estargz, case, tmp_path)


def test_plain_tar_gzip_layer_is_unsupported(tmp_path: Path) -> None:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    blob = tmp_path / "plain"
    blob.write_bytes(gzip.compress(tar_buf.getvalue()))
    with pytest.raises(UnsupportedFormat):
        trio.run(read_estargz, FileSource(blob, "sha256:" + "1" * 64))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedFormat):
        trio.run(read_estargz, FileSource(empty, "sha256:" + "1" * 64))


def test_index_builds_run_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent reads (the mounted layer and its neighbours) build their indexes in turn, so
    their transient memory never adds up."""
    import threading

    import fusefs.formats.estargz as fe

    real_index = fe._index
    lock = threading.Lock()
    active = 0
    overlapped = threading.Event()
    entered = threading.Semaphore(0)

    def index(*args: object) -> object:
        nonlocal active
        with lock:
            active += 1
            if active > 1:
                overlapped.set()
        entered.release()
        # give a second build the chance to start meanwhile (it must not)
        overlapped.wait(0.5)
        try:
            return real_index(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(fe, "_index", index)
    blobs = []
    for k in range(3):
        blob = tmp_path / f"blob{k}"
        blob.write_bytes(_estargz_with_toc([{"name": f"d{k}/", "type": "dir", "mode": 0o755}]))
        blobs.append(blob)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for k, blob in enumerate(blobs):
                nursery.start_soon(read_estargz, FileSource(blob, "sha256:" + str(k) * 64))

    trio.run(main)
    assert not overlapped.is_set()
    assert all(entered.acquire(blocking=False) for _ in blobs)  # every build ran


# -- the TOC loaded into the IndexBuilder as columns against the same TOC fed entry by entry --


def _reference_index(toc_bytes: bytes, footer: object, blob_size: int, opaque_xattr: bytes) -> object:
    """Every TOC entry fed to an IndexBuilder one by one: what loading the TOC's columns (and
    applying the tree-changing entries) must equal, column for column."""
    import os
    import stat as st

    import estargz
    from fusefs.formats.estargz import _CODECS, _TYPES
    from fusefs.index import EntryHandle, IndexBuilder

    toc = estargz.parse_toc(toc_bytes, footer)  # type: ignore[arg-type]
    codec = _CODECS[toc.codec]
    builder = IndexBuilder(blob_size=blob_size, opaque_xattr=opaque_xattr)
    root_mtime = toc.mtime(estargz.ROOT)
    builder.add("", st.S_IFDIR, mode=toc.mode(estargz.ROOT) or 0o755, uid=toc.uid(estargz.ROOT),
                gid=toc.gid(estargz.ROOT), mtime_ns=root_mtime[0] * 10**9 + root_mtime[1])
    dirs: dict[int, EntryHandle] = {estargz.ROOT: builder.root}
    later: list[int] = []
    for i in toc.iter_tree():
        kind = toc.type(i)
        name = toc.name_bytes(i)
        if kind is estargz.EntryType.HARDLINK or name.startswith(b".wh."):
            later.append(i)
            continue
        sec, nsec = toc.mtime(i)
        major, minor = toc.device(i)
        handle = builder.add_child(
            dirs[toc.parent(i)], name, _TYPES[kind], mode=toc.mode(i), uid=toc.uid(i), gid=toc.gid(i),
            size=toc.size(i), mtime_ns=sec * 10**9 + nsec,
            target=toc.linkname(i) if kind is estargz.EntryType.SYMLINK else "",
            rdev=os.makedev(major, minor) if kind in (estargz.EntryType.CHAR, estargz.EntryType.BLOCK) else 0,
            xattrs={k.encode("utf-8", "surrogateescape"): v for k, v in toc.xattrs(i).items()},
        )
        if kind is estargz.EntryType.DIR:
            dirs[i] = handle
        elif kind is estargz.EntryType.REG:
            for c in toc.chunks(i):
                assert c.digest is not None and not c.hole
                builder.add_chunk_to(handle, file_offset=c.file_offset, size=c.size,
                                     blob_offset=c.compressed_offset, blob_end=c.compressed_end,
                                     codec=codec, digest=c.digest, inner_offset=c.inner_offset)
    for i in later:
        path = toc.path(i)
        if builder.add_tar_entry_name(path):
            continue
        builder.add_hardlink(path, toc.path(toc.link_target(i)))
    prefetch_end = 0 if toc.no_prefetch_landmark else toc.prefetch_landmark_offset
    return builder.build(toc_digest=toc.digest, prefetch_end=prefetch_end).skip_verification("test")


def _columns(index: object) -> dict[str, object]:
    return {k: v for k, v in sorted(vars(index).items())}


def _toc_blob(entries: list[dict[str, object]], data_end: int = 1 << 20) -> tuple[bytes, object, int]:
    from estargz import parse_footer
    from estargz._footer import estargz_footer

    toc = json.dumps({"version": 1, "entries": entries}).encode()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        tar.addfile(info, io.BytesIO(toc))
    member = gzip.compress(tar_buf.getvalue())
    tail = member + estargz_footer(data_end)
    size = data_end + len(tail)
    return member, parse_footer(tail[-64:], size), size


def _d(k: int) -> str:
    return "sha256:" + f"{k:064x}"


_T = "2024-03-01T10:00:00.5Z"
TREES: dict[str, list[dict[str, object]]] = {
    "plain": [
        {"name": "./", "type": "dir", "mode": 0o700, "uid": 5, "modtime": _T},
        {"name": "etc/", "type": "dir", "mode": 0o755, "modtime": _T},
        {"name": "etc/passwd", "type": "reg", "size": 10, "offset": 100, "digest": _d(1),
         "chunkDigest": _d(1), "mode": 0o644, "uid": 1, "gid": 2, "modtime": _T,
         "xattrs": {"user.a": "eA==", "security.capability": "AQID"}},
        {"name": "etc/link", "type": "symlink", "linkName": "passwd", "mode": 0o777},
        {"name": "bin/sh", "type": "reg", "size": 9, "offset": 200, "digest": _d(2), "chunkSize": 4,
         "chunkDigest": _d(3), "mode": 0o4755},
        {"name": "bin/sh", "type": "chunk", "chunkOffset": 4, "chunkSize": 5, "offset": 300,
         "chunkDigest": _d(4)},
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
        {"name": "dev/sda", "type": "block", "devMajor": 8, "devMinor": 0},
        {"name": "run/fifo", "type": "fifo"},
        {"name": "empty", "type": "reg", "size": 0, "digest": _d(5)},
        {"name": "xattr-dir/", "type": "dir", "xattrs": {"trusted.x": "eQ=="}},
    ],
    "hardlinks": [
        {"name": "a", "type": "reg", "size": 3, "offset": 100, "digest": _d(1), "chunkDigest": _d(1)},
        {"name": "sub/b", "type": "hardlink", "linkName": "a"},
        {"name": "sub/c", "type": "hardlink", "linkName": "sub/b"},
        {"name": "z", "type": "hardlink", "linkName": "a"},
        {"name": "sub/d", "type": "reg", "size": 3, "offset": 200, "digest": _d(2), "chunkDigest": _d(2)},
    ],
    "whiteouts": [
        {"name": "./", "type": "dir", "mode": 0o755},
        {"name": ".wh..wh..opq", "type": "reg", "size": 0},
        {"name": "usr/", "type": "dir"},
        {"name": "usr/.wh..wh..opq", "type": "reg", "size": 0},
        {"name": "usr/.wh.gone", "type": "reg", "size": 0},
        {"name": "usr/kept", "type": "reg", "size": 3, "offset": 100, "digest": _d(1), "chunkDigest": _d(1)},
        {"name": "usr/.wh.kept", "type": "reg", "size": 0},  # a whiteout replaces a file of the layer
        {"name": "var/lib/", "type": "dir"},
        {"name": "var/lib/x", "type": "reg", "size": 3, "offset": 200, "digest": _d(2), "chunkDigest": _d(2)},
        {"name": "var/.wh.lib", "type": "reg", "size": 0},  # ... and a whole directory
        {"name": "opt/.wh.a", "type": "reg", "size": 0},
        {"name": "opt/a-hl", "type": "hardlink", "linkName": "usr/kept"},
    ],
    "hardlink-to-whiteout": [  # the builder links the whiteout node: kept as it was
        {"name": "a", "type": "reg", "size": 3, "offset": 100, "digest": _d(1), "chunkDigest": _d(1)},
        {"name": ".wh.a", "type": "reg", "size": 0},
        {"name": "h", "type": "hardlink", "linkName": "a"},
    ],
    "landmark": [
        {"name": "a", "type": "reg", "size": 3, "offset": 100, "digest": _d(1), "chunkDigest": _d(1)},
        {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 150, "digest": _d(9),
         "chunkDigest": _d(9)},
        {"name": "b", "type": "reg", "size": 3, "offset": 200, "digest": _d(2), "chunkDigest": _d(2)},
    ],
}


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("opaque", [b"trusted.overlay.opaque", b"user.overlay.opaque"])
def test_direct_packing_equals_the_index_builder(tree: str, opaque: bytes) -> None:
    from fusefs.formats.estargz import _index

    member, footer, size = _toc_blob(TREES[tree])
    got = _index([member], footer, size, opaque, "sha256:" + "1" * 64).skip_verification("test")  # type: ignore[arg-type]
    want = _reference_index(member, footer, size, opaque)
    assert _columns(got) == _columns(want)
    assert got.node_count >= 2


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_direct_packing_equals_the_index_builder_on_fixtures(case: contract.Case) -> None:
    from estargz import parse_footer
    from fusefs.formats.estargz import _index

    blob = case.blob.read_bytes()
    footer = parse_footer(blob[-min(len(blob), 64):], len(blob))
    toc_bytes = blob[footer.toc_offset:footer.toc_end]
    got = _index([toc_bytes], footer, len(blob), TRUSTED_OPAQUE, "sha256:" + "1" * 64).skip_verification("t")
    assert _columns(got) == _columns(_reference_index(toc_bytes, footer, len(blob), TRUSTED_OPAQUE))


TRUSTED_OPAQUE = b"trusted.overlay.opaque"


@pytest.mark.parametrize(("entries", "data_end"), [
    ([{"name": "a", "type": "reg", "size": 3, "offset": 100, "digest": _d(1), "chunkDigest": _d(1)},
      {"name": "a/.wh.x", "type": "reg", "size": 0}], 1 << 20),  # a whiteout under a file
    ([{"name": "d/", "type": "dir"}, {"name": "h", "type": "hardlink", "linkName": "d"}], 1 << 20),
    ([{"name": "big", "type": "reg", "size": 100 << 20, "offset": 100, "digest": _d(1),
       "chunkDigest": _d(1)}], 1 << 20),  # a chunk over the index's 64 MiB limit
    ([{"name": "l", "type": "symlink", "linkName": "x" * 5000}], 1 << 20),
    ([{"name": "x", "type": "dir", "xattrs": {"user.x": base64.b64encode(bytes(65537)).decode()}}], 1 << 20),
    ([{"name": "x", "type": "reg", "xattrs": {"user." + "é" * 126: "eA=="}}], 1 << 20),  # 256 bytes
    ([{"name": "a", "type": "reg", "size": 3, "offset": 100, "digest": _d(1), "chunkDigest": _d(1)},
      {"name": "b", "type": "reg", "size": 3, "offset": 100 + (130 << 20), "digest": _d(2),
       "chunkDigest": _d(2)}], 200 << 20),  # 3 bytes from 130 MiB of blob: more than 2 chunks + 1 MiB
], ids=["whiteout-under-file", "hardlink-to-dir", "huge-chunk", "long-target", "xattr-value", "xattr-name",
        "compressed-too-large"])
def test_direct_packing_refuses_what_the_builder_refuses(entries: list[dict[str, object]],
                                                         data_end: int) -> None:
    import estargz
    from fusefs.formats.estargz import _index

    member, footer, size = _toc_blob(entries, data_end)
    errors = (FormatError, UnsupportedFormat, estargz.EstargzError)
    with pytest.raises(errors):
        _reference_index(member, footer, size, TRUSTED_OPAQUE)
    with pytest.raises((FormatError, UnsupportedFormat)):
        _index([member], footer, size, TRUSTED_OPAQUE, "sha256:" + "1" * 64)  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", [
    {"name": "z", "type": "reg", "size": 3, "offset": 100},  # neither digest nor chunkDigest
    {"name": "z", "type": "reg", "size": 8, "chunkSize": 8, "chunkType": "zeros"},
], ids=["no-digest", "hole"])
def test_chunks_that_cannot_be_served_lazily(entry: dict[str, object]) -> None:
    from fusefs.formats.estargz import _index

    member, footer, size = _toc_blob([{"name": "d/", "type": "dir"}, entry])
    with pytest.raises(UnsupportedFormat, match="'z'"):
        _index([member], footer, size, TRUSTED_OPAQUE, "sha256:" + "1" * 64)  # type: ignore[arg-type]


@pytest.mark.parametrize("tree", sorted(TREES))
def test_tree_changing_entries_are_found_in_tree_order(tree: str) -> None:
    import estargz
    from fusefs.formats.estargz import _later

    entries = [*TREES[tree],
               {"name": "w/x.wh.y", "type": "reg", "size": 0},  # ".wh." inside a name: an ordinary file
               {"name": "w/a.wh", "type": "reg", "size": 0},
               {"name": "w/.wh.a.wh", "type": "reg", "size": 0},
               {"name": "w/sub/.wh.z", "type": "reg", "size": 0},
               {"name": "w/sub/h", "type": "hardlink", "linkName": "w/x.wh.y"}]
    member, footer, _ = _toc_blob(entries)
    toc = estargz.parse_toc(member, footer)  # type: ignore[arg-type]
    walked = [i for i in toc.iter_tree()
              if toc.type(i) is estargz.EntryType.HARDLINK or toc.name(i).startswith(".wh.")]
    assert _later(toc) == walked and len(walked) >= 3


def test_free_memory_goes_back_after_each_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fusefs.formats.estargz as fe
    from fusefs.allocator import release_free_memory

    assert release_free_memory()  # glibc: malloc_trim is there and runs
    calls: list[int] = []
    monkeypatch.setattr(fe, "release_free_memory", lambda: calls.append(1) or True)
    good = tmp_path / "good"
    good.write_bytes(_estargz_with_toc([{"name": "ok/", "type": "dir", "mode": 0o755}]))
    bad = tmp_path / "bad"
    bad.write_bytes(_estargz_with_toc([{"name": "../x", "type": "dir", "mode": 0o755}]))
    trio.run(read_estargz, FileSource(good, "sha256:" + "1" * 64))
    with pytest.raises((FormatError, UnsupportedFormat)):
        trio.run(read_estargz, FileSource(bad, "sha256:" + "2" * 64))
    assert len(calls) == 2  # after a failed build too
