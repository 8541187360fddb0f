"""Import-following speculation: a Python module's first miss fetches the modules of its layer
that it imports (read from its ``.pyc`` or ``.py`` bytes), level by level, in requests of their own.

The layers are real: a package tree compiled by this interpreter (``py_compile``), packed into an
eStargz blob by the project's writer, served by a source that counts its requests.
"""

from __future__ import annotations

import dis
import hashlib
import importlib.util
import io
import marshal
import os
import py_compile
import sys
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from estargz import convert
from fusefs.cache import ChunkCache
from fusefs.config import CacheConfig, FetchConfig, FuseConfig, FusefsConfig, PrefetchConfig
from fusefs.fetch import ChunkFetcher, PriorityGate
from fusefs.formats.estargz import read_estargz
from fusefs.imports import ModuleResolver, compiled_names, source_names
from fusefs.index import LayerIndex, NodeId
from fusefs.manager import LayerManager
from fusefs.sources.file import FileSource, FileSourceFactory
from fusefs.spec import LayerSpec
from tests.fusefs.test_fusefs_fetch import GatedSource

TAG = sys.implementation.cache_tag
SITE = "usr/lib/python3/dist-packages"
STDLIB = "usr/lib/python3.11"
EXT = f"_speedups.{TAG}-x86_64-linux-gnu.so"

# a package whose top level imports some of its modules; others only inside a function, or never
SOURCES = {
    f"{SITE}/app/__init__.py": "import json\nfrom . import core\nfrom .sub import tools\n"
                               "from app import " + EXT.split(".")[0] + "\n"
                               "def later():\n    from . import lazy\n",
    f"{SITE}/app/core.py": "import app.sub.deep\nVALUE = 1\n",
    f"{SITE}/app/lazy.py": "X = 2\n",
    f"{SITE}/app/unused.py": "Y = 3\n",
    f"{SITE}/app/sub/__init__.py": "S = 1\n",
    f"{SITE}/app/sub/tools.py": "from ..core import VALUE\n",
    f"{SITE}/app/sub/deep.py": "import struct\n",
    f"{SITE}/other/__init__.py": "O = 1\n",
    f"{STDLIB}/json/__init__.py": "from .decoder import JSONDecoder\n",
    f"{STDLIB}/json/decoder.py": "from _json import scanstring\nclass JSONDecoder: pass\n",
    f"{STDLIB}/struct.py": "from _struct import *\n",
    f"{STDLIB}/collections.py": "C = 1\n",
}
BINARIES = {
    f"{SITE}/app/{EXT}": 4000,
    f"{STDLIB}/lib-dynload/_json.{TAG}-x86_64-linux-gnu.so": 3000,
    f"{STDLIB}/lib-dynload/_struct.{TAG}-x86_64-linux-gnu.so": 3000,
    f"{STDLIB}/lib-dynload/_unrelated.{TAG}-x86_64-linux-gnu.so": 3000,
}


def _pyc(path: str) -> str:
    directory, name = path.rsplit("/", 1)
    return f"{directory}/__pycache__/{name[:-3]}.{TAG}.pyc"


def _layer(tmp_path: Path, *, compiled: bool, only: str = "", padding: int = 0,
           prioritized: tuple[str, ...] = ()) -> Path:
    """The tree (the part under ``only``) as an eStargz blob: sources and, with ``compiled``,
    their ``.pyc`` files; ``padding`` random bytes at the end keep the modules out of the blob's
    tail (which a mount reads, and caches); ``prioritized`` files go first, before a
    ``.prefetch.landmark`` (an optimized image's prefetch prefix)."""
    tree = tmp_path / "tree"
    files: dict[str, bytes] = {}
    for path, text in SOURCES.items():
        if not path.startswith(only):
            continue
        source = tree / path
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(text)
        files[path] = text.encode()
        if compiled:
            target = tree / _pyc(path)
            py_compile.compile(str(source), cfile=str(target), doraise=True)
            files[_pyc(path)] = target.read_bytes()
    for path, size in BINARIES.items():  # distinct bytes: equal chunks would be cached as one
        if path.startswith(only):
            files[path] = (path.encode() * size)[:size]
    if padding:
        files["zz/padding.bin"] = os.urandom(padding)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        directories = sorted({p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw.seek(0)
    blob = tmp_path / "layer.esgz"
    with blob.open("wb") as out:
        convert(raw, out, prioritized=prioritized)
    return blob


Layers = Callable[[], list[ChunkFetcher]]


def _fetcher(tmp_path: Path, blob: Path, config: FetchConfig,
             image_layers: Layers | None = None) -> tuple[GatedSource, ChunkFetcher]:
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    source = GatedSource(blob, digest)
    index = trio.run(read_estargz, FileSource(blob, digest)).skip_verification("test layer")
    cache = ChunkCache(CacheConfig(tmp_path / "cache", fsync=False))
    return source, ChunkFetcher(digest, index, source, cache, config, PriorityGate(),
                                image_layers=image_layers)


def _node(index: LayerIndex, path: str) -> NodeId:
    return next(n for p, n in index.walk() if p == path)


def _cached(fetcher: ChunkFetcher, path: str) -> bool:
    return all(fetcher.is_cached(c) for c in fetcher.index.chunk_ids(_node(fetcher.index, path)))


async def _settled(fetcher: ChunkFetcher) -> None:
    with trio.fail_after(10):
        await trio.sleep(0.05)
        while fetcher._inflight:
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        while fetcher._inflight:
            await trio.sleep(0.01)


# only import following: the other speculations would fetch siblings on their own
IMPORTS = FetchConfig(neighbour_bytes=0, speculate_file_bytes=4 << 20, speculate_dir_bytes=0,
                      speculate_scan_bytes=0, speculate_import_bytes=8 << 20)


@pytest.mark.parametrize("compiled", [True, False], ids=["pyc", "py"])
def test_a_first_miss_on_a_module_fetches_what_it_imports_and_theirs(tmp_path: Path, compiled: bool) -> None:
    source, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=compiled), IMPORTS)
    name = _pyc if compiled else (lambda p: p)
    start = name(f"{SITE}/app/__init__.py")

    async def main() -> None:
        await fetcher.read(_node(fetcher.index, start), 0, 1 << 20)
        await _settled(fetcher)

    trio.run(main)
    imported = [f"{SITE}/app/core.py", f"{SITE}/app/sub/__init__.py", f"{SITE}/app/sub/tools.py",
                f"{SITE}/app/sub/deep.py"]
    for path in imported:
        assert _cached(fetcher, name(path)), path
    assert _cached(fetcher, f"{SITE}/app/{EXT}")  # an extension module is a file to fetch too
    for path in (f"{SITE}/app/lazy.py", f"{SITE}/app/unused.py", f"{SITE}/other/__init__.py",
                 f"{STDLIB}/collections.py"):
        assert not _cached(fetcher, name(path)), path  # imported inside a function, or never
    unrelated = f"{STDLIB}/lib-dynload/_unrelated.{TAG}-x86_64-linux-gnu.so"
    assert not _cached(fetcher, unrelated)
    if compiled:
        assert not _cached(fetcher, f"{SITE}/app/core.py")  # Python reads the .pyc, not the source
        # the standard library of the module's cache tag, with its extension modules
        for path in (f"{STDLIB}/json/__init__.py", f"{STDLIB}/json/decoder.py", f"{STDLIB}/struct.py"):
            assert _cached(fetcher, name(path)), path
        for path in (f"{STDLIB}/lib-dynload/_json.{TAG}-x86_64-linux-gnu.so",
                     f"{STDLIB}/lib-dynload/_struct.{TAG}-x86_64-linux-gnu.so"):
            assert _cached(fetcher, path), path
    else:  # a source module has no cache tag to tell which standard library
        assert not _cached(fetcher, name(f"{STDLIB}/json/__init__.py"))
    assert len(source.calls) <= 5  # the miss, then one request per level of the import tree


def test_a_module_of_the_prefetch_prefix_starts_no_walk_and_one_past_it_does(tmp_path: Path) -> None:
    """An optimized image's prefix holds what its workload reads, and the mount prefetches it:
    walking from a module there fetches only what the prefix brings anyway or nobody reads."""
    start = _pyc(f"{SITE}/app/__init__.py")
    _, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True, prioritized=(start,)), IMPORTS)
    assert fetcher.index.prefetch_end

    async def main() -> None:
        await fetcher.read(_node(fetcher.index, start), 0, 1 << 20)
        await _settled(fetcher)
        for path in (f"{SITE}/app/core.py", f"{SITE}/app/sub/tools.py", f"{SITE}/app/sub/deep.py"):
            assert not _cached(fetcher, _pyc(path)), path
        # the workload left the profile: a module past the prefix is walked from as usual
        await fetcher.read(_node(fetcher.index, _pyc(f"{SITE}/app/core.py")), 0, 1 << 20)
        await _settled(fetcher)
        assert _cached(fetcher, _pyc(f"{SITE}/app/sub/deep.py"))
        assert _cached(fetcher, _pyc(f"{STDLIB}/struct.py"))

    trio.run(main)


def test_the_standard_library_resolves_from_its_root_and_lib_dynload(tmp_path: Path) -> None:
    _, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True), IMPORTS)

    async def main() -> None:
        await fetcher.read(_node(fetcher.index, _pyc(f"{STDLIB}/json/__init__.py")), 0, 1 << 20)
        await _settled(fetcher)

    trio.run(main)
    assert _cached(fetcher, _pyc(f"{STDLIB}/json/decoder.py"))
    assert _cached(fetcher, f"{STDLIB}/lib-dynload/_json.{TAG}-x86_64-linux-gnu.so")
    assert not _cached(fetcher, f"{STDLIB}/lib-dynload/_unrelated.{TAG}-x86_64-linux-gnu.so")
    assert not _cached(fetcher, _pyc(f"{STDLIB}/struct.py"))


@pytest.mark.parametrize("budget", [1, 0], ids=["one-byte", "off"])
def test_the_budget_bounds_what_is_followed(tmp_path: Path, budget: int) -> None:
    source, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True),
                               replace(IMPORTS, speculate_import_bytes=budget))

    async def main() -> None:
        await fetcher.read(_node(fetcher.index, _pyc(f"{SITE}/app/__init__.py")), 0, 1 << 20)
        await _settled(fetcher)

    trio.run(main)
    assert len(source.calls) == 1
    assert not _cached(fetcher, _pyc(f"{SITE}/app/core.py"))


def test_a_cached_module_is_not_followed_again(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True), IMPORTS)
    start = _node(fetcher.index, _pyc(f"{SITE}/app/__init__.py"))

    async def main() -> None:
        await fetcher.read(start, 0, 1 << 20)
        await _settled(fetcher)
        calls = len(source.calls)
        for path in (f"{SITE}/app/core.py", f"{SITE}/app/sub/tools.py"):
            await fetcher.read(_node(fetcher.index, _pyc(path)), 0, 1 << 20)
        await _settled(fetcher)
        assert len(source.calls) == calls  # served from the cache, nothing more asked

    trio.run(main)


def test_a_failing_source_ends_the_walk_quietly(tmp_path: Path) -> None:
    source, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True), IMPORTS)

    async def main() -> None:
        await fetcher.read(_node(fetcher.index, _pyc(f"{SITE}/app/__init__.py")), 0, 1 << 20)
        source.fail_with = OSError("registry gone")
        await _settled(fetcher)

    trio.run(main)  # the walk's fetch failed inside a system task: nothing escaped
    assert not _cached(fetcher, _pyc(f"{SITE}/app/sub/deep.py"))


def test_a_module_of_one_layer_fetches_what_it_imports_from_the_image_s_other_layers(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "stdlib").mkdir()
    site_blob = _layer(tmp_path / "site", compiled=True, only=SITE)
    stdlib_blob = _layer(tmp_path / "stdlib", compiled=True, only=STDLIB)
    _, stdlib = _fetcher(tmp_path / "stdlib", stdlib_blob, IMPORTS)
    _, site = _fetcher(tmp_path / "site", site_blob, IMPORTS, image_layers=lambda: [stdlib])
    assert not any(p.startswith(STDLIB) for p, _ in site.index.walk())

    async def main() -> None:
        await site.read(_node(site.index, _pyc(f"{SITE}/app/__init__.py")), 0, 1 << 20)
        await _settled(site)
        await _settled(stdlib)

    trio.run(main)
    for path in (f"{STDLIB}/json/__init__.py", f"{STDLIB}/json/decoder.py", f"{STDLIB}/struct.py"):
        assert _cached(stdlib, _pyc(path)), path  # json from app, struct from app.sub.deep
    assert _cached(stdlib, f"{STDLIB}/lib-dynload/_json.{TAG}-x86_64-linux-gnu.so")
    assert not _cached(stdlib, _pyc(f"{STDLIB}/collections.py"))
    assert not _cached(stdlib, f"{STDLIB}/lib-dynload/_unrelated.{TAG}-x86_64-linux-gnu.so")


@pytest.mark.parametrize("below", [True, False])
def test_a_layer_mounted_as_containerd_describes_it_follows_imports_into_the_layers_below(
        tmp_path: Path, below: bool) -> None:
    # containerd's labels name a layer and the layers above it (cri.image-layers,
    # remote/stargz.layers); the ones below come from the snapshot chain, as LayerSpec.lower
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    digests = []
    for part, only in (("stdlib", STDLIB), ("site", SITE)):
        (tmp_path / part).mkdir()
        blob = _layer(tmp_path / part, compiled=True, only=only, padding=1 << 20)
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        blob.rename(blobs / digest.split(":")[1])
        digests.append(digest)
    stdlib_digest, site_digest = digests
    config = FusefsConfig(cache=CacheConfig(dir=tmp_path / "cache", fsync=False),
                          fuse=FuseConfig(mountpoint=tmp_path / "fuse"), fetch=IMPORTS,
                          prefetch=PrefetchConfig(prefetch=False, background=False),
                          allow_unverified_toc=True)

    async def main() -> tuple[ChunkFetcher, ChunkFetcher]:
        async with trio.open_nursery() as nursery:
            manager = LayerManager(config, nursery, FileSourceFactory([blobs]), ChunkCache(config.cache))
            stdlib = await manager._open_layer(LayerSpec(ref="r/app:1", digest=stdlib_digest,
                                                         neighbours=(stdlib_digest, site_digest)))
            site = await manager._open_layer(LayerSpec(ref="r/app:1", digest=site_digest,
                                                       neighbours=(site_digest,),
                                                       lower=(stdlib_digest,) if below else ()))
            await site.fetcher.read(_node(site.index, _pyc(f"{SITE}/app/__init__.py")), 0, 1 << 20)
            await _settled(site.fetcher)
            await _settled(stdlib.fetcher)
            manager.cache.close()
            nursery.cancel_scope.cancel()
        return stdlib.fetcher, site.fetcher

    stdlib, _ = trio.run(main)
    assert _cached(stdlib, _pyc(f"{STDLIB}/json/__init__.py")) is below
    assert _cached(stdlib, _pyc(f"{STDLIB}/struct.py")) is below


# -- the name readers ------------------------------------------------------------------------

def _compiled(source: str) -> bytes:
    code = compile(source, "<test>", "exec")
    return importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(code)


def test_compiled_names_are_the_module_level_ones() -> None:
    data = _compiled("import os.path\nfrom . import sibling\nfrom .pkg import mod as m\n"
                     "try:\n    import fast\nexcept ImportError:\n    fast = None\n"
                     "def f():\n    import lazy\n    return lazy.x\n"
                     "class C:\n    def g(self):\n        import inner\n"
                     "TEXT = 'import not_a_name'\n")
    names = compiled_names(data)
    assert names == {"os.path", "sibling", "pkg", "mod", "fast"}  # not lazy, inner, f, C, TEXT


def test_compiled_names_of_every_module_of_this_interpreter_are_its_import_instructions() -> None:
    stdlib = Path(importlib.util.find_spec("json").origin).parents[1]  # type: ignore[arg-type, union-attr]
    checked = 0
    for path in sorted(stdlib.glob(f"*/__pycache__/*.{TAG}.pyc"))[:400]:
        data = path.read_bytes()
        code = marshal.loads(data[16:])
        imports = ("IMPORT_NAME", "IMPORT_FROM")
        expected = {i.argval for i in dis.get_instructions(code) if i.opname in imports}
        assert compiled_names(data) == {n for n in expected if n.replace(".", "_").isidentifier()}, path
        checked += 1
    assert checked >= 50


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 16, _compiled("import a")[:40], _compiled("import a")[:20],
    b"\xa7\x0d\x0d\x0a" + b"\0" * 12 + b"c" + b"\0" * 20 + b"r\xff\xff\xff\x7f",  # a reference to nothing
    b"\xa7\x0d\x0d\x0a" + b"\0" * 12 + b"(" * 5000,  # nested beyond the bound
    b"\xa7\x0d\x0d\x0a" + b"\0" * 12 + b"c" + b"\0" * 20 + b"s\xff\xff\xff\x7f",  # absurd length
], ids=["empty", "zeros", "truncated", "header", "bad-ref", "deep", "huge"])
def test_compiled_names_of_malformed_data_are_none(data: bytes) -> None:
    assert compiled_names(data) == set()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=200))
def test_compiled_names_never_raise_on_corrupt_modules(junk: bytes, cut: int) -> None:
    data = _compiled("import os\nfrom . import a, b\ndef f(x):\n    return x + 1.5\n")
    compiled_names(data[:16 + cut] + junk)
    compiled_names(data[:16] + junk)


def test_source_names() -> None:
    text = (b"import os, sys as system\nfrom . import a, b\nfrom .m import (x,  # why\n    y)\n"
            b"from numpy.core import multiarray\n    import json.decoder\nfoo = 1\nfrom z import w\n"
            b"bar, baz = 1, 2\ntry:\n    import fast\nexcept ImportError:\n    from . import slow\n"
            b"def f():\n    import lazy\n# a comment at the margin is no statement\n    import later\n"
            b"class C:\n    import inner\n")
    assert source_names(text) == {"os", "sys", "a", "b", "m", "m.x", "m.y", "numpy.core",
                                  "numpy.core.multiarray", "json.decoder", "z", "z.w", "fast", "slow"}


def test_an_unclosed_parenthesis_names_only_the_package() -> None:
    assert source_names(b"from a import (b,\n" + b"c, " * 5000 + b")") == {"a"}  # beyond the bound
    assert source_names(b"from a import (b,\n c\nimport d\n") == {"a", "d"}  # never closed


def test_every_node_has_its_name_and_directory(tmp_path: Path) -> None:
    _, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True), IMPORTS)
    index = fetcher.index
    parents, entries = index.links()
    paths = dict(index.walk())
    for path, node in paths.items():
        directory, _, name = path.rpartition("/")
        assert index.entry_name(entries[node]) == name.encode()
        assert parents[node] == (paths[directory] if directory else 0)


def test_a_file_outside_a_pycache_is_no_compiled_module(tmp_path: Path) -> None:
    _, fetcher = _fetcher(tmp_path, _layer(tmp_path, compiled=True), IMPORTS)
    index = fetcher.index
    parents, entries = index.links()
    resolver = ModuleResolver(index, lambda node: NodeId(parents[node]),
                              lambda node: index.entry_name(entries[node]))
    assert resolver.module(_node(index, f"{SITE}/app/{EXT}")) is None
    module = resolver.module(_node(index, _pyc(f"{SITE}/app/__init__.py")))
    assert module is not None and module.tag == TAG.encode()
    assert module.directory == _node(index, f"{SITE}/app")
