"""Blob footers: find the TOC from the last bytes of an eStargz or zstd:chunked blob.

Layouts (all integers little-endian):

* eStargz, 51 bytes: an empty gzip member whose header has FEXTRA, XLEN 26, one subfield
  ``SG`` of 22 bytes = the TOC offset as 16 lowercase hex digits + ``STARGZ``.
* legacy stargz (CRFS), 47 bytes: the same member with XLEN 22 and no subfield wrapper.
* external TOC, 46 bytes: XLEN 21, subfield ``SG`` of 17 bytes = ``STARGZEXTERNALTOC``; the
  blob holds no TOC.
* zstd:chunked as written by stargz-snapshotter, 40-byte payload of a zstd skippable frame:
  TOC offset, compressed length, uncompressed length, manifest type, magic ``GnUlInUx``.
* zstd:chunked as written by containers/storage, 64-byte payload: the four fields above,
  then tar-split offset, compressed length, uncompressed length, magic ``GNUlInUx``.

For zstd footers ``Footer.size`` is the payload size; its 8-byte skippable-frame header sits just
before it and is not counted (containers/storage reads only the payload too).
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from .errors import FooterError

__all__ = [
    "ESTARGZ_FOOTER_SIZE",
    "MAX_FOOTER_SIZE",
    "Footer",
    "FooterKind",
    "estargz_footer",
    "parse_footer",
    "zstd_chunked_footer",
]

MAX_FOOTER_SIZE = 64
ESTARGZ_FOOTER_SIZE = 51
_LEGACY_SIZE = 47
_EXTERNAL_SIZE = 46
_ZSTD_V1_SIZE = 40
_ZSTD_V2_SIZE = 64
_ZSTD_V1_MAGIC = b"GnUlInUx"
_ZSTD_V2_MAGIC = b"GNUlInUx"
_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
_SKIPPABLE_HEADER = 8
_MANIFEST_TYPE_CRFS = 1
_GZIP_FEXTRA_PREFIX = b"\x1f\x8b\x08\x04"


class FooterKind(enum.Enum):
    """Which footer a blob ends with."""

    ESTARGZ = "estargz"
    LEGACY_STARGZ = "legacy-stargz"
    EXTERNAL_TOC = "external-toc"
    ZSTD_CHUNKED = "zstd:chunked"
    ZSTD_CHUNKED_V2 = "zstd:chunked-v2"

    @property
    def is_zstd(self) -> bool:
        return self in (FooterKind.ZSTD_CHUNKED, FooterKind.ZSTD_CHUNKED_V2)


@dataclass(frozen=True, slots=True)
class Footer:
    """Where the TOC is, as the footer says (already checked against the blob size).

    Attributes:
        kind: the footer variant.
        size: footer bytes at the end of the blob (zstd: payload only, see module docstring).
        toc_offset: blob offset of the compressed TOC (gzip member, or zstd frame after the
            skippable header). 0 for EXTERNAL_TOC.
        toc_end: blob offset where the compressed TOC ends; ``parse_toc`` wants
            ``blob[toc_offset:toc_end]``. 0 for EXTERNAL_TOC.
        toc_uncompressed_size: the JSON size the zstd footer declares; None for gzip kinds
            (the size is in the TOC's tar header).
        tar_split_offset, tar_split_size, tar_split_uncompressed_size: the tar-split frame of
            ZSTD_CHUNKED_V2 (payload after its skippable header); None otherwise.
    """

    kind: FooterKind
    size: int
    toc_offset: int
    toc_end: int
    toc_uncompressed_size: int | None = None
    tar_split_offset: int | None = None
    tar_split_size: int | None = None
    tar_split_uncompressed_size: int | None = None

    @property
    def needs_external_toc(self) -> bool:
        return self.kind is FooterKind.EXTERNAL_TOC


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from ``tail`` = the last ``min(blob_size, MAX_FOOTER_SIZE)`` blob bytes.

    Tries eStargz (51), legacy stargz (47), external TOC (46), zstd:chunked v2 (64) and v1
    (40), as upstream does, and returns the first that parses and fits in the blob.

    Raises:
        FooterError: no known footer, or its offsets point outside the blob.
    """
    if blob_size < 0 or len(tail) != min(blob_size, MAX_FOOTER_SIZE):
        raise FooterError(
            f"tail must be the last min(blob_size, {MAX_FOOTER_SIZE}) bytes: got {len(tail)} bytes "
            f"for a {blob_size}-byte blob"
        )
    problems: list[str] = []
    for parse in (_parse_gzip, _parse_zstd):
        footer = parse(tail, blob_size, problems)
        if footer is not None:
            return footer
    detail = "; ".join(problems) if problems else "no eStargz, stargz or zstd:chunked footer magic"
    raise FooterError(f"blob of {blob_size} bytes has no valid footer: {detail}")


def _parse_gzip(tail: bytes, blob_size: int, problems: list[str]) -> Footer | None:
    for size in (ESTARGZ_FOOTER_SIZE, _LEGACY_SIZE, _EXTERNAL_SIZE):
        if len(tail) < size:
            continue
        raw = tail[-size:]
        if not raw.startswith(_GZIP_FEXTRA_PREFIX):
            continue
        (xlen,) = struct.unpack_from("<H", raw, 10)
        extra = raw[12 : 12 + xlen]
        if size == ESTARGZ_FOOTER_SIZE and xlen == 26 and extra[:4] == b"SG\x16\x00":
            kind, payload = FooterKind.ESTARGZ, extra[4:]
        elif size == _LEGACY_SIZE and xlen == 22:
            kind, payload = FooterKind.LEGACY_STARGZ, extra
        elif size == _EXTERNAL_SIZE and xlen == 21 and extra == b"SG\x11\x00STARGZEXTERNALTOC":
            kind, payload = FooterKind.EXTERNAL_TOC, b""
        else:
            continue
        if not _is_empty_gzip_member(raw):
            problems.append(f"{kind.value} footer is not an empty gzip member")
            continue
        if kind is FooterKind.EXTERNAL_TOC:
            return Footer(kind=kind, size=size, toc_offset=0, toc_end=0)
        if len(payload) != 22 or payload[16:] != b"STARGZ":
            problems.append(f"{kind.value} footer extra field lacks the STARGZ magic")
            continue
        hex_offset = payload[:16]
        if not all(c in b"0123456789abcdef" for c in hex_offset):
            problems.append(f"{kind.value} footer TOC offset {hex_offset!r} is not 16 lowercase hex digits")
            continue
        toc_offset = int(hex_offset, 16)
        toc_end = blob_size - size
        if toc_offset >= toc_end:
            problems.append(
                f"{kind.value} footer TOC offset {toc_offset} is not below the footer start {toc_end}"
            )
            continue
        return Footer(kind=kind, size=size, toc_offset=toc_offset, toc_end=toc_end)
    return None


def _is_empty_gzip_member(raw: bytes) -> bool:
    decoder = zlib.decompressobj(wbits=31)
    try:
        out = decoder.decompress(raw, 1)
    except zlib.error:
        return False
    return out == b"" and decoder.eof and decoder.unused_data == b""


def _parse_zstd(tail: bytes, blob_size: int, problems: list[str]) -> Footer | None:
    for size, magic, kind in (
        (_ZSTD_V2_SIZE, _ZSTD_V2_MAGIC, FooterKind.ZSTD_CHUNKED_V2),
        (_ZSTD_V1_SIZE, _ZSTD_V1_MAGIC, FooterKind.ZSTD_CHUNKED),
    ):
        if len(tail) < size or tail[-8:] != magic:
            continue
        raw = tail[-size:]
        offset, length, uncompressed, manifest_type = struct.unpack_from("<4Q", raw, 0)
        if manifest_type != _MANIFEST_TYPE_CRFS:
            problems.append(f"{kind.value} footer manifest type {manifest_type} is not 1 (CRFS TOC)")
            return None
        limit = blob_size - size - _SKIPPABLE_HEADER
        split: tuple[int, int, int] | None = None
        if kind is FooterKind.ZSTD_CHUNKED_V2:
            split = struct.unpack_from("<3Q", raw, 32)
            s_off, s_len, _ = split
            if s_len and (s_off < _SKIPPABLE_HEADER or s_off > limit or s_len > limit - s_off):
                problems.append(f"{kind.value} footer tar-split range {s_off}+{s_len} is outside the blob")
                return None
        if offset < _SKIPPABLE_HEADER or offset > limit or length == 0 or length > limit - offset:
            problems.append(
                f"{kind.value} footer TOC range offset {offset} length {length} is outside the "
                f"{blob_size}-byte blob"
            )
            return None
        return Footer(
            kind=kind,
            size=size,
            toc_offset=offset,
            toc_end=offset + length,
            toc_uncompressed_size=uncompressed,
            tar_split_offset=split[0] if split else None,
            tar_split_size=split[1] if split else None,
            tar_split_uncompressed_size=split[2] if split else None,
        )
    return None


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at ``toc_offset``."""
    extra = b"SG" + struct.pack("<H", 22) + b"%016xSTARGZ" % toc_offset
    header = _GZIP_FEXTRA_PREFIX + b"\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    return header + b"\x01\x00\x00\xff\xff" + b"\x00" * 8


def zstd_chunked_footer(toc_offset: int, compressed: int, uncompressed: int) -> bytes:
    """The stargz-snapshotter zstd:chunked footer frame (skippable header + 40-byte payload)."""
    payload = struct.pack("<4Q", toc_offset, compressed, uncompressed, _MANIFEST_TYPE_CRFS) + _ZSTD_V1_MAGIC
    return skippable_frame(payload)


def skippable_frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in a zstd skippable frame (plain zstd decoders skip it)."""
    return _SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload
