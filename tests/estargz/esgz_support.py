"""Helpers for the estargz tests: fixture paths, expected-tree TSVs, hand-made blobs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import estargz
from estargz._footer import estargz_footer

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "estargz"
CTR_REMOTE = FIXTURES / "ctr-remote"
IMAGES = ("esgz-default", "esgz-prefetch", "zstdchunked-default")

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"shared fixtures not present at {FIXTURES} (../shared is not mounted)"
)


@dataclass(frozen=True)
class FixtureLayer:
    image: str
    index: int
    blob: Path
    descriptor: dict[str, Any]

    @property
    def annotations(self) -> dict[str, str]:
        return self.descriptor["annotations"]  # type: ignore[no-any-return]


def _blob(image: str, digest: str) -> Path:
    return CTR_REMOTE / image / "blobs" / "sha256" / digest.split(":", 1)[1]


def fixture_layers() -> Iterator[FixtureLayer]:
    for image in IMAGES:
        index = json.loads((CTR_REMOTE / image / "index.json").read_text())
        inner = json.loads(_blob(image, index["manifests"][0]["digest"]).read_text())
        manifest = json.loads(_blob(image, inner["manifests"][0]["digest"]).read_text())
        for n, layer in enumerate(manifest["layers"]):
            yield FixtureLayer(image, n, _blob(image, layer["digest"]), layer)


def expected_tree(layer: int) -> dict[str, tuple[str, ...]]:
    """path -> (type, mode, uid, gid, size, sha256|target|dev, xattrs) from expected-layerN.tsv."""
    rows = (CTR_REMOTE / f"expected-layer{layer}.tsv").read_text(encoding="utf-8").splitlines()
    out = {}
    for row in rows[1:]:
        kind, mode, uid, gid, size, detail, path, xattrs = row.split("\t")
        out[path] = (kind, mode, uid, gid, size, detail, xattrs)
    return out


def observed_tree(reader: estargz.BlobReader) -> dict[str, tuple[str, ...]]:
    """The same columns, computed through the TOC, every regular file read and verified."""
    toc = reader.toc
    out = {}
    for i in toc.iter_tree():
        kind = toc.type(i)
        if kind == estargz.EntryType.REG:
            detail = "sha256:" + hashlib.sha256(b"".join(reader.read_chunks(i))).hexdigest()
        elif kind in (estargz.EntryType.SYMLINK, estargz.EntryType.HARDLINK):
            detail = toc.linkname(i)
            if kind == estargz.EntryType.HARDLINK:
                # reading through the link must give the target's bytes
                assert b"".join(reader.read_chunks(i)) == reader.read_file(detail)
        elif kind in (estargz.EntryType.CHAR, estargz.EntryType.BLOCK):
            detail = "{}:{}".format(*toc.device(i))
        else:
            detail = ""
        xattrs = ";".join(f"{k}={v.hex()}" for k, v in sorted(toc.xattrs(i).items()))
        out[toc.path(i)] = (
            kind.label,
            f"{toc.mode(i):04o}",
            str(toc.uid(i)),
            str(toc.gid(i)),
            str(toc.size(i)),
            detail,
            xattrs,
        )
    return out


def gzip_member(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def toc_member(json_bytes: bytes) -> bytes:
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(json_bytes)
    return gzip_member(info.tobuf(tarfile.USTAR_FORMAT) + json_bytes + bytes(-len(json_bytes) % 512 + 1024))


def make_blob(toc: dict[str, Any] | bytes, prefix: bytes = b"") -> bytes:
    """An eStargz blob: ``prefix`` (the data area), a TOC member holding ``toc``, the footer."""
    raw = toc if isinstance(toc, bytes) else json.dumps(toc).encode()
    return prefix + toc_member(raw) + estargz_footer(len(prefix))


def with_toc_entry(blob: bytes, entry: dict[str, Any]) -> tuple[bytes, str]:
    """``blob`` (gzip eStargz) with ``entry`` appended to its TOC, and the new TOC's digest: the
    data area is untouched, so every other entry still points at its chunks."""
    footer = estargz.parse_footer(blob[-estargz.MAX_FOOTER_SIZE:], len(blob))
    toc_tar = zlib.decompress(blob[footer.toc_offset:footer.toc_end], 31)
    with tarfile.open(fileobj=io.BytesIO(toc_tar)) as tar:
        member = tar.extractfile("stargz.index.json")
        assert member is not None
        toc = json.loads(member.read())
    toc["entries"].append(entry)
    raw = json.dumps(toc).encode()
    return make_blob(raw, prefix=blob[:footer.toc_offset]), "sha256:" + hashlib.sha256(raw).hexdigest()


def read_blob(blob: bytes, **kwargs: Any) -> estargz.BlobReader:
    def read_at(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    return estargz.BlobReader(read_at, len(blob), **kwargs)


def parse_blob_toc(blob: bytes) -> estargz.TOC:
    footer = estargz.parse_footer(blob[-min(len(blob), estargz.MAX_FOOTER_SIZE) :], len(blob))
    return estargz.parse_toc(blob[footer.toc_offset : footer.toc_end], footer)


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_tree(tar: bytes) -> dict[str, tuple[str, ...]]:
    """The ``observed_tree`` columns computed by Python's tarfile, independently of estargz."""
    kinds = {
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.CHRTYPE: "char",
        tarfile.BLKTYPE: "block",
        tarfile.FIFOTYPE: "fifo",
    }
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8") as t:
        for m in t:
            kind = kinds.get(m.type, "reg")
            if kind == "reg":
                f = t.extractfile(m)
                detail = "sha256:" + hashlib.sha256(f.read() if f else b"").hexdigest()
            elif kind in ("symlink", "hardlink"):
                detail = m.linkname
            elif kind in ("char", "block"):
                detail = f"{m.devmajor}:{m.devminor}"
            else:
                detail = ""
            xattrs = ";".join(
                f"{k[13:]}={v.encode('utf-8', 'surrogateescape').hex()}"
                for k, v in sorted(m.pax_headers.items())
                if k.startswith("SCHILY.xattr.")
            )
            size = str(m.size) if kind == "reg" else "0"
            out[m.name.rstrip("/")] = (
                kind,
                f"{m.mode & 0o7777:04o}",
                str(m.uid),
                str(m.gid),
                size,
                detail,
                xattrs,
            )
    return out
