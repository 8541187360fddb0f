"""Reading real blobs made by upstream's converter (ctr-remote 0.12) and real legacy stargz TOCs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json

import pytest
import zstandard
from esgz_support import (
    FIXTURES,
    FixtureLayer,
    expected_tree,
    fixture_layers,
    needs_fixtures,
    observed_tree,
)

import estargz

pytestmark = needs_fixtures
LAYERS = list(fixture_layers()) if FIXTURES.is_dir() else []


def _reader(layer: FixtureLayer) -> estargz.BlobReader:
    blob = estargz.BlobFile(layer.blob)
    return estargz.BlobReader(
        blob.read_at,
        blob.size,
        expected_toc_digest=layer.annotations["containerd.io/snapshot/stargz/toc.digest"],
    )


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"{layer.image}-{layer.index}")
def test_tree_matches_expected(layer: FixtureLayer) -> None:
    reader = _reader(layer)
    assert observed_tree(reader) == expected_tree(layer.index)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"{layer.image}-{layer.index}")
def test_toc_digest_and_annotations(layer: FixtureLayer) -> None:
    reader = _reader(layer)
    toc = reader.toc
    ann = layer.annotations
    assert toc.digest == ann["containerd.io/snapshot/stargz/toc.digest"]
    blob = layer.blob.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == layer.blob.name
    if layer.image.startswith("zstd"):
        assert reader.footer.kind is estargz.FooterKind.ZSTD_CHUNKED
        assert toc.manifest_checksum == ann["io.containers.zstd-chunked.manifest-checksum"]
        position = (
            f"{reader.footer.toc_offset}:{reader.footer.toc_end - reader.footer.toc_offset}:{toc.json_size}:1"
        )
        assert position == ann["io.containers.zstd-chunked.manifest-position"]
        estargz.verify_toc(toc, ann["io.containers.zstd-chunked.manifest-checksum"])
        plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    else:
        assert reader.footer.kind is estargz.FooterKind.ESTARGZ and reader.footer.size == 51
        assert toc.manifest_checksum is None
        plain = gzip.decompress(blob)
    assert len(plain) == int(ann["io.containers.estargz.uncompressed-size"])


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: f"{layer.image}-{layer.index}")
def test_toc_digests_without_parsing(layer: FixtureLayer) -> None:
    """What a mount checks before it indexes the TOC: upstream's annotations, as parse_toc has them."""
    blob = layer.blob.read_bytes()
    footer = estargz.parse_footer(blob[-estargz.MAX_FOOTER_SIZE:], len(blob))
    data = blob[footer.toc_offset:footer.toc_end]
    toc = estargz.parse_toc(data, footer)
    digests = estargz.toc_digests(data, footer)
    assert digests == (toc.digest, *((toc.manifest_checksum,) if toc.manifest_checksum else ()))
    ann = layer.annotations
    assert digests[0] == ann["containerd.io/snapshot/stargz/toc.digest"]
    if layer.image.startswith("zstd"):
        assert digests[1] == ann["io.containers.zstd-chunked.manifest-checksum"]
    with pytest.raises(estargz.TOCError):
        estargz.toc_digests(data[:-1], footer)
    with pytest.raises(estargz.TOCError):
        estargz.toc_digests(data, footer, max_uncompressed=toc.json_size - 1)


def test_landmarks() -> None:
    by_name = {(layer.image, layer.index): _reader(layer) for layer in LAYERS}
    default = by_name[("esgz-default", 0)].toc
    assert default.no_prefetch_landmark and default.prefetch_landmark_offset is None
    assert default.footer.toc_offset == 5266194
    prefetch = by_name[("esgz-prefetch", 0)].toc
    assert not prefetch.no_prefetch_landmark and prefetch.prefetch_landmark_offset == 14018
    for path in ("bin/hello.sh", "etc/os-release", "data/text-200KiB.txt"):
        i = prefetch.lookup(path)
        assert i is not None and prefetch.chunks(i)[0].compressed_end <= 14018
    for toc in (default, prefetch):
        assert toc.lookup(".prefetch.landmark") is None and toc.lookup(".no.prefetch.landmark") is None


def test_chunked_file_layout() -> None:
    reader = _reader(next(layer for layer in LAYERS if layer.image == "esgz-default" and layer.index == 0))
    i = reader.toc.lookup("data/random-5MiB.bin")
    assert i is not None
    chunks = reader.toc.chunks(i)
    assert [(c.file_offset, c.size, c.compressed_offset) for c in chunks] == [
        (0, 4194304, 677),
        (4194304, 5243003 - 4194304, 4196284),
    ]
    assert chunks[0].compressed_end == 4196284
    assert reader.toc.nlink(reader.toc.lookup("bin/hello.sh") or 0) == 2
    stats = reader.toc.statistics()
    assert (stats.entries, stats.chunks) == (39, 18)  # 37 + root + landmark; 16 files + landmark + 2nd chunk
    assert stats.buffer_bytes < 300 * stats.entries


def test_legacy_stargz_footer_and_toc() -> None:
    legacy = FIXTURES / "nydus-snapshotter-legacy-stargz"
    footer_bytes = (legacy / "stargzfooter.bin").read_bytes()
    member = (legacy / "stargztoc.bin").read_bytes()
    blob_size = 24442675 + len(member) + len(footer_bytes)
    footer = estargz.parse_footer(b"\0" * 17 + footer_bytes, blob_size)
    assert footer.kind is estargz.FooterKind.LEGACY_STARGZ
    assert (footer.toc_offset, footer.size) == (24442675, 47)
    toc = estargz.parse_toc(member, footer)
    expected_json = (legacy / "stargz.index.json").read_bytes()
    assert toc.digest == "sha256:" + hashlib.sha256(expected_json).hexdigest()
    assert toc.digest == "sha256:46c03b793f385f3c2304582ac028104f94c6245b87cc37a06aa2bc662293d439"
    entries = json.loads(expected_json)["entries"]
    assert len(entries) == 4559
    assert sum(1 for _ in toc.iter_tree()) == len({e["name"].rstrip("/") for e in entries})
    bash = toc.lookup("bin/bash")
    assert bash is not None
    assert toc.size(bash) == 1099016 and toc.mode(bash) == 0o755
    assert toc.file_digest(bash) == "sha256:3f0bc167fa8ef1f7a38452a5fd16d077ed8ef657bb81cdce5af9537ca96e8345"
    (chunk,) = toc.chunks(bash)
    assert chunk.compressed_offset == 123 and chunk.digest == toc.file_digest(bash)
    kinds = {k: sum(1 for i in toc.iter_tree() if toc.type(i).label == k) for k in ("dir", "reg", "symlink")}
    assert kinds["reg"] == 2936 and kinds["symlink"] == 1179


def test_nydus_sample_toc() -> None:
    raw = (FIXTURES / "nydus-texture" / "estargz_sample.json").read_bytes()
    footer = estargz.Footer(
        kind=estargz.FooterKind.ESTARGZ, size=51, toc_offset=1 << 30, toc_end=(1 << 30) + 1
    )
    toc = estargz.parse_toc_json(raw, footer, codec=estargz.Codec.GZIP)
    link = toc.lookup("bin/busybox2")
    target = toc.lookup("bin/busybox")
    assert link is not None and target is not None
    assert toc.type(link) is estargz.EntryType.HARDLINK and toc.link_target(link) == target
    assert toc.nlink(target) == 2 and toc.mode(target) == 0o755
    assert toc.prefetch_landmark_offset == 886633
    assert toc.chunks(target)[0].compressed_end == 512427
    assert toc.lookup("lib") is not None  # implicit parent directory
    assert toc.mode(toc.lookup("lib") or 0) == 0o755
