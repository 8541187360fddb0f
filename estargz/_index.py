"""Turn TOC JSON into the compact :class:`TOC` index, validating everything on the way.

The JSON is walked one entry at a time (``json.JSONDecoder.raw_decode`` over the top-level
``entries`` array) as it is decompressed, so neither the parsed form of the document nor its
whole text ever exists in memory: peak memory is a window of the text, the arrays being filled
and the path map of the entries.

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

import gc
from array import array
from collections.abc import Iterable, Iterator
from itertools import accumulate, compress, islice
from operator import lt
from typing import Any

from ._chunks import Codec
from ._fields import (
    MAX_PATH,
    MAX_U32,
    MAX_U63,
    NO_DIGEST,
    clean,
    digest_bytes,
    parse_time,
    parse_xattrs,
    uint,
    walk_json_pieces,
    within_limits,
)
from ._footer import Footer
from ._toc import CHUNK_HOLE, ROOT, TOC, EntryType
from .errors import TOCError

__all__ = [
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_ENTRIES",
    "decode_toc_json",
    "index_toc_json",
    "index_toc_pieces",
    "index_toc_text",
]

DEFAULT_MAX_ENTRIES = 4_000_000
DEFAULT_MAX_CHUNK_SIZE = 256 << 20
_HIDDEN_AT_ROOT = frozenset({".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"})
# Plain ints for the hot paths: comparing with (and looking up) IntEnum members costs ~10x more.
_DIR, _REG, _SYMLINK, _HARDLINK, _CHAR, _BLOCK = (
    int(EntryType.DIR),
    int(EntryType.REG),
    int(EntryType.SYMLINK),
    int(EntryType.HARDLINK),
    int(EntryType.CHAR),
    int(EntryType.BLOCK),
)
_TYPES = {
    "dir": EntryType.DIR,
    "reg": EntryType.REG,
    "symlink": EntryType.SYMLINK,
    "hardlink": EntryType.HARDLINK,
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "fifo": EntryType.FIFO,
}


# The entry columns of the builder (and of the TOC it becomes), by array typecode.
_TYPE, _MODE, _UID, _GID, _UNAME, _GNAME, _SIZE, _MTIME, _NSEC, _MAJOR, _MINOR, _PARENT, _LINK, _CSTART = (
    range(14)
)
_COLUMNS = "BHIIiiQqIIIiiI"
_NAME_BATCH = 4096  # entries whose names are encoded at a time in finish
_CHUNK_COLUMNS = "QQQQQB"  # file offset, size, blob offset, blob end, inner offset, flags


class _Builder:
    """Accumulates entries straight into the arrays of a :class:`TOC` (one column per field:
    no Python object per entry or chunk, which cost ~3x the arrays while a TOC was walked)."""

    def __init__(self, toc_offset: int, max_entries: int, max_chunk_size: int) -> None:
        self.toc_offset = toc_offset
        self.max_entries = max_entries
        self.max_chunk_size = max_chunk_size
        self.cols: list[array[int]] = [array(code) for code in _COLUMNS]
        # each entry's clean path, the same string as its by_path key: no second string per
        # entry for its name (the part after the last "/", taken in finish)
        self.paths: list[str] = []
        self.links: dict[int, str] = {}
        self.digests = bytearray()  # 32 raw bytes per entry (zeros: none)
        self.xattrs: dict[int, tuple[tuple[str, bytes], ...]] = {}
        self.hardlinks: dict[int, int] = {}
        # file_off, size, off, end, inner, flags
        self.chunks: list[array[int]] = [array(code) for code in _CHUNK_COLUMNS]
        self.chunk_digests = bytearray()  # 32 raw bytes per chunk
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
        self.chunk_digest_missing: list[int] = []  # chunks without chunkDigest
        self._new(_DIR, "", ROOT, 0o755)

    # -- entries -------------------------------------------------------------------------------
    def _new(self, kind: int, path: str, parent: int, mode: int) -> int:
        i = len(self.cols[_TYPE])
        if i >= self.max_entries:
            raise TOCError(f"TOC has more than {self.max_entries} entries")
        for col, value in zip(self.cols, (kind, mode, 0, 0, -1, -1, 0, 0, 0, 0, 0, parent, -1,
                                          len(self.chunks[0])), strict=True):
            col.append(value)
        self.paths.append(path)
        self.digests += NO_DIGEST
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
        i = self.by_path.get("/".join(parts))
        if i is not None and self.cols[_TYPE][i] == _DIR:
            return i
        parent = ROOT
        path = ""
        for p in parts:
            path = f"{path}/{p}" if path else p
            i = self.by_path.get(path)
            if i is None:
                i = self._new(_DIR, path, parent, 0o755)
                self.by_path[path] = i
            elif self.cols[_TYPE][i] != _DIR:
                raise ValueError(
                    f"parent {path!r} is a {EntryType(self.cols[_TYPE][i]).label}, not a directory"
                )
            parent = i
        return parent

    def add(self, e: object) -> None:
        n = self.n_json
        self.n_json += 1
        if e.__class__ is not dict:
            raise TOCError(f"TOC entry {n} is not a JSON object")
        assert isinstance(e, dict)
        try:
            if not self._add_common(e):
                self._add(e)
        except ValueError as exc:
            raise TOCError(f"TOC entry {n} ({str(e.get('name'))[:200]!r}): {exc}") from None
        except (TypeError, AttributeError, OverflowError) as exc:
            # Safety net: a field of a type no check above expected must still end as a TOCError.
            raise TOCError(f"TOC entry {n} ({str(e.get('name'))[:200]!r}): malformed field ({exc})") from None

    def _add_common(self, e: dict[str, Any]) -> bool:
        """Fast path for the common entry: a plain dir, file or symlink in a known directory.

        Returns False, having changed nothing, for anything unusual (or invalid); ``_add`` then
        handles the entry with the full checks and precise errors.
        """
        get = e.get
        kind_name = get("type")
        if kind_name == "reg":
            kind = _REG
        elif kind_name == "dir":
            kind = _DIR
        elif kind_name == "symlink":
            kind = _SYMLINK
        else:
            return False
        name = get("name")
        if (
            name.__class__ is not str
            or not name
            or not within_limits(name)
            or name.startswith((".", "/"))
            or "/." in name
            or "//" in name
            or "\x00" in name
            or "userName" in e
            or "groupName" in e
            or "xattrs" in e
        ):
            return False
        cols = self.cols
        types, sizes = cols[_TYPE], cols[_SIZE]
        cf = self.current_file
        if cf >= 0 and sizes[cf] and self.current_end != sizes[cf]:
            return False
        path = name.rstrip("/")
        by_path = self.by_path
        if path in by_path:
            return False
        parent_path, _, base = path.rpartition("/")
        if parent_path:
            parent = by_path.get(parent_path)
            if parent is None or types[parent] != _DIR:
                return False
        elif base in _HIDDEN_AT_ROOT:
            return False
        else:
            parent = ROOT
        mode = get("mode", 0)
        uid = get("uid", 0)
        gid = get("gid", 0)
        if (
            mode.__class__ is not int
            or uid.__class__ is not int
            or gid.__class__ is not int
            or mode < 0
            or not 0 <= uid <= MAX_U32
            or not 0 <= gid <= MAX_U32
        ):
            return False
        sec = nsec = 0
        modtime = get("modtime")
        if modtime:
            if modtime.__class__ is not str:
                return False
            t = self.time_cache.get(modtime)
            if t is None:
                t = self.time_cache[modtime] = parse_time(modtime)
            sec, nsec = t
        size = 0
        digest = NO_DIGEST
        chunk: tuple[int, int] | None = None  # size, offset
        chunk_digest = NO_DIGEST
        link = None
        if kind == _REG:
            size = get("size", 0)
            if size.__class__ is not int or not 0 <= size <= MAX_U63:
                return False
            raw_digest = get("digest")
            if raw_digest is not None:
                digest = digest_bytes(raw_digest, "digest")
            if size:
                offset = get("offset", 0)
                csize = get("chunkSize", 0)
                chunk_offset = get("chunkOffset", 0)
                if csize.__class__ is int and csize == 0:
                    csize = size
                if (
                    offset.__class__ is not int
                    or csize.__class__ is not int
                    or chunk_offset.__class__ is not int
                    or chunk_offset != 0
                    or not 0 < offset < self.toc_offset
                    or not 0 < csize <= size
                    or csize > self.max_chunk_size
                    or "innerOffset" in e
                    or "endOffset" in e
                    or "chunkType" in e
                ):
                    return False
                raw_chunk = get("chunkDigest")
                if raw_chunk is None:
                    return False
                chunk_digest = digest if raw_chunk == raw_digest else digest_bytes(raw_chunk, "chunkDigest")
                chunk = (csize, offset)
        elif kind == _SYMLINK:
            link = get("linkName")
            if link.__class__ is not str or not link or len(link) > MAX_PATH // 4 or "\x00" in link:
                return False
        # Every check passed: record the entry.
        i = len(types)
        if i >= self.max_entries:
            return False
        chunks = self.chunks
        types.append(kind)
        cols[_MODE].append(mode & 0o7777)
        cols[_UID].append(uid)
        cols[_GID].append(gid)
        cols[_UNAME].append(self.uname_by_uid.get(uid, -1))
        cols[_GNAME].append(self.gname_by_gid.get(gid, -1))
        sizes.append(size)
        cols[_MTIME].append(sec)
        cols[_NSEC].append(nsec)
        cols[_MAJOR].append(0)
        cols[_MINOR].append(0)
        cols[_PARENT].append(parent)
        cols[_LINK].append(-1)
        cols[_CSTART].append(len(chunks[0]))
        self.paths.append(path)
        self.digests += digest
        self.live.append(1)
        by_path[path] = i
        if link is not None:
            self.links[i] = link
        if kind == _REG:
            self.current_file = i
            self.current_end = 0
            if chunk is not None:
                csize, offset = chunk
                chunks[0].append(0)
                chunks[1].append(csize)
                chunks[2].append(offset)
                chunks[3].append(0)
                chunks[4].append(0)
                chunks[5].append(0)
                self.chunk_digests += chunk_digest
                self.current_end = csize
        else:
            self.current_file = -1
        return True

    def _add(self, e: dict[str, Any]) -> None:
        kind_name = e.get("type")
        parts = clean(e.get("name"), "name")
        if kind_name == "chunk":
            self._add_chunk(e, "/".join(parts))
            return
        kind = _TYPES.get(kind_name) if kind_name.__class__ is str else None
        if kind is None:
            raise ValueError(f"unknown type {kind_name!r}")
        if self.current_file >= 0:
            self._check_file_complete(self.current_file)
            self.current_file = -1
        mode = e.get("mode", 0)
        if mode.__class__ is not int or mode < 0:
            raise ValueError(f"mode {mode!r} is not a non-negative integer")
        mode &= 0o7777
        if not parts:
            if kind != _DIR:
                raise ValueError("the layer root must be a directory")
            self._fill(ROOT, e, kind, mode)
            return
        path = "/".join(parts)
        parent = self._dir_for(parts[:-1]) if len(parts) > 1 else ROOT
        old = self.by_path.get(path)
        if old is not None:
            old_kind = self.cols[_TYPE][old]
            if (old_kind == _DIR) != (kind == _DIR):
                raise ValueError(f"duplicate name turns a {EntryType(old_kind).label} into a {kind.label}")
            if old_kind == _DIR:
                self._fill(old, e, kind, mode)
                return
            self.live[old] = 0
        i = self._new(kind, path, parent, mode)
        self.by_path[path] = i
        if parent == ROOT and parts[-1] in _HIDDEN_AT_ROOT:
            self.hidden[parts[-1]] = i
            self.live[i] = 0
        self._fill(i, e, kind, mode)

    def _fill(self, i: int, e: dict[str, Any], kind: EntryType, mode: int) -> None:
        cols = self.cols
        cols[_MODE][i] = mode
        uid = e.get("uid", 0)
        gid = e.get("gid", 0)
        if uid.__class__ is not int or not 0 <= uid <= MAX_U32:
            raise ValueError(f"uid {uid!r} is not an integer in [0, {MAX_U32}]")
        if gid.__class__ is not int or not 0 <= gid <= MAX_U32:
            raise ValueError(f"gid {gid!r} is not an integer in [0, {MAX_U32}]")
        cols[_UID][i] = uid
        cols[_GID][i] = gid
        uname = e.get("userName")
        if uname:
            if uname.__class__ is not str:
                raise ValueError("userName is not a string")
            self.uname_by_uid[uid] = self._owner(uname)
        cols[_UNAME][i] = self.uname_by_uid.get(uid, -1)
        gname = e.get("groupName")
        if gname:
            if gname.__class__ is not str:
                raise ValueError("groupName is not a string")
            self.gname_by_gid[gid] = self._owner(gname)
        cols[_GNAME][i] = self.gname_by_gid.get(gid, -1)
        modtime = e.get("modtime")
        if modtime:
            if modtime.__class__ is not str:
                raise ValueError("modtime is not a string")
            t = self.time_cache.get(modtime)
            if t is None:
                t = self.time_cache[modtime] = parse_time(modtime)
            cols[_MTIME][i], cols[_NSEC][i] = t
        raw_xattrs = e.get("xattrs")
        if raw_xattrs:
            self.xattrs[i] = parse_xattrs(raw_xattrs)
        if kind == _REG:
            self._fill_reg(i, e)
        elif kind == _SYMLINK:
            target = e.get("linkName")
            if target.__class__ is not str or not target or "\x00" in target:
                raise ValueError("symlink has no valid linkName")
            self._set_link(i, target)
        elif kind == _HARDLINK:
            parts = clean(e.get("linkName"), "linkName")
            target_path = "/".join(parts)
            found = self.by_path.get(target_path)
            if found is None or found == i:
                raise ValueError(f"hardlink target {target_path!r} is not an earlier entry")
            link = cols[_LINK][found]
            target = link if link >= 0 else found
            if cols[_TYPE][target] == _DIR:
                raise ValueError(f"hardlink target {target_path!r} is a directory")
            cols[_LINK][i] = target
            self.hardlinks[target] = self.hardlinks.get(target, 0) + 1
            self._set_link(i, target_path)
        elif kind in (_CHAR, _BLOCK):
            cols[_MAJOR][i] = uint(e, "devMajor", MAX_U32)
            cols[_MINOR][i] = uint(e, "devMinor", MAX_U32)

    def _set_link(self, i: int, target: str) -> None:
        if i != len(self.cols[_TYPE]) - 1:
            raise ValueError("a link may not redefine an existing directory")
        if len(target) > MAX_PATH // 4 and len(target.encode("utf-8")) > MAX_PATH:
            raise ValueError(f"linkName is longer than {MAX_PATH} bytes")
        self.links[i] = target

    def _fill_reg(self, i: int, e: dict[str, Any]) -> None:
        size = e.get("size", 0)
        if size.__class__ is not int or not 0 <= size <= MAX_U63:
            raise ValueError(f"size {size!r} is not an integer in [0, {MAX_U63}]")
        self.cols[_SIZE][i] = size
        digest = e.get("digest")
        if digest is not None:
            self.digests[32 * i:32 * i + 32] = digest_bytes(digest, "digest")
        self.current_file = i
        self.current_end = 0
        if size:
            self._add_chunk_record(i, size, e)

    def _add_chunk(self, e: dict[str, Any], path: str) -> None:
        self.has_chunk_entries = True
        i = self.current_file
        if i < 0:
            raise ValueError("chunk entry does not follow a regular file")
        if self.by_path.get(path) != i:
            raise ValueError("chunk entry name differs from the file it follows")
        self._add_chunk_record(i, self.cols[_SIZE][i], e)

    def _append_chunk(self, file_off: int, size: int, offset: int, end: int, inner: int, flags: int) -> None:
        for col, value in zip(self.chunks, (file_off, size, offset, end, inner, flags), strict=True):
            col.append(value)

    def _add_chunk_record(self, i: int, size: int, e: dict[str, Any]) -> None:
        file_off = e.get("chunkOffset", 0)
        if file_off != self.current_end or file_off.__class__ is not int or file_off >= size:
            raise ValueError(
                f"chunkOffset {file_off!r} does not continue the file at {self.current_end} "
                f"(file size {size})"
            )
        csize = e.get("chunkSize", 0)
        if csize.__class__ is not int or csize < 0:
            raise ValueError(f"chunkSize {csize!r} is not a non-negative integer")
        csize = csize or size - file_off
        if csize > size - file_off:
            raise ValueError(f"chunkSize {csize} runs past the file size {size}")
        if csize > self.max_chunk_size:
            raise ValueError(f"chunk of {csize} bytes exceeds the {self.max_chunk_size}-byte limit")
        self.current_end = file_off + csize
        chunk_type = e.get("chunkType")
        offset = e.get("offset", 0)
        inner = e.get("innerOffset", 0)
        end = e.get("endOffset", 0)
        if chunk_type == "zeros":
            self._append_chunk(file_off, csize, 0, 0, 0, CHUNK_HOLE)
        else:
            if chunk_type not in (None, ""):
                raise ValueError(f"unknown chunkType {chunk_type!r}")
            for key, v in (("offset", offset), ("innerOffset", inner), ("endOffset", end)):
                if v.__class__ is not int or not 0 <= v <= MAX_U63:
                    raise ValueError(f"{key} {v!r} is not an integer in [0, {MAX_U63}]")
            if offset == 0 and inner == 0:
                raise ValueError("non-empty payload has no offset")
            if offset >= self.toc_offset:
                raise ValueError(f"offset {offset} is not below the TOC offset {self.toc_offset}")
            if end and not offset < end <= self.toc_offset:
                raise ValueError(f"endOffset {end} is not in ({offset}, {self.toc_offset}]")
            self._append_chunk(file_off, csize, offset, end, inner, 0)
        chunk_digest = e.get("chunkDigest")
        if chunk_digest is None:
            self.chunk_digests += NO_DIGEST
            self.chunk_digest_missing.append(len(self.chunks[0]) - 1)
        elif chunk_digest == e.get("digest"):
            self.chunk_digests += self.digests[32 * i:32 * i + 32]  # already parsed and validated
        else:
            self.chunk_digests += digest_bytes(chunk_digest, "chunkDigest")

    # -- finish ---------------------------------------------------------------------------------
    def finish(self) -> TOC:
        if self.current_file >= 0:
            self._check_file_complete(self.current_file)
        # The walk's lookups are over: drop what only they needed before this allocates (the
        # paths are most of the builder's memory, and this is where indexing peaks).
        self.by_path = {}
        self.time_cache = {}
        n = len(self.cols[_TYPE])
        toc = TOC()
        (
            toc._type,
            toc._mode,
            toc._uid,
            toc._gid,
            toc._uname,
            toc._gname,
            toc._size,
            toc._mtime,
            toc._mtime_nsec,
            majors,
            minors,
            toc._parent,
            toc._link,
            chunk_start,
        ) = self.cols
        self.cols = []
        # A file's chunks are appended right after the file entry is created (chunk entries
        # must follow their file), so entry i owns chunks [chunk_start[i], chunk_start[i + 1]).
        chunk_start.append(len(self.chunks[0]))
        toc._chunk_start = chunk_start
        dev = array("I", bytes(8 * n))
        dev[0::2] = majors
        dev[1::2] = minors
        del majors, minors
        toc._dev = dev
        c_file_off, c_size, c_off, c_end, c_inner, c_flags = self.chunks
        self.chunks = []
        self._compute_ends(c_off, c_end, c_inner, c_flags)
        self._fill_missing_chunk_digests(chunk_start)
        toc._digest, self.digests = bytes(self.digests), bytearray()
        toc._chunk_digest, self.chunk_digests = bytes(self.chunk_digests), bytearray()
        # children, sorted by UTF-8 name (code point order equals UTF-8 byte order), then, the
        # sort being stable, by parent: ordered by (parent, name) with no tuple per entry
        parent = toc._parent
        self.live[ROOT] = 0  # the root is nobody's child
        kids = list(compress(range(n), self.live))
        kids.sort(key=self.paths.__getitem__)  # siblings' paths differ only in their names
        kids.sort(key=parent.__getitem__)
        toc._child_list = array("I", kids)
        counts = array("I", bytes(4 * n))
        for p in map(parent.__getitem__, kids):
            counts[p] += 1
        del kids
        toc._child_start = array("I", accumulate(counts, initial=0))
        del counts
        paths, self.paths = self.paths, []
        toc._name_off, toc._name_blob = _blob(_names(paths))
        del paths
        links = [self.links.get(i, "") for i in range(n)] if self.links else [""] * n
        toc._link_off, toc._link_blob = _blob((links,))
        del links
        toc._owner_names = self.owner_names
        toc._hardlinks = self.hardlinks
        toc._xattrs = self.xattrs
        toc._chunk_file_off, toc._chunk_size = c_file_off, c_size
        toc._chunk_off, toc._chunk_end, toc._chunk_inner = c_off, c_end, c_inner
        toc._chunk_flags = c_flags
        landmark = self.hidden.get(".prefetch.landmark")
        toc.prefetch_landmark_offset = None
        if landmark is not None and chunk_start[landmark + 1] > chunk_start[landmark]:
            toc.prefetch_landmark_offset = c_off[chunk_start[landmark]]
        toc.no_prefetch_landmark = ".no.prefetch.landmark" in self.hidden
        return toc

    def _check_file_complete(self, i: int) -> None:
        size = self.cols[_SIZE][i]
        if self.current_end != size and size:
            raise TOCError(f"TOC file {self.paths[i]!r}: chunks cover {self.current_end} of {size} bytes")

    def _compute_ends(self, off: array[int], end: array[int], inner: array[int], flags: array[int]) -> None:
        """Give each chunk its compressed extent; check that payloads are in blob order."""
        if not any(flags) and not any(inner) and not any(end):
            # Common layout: one payload per member, strictly increasing offsets.
            if len(off) > 1 and not all(map(lt, off, islice(off, 1, None))):
                self._order_error(off, inner, flags)
            end[:] = array("Q", islice(off, 1, None))
            if len(off):
                end.append(self.toc_offset)
            return
        self._order_error(off, inner, flags)
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

    @staticmethod
    def _order_error(off: array[int], inner: array[int], flags: array[int]) -> None:
        """Raise if (offset, innerOffset) of the payloads does not strictly increase."""
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

    def _fill_missing_chunk_digests(self, starts: array[int]) -> None:
        """Unchunked files without chunkDigest are verified by their file digest (as upstream)."""
        if not self.chunk_digest_missing:
            return
        if self.has_chunk_entries:
            k = self.chunk_digest_missing[0]
            raise TOCError(
                f"TOC chunk {k}: no chunkDigest, but the TOC has chunk entries "
                "(then every chunk must have one)"
            )
        owner = {starts[i]: i for i in range(len(starts) - 1) if starts[i + 1] - starts[i] == 1}
        for k in self.chunk_digest_missing:
            i = owner.get(k)
            if i is not None:
                self.chunk_digests[32 * k:32 * k + 32] = self.digests[32 * i:32 * i + 32]


def _blob(batches: Iterable[list[str]]) -> tuple[array[int], bytes]:
    """The strings of ``batches`` UTF-8 encoded end to end, and the offset where each starts
    (and the end)."""
    lengths = array("Q")
    blob = bytearray()
    for texts in batches:
        joined = "".join(texts)
        if joined.isascii():  # one byte per character: no bytes object per text
            blob += joined.encode("ascii")
            lengths.extend(map(len, texts))
            continue
        del joined
        try:
            parts = [t.encode("utf-8") for t in texts]
        except UnicodeEncodeError as exc:  # JSON may escape a lone surrogate, which UTF-8 cannot hold
            raise TOCError(f"TOC name or link target {exc.object[:200]!r} is not valid Unicode") from None
        blob += b"".join(parts)
        lengths.extend(map(len, parts))
    return array("Q", accumulate(lengths, initial=0)), bytes(blob)


def _names(paths: list[str]) -> Iterator[list[str]]:
    """The name in each of ``paths`` (what follows the last "/"), a batch at a time; each batch
    of ``paths`` is emptied as it is taken, so paths and names are not all held at once."""
    for k in range(0, len(paths), _NAME_BATCH):
        batch = paths[k:k + _NAME_BATCH]
        paths[k:k + _NAME_BATCH] = [""] * len(batch)
        yield [p[p.rfind("/") + 1:] for p in batch]


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
    return index_toc_text(
        decode_toc_json(data), footer, codec=codec, max_entries=max_entries, max_chunk_size=max_chunk_size
    )


def decode_toc_json(data: bytes) -> str:
    """The TOC JSON as text (TOCError if it is not UTF-8)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TOCError(f"TOC JSON is not valid UTF-8: {exc}") from None


def index_toc_text(
    text: str,
    footer: Footer,
    *,
    codec: Codec,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
) -> tuple[TOC, dict[str, Any]]:
    """:func:`index_toc_json` of already decoded JSON text."""
    return index_toc_pieces(
        iter((text,)), footer, codec=codec, max_entries=max_entries, max_chunk_size=max_chunk_size
    )


def index_toc_pieces(
    texts: Iterator[str],
    footer: Footer,
    *,
    codec: Codec,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
) -> tuple[TOC, dict[str, Any]]:
    """:func:`index_toc_json` of JSON text arriving in pieces, split anywhere (only a window of
    it is held at a time; errors the pieces raise propagate)."""
    builder = _Builder(footer.toc_offset, max_entries, max_chunk_size)
    # The builder allocates one small list per entry: with the cyclic GC on, every collection
    # rescans all of them (about a quarter of the indexing time at 100k entries). Nothing here
    # creates cycles, so the GC is paused; the flag is process-wide, so it is only restored if
    # it was on (concurrent parses in other threads end with it on again).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            top = walk_json_pieces(texts, builder.add)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            if isinstance(exc, TOCError):
                raise
            raise TOCError(f"TOC JSON is malformed: {exc}") from None
        version = top.get("version")
        if version != 1 or type(version) is not int:
            raise TOCError(f"TOC version {version!r} is not supported (only 1)")
        toc = builder.finish()
    finally:
        if gc_was_enabled:
            gc.enable()
    split = top.get("tarSplitDigest")
    toc.footer = footer
    toc.codec = codec
    toc.tar_split_digest = split if isinstance(split, str) else None
    return toc, top
