"""Untrusted input: malformed footers, lying TOCs, bombs, tampered chunks, hostile writer input.

Each case must end in the specific EstargzError subclass with a message naming what is wrong:
never another exception, a hang, or an allocation sized by the attacker.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import tracemalloc
import zlib
from typing import Any

import pytest
import zstandard
from esgz_support import gzip_member, make_blob, parse_blob_toc, read_blob, tar_bytes, toc_member

import estargz
from estargz._footer import estargz_footer, skippable_frame, zstd_chunked_footer

D_A = "sha256:" + hashlib.sha256(b"a").hexdigest()
D_EMPTY = "sha256:" + hashlib.sha256(b"").hexdigest()
PREFIX = b"\0" * 4096  # the "data area" in front of hand-made TOCs


def toc_of(*entries: dict[str, Any], version: Any = 1) -> estargz.TOC:
    return parse_blob_toc(make_blob({"version": version, "entries": list(entries)}, PREFIX))


def reg(name: str, offset: int = 100, size: int = 1, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "reg", "size": size, "offset": offset, "digest": D_A, **extra}


def raises_toc(match: str, *entries: dict[str, Any], **kw: Any) -> None:
    with pytest.raises(estargz.TOCError, match=match):
        toc_of(*entries, **kw)


# -- footers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tail", "size", "match"),
    [
        (b"", 0, "no valid footer"),
        (b"\x1f\x8b" * 10, 20, "no valid footer"),
        (bytes(64), 1000, "no valid footer"),
        (estargz_footer(10).upper(), 1000, "no valid footer"),
        (estargz_footer(0x1234).replace(b"1234", b"12G4"), 1000, "hex"),
        (estargz_footer(5000), 1000, "not below the footer start"),
        (estargz_footer(10)[:-8] + b"\x01" + bytes(7), 1000, "not an empty gzip member"),
        (
            estargz_footer(10)[:40] + b"\xff\xff\xff" + estargz_footer(10)[43:],
            1000,
            "not an empty gzip member",
        ),
        (zstd_chunked_footer(10_000, 10, 10), 2000, "outside"),
        (zstd_chunked_footer(8, 0, 10), 2000, "outside"),
        (zstd_chunked_footer(100, 10, 10)[:-16] + b"\x02" + bytes(7) + b"GnUlInUx", 2000, "manifest type"),
    ],
    ids=[
        "empty-blob",
        "gzip-magic-only",
        "zeros",
        "uppercase",
        "non-hex-offset",
        "offset-past-footer",
        "bad-trailer",
        "bad-deflate",
        "zstd-offset-outside",
        "zstd-empty-toc",
        "zstd-manifest-type",
    ],
)
def test_bad_footer(tail: bytes, size: int, match: str) -> None:
    tail = tail[-min(size, 64) :]
    tail = bytes(min(size, 64) - len(tail)) + tail
    with pytest.raises(estargz.FooterError, match=match):
        estargz.parse_footer(tail, size)


def test_tail_length_must_match() -> None:
    with pytest.raises(estargz.FooterError, match="last min"):
        estargz.parse_footer(estargz_footer(10), 1000)


def test_external_toc_footer() -> None:
    external = (
        b"\x1f\x8b\x08\x04"
        + bytes(5)
        + b"\xff"
        + b"\x15\x00"
        + b"SG\x11\x00STARGZEXTERNALTOC"
        + b"\x01\x00\x00\xff\xff"
    )
    external += bytes(8)
    assert len(external) == 46
    blob = b"x" * 100 + external
    footer = estargz.parse_footer(blob[-64:], len(blob))
    assert footer.kind is estargz.FooterKind.EXTERNAL_TOC and footer.needs_external_toc
    with pytest.raises(estargz.NeedsExternalTOC):
        estargz.parse_toc(b"", footer)
    with pytest.raises(estargz.NeedsExternalTOC):
        read_blob(blob)


# -- TOC container ----------------------------------------------------------------------------------
def test_truncated_toc() -> None:
    blob = make_blob({"version": 1, "entries": [reg("a")]}, PREFIX)
    footer = estargz.parse_footer(blob[-64:], len(blob))
    data = blob[footer.toc_offset : footer.toc_end]
    with pytest.raises(estargz.TOCError, match="footer says"):
        estargz.parse_toc(data[:-5], footer)
    short = estargz.Footer(footer.kind, footer.size, footer.toc_offset, footer.toc_end - 40)
    with pytest.raises(estargz.TOCError, match=r"truncated|corrupt|less than"):
        estargz.parse_toc(data[:-40], short)


def test_toc_tar_entry_must_be_the_index() -> None:
    info = tarfile.TarInfo("etc/passwd")
    info.size = 2
    member = gzip_member(info.tobuf() + b"{}" + bytes(510 + 1024))
    blob = PREFIX + member + estargz_footer(len(PREFIX))
    with pytest.raises(estargz.TOCError, match=r"stargz\.index\.json"):
        parse_blob_toc(blob)


def test_gzip_bomb_toc_is_bounded() -> None:
    info = tarfile.TarInfo("stargz.index.json")
    info.size = 64 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = z.compress(info.tobuf(tarfile.USTAR_FORMAT))
    zeros = bytes(1 << 20)
    for _ in range(64):
        member += z.compress(zeros)
    member += z.flush()
    assert len(member) < 1 << 20
    blob = PREFIX + member + estargz_footer(len(PREFIX))
    footer = estargz.parse_footer(blob[-64:], len(blob))
    data = blob[footer.toc_offset : footer.toc_end]
    with pytest.raises(estargz.TOCError, match="exceeds"):
        estargz.parse_toc(data, footer, max_uncompressed=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(estargz.TOCError, match=r"expected '\{'"):  # 64 MiB of zeros are not JSON
            estargz.parse_toc(data, footer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * (64 << 20)  # the declared size bounds it: JSON bytes + their text, no more


def test_zstd_toc_longer_than_declared() -> None:
    raw = json.dumps({"version": 1, "entries": []}).encode()
    frame = zstandard.ZstdCompressor().compress(raw * 1000)
    blob = PREFIX + skippable_frame(frame)
    blob += zstd_chunked_footer(len(PREFIX) + 8, len(frame), len(raw))
    with pytest.raises(estargz.TOCError, match="more than"):
        parse_blob_toc(blob)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "expected '{'"),
        (b'{"version": 1, "entries": [1]}', "not a JSON object"),
        (b'{"version": 1, "entries": {}}', "to open 'entries'"),
        (b'{"version": 1}', "no 'entries'"),
        (b'{"version": 1, "entries": [], "entries": []}', "two 'entries'"),
        (b'{"version": NaN, "entries": []}', "malformed"),
        (b'{"version": 1, "entries": []} trailing', "trailing"),
        (b'{"version": 1, "entries": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "malformed|not a JSON"),
        (b'{"version": 1, "entries": ["\xff"]}', "UTF-8"),
    ],
)
def test_malformed_json(raw: bytes, match: str) -> None:
    with pytest.raises(estargz.TOCError, match=match):
        parse_blob_toc(make_blob(raw, PREFIX))


def test_version_must_be_1() -> None:
    raises_toc("version", version=2)
    raises_toc("version", version=True)


# -- entries that lie -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (reg("../etc/passwd"), r"'\.\.'"),
        (reg("a/../../b"), r"'\.\.'"),
        (reg("/etc/passwd"), "absolute"),
        (reg("a\x00b"), "NUL"),
        (reg("x" * 300), "longer than 255"),
        (reg("a", offset=4096), "not below the TOC offset"),
        (reg("a", offset=10**12), "not below the TOC offset"),
        (reg("a", offset=0), "no offset"),
        (reg("a", size=-1), "size"),
        (reg("a", size="1"), "size"),
        (reg("a", size=True), "size"),
        (reg("a", size=2**70), "size"),
        (reg("a", size=2**40), "exceeds"),
        (reg("a", size=10, chunkSize=20), "past the file size"),
        (reg("a", size=10, chunkOffset=3), "chunkOffset"),
        (reg("a", endOffset=5000), "endOffset"),
        (reg("a", digest="md5:abc"), "digest"),
        (reg("a", digest="sha256:" + "A" * 64), "digest"),
        (reg("a", chunkDigest="sha256:1234"), "chunkDigest"),
        (reg("a", modtime="yesterday"), "RFC 3339"),
        (reg("a", uid=2**32), "uid"),
        (reg("a", xattrs={"user.x": "!!not base64"}), "base64"),
        (reg("a", xattrs=["user.x"]), "xattrs"),
        (reg("a", chunkType="ones"), "chunkType"),
        ({"name": "a", "type": "socket"}, "unknown type"),
        ({"name": "a", "type": "symlink"}, "linkName"),
        ({"name": 5, "type": "dir"}, "not a string"),
        ({"name": "./", "type": "reg"}, "root must be a directory"),
        ({"name": "a", "type": "chunk", "offset": 100, "chunkOffset": 0}, "does not follow a regular file"),
    ],
)
def test_lying_entry(entry: dict[str, Any], match: str) -> None:
    raises_toc(match, entry)


def test_offsets_must_increase() -> None:
    raises_toc("out of order", reg("a", offset=200), reg("b", offset=100))
    raises_toc("overlap", reg("a", offset=200), reg("b", offset=200))
    raises_toc("endOffset .* overlaps", reg("a", offset=100, endOffset=300), reg("b", offset=200))
    shared = toc_of(reg("a", offset=100), reg("b", offset=100, innerOffset=512), reg("c", offset=300))
    ends = [shared.chunks(shared.lookup(n) or 0)[0].compressed_end for n in "abc"]
    assert ends == [300, 300, len(PREFIX)]


def test_chunks_must_tile_the_file() -> None:
    big = reg("f", size=10, chunkSize=4)
    raises_toc("cover 4 of 10", big, reg("g", offset=200))
    raises_toc("cover 4 of 10", big)
    gap = {"name": "f", "type": "chunk", "offset": 150, "chunkOffset": 5, "chunkDigest": D_A}
    raises_toc("does not continue", big, gap)
    other = {"name": "g", "type": "chunk", "offset": 150, "chunkOffset": 4, "chunkDigest": D_A}
    raises_toc("differs from the file", big, other)
    undigested = {"name": "f", "type": "chunk", "offset": 150, "chunkOffset": 4}
    raises_toc("chunkDigest", dict(big, chunkDigest=D_A), undigested)
    ok = toc_of(dict(big, chunkDigest=D_A), dict(undigested, chunkDigest=D_A))
    assert [(c.file_offset, c.size) for c in ok.chunks(ok.lookup("f") or 0)] == [(0, 4), (4, 6)]


def test_duplicates() -> None:
    toc = toc_of(reg("a", offset=100), reg("a", offset=200, digest=D_EMPTY))
    i = toc.lookup("a")
    assert i is not None and toc.file_digest(i) == D_EMPTY and toc.chunks(i)[0].compressed_offset == 200
    assert [toc.path(k) for k in toc.iter_tree()] == ["a"]
    raises_toc("turns a dir into a reg", {"name": "a/", "type": "dir"}, reg("a"))
    raises_toc("turns a reg into a dir", reg("a"), {"name": "a/", "type": "dir"})
    toc = toc_of(reg("d/x"), {"name": "d/", "type": "dir", "mode": 0o40700, "uid": 7})
    d = toc.lookup("d")
    assert d is not None and toc.mode(d) == 0o700 and toc.uid(d) == 7 and toc.children(d).tolist() != []


def test_names_that_utf8_cannot_hold_are_refused() -> None:
    # JSON can escape a lone surrogate; no file name on disk can be one
    raises_toc("not valid Unicode", reg("a\udc80b"))
    raises_toc("surrogates not allowed", reg("d/" + "x" * 100 + "\udc80"))  # the long-name path
    raises_toc("not valid Unicode", {"name": "l", "type": "symlink", "linkName": "\ud800"})


def test_long_ascii_and_short_unicode_names_are_taken_whole() -> None:
    long_ascii = "/".join(["p" * 60] * 4)  # 243 characters: past the old 63-character fast path
    unicode_name = "\u00e9" * 63  # 126 UTF-8 bytes
    toc = toc_of(reg(long_ascii, offset=100), reg(unicode_name, offset=200))
    assert sorted(toc.path(k) for k in toc.iter_tree()) == sorted(
        ["p" * 60, "/".join(["p" * 60] * 2), "/".join(["p" * 60] * 3), long_ascii, unicode_name])
    raises_toc("longer than 255", reg("q" * 256))
    raises_toc("longer than 255", reg("\u00e9" * 128))


def test_hardlinks() -> None:
    raises_toc("not an earlier entry", {"name": "l", "type": "hardlink", "linkName": "missing"})
    raises_toc("not an earlier entry", {"name": "l", "type": "hardlink", "linkName": "a"}, reg("a"))
    raises_toc("not an earlier entry", {"name": "l", "type": "hardlink", "linkName": "l"})
    raises_toc(
        "is a directory", {"name": "d/", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}
    )
    raises_toc(r"'\.\.'", reg("a"), {"name": "l", "type": "hardlink", "linkName": "../a"})
    toc = toc_of(
        reg("a"),
        {"name": "b", "type": "hardlink", "linkName": "a"},
        {"name": "c", "type": "hardlink", "linkName": "b"},
    )
    a, c = toc.lookup("a"), toc.lookup("c")
    assert a is not None and c is not None
    assert toc.link_target(c) == a and toc.nlink(a) == 3 and toc.chunks(c) == toc.chunks(a)


def test_parent_must_be_a_directory() -> None:
    raises_toc("not a directory", {"name": "evil", "type": "symlink", "linkName": "/"}, reg("evil/etc/x"))
    raises_toc("not a directory", reg("f"), reg("f/x", offset=200))


def test_entry_count_is_bounded() -> None:
    blob = make_blob(
        {"version": 1, "entries": [{"name": f"d{k}/", "type": "dir"} for k in range(50)]}, PREFIX
    )
    footer = estargz.parse_footer(blob[-64:], len(blob))
    data = blob[footer.toc_offset : footer.toc_end]
    with pytest.raises(estargz.TOCError, match="more than 20 entries"):
        estargz.parse_toc(data, footer, max_entries=20)
    deep = "/".join(["d"] * 2500)
    raises_toc("longer than 4096", reg(deep))


def test_mode_type_bits_are_masked() -> None:
    toc = toc_of({"name": "bin/", "type": "dir", "mode": 0o40755}, reg("bin/sh", mode=0o104755))
    assert toc.mode(toc.lookup("bin") or 0) == 0o755 and toc.mode(toc.lookup("bin/sh") or 0) == 0o4755


# -- chunks -----------------------------------------------------------------------------------------
def test_decode_chunk_bomb_is_bounded() -> None:
    bomb = gzip.compress(bytes(100 << 20), compresslevel=9)
    tracemalloc.start()
    try:
        out = estargz.decode_chunk(
            bomb, codec=estargz.Codec.GZIP, inner_offset=5, size=10, expected_digest=None
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == bytes(10) and peak < 1 << 20
    zbomb = zstandard.ZstdCompressor().compress(bytes(100 << 20))
    out = estargz.decode_chunk(zbomb, codec=estargz.Codec.ZSTD, inner_offset=0, size=10, expected_digest=None)
    assert out == bytes(10)


@pytest.mark.parametrize("codec", [estargz.Codec.GZIP, estargz.Codec.ZSTD])
def test_decode_chunk_errors(codec: estargz.Codec) -> None:
    data = b"hello world" * 10
    packed = gzip_member(data) if codec is estargz.Codec.GZIP else zstandard.ZstdCompressor().compress(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert (
        estargz.decode_chunk(packed, codec=codec, inner_offset=0, size=len(data), expected_digest=digest)
        == data
    )
    with pytest.raises(estargz.ChunkError, match=r"truncated"):
        estargz.decode_chunk(packed, codec=codec, inner_offset=0, size=len(data) + 1, expected_digest=None)
    with pytest.raises(estargz.ChunkDigestMismatch, match="digest mismatch"):
        estargz.decode_chunk(packed, codec=codec, inner_offset=1, size=len(data) - 1, expected_digest=digest)
    with pytest.raises(estargz.ChunkError):
        estargz.decode_chunk(
            packed[:-6] + b"garbage", codec=codec, inner_offset=0, size=len(data), expected_digest=None
        )
    with pytest.raises(estargz.ChunkError):
        estargz.decode_chunk(b"\0" * 40, codec=codec, inner_offset=0, size=1, expected_digest=None)


def _converted(files: dict[str, bytes]) -> tuple[bytes, estargz.ConvertResult]:
    members = []
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        members.append((info, data))
    out = io.BytesIO()
    result = estargz.convert(io.BytesIO(tar_bytes(members)), out, chunk_size=1024, level=1)
    return out.getvalue(), result


def test_tampered_chunk_digest_and_toc_digest() -> None:
    blob, result = _converted({"f": b"A" * 3000})
    footer = estargz.parse_footer(blob[-64:], len(blob))
    raw = zlib.decompressobj(31).decompress(blob[footer.toc_offset : footer.toc_end])
    toc_json = json.loads(raw[512 : 512 + int(raw[124:135], 8)])
    for e in toc_json["entries"]:
        if e["name"] == "f" and e["type"] == "chunk":
            e["chunkDigest"] = "sha256:" + hashlib.sha256(b"B" * 1024).hexdigest()
    forged = (
        blob[: footer.toc_offset]
        + toc_member(json.dumps(toc_json).encode())
        + estargz_footer(footer.toc_offset)
    )
    with pytest.raises(estargz.TOCDigestMismatch, match=result.toc_digest):
        read_blob(forged, expected_toc_digest=result.toc_digest)
    with pytest.raises(estargz.ChunkDigestMismatch, match="'f' at file offset 1024"):
        read_blob(forged).read_file("f")
    # Flip one compressed byte of the first chunk: gzip's own CRC or the chunk digest must catch it.
    i = read_blob(blob).toc.lookup("f")
    assert i is not None
    off = read_blob(blob).toc.chunks(i)[0].compressed_offset + 12
    flipped = blob[:off] + bytes([blob[off] ^ 0xFF]) + blob[off + 1 :]
    with pytest.raises(estargz.ChunkError):
        read_blob(flipped).read_file("f")


def test_file_without_any_digest_is_not_served() -> None:
    data = b"secret"
    member = gzip_member(data)
    entry = {"name": "f", "type": "reg", "size": len(data), "offset": 10}
    blob = make_blob({"version": 1, "entries": [entry]}, bytes(10) + member)
    with pytest.raises(estargz.ChunkError, match="without digests and no file digest"):
        read_blob(blob).read_file("f")
    entry["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
    assert read_blob(make_blob({"version": 1, "entries": [entry]}, bytes(10) + member)).read_file("f") == data


# -- writer input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../escape", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        (".no.prefetch.landmark", "reserves"),
        ("stargz.index.json", "reserves"),
    ],
)
def test_writer_refuses_hostile_names(name: str, match: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    with pytest.raises(estargz.InputError, match=match):
        estargz.convert(io.BytesIO(tar_bytes([(info, b"x")])), io.BytesIO())


def test_writer_refuses_garbage_and_bad_priorities() -> None:
    with pytest.raises(estargz.InputError, match="cannot read the input tar"):
        estargz.convert(io.BytesIO(b"\x1f\x8b" + b"nonsense" * 100), io.BytesIO())
    with pytest.raises(estargz.InputError, match="not a regular file"):
        _ = estargz.convert(
            io.BytesIO(tar_bytes([(tarfile.TarInfo("a"), b"")])), io.BytesIO(), prioritized=["missing"]
        )


def test_symlink_payload_cannot_escape_on_extract(tmp_path: Any) -> None:
    """A symlink to / followed by a same-named directory entry is refused by the index."""
    entries = [
        {"name": "link", "type": "symlink", "linkName": "/"},
        {"name": "link/", "type": "dir"},
    ]
    with pytest.raises(estargz.TOCError, match="turns a symlink into a dir"):
        parse_blob_toc(make_blob({"version": 1, "entries": entries}, PREFIX))
    xattr = base64.b64encode(b"v").decode()
    ok = parse_blob_toc(make_blob({"version": 1, "entries": [reg("x", xattrs={"user.a": xattr})]}, PREFIX))
    assert ok.xattrs(ok.lookup("x") or 0) == {"user.a": b"v"}


def test_writer_refuses_truncated_tar() -> None:
    info = tarfile.TarInfo("big")
    data = bytes(range(256)) * 40
    info.size = len(data)
    tar = tar_bytes([(info, data)])
    for cut in (600, 512 + 5000, 9000):
        for src in (tar[:cut], gzip.compress(tar[:cut])):
            with pytest.raises(estargz.InputError, match=r"truncated|cannot read"):
                estargz.convert(io.BytesIO(src), io.BytesIO())
