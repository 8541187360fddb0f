"""zstd:chunked as containers/storage writes it: 64-byte ``GNUlInUx`` footer, tar-split frame,
``endOffset`` on entries and ``chunkType: zeros`` holes. No upstream fixture exists, so the blob
is assembled here from the layout in docs/formats/estargz.md §6.2."""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile

import pytest
import zstandard
from esgz_support import read_blob

import estargz
from estargz._footer import skippable_frame


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def v2_blob() -> tuple[bytes, bytes, str]:
    z = zstandard.ZstdCompressor()
    content = b"hello v2\n" * 100
    info = tarfile.TarInfo("a")
    info.size = len(content)
    head = z.compress(info.tobuf())
    body = z.compress(content + bytes(-len(content) % 512))
    data = head + body
    entries = [
        {
            "name": "a",
            "type": "reg",
            "size": len(content),
            "offset": len(head),
            "endOffset": len(data),
            "digest": _sha(content),
            "chunkDigest": _sha(content),
        },
    ]
    toc_json = json.dumps({"version": 1, "entries": entries, "tarSplitDigest": _sha(b"split")}).encode()
    compressed_toc = z.compress(toc_json)
    toc_offset = len(data) + 8
    blob = data + skippable_frame(compressed_toc)
    split = z.compress(b"split")
    split_offset = len(blob) + 8
    blob += skippable_frame(split)
    payload = struct.pack("<4Q", toc_offset, len(compressed_toc), len(toc_json), 1)
    payload += struct.pack("<3Q", split_offset, len(split), 5) + b"GNUlInUx"
    return blob + skippable_frame(payload), compressed_toc, _sha(toc_json)


def test_reads_containers_storage_layout() -> None:
    blob, compressed_toc, json_digest = v2_blob()
    reader = read_blob(blob, expected_toc_digest=_sha(compressed_toc))  # the manifest-checksum form
    footer = reader.footer
    assert footer.kind is estargz.FooterKind.ZSTD_CHUNKED_V2 and footer.size == 64
    assert footer.tar_split_size == len(zstandard.ZstdCompressor().compress(b"split"))
    assert reader.toc.digest == json_digest and reader.toc.tar_split_digest == _sha(b"split")
    assert reader.read_file("a") == b"hello v2\n" * 100
    estargz.verify_toc(reader.toc, json_digest)
    with pytest.raises(estargz.TOCDigestMismatch):
        estargz.verify_toc(reader.toc, _sha(b"other"))


def test_zero_chunks_are_holes() -> None:
    footer = estargz.Footer(estargz.FooterKind.ZSTD_CHUNKED_V2, 64, 1000, 1100, 10)
    content = b"x" * 4096
    entries = [
        {
            "name": "s",
            "type": "reg",
            "size": 8192,
            "chunkSize": 4096,
            "chunkType": "zeros",
            "chunkDigest": _sha(bytes(4096)),
            "digest": _sha(bytes(4096) + content),
        },
        {
            "name": "s",
            "type": "chunk",
            "offset": 100,
            "endOffset": 300,
            "chunkOffset": 4096,
            "chunkDigest": _sha(content),
        },
    ]
    toc = estargz.parse_toc_json(
        json.dumps({"version": 1, "entries": entries}).encode(), footer, codec=estargz.Codec.ZSTD
    )
    hole, data = toc.chunks(toc.lookup("s") or 0)
    assert hole.hole and hole.size == 4096 and hole.compressed_offset == hole.compressed_end == 0
    assert not data.hole and (data.compressed_offset, data.compressed_end) == (100, 300)
