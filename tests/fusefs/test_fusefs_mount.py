"""Layers served by one real FUSE session (in a child process), read back through the kernel."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fusefs.formats.estargz import read_estargz
from fusefs.sources.file import FileSource
from tests.estargz.esgz_support import with_toc_entry
from tests.fusefs import contract
from tests.fusefs.fixtures import FIXTURES, VARIANTS, layer_case
from tests.fusefs.fuse_client import FuseServer, force_unmount

pytestmark = [pytest.mark.root]


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # short, unique, and not under a FUSE or overlay mount of another test
    path = Path(tmp_path_factory.mktemp("fuse"))
    yield path
    force_unmount(path)


def _assert_clean_log(server: FuseServer) -> None:
    text = server.log_text()
    assert "unexpected error" not in text and "Traceback" not in text, text
    assert server.returncode == 0, text


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_layers_through_one_session_and_overlay(variant: str, work: Path) -> None:
    layer0, layer1 = layer_case(variant, 0), layer_case(variant, 1)
    with FuseServer(work, [FIXTURES / variant]) as server:
        served = str(work / "fuse" / layer0.blob.name[:16])
        assert server.mount(layer0, work / "l0") == {"ok": True, "path": served}
        assert server.mount(layer1, work / "l1")["ok"]
        assert sorted(os.listdir(work / "fuse")) == sorted([layer0.blob.name[:16], layer1.blob.name[:16]])

        for case, mountpoint in ((layer0, work / "l0"), (layer1, work / "l1")):
            rows, inodes = contract.tree_from_fs(str(mountpoint))
            contract.assert_tree(rows, inodes, contract.load_tsv(case.expected))

        merged = work / "merged"
        merged.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={work / 'l1'}:{work / 'l0'}",
                        str(merged)], check=True, capture_output=True)
        try:
            assert os.listdir(merged / "whiteme") == []
            assert os.listdir(merged / "opaque") == ["new.txt"]
            assert (merged / "etc" / "hostname").read_bytes() == b"fixture-layer2\n"
            assert (merged / "bin" / "hello.sh").stat().st_size == 42
        finally:
            subprocess.run(["umount", str(merged)], check=True)

        assert server.cmd(f"unmount {work / 'l1'}") == {"ok": True}
        assert not os.path.ismount(work / "l1")
        assert os.listdir(work / "fuse") == [layer0.blob.name[:16]]
    _assert_clean_log(server)
    assert not os.path.ismount(work / "l0") and not os.path.ismount(work / "fuse")


def test_directories_list_dot_and_dotdot_once(work: Path) -> None:
    # as on disk, so `ls -a` in a container sees the same whether a layer is lazy or unpacked
    case = layer_case("esgz-default", 0)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        assert server.mount(case, work / "l0")["ok"]
        for directory in [work / "l0", *(p for p in (work / "l0").rglob("*") if p.is_dir()
                                         and not p.is_symlink())]:
            listed = subprocess.run(["ls", "-a", "-f", "-1", str(directory)], check=True,
                                    capture_output=True, text=True).stdout.splitlines()
            assert sorted(listed) == sorted([".", "..", *os.listdir(directory)]), directory
    _assert_clean_log(server)


def test_fuse_refuses_writes(work: Path) -> None:
    case = layer_case("esgz-default", 0)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        assert server.mount(case, work / "l0")["ok"]
        for attempt in (lambda: os.open(work / "l0" / "etc" / "hostname", os.O_RDWR),
                        lambda: (work / "l0" / "new").write_bytes(b"x"),
                        lambda: os.mkdir(work / "l0" / "newdir")):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno in (errno.EROFS, errno.EACCES)
        with pytest.raises(FileNotFoundError):
            os.stat(work / "l0" / "no-such-file")
        with pytest.raises(OSError) as info:
            os.getxattr(work / "l0" / "etc" / "hostname", "user.none")
        assert info.value.errno == errno.ENODATA
        assert os.statvfs(work / "l0").f_namemax == 255
    _assert_clean_log(server)


def _corrupt_copy(case: contract.Case, roots: Path) -> tuple[Path, str, str]:
    """Copy the blob into ``roots`` with one flipped byte inside the big file's first chunk."""
    index = trio.run(read_estargz, FileSource(case.blob, case.digest)).verify(case.toc_digest)
    node = next(n for p, n in index.walk() if p == "data/random-5MiB.bin")
    cid = index.chunk_ids(node)[0]
    start, end = index.chunk_blob_range(cid)
    data = bytearray(case.blob.read_bytes())
    data[(start + end) // 2] ^= 0x01
    target = roots / "blobs" / "sha256" / case.blob.name
    target.parent.mkdir(parents=True)
    target.write_bytes(bytes(data))
    return target, index.chunk_key(cid), "data/random-5MiB.bin"


def test_corrupt_chunk_gives_eio_and_recovers(work: Path) -> None:
    case = layer_case("esgz-default", 0)
    roots = work / "blobs"
    blob, bad_key, path = _corrupt_copy(case, roots)
    ttl = 0.5
    with FuseServer(work, [roots], failure_ttl=ttl) as server:
        assert server.mount(case, work / "l0")["ok"]
        target = work / "l0" / path
        for _ in range(2):  # the second read fails fast from the remembered failure
            with pytest.raises(OSError) as info:
                target.read_bytes()
            assert info.value.errno == errno.EIO
        assert not (work / "cache" / "chunks" / case.blob.name / bad_key).exists()
        assert server.stats(case)["fetch"]["integrity_failures"] == 1
        # the "registry" heals: the good blob replaces the corrupted one
        tmp = blob.with_name("good.tmp")
        shutil.copyfile(case.blob, tmp)
        os.replace(tmp, blob)
        time.sleep(ttl + 0.2)
        data = target.read_bytes()
        expected = contract.load_tsv(case.expected).rows[path].content
        assert "sha256:" + hashlib.sha256(data).hexdigest() == expected
        assert (work / "cache" / "chunks" / case.blob.name / bad_key).exists()
    log = server.log_text()
    assert f"layer {case.digest}: chunk at blob offset" in log and f"sha256:{bad_key}" in log
    _assert_clean_log(server)


def _regular_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if stat.S_ISREG(p.lstat().st_mode))


def test_cache_bound_and_restart_reuse(work: Path) -> None:
    case = layer_case("esgz-default", 0)
    expected = contract.load_tsv(case.expected)
    limit = 3 << 20  # the layer holds about 7 MiB of chunks
    mountpoint = work / "l0"
    with FuseServer(work, [FIXTURES / "esgz-default"], cache_max=limit) as server:
        assert server.mount(case, mountpoint)["ok"]
        rows, inodes = contract.tree_from_fs(str(mountpoint))
        contract.assert_tree(rows, inodes, expected)
        cache = server.stats(case)["cache"]
        assert 0 < cache["bytes_cached"] <= limit
        assert cache["not_kept"] > 0
    _assert_clean_log(server)
    on_disk = sum(f.stat().st_size for f in (work / "cache" / "chunks").rglob("*") if f.is_file())
    assert on_disk <= limit

    # which files are fully cached now?
    index = trio.run(read_estargz, FileSource(case.blob, case.digest)).verify(case.toc_digest)
    cached_keys = {f.name for f in (work / "cache" / "chunks" / case.blob.name).iterdir()}
    cached_files = [p for p, n in index.walk()
                    if stat.S_ISREG(index.attr(n).mode) and index.attr(n).size
                    and all(index.chunk_key(c) in cached_keys for c in index.chunk_ids(n))]
    assert cached_files

    with FuseServer(work, [FIXTURES / "esgz-default"], cache_max=limit) as server:
        assert server.mount(case, mountpoint)["ok"]
        assert server.stats(case)["source_calls"] == 0  # the index came from the cache
        for path in cached_files:
            data = (mountpoint / path).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == expected.rows[path].content
        assert server.stats(case)["source_calls"] == 0  # and so did those files
        rows, inodes = contract.tree_from_fs(str(mountpoint))
        contract.assert_tree(rows, inodes, expected)
        stats = server.stats(case)
        assert stats["source_calls"] > 0
        assert stats["cache"]["bytes_cached"] <= limit
    _assert_clean_log(server)


def test_unverifiable_layer_is_refused_and_mountpoint_left_clean(work: Path) -> None:
    case = layer_case("esgz-default", 1)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        bad = contract.Case(case.name, case.blob, "sha256:" + "0" * 64, case.expected)
        reply = server.mount(bad, work / "l1")
        assert reply["error"] == "IntegrityError"
        assert not os.path.ismount(work / "l1") and os.listdir(work / "l1") == []
        reply = server.mount(contract.Case(case.name, case.blob, "", case.expected), work / "l1")
        assert reply["error"] == "IntegrityError"
        missing = contract.Case("missing", case.blob.with_name("0" * 64), case.toc_digest, case.expected)
        assert server.mount(missing, work / "l1")["error"] == "BlobNotFound"
        assert os.listdir(work / "fuse") == []
        req = {"digest": case.digest, "toc_digest": case.toc_digest, "mountpoint": str(work / "absent")}
        assert server.cmd("mount " + json.dumps(req))["error"] == "LayerError"  # bind mount fails
        assert os.listdir(work / "fuse") == []  # and the layer is not left served
        assert server.mount(case, work / "l1")["ok"]
    _assert_clean_log(server)


def test_started_mount_answers_once_the_toc_verifies(work: Path) -> None:
    # What a Prepare waits for: the TOC read and checked, not the index built and bound
    case = layer_case("esgz-default", 1)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        wrong = contract.Case(case.name, case.blob, "sha256:" + "0" * 64, case.expected)
        assert server.mount(wrong, work / "l1", "start_mount")["error"] == "IntegrityError"
        assert server.cmd("hold-builds") == {"ok": True}
        assert server.mount(case, work / "l1", "start_mount") == {"ok": True}
        assert not os.path.ismount(work / "l1")  # its index cannot have been built yet
        assert server.mount(case, work / "l1", "start_mount")["error"] == "LayerError"  # taken
        assert server.cmd(f"check-nowait {work / 'l1'}") == {"ok": True}  # under way: passes
        assert server.cmd("release-builds") == {"ok": True}
        assert server.cmd(f"check {work / 'l1'}") == {"ok": True}  # waits for the build and bind
        rows, inodes = contract.tree_from_fs(str(work / "l1"))
        contract.assert_tree(rows, inodes, contract.load_tsv(case.expected))
        assert server.cmd(f"unmount {work / 'l1'}") == {"ok": True}
        assert not os.path.ismount(work / "l1") and os.listdir(work / "fuse") == []
    _assert_clean_log(server)


def test_unmount_waits_for_a_started_mount(work: Path) -> None:
    # a Remove while the index is still being built: nothing may be bound after the unmount
    case = layer_case("esgz-default", 1)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        assert server.cmd("hold-builds") == {"ok": True}
        assert server.mount(case, work / "l1", "start_mount") == {"ok": True}
        assert server.cmd(f"later unmount {work / 'l1'}") == {"ok": True}
        time.sleep(0.2)
        assert "later unmount" not in server.log_text()  # waiting for the build
        assert server.cmd("release-builds") == {"ok": True}
        deadline = time.monotonic() + 20
        while "later unmount" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 'later unmount: {"ok": true}' in server.log_text()
        assert not os.path.ismount(work / "l1") and os.listdir(work / "fuse") == []
        assert server.cmd(f"check {work / 'l1'}")["error"] == "LayerError"
    _assert_clean_log(server)


def _toc_that_verifies_but_fails_to_index(case: contract.Case, roots: Path) -> contract.Case:
    """``case``'s blob with one more TOC entry, named ``../escape``: a TOC whose digest is right
    (it is the digest of this JSON) but which no index may be built from."""
    bad, toc_digest = with_toc_entry(case.blob.read_bytes(), {"name": "../escape", "type": "reg", "size": 0})
    target = roots / "blobs" / "sha256" / hashlib.sha256(bad).hexdigest()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bad)
    return contract.Case("escape", target, toc_digest, case.expected)


def test_started_mount_whose_toc_fails_to_index(work: Path) -> None:
    # accepted, then the build fails: snapshots on it must say why, and the next pull unpack it
    bad = _toc_that_verifies_but_fails_to_index(layer_case("esgz-default", 1), work / "roots")
    with FuseServer(work, [work / "roots"]) as server:
        assert server.cmd("hold-builds") == {"ok": True}
        assert server.mount(bad, work / "l1", "start_mount") == {"ok": True}
        assert server.cmd("release-builds") == {"ok": True}
        reply = server.cmd(f"check {work / 'l1'}")
        assert reply["error"] == "LayerError"
        assert "cannot be served" in reply["message"] and "../escape" in reply["message"]
        assert not os.path.ismount(work / "l1") and os.listdir(work / "l1") == []
        assert server.cmd(f"check-nowait {work / 'l1'}")["error"] == "LayerError"  # ended, failed
        assert server.cmd(f"unmount {work / 'l1'}") == {"ok": True}  # nothing was bound
        assert server.cmd(f"check {work / 'l1'}")["error"] == "LayerError"
        reply = server.mount(bad, work / "l1", "start_mount")
        assert reply["error"] == "LayerError" and "failed to index before" in reply["message"]
        assert os.listdir(work / "fuse") == []
    assert "was accepted (its TOC matches its digest) but cannot be served" in server.log_text()
    _assert_clean_log(server)


def test_neighbours_shared_mounts_and_check(work: Path) -> None:
    layer0, layer1 = layer_case("esgz-default", 0), layer_case("esgz-default", 1)
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        assert server.mount(layer1, work / "l1", neighbours=[layer0.digest, layer1.digest])["ok"]
        persisted = work / "cache" / "indexes" / layer0.blob.name
        deadline = time.monotonic() + 20
        while not persisted.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert persisted.exists()
        before = server.stats(layer0)["source_calls"]
        assert before > 0  # the neighbour's index was fetched ahead of its mount
        assert server.mount(layer0, work / "a")["ok"]
        assert server.stats(layer0)["source_calls"] == before  # and its mount needed no request

        # one digest at two mountpoints shares one served tree
        assert server.mount(layer0, work / "b")["ok"]
        hello = [os.stat(work / m / "bin" / "hello.sh").st_ino for m in ("a", "b")]
        assert hello[0] == hello[1]
        assert server.cmd(f"check {work / 'a'}") == {"ok": True}
        assert server.cmd(f"unmount {work / 'a'}") == {"ok": True}
        assert (work / "b" / "etc" / "hostname").read_bytes() == b"fixture\n"
        assert server.cmd(f"check {work / 'b'}") == {"ok": True}
        assert server.cmd(f"check {work / 'a'}")["error"] == "LayerError"
        assert server.mount(layer0, work / "b")["error"] == "LayerError"  # already mounted there
    _assert_clean_log(server)


def test_prefetch_and_background_fetch_at_mount(work: Path) -> None:
    case = layer_case("esgz-prefetch", 0)
    chunks = trio.run(read_estargz, FileSource(case.blob, case.digest)).verify(case.toc_digest).chunk_count
    with FuseServer(work, [FIXTURES / "esgz-prefetch"], prefetch=True, background=True) as server:
        assert server.mount(case, work / "l0")["ok"]
        deadline = time.monotonic() + 60
        while server.stats(case)["cache"]["chunks_cached"] < chunks and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = server.stats(case)
        assert stats["cache"]["chunks_cached"] == chunks
        assert stats["fetch"]["background_fetches"] > 0
        calls = stats["source_calls"]
        rows, inodes = contract.tree_from_fs(str(work / "l0"))
        contract.assert_tree(rows, inodes, contract.load_tsv(case.expected))
        assert server.stats(case)["source_calls"] == calls  # everything came from the cache
    log = server.log_text()
    assert "prefetched" in log and "background fetch complete" in log
    _assert_clean_log(server)


def test_remount_after_a_crash(work: Path) -> None:
    case = layer_case("esgz-default", 0)
    mountpoint = work / "l0"
    first = FuseServer(work, [FIXTURES / "esgz-default"])
    first.start()
    try:
        assert first.mount(case, mountpoint)["ok"]
        assert (mountpoint / "etc" / "hostname").read_bytes() == b"fixture\n"
    finally:
        first.kill()
    with pytest.raises(OSError) as info:
        os.statvfs(mountpoint)
    assert info.value.errno == errno.ENOTCONN  # what a crashed daemon leaves behind
    with FuseServer(work, [FIXTURES / "esgz-default"]) as server:
        assert server.mount(case, mountpoint)["ok"]
        assert server.stats(case)["source_calls"] == 0  # index persisted by the first run
        rows, inodes = contract.tree_from_fs(str(mountpoint))
        contract.assert_tree(rows, inodes, contract.load_tsv(case.expected))
    assert "dead FUSE mount" in server.log_text()
    _assert_clean_log(server)
