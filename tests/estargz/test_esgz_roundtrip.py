"""Round trip: generated trees -> tar -> convert -> read through the TOC / extract / gunzip."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field

import zstandard
from esgz_support import observed_tree, read_blob, tar_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import estargz

RESERVED = {".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"}


@dataclass
class Node:
    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes = b""
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)


names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00", exclude_categories=("Cs",)),
    min_size=1,
    max_size=16,
).filter(lambda s: s not in (".", "..") and s not in RESERVED)


@st.composite
def trees(draw: st.DrawFn) -> list[Node]:
    nodes: list[Node] = []
    dirs = [""]
    regs: list[str] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(1, 20))):
        parent = draw(st.sampled_from(dirs))
        path = f"{parent}/{draw(names)}" if parent else draw(names)
        if path in used:
            continue
        used.add(path)
        kind = draw(
            st.sampled_from(["dir", "reg", "reg", "reg", "symlink", "hardlink", "fifo", "char", "block"])
        )
        if kind == "hardlink" and not regs:
            kind = "reg"
        node = Node(
            path,
            kind,
            mode=draw(st.integers(0, 0o7777)) | (0o700 if kind == "dir" else 0),
            uid=draw(st.integers(0, 70000)),
            gid=draw(st.integers(0, 70000)),
            mtime=draw(st.integers(0, 2**33)),
        )
        if kind == "reg":
            size = draw(st.one_of(st.integers(0, 600), st.integers(0, 20000)))
            node.data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
            if draw(st.booleans()):
                node.data = node.data[: size // 2] + bytes(size - size // 2)  # compressible
            regs.append(path)
        elif kind == "dir":
            dirs.append(path)
        elif kind == "symlink":
            node.target = draw(st.sampled_from(["../x", "/etc/passwd", "a b/é", "."]))
            node.mode = 0o777
        elif kind == "hardlink":
            node.target = draw(st.sampled_from(regs))
        elif kind in ("char", "block"):
            node.dev = (draw(st.integers(0, 255)), draw(st.integers(0, 255)))
        if kind in ("reg", "dir") and draw(st.booleans()):
            node.xattrs = {"user.k" + str(draw(st.integers(0, 3))): draw(st.text(min_size=1, max_size=20))}
        nodes.append(node)
    return nodes


TAR_TYPES = {
    "dir": tarfile.DIRTYPE,
    "reg": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}


def to_tar(nodes: list[Node]) -> bytes:
    members = []
    for n in nodes:
        info = tarfile.TarInfo(n.path + ("/" if n.kind == "dir" else ""))
        info.type = TAR_TYPES[n.kind]
        info.mode, info.uid, info.gid, info.mtime = n.mode, n.uid, n.gid, n.mtime
        info.size = len(n.data)
        info.linkname = n.target
        info.devmajor, info.devminor = n.dev
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in n.xattrs.items()}
        members.append((info, n.data if n.kind == "reg" else None))
    return tar_bytes(members)


def expected(nodes: list[Node]) -> dict[str, tuple[str, ...]]:
    out = {}
    for n in nodes:
        if n.kind == "reg":
            detail = "sha256:" + hashlib.sha256(n.data).hexdigest()
        elif n.kind in ("symlink", "hardlink"):
            detail = n.target
        elif n.kind in ("char", "block"):
            detail = "{}:{}".format(*n.dev)
        else:
            detail = ""
        xattrs = ";".join(f"{k}={v.encode().hex()}" for k, v in sorted(n.xattrs.items()))
        size = str(len(n.data)) if n.kind == "reg" else "0"
        out[n.path] = (n.kind, f"{n.mode:04o}", str(n.uid), str(n.gid), size, detail, xattrs)
    return out


def convert(tar: bytes, **options: object) -> tuple[bytes, estargz.ConvertResult]:
    out = io.BytesIO()
    result = estargz.convert(io.BytesIO(tar), out, **options)  # type: ignore[arg-type]
    return out.getvalue(), result


def uncompressed(blob: bytes, zstd: bool) -> bytes:
    if zstd:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    return gzip.decompress(blob)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=trees(),
    zstd=st.booleans(),
    chunk_size=st.integers(512, 8192),
    input_codec=st.sampled_from(["tar", "gzip", "zstd"]),
    prioritize=st.data(),
)
def test_convert_then_read(
    nodes: list[Node], zstd: bool, chunk_size: int, input_codec: str, prioritize: st.DataObject
) -> None:
    tar = to_tar(nodes)
    src = {"tar": tar, "gzip": gzip.compress(tar), "zstd": zstandard.ZstdCompressor().compress(tar)}[
        input_codec
    ]
    regs = [n.path for n in nodes if n.kind == "reg"]
    prioritized = prioritize.draw(st.lists(st.sampled_from(regs), unique=True)) if regs else []
    blob, result = convert(src, chunk_size=chunk_size, level=1, zstd_chunked=zstd, prioritized=prioritized)

    reader = read_blob(blob, expected_toc_digest=result.toc_digest)
    assert observed_tree(reader) == expected(nodes)
    toc = reader.toc
    assert toc.footer.kind is (estargz.FooterKind.ZSTD_CHUNKED if zstd else estargz.FooterKind.ESTARGZ)
    for i in toc.iter_tree():
        assert all(c.size <= chunk_size for c in toc.chunks(i))
    if prioritized:
        landmark = toc.prefetch_landmark_offset
        assert landmark is not None and not toc.no_prefetch_landmark
        for path in prioritized:
            i = toc.lookup(path)
            assert i is not None
            assert all(c.compressed_end <= landmark for c in toc.chunks(i))
    else:
        assert toc.no_prefetch_landmark

    plain = uncompressed(blob, zstd)
    assert len(plain) == result.uncompressed_size
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == result.diff_id
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == result.blob_digest
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as t:
        got = {}
        for m in t:
            f = t.extractfile(m) if m.isreg() else None
            got[m.name.rstrip("/")] = (m.type, m.linkname, f.read() if f else b"")
    want = {n.path: (TAR_TYPES[n.kind], n.target, n.data) for n in nodes}
    landmark_name = ".prefetch.landmark" if prioritized else ".no.prefetch.landmark"
    assert got.pop(landmark_name) == (tarfile.REGTYPE, "", b"\x0f")
    if not zstd:
        toc_member = got.pop("stargz.index.json")
        assert hashlib.sha256(toc_member[2]).hexdigest() == result.toc_digest.split(":")[1]
    assert got == {
        k: (v[0] if v[0] != tarfile.REGTYPE else tarfile.REGTYPE, v[1], v[2]) for k, v in want.items()
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=trees(), zstd=st.booleans())
def test_convert_then_extract(nodes: list[Node], zstd: bool) -> None:
    blob, result = convert(to_tar(nodes), chunk_size=1024, level=1, zstd_chunked=zstd)
    reader = read_blob(blob, expected_toc_digest=result.toc_digest)
    root = tempfile.mkdtemp(prefix="esgz-extract-")
    try:
        estargz.extract(reader, os.path.join(root, "out"))
        check_extracted(os.path.join(root, "out"), nodes)
    finally:
        shutil.rmtree(root)


def check_extracted(root: str, nodes: list[Node]) -> None:
    privileged = os.geteuid() == 0
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    by_path = {n.path: n for n in nodes}
    assert found == {p for p, n in by_path.items() if privileged or n.kind not in ("char", "block")}
    for n in nodes:
        full = os.path.join(root, n.path)
        if n.kind in ("char", "block") and not privileged:
            continue
        st_ = os.lstat(full)
        if n.kind == "symlink":
            assert os.readlink(full) == n.target
            continue
        target = by_path[n.target] if n.kind == "hardlink" else n
        assert stat.S_IMODE(st_.st_mode) == target.mode, n.path
        assert int(st_.st_mtime) == target.mtime
        if privileged:
            assert (st_.st_uid, st_.st_gid) == (target.uid, target.gid)
            for k, v in target.xattrs.items():
                assert os.getxattr(full, k, follow_symlinks=False) == v.encode()
        if n.kind == "hardlink":
            assert os.path.samefile(full, os.path.join(root, n.target))
        if target.kind == "reg":
            with open(full, "rb") as f:
                assert f.read() == target.data
        elif n.kind == "fifo":
            assert stat.S_ISFIFO(st_.st_mode)
        elif n.kind in ("char", "block"):
            assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == n.dev
            assert stat.S_ISCHR(st_.st_mode) if n.kind == "char" else stat.S_ISBLK(st_.st_mode)
