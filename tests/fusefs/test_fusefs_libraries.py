"""Library-following speculation: an ELF file's first miss at its start fetches what the dynamic
loader reads of it next and the libraries of its layer that it needs, down the chain.

The layers hold this machine's real libraries (libssl needs libcrypto and libc), laid out the
ways images lay them out (Debian's /etc/alternatives links, a directory only ``ld.so.cache``
knows, made by the real ``ldconfig``), packed by the project's eStargz writer in small chunks.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from estargz import convert
from fusefs import elf
from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.index import LayerIndex, NodeId
from fusefs.libraries import LibraryFinder
from fusefs.sources.file import FileSource
from tests.fusefs.test_fusefs_fetch import GatedSource

HOST_LIBS = Path("/usr/lib/x86_64-linux-gnu")
SSL, CRYPTO, ZLIB = HOST_LIBS / "libssl.so.3", HOST_LIBS / "libcrypto.so.3", HOST_LIBS / "libz.so.1.2.13"
CHUNK = 64 << 10
LIBS = "usr/lib/x86_64-linux-gnu"

pytestmark = pytest.mark.skipif(not (SSL.exists() and CRYPTO.exists() and ZLIB.exists()),
                                reason="needs the host's libssl3 and zlib1g (x86-64)")


def _pack(tree: Path, blob: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    raw.seek(0)
    with blob.open("wb") as out:
        convert(raw, out, chunk_size=CHUNK)


def _alternatives_layer(tmp_path: Path) -> Path:
    """libssl in the default directory; libcrypto reached through two absolute symlinks."""
    tree = tmp_path / "tree"
    (tree / LIBS / "openssl-alt").mkdir(parents=True)
    (tree / "etc/alternatives").mkdir(parents=True)
    shutil.copy(SSL, tree / LIBS / "libssl.so.3")
    shutil.copy(CRYPTO, tree / LIBS / "openssl-alt/libcrypto.so.3")
    shutil.copy(ZLIB, tree / LIBS / "libz.so.1.2.13")
    os.symlink("/etc/alternatives/libcrypto.so.3", tree / LIBS / "libcrypto.so.3")
    os.symlink(f"/{LIBS}/openssl-alt/libcrypto.so.3", tree / "etc/alternatives/libcrypto.so.3")
    blob = tmp_path / "layer.esgz"
    _pack(tree, blob)
    return blob


Layers = Callable[[], list[ChunkFetcher]]


def _fetcher(tmp_path: Path, blob: Path, budget: int = 16 << 20,
             image_layers: Layers | None = None) -> tuple[GatedSource, ChunkFetcher]:
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    source = GatedSource(blob, digest)
    index = trio.run(read_estargz, FileSource(blob, digest)).skip_verification("test layer")
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    # only library following: the other speculations would fetch more on their own
    config = FetchConfig(neighbour_bytes=0, speculate_file_bytes=0, speculate_scan_bytes=0,
                         speculate_import_bytes=0, speculate_library_bytes=budget)
    fetcher = ChunkFetcher(digest, index, source, cache, config, PriorityGate(), image_layers=image_layers)
    return source, fetcher


def _node(index: LayerIndex, path: str) -> NodeId:
    return next(n for p, n in index.walk() if p == path)


def _cached_at(fetcher: ChunkFetcher, path: str, offset: int, length: int = 1) -> bool:
    node = _node(fetcher.index, path)
    return all(fetcher.is_cached(c) for c in fetcher.index.chunks_in(node, offset, length))


async def _settled(fetcher: ChunkFetcher) -> None:
    with trio.fail_after(10):
        for _ in range(3):
            await trio.sleep(0.05)
            while fetcher._inflight:
                await trio.sleep(0.01)


def _read_start(fetcher: ChunkFetcher, path: str) -> None:
    async def main() -> None:
        await fetcher.read(_node(fetcher.index, path), 0, 4096)
        await _settled(fetcher)

    trio.run(main)


def test_a_library_start_fetches_what_the_loader_reads_next_and_what_it_needs(tmp_path: Path) -> None:
    _, fetcher = _fetcher(tmp_path, _alternatives_layer(tmp_path))
    _read_start(fetcher, f"{LIBS}/libssl.so.3")
    ssl = elf.layout(SSL.read_bytes()[:65536], SSL.stat().st_size)
    crypto = elf.layout(CRYPTO.read_bytes()[:65536], CRYPTO.stat().st_size)
    assert ssl is not None and crypto is not None
    for offset, length in ssl.touched():  # libssl's dynamic section and writable segment
        assert _cached_at(fetcher, f"{LIBS}/libssl.so.3", offset, length)
    target = f"{LIBS}/openssl-alt/libcrypto.so.3"  # found through the alternatives links
    assert _cached_at(fetcher, target, 0)
    for offset, length in crypto.touched():  # and then its own next reads
        assert _cached_at(fetcher, target, offset, length)
    assert not _cached_at(fetcher, target, 2 << 20)  # its code is paged in as it runs, if ever
    assert not _cached_at(fetcher, f"{LIBS}/libz.so.1.2.13", 0)  # not needed
    assert not _cached_at(fetcher, f"{LIBS}/libssl.so.3", 256 << 10)


def test_a_library_needed_from_another_layer_of_the_image_is_fetched_there(tmp_path: Path) -> None:
    base, top = tmp_path / "base", tmp_path / "top"
    (base / "tree" / LIBS).mkdir(parents=True)
    (top / "tree" / LIBS).mkdir(parents=True)
    shutil.copy(CRYPTO, base / "tree" / LIBS / "libcrypto.so.3")
    shutil.copy(ZLIB, base / "tree" / LIBS / "libz.so.1")
    shutil.copy(SSL, top / "tree" / LIBS / "libssl.so.3")
    _pack(base / "tree", base / "layer.esgz")
    _pack(top / "tree", top / "layer.esgz")
    _, lower = _fetcher(base, base / "layer.esgz")
    _, upper = _fetcher(top, top / "layer.esgz", image_layers=lambda: [lower])
    _read_start(upper, f"{LIBS}/libssl.so.3")

    async def settle() -> None:
        await _settled(lower)

    trio.run(settle)
    assert _cached_at(lower, f"{LIBS}/libcrypto.so.3", 0)
    assert not _cached_at(lower, f"{LIBS}/libz.so.1", 0)


def test_the_budget_bounds_the_walk(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, _alternatives_layer(tmp_path), budget=1)
    _read_start(fetcher, f"{LIBS}/libssl.so.3")
    assert len(source.calls) == 1
    assert not _cached_at(fetcher, f"{LIBS}/openssl-alt/libcrypto.so.3", 0)


def test_a_miss_inside_a_library_follows_nothing(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, _alternatives_layer(tmp_path))

    async def main() -> None:
        await fetcher.read(_node(fetcher.index, f"{LIBS}/libssl.so.3"), 300 << 10, 4096)
        await _settled(fetcher)

    trio.run(main)
    assert len(source.calls) == 1  # a page of code: the loader is done with this file


def _vendor_tree(tmp_path: Path, vendor: dict[str, Path], default: dict[str, Path]) -> Path:
    """A tree with ``vendor`` libraries in /opt/vendor/lib, which only its ld.so.cache (made by
    the real ``ldconfig``) names, and ``default`` ones in the multiarch directory."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if not Path(ldconfig).exists():
        pytest.skip("needs ldconfig (libc-bin)")
    tree = tmp_path / "tree"
    (tree / "opt/vendor/lib").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / LIBS).mkdir(parents=True)
    for name, library in default.items():
        shutil.copy(library, tree / LIBS / name)
    for name, library in vendor.items():
        shutil.copy(library, tree / "opt/vendor/lib" / name)
    (tree / "etc/ld.so.conf").write_text("/opt/vendor/lib\n")
    subprocess.run([ldconfig, "-r", str(tree)], check=True, capture_output=True)
    return tree


def test_a_library_only_ld_so_cache_knows_is_found_through_it(tmp_path: Path) -> None:
    tree = _vendor_tree(tmp_path, {"libcrypto.so.3": CRYPTO}, {"libssl.so.3": SSL})
    assert elf.ld_so_cache((tree / "etc/ld.so.cache").read_bytes())[b"libcrypto.so.3"] == \
        b"/opt/vendor/lib/libcrypto.so.3"
    blob = tmp_path / "layer.esgz"
    _pack(tree, blob)
    _, fetcher = _fetcher(tmp_path, blob)
    _read_start(fetcher, f"{LIBS}/libssl.so.3")
    assert _cached_at(fetcher, "opt/vendor/lib/libcrypto.so.3", 0)


def test_walks_that_start_together_all_find_their_libraries_through_ld_so_cache(tmp_path: Path) -> None:
    # one walk reads /etc/ld.so.cache; another one asking meanwhile must get it too, not nothing
    tree = _vendor_tree(tmp_path, {"libcrypto.so.3": CRYPTO, "libz.so.1": ZLIB}, {})
    blob = tmp_path / "layer.esgz"
    _pack(tree, blob)
    _, fetcher = _fetcher(tmp_path, blob)

    async def main() -> None:
        fetcher.follow_libraries([b"libcrypto.so.3"], [])  # as two upper layers' walks would
        fetcher.follow_libraries([b"libz.so.1"], [])
        await _settled(fetcher)

    trio.run(main)
    assert _cached_at(fetcher, "opt/vendor/lib/libcrypto.so.3", 0)
    assert _cached_at(fetcher, "opt/vendor/lib/libz.so.1", 0)


def test_the_host_ld_so_cache_parses_as_ldconfig_prints_it() -> None:
    cache = Path("/etc/ld.so.cache")
    if not cache.exists():
        pytest.skip("no /etc/ld.so.cache")
    printed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    parsed = elf.ld_so_cache(cache.read_bytes())
    expected: dict[bytes, bytes] = {}
    for line in printed.splitlines()[1:]:
        name, arrow, path = line.strip().partition(" => ")
        if arrow:  # not the trailer ("Cache generated by: ...")
            expected.setdefault(name.split(" (")[0].encode(), path.encode())
    assert parsed == expected


def test_the_dynamic_section_names_what_readelf_does() -> None:
    data = SSL.read_bytes()
    layout = elf.layout(data[:65536], len(data))
    assert layout is not None and layout.dynamic is not None
    offset, length = layout.dynamic
    dynamic = elf.dynamic_entries(data[offset:offset + length], layout)
    assert dynamic is not None
    strtab = data[dynamic.strtab:dynamic.strtab + dynamic.strsz]
    names = [elf.string_at(strtab, o) for o in dynamic.needed]
    readelf = subprocess.run(["readelf", "-d", str(SSL)], capture_output=True, text=True)
    if readelf.returncode == 0:
        expected = [line.split("[")[1].split("]")[0].encode() for line in readelf.stdout.splitlines()
                    if "(NEEDED)" in line]
        assert names == expected
    assert names[:2] == [b"libcrypto.so.3", b"libc.so.6"]


def test_origin_and_default_directories(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "app/bin").mkdir(parents=True)
    (tree / "app/lib").mkdir()
    (tree / "usr/lib").mkdir(parents=True)
    shutil.copy(SSL, tree / "app/bin/tool")
    shutil.copy(ZLIB, tree / "app/lib/libz.so.1")
    shutil.copy(ZLIB, tree / "usr/lib/libz.so.1")
    shutil.copy(CRYPTO, tree / "usr/lib/libcrypto.so.3")
    blob = tmp_path / "layer.esgz"
    _pack(tree, blob)
    _, fetcher = _fetcher(tmp_path, blob)
    index = fetcher.index
    parents, entries = index.links()
    finder = LibraryFinder(index, lambda n: NodeId(parents[n]), lambda n: index.entry_name(entries[n]), {})
    tool = _node(index, "app/bin/tool")
    assert finder.path_of(tool) == b"/app/bin/tool"
    assert finder.find(tool, b"libz.so.1", [b"$ORIGIN/../lib"]) == _node(index, "app/lib/libz.so.1")
    assert finder.find(tool, b"libz.so.1", []) == _node(index, "usr/lib/libz.so.1")
    crypto = _node(index, "usr/lib/libcrypto.so.3")
    assert finder.find(tool, b"libcrypto.so.3", [b"${ORIGIN}/../lib"]) == crypto
    assert finder.find(tool, b"libc.so.6", []) is None  # in another layer
    assert finder.find(tool, b"../lib/libz.so.1", []) is None  # a soname is a name, not a path


def test_symlinks_resolve_within_the_layer_and_stop(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a/b").mkdir(parents=True)
    (tree / "a/b/file").write_bytes(b"x")
    os.symlink("b/file", tree / "a/relative")
    os.symlink("/a/relative", tree / "absolute")
    os.symlink("../b/./file", tree / "a/b/dotted")
    os.symlink("/loop1", tree / "loop2")
    os.symlink("/loop2", tree / "loop1")
    os.symlink("/elsewhere/file", tree / "outside")
    blob = tmp_path / "layer.esgz"
    _pack(tree, blob)
    _, fetcher = _fetcher(tmp_path, blob)
    index = fetcher.index
    file = _node(index, "a/b/file")
    assert index.resolve(b"/absolute") == file
    assert index.resolve(b"a/relative") == file
    assert index.resolve(b"a/b/dotted") == file
    assert index.resolve(b"/a/b/../../a/b/file") == file
    assert index.resolve(b"loop1") is None
    assert index.resolve(b"outside") is None
    assert index.resolve(b"a/b/file/more") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(min_value=0, max_value=1 << 40))
def test_corrupt_headers_never_raise(junk: bytes, size: int) -> None:
    head = SSL.read_bytes()[:1024]
    for data in (junk, elf.MAGIC + b"\x02\x01" + junk, head[:64] + junk, head[:len(junk)] + junk):
        layout = elf.layout(data, size)
        if layout is not None:
            layout.touched()
            layout.file_offset(size)
            elf.dynamic_entries(junk, layout)
    elf.ld_so_cache(junk)
    elf.ld_so_cache(b"glibc-ld.so.cache1.1" + junk)
    elf.string_at(junk, size % 700)
