"""Interop with upstream (stargz-snapshotter 0.12's ctr-remote) through a private containerd 1.6.

* a blob our writer produced, imported as an OCI image, is accepted by
  ``ctr-remote image get-toc-digest`` with the TOC digest we computed (eStargz and zstd:chunked);
* a layer converted by ``ctr-remote image convert --estargz|--zstdchunked --oci`` reads through
  our reader to the tree it was made from.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from esgz_support import observed_tree, read_blob, tar_bytes, tar_tree

import estargz
from tests.harness import Containerd, remove_tree, short_tempdir

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("containerd", "ctr", "ctr-remote")),
        reason="containerd, ctr or ctr-remote is not installed",
    ),
]
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    work = short_tempdir("lzs-esgz-")
    try:
        with Containerd(work) as ctd:
            yield ctd
    finally:
        remove_tree(work)


def source_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """A small but varied tree: chunked file, empty file, links, devices, xattrs, odd names."""
    rnd = random.Random(7)
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **attrs: Any) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mtime = 1_700_000_000
        info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
        for k, v in attrs.items():
            setattr(info, k, v)
        if data is not None:
            info.size = len(data)
        members.append((info, data))

    add("app", tarfile.DIRTYPE)
    add("app/big.bin", data=rnd.randbytes(3 << 20) + bytes(1 << 20))
    add("app/empty")
    add("app/text.txt", data=b"hello interop\n" * 1000, uid=1000, gid=1000, uname="u", gname="g")
    add("app/setuid", data=b"#!/bin/sh\n", mode=0o4755)
    add("app/link", tarfile.SYMTYPE, linkname="text.txt", mode=0o777)
    add("app/hard", tarfile.LNKTYPE, linkname="app/text.txt")
    add("app/fifo", tarfile.FIFOTYPE)
    add("app/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    add("app/x", data=b"x", pax_headers={"SCHILY.xattr.user.note": "interop"})
    add("app/ünï code.txt", data=b"names\n")
    return members


def oci_layout(layer: bytes, media_type: str, diff_id: str, annotations: dict[str, str]) -> bytes:
    """An OCI image layout tar holding one single-layer image."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": media_type,
                    "digest": put(layer),
                    "size": len(layer),
                    "annotations": annotations,
                }
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": json.dumps(index).encode()}
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":")[1]] = data
    members = []
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        members.append((info, data))
    return tar_bytes(members)


def import_image(ctd: Containerd, layout: bytes, name: str) -> None:
    path = Path(ctd.workdir) / (name.replace("/", "_").replace(":", "_") + ".tar")
    path.write_bytes(layout)
    ctd.ctr("images", "import", "--all-platforms", "--no-unpack", "--index-name", name, str(path))


@pytest.mark.parametrize("zstd", [False, True], ids=["estargz", "zstdchunked"])
def test_ctr_remote_accepts_our_blob(containerd: Containerd, zstd: bool) -> None:
    out = io.BytesIO()
    result = estargz.convert(
        io.BytesIO(tar_bytes(source_members())), out, chunk_size=1 << 20, zstd_chunked=zstd
    )
    blob = out.getvalue()
    name = f"esgz.local/ours:{'zstd' if zstd else 'gzip'}"
    import_image(containerd, oci_layout(blob, result.media_type, result.diff_id, result.annotations()), name)
    args = ["images", "get-toc-digest", *(["--zstdchunked"] if zstd else []), result.blob_digest]
    got = containerd.ctr_remote(*args).stdout.strip()
    assert got == result.toc_digest
    assert observed_tree(read_blob(blob, expected_toc_digest=got)) == tar_tree(tar_bytes(source_members()))
    # and the TOC it dumps is the one we index (same entries, same order)
    dumped = json.loads(containerd.ctr_remote(*args[:-1], "--dump-toc", result.blob_digest).stdout)
    ours = read_blob(blob).toc
    names = [e["name"].rstrip("/") for e in dumped["entries"] if e["type"] != "chunk"]
    assert sorted(n for n in names if not n.startswith(".")) == sorted(ours.path(i) for i in ours.iter_tree())


def exported_layer(ctd: Containerd, ref: str) -> tuple[bytes, dict[str, Any]]:
    path = Path(ctd.workdir) / "export.tar"
    ctd.ctr("images", "export", "--platform", "linux/amd64", str(path), ref)
    with tarfile.open(path) as t:

        def blob(digest: str) -> bytes:
            f = t.extractfile("blobs/sha256/" + digest.split(":")[1])
            assert f is not None
            return f.read()

        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
        doc = json.loads(blob(index["manifests"][0]["digest"]))
        while "manifests" in doc:
            doc = json.loads(blob(doc["manifests"][0]["digest"]))
        (layer,) = doc["layers"]
        return blob(layer["digest"]), layer


@pytest.mark.parametrize("flag", ["--estargz", "--zstdchunked"])
def test_our_reader_reads_ctr_remote_conversion(containerd: Containerd, flag: str) -> None:
    tar = tar_bytes(source_members())
    src = f"esgz.local/src:{flag.strip('-')}"
    dst = f"esgz.local/converted:{flag.strip('-')}"
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    layer = gzip.compress(tar)
    import_image(
        containerd, oci_layout(layer, "application/vnd.oci.image.layer.v1.tar+gzip", diff_id, {}), src
    )
    containerd.ctr_remote("images", "convert", flag, "--oci", src, dst)
    blob, descriptor = exported_layer(containerd, dst)
    reader = read_blob(blob, expected_toc_digest=descriptor["annotations"][TOC_DIGEST])
    # the upstream TOC, read through our index, gives the tree we put in (tarfile's view of it)
    assert observed_tree(reader) == tar_tree(tar)
    assert reader.read_file("app/big.bin") == dict((m.name, d) for m, d in source_members())["app/big.bin"]
    assert reader.toc.no_prefetch_landmark
