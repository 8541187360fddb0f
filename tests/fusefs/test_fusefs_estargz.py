"""The eStargz / zstd:chunked reader against the ctr-remote fixtures: the shared reader contract."""

from __future__ import annotations

import gzip
import io
import json
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
