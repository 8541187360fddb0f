"""The writer: a tar layer (plain, gzip or zstd) in, an eStargz or zstd:chunked blob out.

Layout (what upstream's converter writes and readers rely on): a new gzip member (zstd frame)
starts at offset 0, at the first payload byte of every non-empty regular file and at every
``chunk_size`` boundary inside it; the landmark file comes first (``.no.prefetch.landmark``), or
after the prioritized files (``.prefetch.landmark``); then, for gzip, the TOC member (tar entry
``stargz.index.json`` + end-of-archive) and the 51-byte footer; for zstd, the TOC in a skippable
frame and the 40-byte ``GnUlInUx`` footer frame. The gzip blob stays a valid tar.gz.

Memory: payloads of compressed input are spooled to an anonymous temp file (a plain, seekable
tar is read in place), and at most ``2 * workers + 1`` members
(each about ``chunk_size``) are held while a thread pool compresses them (zlib and zstd release
the GIL). What grows with the layer is the TOC itself: one small record per entry, as upstream.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from ._footer import estargz_footer, skippable_frame, zstd_chunked_footer
from ._parse import TOC_TAR_NAME
from .errors import InputError

__all__ = ["DEFAULT_CHUNK_SIZE", "ConvertResult", "convert", "convert_file"]

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_GZIP_LEVEL = 9
DEFAULT_ZSTD_LEVEL = 3
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_LANDMARK_CONTENT = b"\x0f"
_RESERVED = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME})
_BLOCK = 512
_COPY = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What a conversion produced; ``annotations()`` gives the layer descriptor annotations.

    Attributes:
        toc_digest: sha256 of the uncompressed TOC JSON (``stargz/toc.digest``).
        diff_id: sha256 of the uncompressed tar stream of the new blob (the image's diffID).
        uncompressed_size: bytes of that tar stream.
        blob_digest, blob_size: of the written blob.
        media_type: OCI layer media type of the blob.
        entries: TOC entries written (chunk entries included).
        manifest_checksum, manifest_position: zstd:chunked only (sha256 of the compressed TOC;
            ``offset:length:uncompressed_length:1``).
    """

    toc_digest: str
    diff_id: str
    uncompressed_size: int
    blob_digest: str
    blob_size: int
    media_type: str
    entries: int
    manifest_checksum: str | None = None
    manifest_position: str | None = None

    def annotations(self) -> dict[str, str]:
        out = {
            "containerd.io/snapshot/stargz/toc.digest": self.toc_digest,
            "io.containers.estargz.uncompressed-size": str(self.uncompressed_size),
        }
        if self.manifest_checksum and self.manifest_position:
            out["io.containers.zstd-chunked.manifest-checksum"] = self.manifest_checksum
            out["io.containers.zstd-chunked.manifest-position"] = self.manifest_position
        return out


@dataclass(slots=True)
class _Member:
    info: tarfile.TarInfo
    path: str  # cleaned, no trailing slash
    spool_offset: int


def convert(
    src: IO[bytes],
    dst: IO[bytes],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
    prioritized: Sequence[str] = (),
    zstd_chunked: bool = False,
    workers: int | None = None,
    tmpdir: str | None = None,
) -> ConvertResult:
    """Convert the tar layer read from ``src`` into an eStargz (or zstd:chunked) blob on ``dst``.

    Args:
        src: a tar stream, plain, gzip or zstd compressed (detected from its first bytes).
        dst: where the blob is written, sequentially.
        chunk_size: files larger than this are split into chunks of this size.
        level: gzip level (default 9, as upstream) or zstd level (default 3).
        prioritized: paths of regular files to put first, in access order, followed by
            ``.prefetch.landmark``; when empty, ``.no.prefetch.landmark`` comes first.
        workers: compression threads (default: CPU count).
        tmpdir: where payloads are spooled (default: the system temp dir).

    Raises:
        InputError: corrupt tar, names escaping the root, sparse files, or a prioritized path
            that is not a regular file of the layer.
    """
    if chunk_size < _BLOCK:
        raise ValueError(f"chunk_size must be at least {_BLOCK}")
    with tempfile.TemporaryFile(dir=tmpdir) as spool:
        members, payloads = _read_members(src, spool)
        order = _ordered(members, prioritized)
        writer = _BlobWriter(
            dst,
            payloads,
            chunk_size=chunk_size,
            zstd_chunked=zstd_chunked,
            level=_default_level(level, zstd_chunked),
            workers=workers or os.cpu_count() or 1,
        )
        return writer.write(order, landmark=PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK)


def _default_level(level: int | None, zstd_chunked: bool) -> int:
    if level is not None:
        return level
    return DEFAULT_ZSTD_LEVEL if zstd_chunked else DEFAULT_GZIP_LEVEL


# -- reading the input -----------------------------------------------------------------------------
def _open_input(src: IO[bytes]) -> IO[bytes]:
    head = _peek(src, 4)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]
    if head == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)  # type: ignore[no-any-return,unused-ignore]
    return src


def _peek(src: IO[bytes], n: int) -> bytes:
    if src.seekable():
        pos = src.tell()
        head = src.read(n)
        src.seek(pos)
        return head
    if isinstance(src, io.BufferedReader):
        return src.peek(n)[:n]
    raise InputError("input must be seekable or a buffered reader (to detect its compression)")


def _clean(name: str, what: str) -> str:
    if "\x00" in name:
        raise InputError(f"{what} {name!r} contains a NUL byte")
    if name.startswith("/") and name.strip("/"):
        raise InputError(f"{what} {name!r} is absolute")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise InputError(f"{what} {name!r} contains '..'")
    return "/".join(parts)


def _open_tar(stream: IO[bytes], random_access: bool) -> tarfile.TarFile:
    if random_access:
        return tarfile.open(fileobj=stream, mode="r:", encoding="utf-8", errors="surrogateescape")
    return tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape")


def _read_members(src: IO[bytes], spool: IO[bytes]) -> tuple[list[_Member], IO[bytes]]:
    """Index the input tar; returns its members and the file their payload offsets refer to.

    A plain, seekable tar is read in place (payload offsets are offsets in ``src``); compressed or
    streamed input has its payloads copied to ``spool``, since the writer may reorder them.
    """
    stream = _open_input(src)
    in_place = stream is src and src.seekable()
    members: list[_Member] = []
    try:
        with _open_tar(stream, in_place) as tar:
            for info in tar:
                if info.type not in _TYPES:
                    raise InputError(f"tar entry {info.name!r} has unsupported type {info.type!r} (sparse?)")
                path = _clean(info.name, "tar entry")
                if path in _RESERVED:
                    raise InputError(
                        f"tar entry {info.name!r} uses a name eStargz reserves at the layer root"
                    )
                offset = info.offset_data if in_place else spool.tell()
                if info.isreg() and info.size and not in_place:
                    f = tar.extractfile(info)
                    assert f is not None
                    shutil.copyfileobj(f, spool, _COPY)
                    if spool.tell() - offset != info.size:
                        raise InputError(f"tar entry {info.name!r} is truncated")
                members.append(_Member(info, path, offset))
                tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member otherwise
    except (tarfile.TarError, EOFError, zlib.error, OSError, zstandard.ZstdError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read the input tar: {exc}") from exc
    return members, src if in_place else spool


def _ordered(members: list[_Member], prioritized: Sequence[str]) -> list[_Member | None]:
    """Members in output order; None marks where the landmark goes."""
    if not prioritized:
        return [None, *members]
    by_path = {m.path: k for k, m in enumerate(members) if m.path}
    taken: set[int] = set()
    out: list[_Member | None] = []

    def take(k: int) -> None:
        if k not in taken:
            taken.add(k)
            out.append(members[k])

    for raw in prioritized:
        path = _clean(raw, "prioritized path")
        k = by_path.get(path)
        if k is None or not (members[k].info.isreg() or members[k].info.islnk()):
            raise InputError(f"prioritized path {raw!r} is not a regular file of the layer")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            d = by_path.get("/".join(parts[:depth]))
            if d is not None and d < k:
                take(d)
        if members[k].info.islnk():
            t = by_path.get(_clean(members[k].info.linkname, "hardlink target"))
            if t is not None:
                take(t)
        take(k)
    out.append(None)
    out.extend(m for k, m in enumerate(members) if k not in taken)
    return out


# -- writing ---------------------------------------------------------------------------------------
class _BlobWriter:
    def __init__(
        self,
        dst: IO[bytes],
        spool: IO[bytes],
        *,
        chunk_size: int,
        zstd_chunked: bool,
        level: int,
        workers: int,
    ) -> None:
        self.dst = dst
        self.spool = spool
        self.chunk_size = chunk_size
        self.zstd = zstd_chunked
        self.level = level
        self.workers = workers
        self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz-compress")
        self.inflight: deque[tuple[cf.Future[bytes], dict[str, Any] | None]] = deque()
        self.pending = bytearray()
        self.pending_owner: dict[str, Any] | None = None
        self.position = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.uncompressed = 0
        self.toc: list[dict[str, Any]] = []
        self.last_uname: dict[int, str] = {}
        self.last_gname: dict[int, str] = {}
        self._local = threading.local()

    # compression ---------------------------------------------------------------------------------
    def _compress(self, data: bytes) -> bytes:
        if self.zstd:
            c = getattr(self._local, "zstd", None)
            if c is None:
                c = self._local.zstd = zstandard.ZstdCompressor(level=self.level)
            return bytes(c.compress(data))
        z = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        return z.compress(data) + z.flush()

    def _emit(self, data: bytes | bytearray) -> None:
        self.diff_hash.update(data)
        self.uncompressed += len(data)
        self.pending += data

    def _cut(self) -> None:
        """End the current member: hand it to the pool; write finished members in order."""
        if not self.pending:
            return
        data = bytes(self.pending)
        self.pending.clear()
        self.inflight.append((self.pool.submit(self._compress, data), self.pending_owner))
        self.pending_owner = None
        while len(self.inflight) > 2 * self.workers:
            self._drain_one()

    def _drain_one(self) -> None:
        future, owner = self.inflight.popleft()
        if owner is not None:
            owner["offset"] = self.position
        self._write_raw(future.result())

    def _write_raw(self, data: bytes) -> None:
        self.dst.write(data)
        self.blob_hash.update(data)
        self.position += len(data)

    def _flush(self) -> None:
        self._cut()
        while self.inflight:
            self._drain_one()

    # entries -------------------------------------------------------------------------------------
    def write(self, order: Iterable[_Member | None], *, landmark: str) -> ConvertResult:
        try:
            for m in order:
                if m is None:
                    self._write_landmark(landmark)
                else:
                    self._write_member(m)
            self._flush()
            return self._finish()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _header(self, info: tarfile.TarInfo) -> None:
        try:
            self._emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        except ValueError as exc:
            raise InputError(f"tar entry {info.name!r} cannot be written: {exc}") from exc
        if len(self.pending) >= self.chunk_size:
            self._cut()  # bound a run of headers; readers ignore where header-only members end

    def _write_landmark(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size = 1
        info.mode = 0o644
        self._header(info)
        digest = "sha256:" + hashlib.sha256(_LANDMARK_CONTENT).hexdigest()
        entry = {"name": name, "type": "reg", "size": 1, "digest": digest, "chunkDigest": digest}
        self._payload(_LANDMARK_CONTENT, entry)
        self._emit(bytes(_BLOCK - 1))
        self.toc.append(entry)

    def _payload(self, data: bytes, owner: dict[str, Any]) -> None:
        self._cut()
        self.pending_owner = owner
        self._emit(data)

    def _write_member(self, m: _Member) -> None:
        info = m.info
        kind = _TYPES[info.type]
        entry: dict[str, Any] = {"name": m.path + "/" if kind == "dir" and m.path else m.path or "./"}
        entry["type"] = kind
        if kind == "reg" and info.size:
            entry["size"] = info.size
        if info.mtime:
            when = dt.datetime.fromtimestamp(int(info.mtime), dt.UTC)
            entry["modtime"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        if kind == "symlink":
            entry["linkName"] = info.linkname
        elif kind == "hardlink":
            entry["linkName"] = _clean(info.linkname, "hardlink target")
        entry["mode"] = info.mode & 0o7777
        if info.uid:
            entry["uid"] = info.uid
        if info.gid:
            entry["gid"] = info.gid
        if info.uname and self.last_uname.get(info.uid) != info.uname:
            entry["userName"] = self.last_uname[info.uid] = info.uname
        if info.gname and self.last_gname.get(info.gid) != info.gname:
            entry["groupName"] = self.last_gname[info.gid] = info.gname
        if kind in ("char", "block"):
            entry["devMajor"] = info.devmajor
            entry["devMinor"] = info.devminor
        xattrs = {
            k[len("SCHILY.xattr.") :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
            for k, v in info.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }
        if xattrs:
            entry["xattrs"] = xattrs
        self._header(info)
        if kind != "reg":
            self.toc.append(entry)
            return
        if not info.size:
            entry["digest"] = "sha256:" + hashlib.sha256(b"").hexdigest()
            self.toc.append(entry)
            return
        self._write_file(m, entry)

    def _write_file(self, m: _Member, entry: dict[str, Any]) -> None:
        size = m.info.size
        whole = hashlib.sha256()
        self.spool.seek(m.spool_offset)
        self.toc.append(entry)
        chunk_entry = entry
        for start in range(0, size, self.chunk_size):
            n = min(self.chunk_size, size - start)
            data = self.spool.read(n)
            if len(data) != n:
                raise InputError(f"payload of {m.path!r} is short: the input tar is truncated")
            if start:
                chunk_entry = {"name": m.path, "type": "chunk", "chunkOffset": start}
                self.toc.append(chunk_entry)
            if n < size - start:
                chunk_entry["chunkSize"] = n
            whole.update(data)
            chunk_entry["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
            self._payload(data, chunk_entry)
        entry["digest"] = "sha256:" + whole.hexdigest()
        pad = -size % _BLOCK
        if pad:
            self._emit(bytes(pad))
        if self.zstd:
            self._cut()  # as upstream: the headers that follow start a new frame

    # TOC and footer ------------------------------------------------------------------------------
    def _finish(self) -> ConvertResult:
        toc_json = _toc_json(self.toc)
        toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        checksum = position = None
        if self.zstd:
            compressed = zstandard.ZstdCompressor(level=self.level).compress(toc_json)
            toc_offset = self.position + 8
            self._write_raw(skippable_frame(compressed))
            self._write_raw(zstd_chunked_footer(toc_offset, len(compressed), len(toc_json)))
            checksum = "sha256:" + hashlib.sha256(compressed).hexdigest()
            position = f"{toc_offset}:{len(compressed)}:{len(toc_json)}:1"
            media_type = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            info = tarfile.TarInfo(TOC_TAR_NAME)
            info.size = len(toc_json)
            tail = info.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % _BLOCK + 2 * _BLOCK)
            self._emit(tail)
            toc_offset = self.position
            data = bytes(self.pending)
            self.pending.clear()
            self._write_raw(self._compress(data))
            self._write_raw(estargz_footer(toc_offset))
            media_type = "application/vnd.oci.image.layer.v1.tar+gzip"
        return ConvertResult(
            toc_digest=toc_digest,
            diff_id="sha256:" + self.diff_hash.hexdigest(),
            uncompressed_size=self.uncompressed,
            blob_digest="sha256:" + self.blob_hash.hexdigest(),
            blob_size=self.position,
            media_type=media_type,
            entries=len(self.toc),
            manifest_checksum=checksum,
            manifest_position=position,
        )


def _toc_json(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}, indent="\t", ensure_ascii=False).encode()


def convert_file(src_path: str, dst_path: str, **options: Any) -> ConvertResult:
    """:func:`convert` between two files (the destination is written to a temp name, then renamed)."""
    tmp = dst_path + ".tmp"
    try:
        with open(src_path, "rb") as src, open(tmp, "wb") as dst:
            result = convert(src, dst, **options)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result
