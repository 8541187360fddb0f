"""Turn TOC JSON into the compact :class:`TOC` index, validating everything on the way.

The JSON is walked one entry at a time (``json.JSONDecoder.raw_decode`` over the top-level
``entries`` array), so the parsed form of the whole document never exists in memory: peak memory
is the JSON text plus the arrays being filled.

Decisions (documented in ``estargz/__init__.py``):

* names are cleaned (``./`` and empty components dropped); ``..``, absolute names, NUL bytes,
  components over 255 bytes and paths over 4096 bytes are refused;
* a duplicate name replaces the earlier entry (tar semantics, as upstream's reader does), except
  that a directory and a non-directory may not replace each other (refused); a repeated
  directory keeps its children and takes the later metadata;
* a hardlink must name an earlier, non-directory entry; it is resolved once to the entry holding
  the data, so cycles cannot form;
* ``.prefetch.landmark``, ``.no.prefetch.landmark`` and ``stargz.index.json`` at the layer root
  are kept in the chunk order (their offsets bound other chunks) but hidden from the tree.
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import re
from array import array
from collections.abc import Callable
from typing import Any

from ._chunks import Codec
from ._footer import Footer
from ._toc import CHUNK_HOLE, ROOT, TOC, EntryType
from .errors import TOCError

__all__ = ["DEFAULT_MAX_CHUNK_SIZE", "DEFAULT_MAX_ENTRIES", "index_toc_json"]

DEFAULT_MAX_ENTRIES = 4_000_000
DEFAULT_MAX_CHUNK_SIZE = 256 << 20
_MAX_PATH = 4096
_MAX_NAME = 255
_MAX_U32 = (1 << 32) - 1
_MAX_U63 = (1 << 63) - 1
_HIDDEN_AT_ROOT = frozenset({".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"})
_TYPES = {
    "dir": EntryType.DIR,
    "reg": EntryType.REG,
    "symlink": EntryType.SYMLINK,
    "hardlink": EntryType.HARDLINK,
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "fifo": EntryType.FIFO,
}
_WS = re.compile(r"[ \t\n\r]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NO_DIGEST = bytes(32)


def _reject(*_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject)


def _walk_json(text: str, on_entry: Callable[[Any], None]) -> dict[str, Any]:
    """Call ``on_entry`` for each element of the top-level ``entries``; return the other keys."""
    decode = _DECODER.raw_decode
    ws = _WS.match
    top: dict[str, Any] = {}
    seen_entries = False

    def expect(pos: int, char: str, where: str) -> int:
        pos = ws(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != char:
            raise TOCError(f"TOC JSON: expected {char!r} {where} at character {pos}")
        return pos + 1

    pos = expect(0, "{", "at the start")
    pos = ws(text, pos).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            key, pos = decode(text, ws(text, pos).end())  # type: ignore[union-attr]
            if not isinstance(key, str):
                raise TOCError(f"TOC JSON: object key at character {pos} is not a string")
            pos = expect(pos, ":", f"after key {key!r}")
            pos = ws(text, pos).end()  # type: ignore[union-attr]
            if key == "entries":
                if seen_entries:
                    raise TOCError("TOC JSON has two 'entries' keys")
                seen_entries = True
                pos = expect(pos, "[", "to open 'entries'")
                pos = ws(text, pos).end()  # type: ignore[union-attr]
                if text[pos : pos + 1] == "]":
                    pos += 1
                else:
                    while True:
                        value, pos = decode(text, pos)
                        on_entry(value)
                        pos = ws(text, pos).end()  # type: ignore[union-attr]
                        sep = text[pos : pos + 1]
                        pos = ws(text, pos + 1).end()  # type: ignore[union-attr]
                        if sep == "]":
                            break
                        if sep != ",":
                            raise TOCError(f"TOC JSON: expected ',' or ']' in 'entries' at character {pos}")
            else:
                if key in top:
                    raise TOCError(f"TOC JSON has two {key!r} keys")
                top[key], pos = decode(text, pos)
            pos = ws(text, pos).end()  # type: ignore[union-attr]
            sep = text[pos : pos + 1]
            pos += 1
            if sep == "}":
                break
            if sep != ",":
                raise TOCError(f"TOC JSON: expected ',' or '}}' at character {pos - 1}")
    if ws(text, pos).end() != len(text):  # type: ignore[union-attr]
        raise TOCError(f"TOC JSON: trailing data after character {pos}")
    if not seen_entries:
        raise TOCError("TOC JSON has no 'entries' array")
    return top


def _parse_time(value: str) -> tuple[int, int]:
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise ValueError(f"modtime {value!r} is not RFC 3339")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    frac = m.group(7) or ""
    if m.group(8):
        offset = 0
    else:
        sign = -1 if m.group(9) == "-" else 1
        offset = sign * (int(m.group(10)) * 3600 + int(m.group(11)) * 60)
    if second == 60:
        second = 59
    when = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    seconds = (when - _EPOCH) // dt.timedelta(seconds=1) - offset
    return seconds, int(frac.ljust(9, "0")) if frac else 0


def _digest_bytes(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("sha256:") or not _HEX64.fullmatch(value, 7):
        raise ValueError(f"{field} {value!r} is not sha256:<64 lowercase hex>")
    raw = bytes.fromhex(value[7:])
    if raw == _NO_DIGEST:
        raise ValueError(f"{field} is the all-zero digest")
    return raw


def _clean(name: object, field: str) -> list[str]:
    if not isinstance(name, str):
        raise ValueError(f"{field} is not a string")
    if "\x00" in name:
        raise ValueError(f"{field} {name!r} contains a NUL byte")
    if name.startswith("/") and name.strip("/"):
        raise ValueError(f"{field} {name!r} is absolute")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"{field} {name!r} contains '..'")
    if len(name.encode("utf-8")) > _MAX_PATH:
        raise ValueError(f"{field} is longer than {_MAX_PATH} bytes")
    for p in parts:
        if len(p.encode("utf-8")) > _MAX_NAME:
            raise ValueError(f"{field} has a component longer than {_MAX_NAME} bytes")
    return parts


class _Builder:
    """Accumulates entries into the arrays of a :class:`TOC`."""

    def __init__(self, toc_offset: int, max_entries: int, max_chunk_size: int) -> None:
        self.toc_offset = toc_offset
        self.max_entries = max_entries
        self.max_chunk_size = max_chunk_size
        self.type = array("B")
        self.mode = array("H")
        self.uid = array("I")
        self.gid = array("I")
        self.uname = array("i")
        self.gname = array("i")
        self.size = array("Q")
        self.mtime = array("q")
        self.mtime_nsec = array("I")
        self.dev = array("I")
        self.parent = array("i")
        self.link = array("i")
        self.names: list[str] = []
        self.link_off = array("Q", [0])
        self.link_parts: list[bytes] = []
        self.link_len = 0
        self.digest = bytearray()
        self.xattrs: dict[int, tuple[tuple[str, bytes], ...]] = {}
        self.hardlinks: dict[int, int] = {}
        self.chunk_start = array("I")
        self.c_file_off = array("Q")
        self.c_size = array("Q")
        self.c_off = array("Q")
        self.c_end = array("Q")
        self.c_inner = array("Q")
        self.c_flags = array("B")
        self.c_digest = bytearray()
        self.by_path: dict[str, int] = {"": ROOT}
        self.live = bytearray()
        self.owner_names: list[str] = []
        self.owner_ids: dict[str, int] = {}
        self.uname_by_uid: dict[int, int] = {}
        self.gname_by_gid: dict[int, int] = {}
        self.time_cache: dict[str, tuple[int, int]] = {}
        self.hidden: dict[str, int] = {}
        self.current_file = -1  # entry that following ``chunk`` entries belong to
        self.current_end = 0  # file offset the next chunk must start at
        self.n_json = 0
        self.has_chunk_entries = False
        self.chunk_digest_missing: list[int] = []  # chunk index needing the file digest
        self._new(EntryType.DIR, "", ROOT, 0o755)

    # -- entries -------------------------------------------------------------------------------
    def _new(self, kind: EntryType, name: str, parent: int, mode: int) -> int:
        i = len(self.type)
        if i >= self.max_entries:
            raise TOCError(f"TOC has more than {self.max_entries} entries")
        self.type.append(kind)
        self.mode.append(mode)
        self.uid.append(0)
        self.gid.append(0)
        self.uname.append(-1)
        self.gname.append(-1)
        self.size.append(0)
        self.mtime.append(0)
        self.mtime_nsec.append(0)
        self.dev.append(0)
        self.dev.append(0)
        self.parent.append(parent)
        self.link.append(-1)
        self.names.append(name)
        self.link_off.append(self.link_len)
        self.digest += _NO_DIGEST
        self.chunk_start.append(len(self.c_off))
        self.live.append(1)
        return i

    def _owner(self, name: str) -> int:
        k = self.owner_ids.get(name)
        if k is None:
            k = self.owner_ids[name] = len(self.owner_names)
            self.owner_names.append(name)
        return k

    def _dir_for(self, parts: list[str]) -> int:
        """Index of the directory holding ``parts``, creating missing ones (mode 0755)."""
        parent = ROOT
        path = ""
        for p in parts:
            path = f"{path}/{p}" if path else p
            i = self.by_path.get(path)
            if i is None:
                i = self._new(EntryType.DIR, p, parent, 0o755)
                self.by_path[path] = i
            elif self.type[i] != EntryType.DIR:
                raise ValueError(f"parent {path!r} is a {EntryType(self.type[i]).label}, not a directory")
            parent = i
        return parent

    def add(self, e: object) -> None:
        n = self.n_json
        self.n_json += 1
        if not isinstance(e, dict):
            raise TOCError(f"TOC entry {n} is not a JSON object")
        try:
            self._add(e)
        except ValueError as exc:
            raise TOCError(f"TOC entry {n} ({str(e.get('name'))[:200]!r}): {exc}") from None

    def _add(self, e: dict[str, Any]) -> None:
        kind_name = e.get("type")
        parts = _clean(e.get("name"), "name")
        if kind_name == "chunk":
            self._add_chunk(e, "/".join(parts))
            return
        kind = _TYPES.get(kind_name)  # type: ignore[arg-type]
        if kind is None:
            raise ValueError(f"unknown type {kind_name!r}")
        if self.current_file >= 0:
            self._check_file_complete(self.current_file)
        self.current_file = -1
        path = "/".join(parts)
        mode = _uint(e, "mode", _MAX_U63) & 0o7777
        if not parts:
            if kind != EntryType.DIR:
                raise ValueError("the layer root must be a directory")
            self._fill(ROOT, e, kind, mode)
            return
        parent = self._dir_for(parts[:-1])
        old = self.by_path.get(path)
        if old is not None:
            old_is_dir = self.type[old] == EntryType.DIR
            if old_is_dir != (kind == EntryType.DIR):
                raise ValueError(
                    f"duplicate name turns a {EntryType(self.type[old]).label} into a {kind.label}"
                )
            if old_is_dir:
                self._fill(old, e, kind, mode)
                return
            self.live[old] = 0
        i = self._new(kind, parts[-1], parent, mode)
        self.by_path[path] = i
        if parent == ROOT and parts[-1] in _HIDDEN_AT_ROOT:
            self.hidden[parts[-1]] = i
            self.live[i] = 0
        self._fill(i, e, kind, mode)

    def _fill(self, i: int, e: dict[str, Any], kind: EntryType, mode: int) -> None:
        self.mode[i] = mode
        uid = self.uid[i] = _uint(e, "uid", _MAX_U32)
        gid = self.gid[i] = _uint(e, "gid", _MAX_U32)
        uname = e.get("userName")
        if uname:
            if not isinstance(uname, str):
                raise ValueError("userName is not a string")
            self.uname_by_uid[uid] = self._owner(uname)
        self.uname[i] = self.uname_by_uid.get(uid, -1)
        gname = e.get("groupName")
        if gname:
            if not isinstance(gname, str):
                raise ValueError("groupName is not a string")
            self.gname_by_gid[gid] = self._owner(gname)
        self.gname[i] = self.gname_by_gid.get(gid, -1)
        modtime = e.get("modtime")
        if modtime:
            if not isinstance(modtime, str):
                raise ValueError("modtime is not a string")
            t = self.time_cache.get(modtime)
            if t is None:
                t = self.time_cache[modtime] = _parse_time(modtime)
            self.mtime[i], self.mtime_nsec[i] = t
        xattrs = e.get("xattrs")
        if xattrs:
            self.xattrs[i] = _xattrs(xattrs)
        if kind == EntryType.REG:
            self._fill_reg(i, e)
        elif kind == EntryType.SYMLINK:
            target = e.get("linkName")
            if not isinstance(target, str) or not target or "\x00" in target:
                raise ValueError("symlink has no valid linkName")
            self._set_link(i, target)
        elif kind == EntryType.HARDLINK:
            parts = _clean(e.get("linkName"), "linkName")
            target_path = "/".join(parts)
            found = self.by_path.get(target_path)
            if found is None or found == i:
                raise ValueError(f"hardlink target {target_path!r} is not an earlier entry")
            target = self.link[found] if self.link[found] >= 0 else found
            if self.type[target] == EntryType.DIR:
                raise ValueError(f"hardlink target {target_path!r} is a directory")
            self.link[i] = target
            self.hardlinks[target] = self.hardlinks.get(target, 0) + 1
            self._set_link(i, target_path)
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            self.dev[2 * i] = _uint(e, "devMajor", _MAX_U32)
            self.dev[2 * i + 1] = _uint(e, "devMinor", _MAX_U32)

    def _set_link(self, i: int, target: str) -> None:
        if i != len(self.type) - 1:
            raise ValueError("a link may not redefine an existing directory")
        raw = target.encode("utf-8")
        if len(raw) > _MAX_PATH:
            raise ValueError(f"linkName is longer than {_MAX_PATH} bytes")
        self.link_parts.append(raw)
        self.link_len += len(raw)
        self.link_off[i + 1] = self.link_len

    def _fill_reg(self, i: int, e: dict[str, Any]) -> None:
        size = self.size[i] = _uint(e, "size", _MAX_U63)
        if "digest" in e:
            self.digest[32 * i : 32 * i + 32] = _digest_bytes(e["digest"], "digest")
        self.current_file = i
        self.current_end = 0
        if size:
            self._add_chunk_record(i, e)

    def _add_chunk(self, e: dict[str, Any], path: str) -> None:
        self.has_chunk_entries = True
        i = self.current_file
        if i < 0:
            raise ValueError("chunk entry does not follow a regular file")
        if self.by_path.get(path) != i:
            raise ValueError("chunk entry name differs from the file it follows")
        self._add_chunk_record(i, e)

    def _add_chunk_record(self, i: int, e: dict[str, Any]) -> None:
        size = self.size[i]
        file_off = _uint(e, "chunkOffset", _MAX_U63)
        if file_off != self.current_end or file_off >= size:
            raise ValueError(
                f"chunkOffset {file_off} does not continue the file at {self.current_end} (file size {size})"
            )
        csize = _uint(e, "chunkSize", _MAX_U63) or size - file_off
        if csize > size - file_off:
            raise ValueError(f"chunkSize {csize} runs past the file size {size}")
        if csize > self.max_chunk_size:
            raise ValueError(f"chunk of {csize} bytes exceeds the {self.max_chunk_size}-byte limit")
        self.current_end = file_off + csize
        hole = e.get("chunkType") == "zeros"
        offset = _uint(e, "offset", _MAX_U63)
        inner = _uint(e, "innerOffset", _MAX_U63)
        end = _uint(e, "endOffset", _MAX_U63)
        if hole:
            offset = end = inner = 0
        else:
            if e.get("chunkType") not in (None, ""):
                raise ValueError(f"unknown chunkType {e.get('chunkType')!r}")
            if offset == 0 and inner == 0:
                raise ValueError("non-empty payload has no offset")
            if offset >= self.toc_offset:
                raise ValueError(f"offset {offset} is not below the TOC offset {self.toc_offset}")
            if end and not offset < end <= self.toc_offset:
                raise ValueError(f"endOffset {end} is not in ({offset}, {self.toc_offset}]")
        self.c_file_off.append(file_off)
        self.c_size.append(csize)
        self.c_off.append(offset)
        self.c_end.append(end)
        self.c_inner.append(inner)
        self.c_flags.append(CHUNK_HOLE if hole else 0)
        if "chunkDigest" in e:
            self.c_digest += _digest_bytes(e["chunkDigest"], "chunkDigest")
        else:
            self.c_digest += _NO_DIGEST
            self.chunk_digest_missing.append(len(self.c_off) - 1)

    # -- finish ---------------------------------------------------------------------------------
    def finish(self) -> TOC:
        if self.current_file >= 0:
            self._check_file_complete(self.current_file)
        n = len(self.type)
        toc = TOC()
        # A file's chunks are appended right after the file entry is created (chunk entries
        # must follow their file), so entry i owns chunks [chunk_start[i], chunk_start[i + 1]).
        self.chunk_start.append(len(self.c_off))
        toc._chunk_start = self.chunk_start
        self._compute_ends()
        self._fill_missing_chunk_digests()
        names = [s.encode("utf-8") for s in self.names]
        name_off = array("Q", [0])
        total = 0
        for b in names:
            total += len(b)
            name_off.append(total)
        toc._name_blob = b"".join(names)
        toc._name_off = name_off
        # children, sorted by UTF-8 name (code point order equals UTF-8 byte order)
        live_kids = sorted(
            (i for i in range(1, n) if self.live[i]), key=lambda i: (self.parent[i], self.names[i])
        )
        child_list = array("I", live_kids)
        child_start = array("I", bytes(4 * (n + 1)))
        counts = array("I", bytes(4 * n))
        for i in live_kids:
            counts[self.parent[i]] += 1
        acc = 0
        for i in range(n):
            child_start[i] = acc
            acc += counts[i]
        child_start[n] = acc
        toc._child_list = child_list
        toc._child_start = child_start
        toc._type, toc._mode, toc._uid, toc._gid = self.type, self.mode, self.uid, self.gid
        toc._uname, toc._gname, toc._owner_names = self.uname, self.gname, self.owner_names
        toc._size, toc._mtime, toc._mtime_nsec = self.size, self.mtime, self.mtime_nsec
        toc._dev, toc._parent, toc._link = self.dev, self.parent, self.link
        toc._hardlinks = {t: c for t, c in self.hardlinks.items()}
        toc._link_off, toc._link_blob = self.link_off, b"".join(self.link_parts)
        toc._digest = bytes(self.digest)
        toc._xattrs = self.xattrs
        toc._chunk_file_off, toc._chunk_size = self.c_file_off, self.c_size
        toc._chunk_off, toc._chunk_end, toc._chunk_inner = self.c_off, self.c_end, self.c_inner
        toc._chunk_flags, toc._chunk_digest = self.c_flags, bytes(self.c_digest)
        landmark = self.hidden.get(".prefetch.landmark")
        toc.prefetch_landmark_offset = None
        if landmark is not None and self.chunk_start[landmark + 1] > self.chunk_start[landmark]:
            toc.prefetch_landmark_offset = self.c_off[self.chunk_start[landmark]]
        toc.no_prefetch_landmark = ".no.prefetch.landmark" in self.hidden
        return toc

    def _check_file_complete(self, i: int) -> None:
        if self.current_end != self.size[i] and self.size[i]:
            raise TOCError(
                f"TOC file {self.names[i]!r}: chunks cover {self.current_end} of {self.size[i]} bytes"
            )

    def _compute_ends(self) -> None:
        """Give each chunk its compressed extent; check that payloads are in blob order."""
        off, inner, end, flags = self.c_off, self.c_inner, self.c_end, self.c_flags
        prev = (-1, -1)
        for k in range(len(off)):
            if flags[k] & CHUNK_HOLE:
                continue
            cur = (off[k], inner[k])
            if cur <= prev:
                raise TOCError(
                    f"TOC chunk {k}: offset {off[k]} (inner {inner[k]}) does not follow the previous "
                    f"payload at {prev[0]} (inner {prev[1]}): payloads overlap or are out of order"
                )
            prev = cur
        nxt = self.toc_offset
        cur_end = self.toc_offset
        for k in range(len(off) - 1, -1, -1):
            if flags[k] & CHUNK_HOLE:
                continue
            o = off[k]
            if o < nxt:
                cur_end = nxt
                nxt = o
            if end[k] == 0:
                end[k] = cur_end
            elif end[k] > cur_end:
                raise TOCError(f"TOC chunk {k}: endOffset {end[k]} overlaps the next payload at {cur_end}")

    def _fill_missing_chunk_digests(self) -> None:
        """Unchunked files without chunkDigest are verified by their file digest (as upstream)."""
        if not self.chunk_digest_missing:
            return
        starts = self.chunk_start
        owner = {starts[i]: i for i in range(len(self.type)) if starts[i + 1] - starts[i] == 1}
        for k in self.chunk_digest_missing:
            i = owner.get(k)
            if i is not None and not self.has_chunk_entries:
                self.c_digest[32 * k : 32 * k + 32] = self.digest[32 * i : 32 * i + 32]
            elif self.has_chunk_entries:
                raise TOCError(
                    f"TOC chunk {k}: no chunkDigest, but the TOC has chunk entries "
                    "(then every chunk must have one)"
                )


def _uint(e: dict[str, Any], key: str, limit: int) -> int:
    v = e.get(key, 0)
    if type(v) is not int or v < 0 or v > limit:
        raise ValueError(f"{key} {v!r} is not an integer in [0, {limit}]")
    return v


def _xattrs(raw: object) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(raw, dict):
        raise ValueError("xattrs is not an object")
    out = []
    for k, v in raw.items():
        if not k or "\x00" in k or len(k) > 255 or not isinstance(v, str):
            raise ValueError(f"xattr {k[:64]!r} has an invalid name or a non-string value")
        try:
            out.append((k, binascii.a2b_base64(v, strict_mode=True)))
        except binascii.Error as exc:
            raise ValueError(f"xattr {k!r} is not valid base64: {exc}") from None
    return tuple(sorted(out))


def index_toc_json(
    data: bytes,
    footer: Footer,
    *,
    codec: Codec,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
) -> tuple[TOC, dict[str, Any]]:
    """Index the uncompressed TOC JSON; returns the index and the other top-level keys.

    ``digest``/``manifest_checksum``/``json_size`` are left for the caller to set.

    Raises:
        TOCError: malformed JSON, wrong version, or any entry that breaks the rules above.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TOCError(f"TOC JSON is not valid UTF-8: {exc}") from None
    builder = _Builder(footer.toc_offset, max_entries, max_chunk_size)
    try:
        top = _walk_json(text, builder.add)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        if isinstance(exc, TOCError):
            raise
        raise TOCError(f"TOC JSON is malformed: {exc}") from None
    version = top.get("version")
    if version != 1 or type(version) is not int:
        raise TOCError(f"TOC version {version!r} is not supported (only 1)")
    split = top.get("tarSplitDigest")
    toc = builder.finish()
    toc.footer = footer
    toc.codec = codec
    toc.tar_split_digest = split if isinstance(split, str) else None
    return toc, top
