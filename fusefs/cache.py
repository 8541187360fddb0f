"""The on-disk chunk cache: verified chunk bytes keyed by (layer digest, chunk key), bounded, LRU.

Layout under ``CacheConfig.dir``::

    chunks/<layer hex>/<chunk key>   one file per verified chunk (key = chunk digest hex)
    indexes/<layer hex>              what a reader needs to rebuild the layer's index offline

Only verified bytes are ever stored (callers verify first); a file appears by atomic rename, so
a reader never sees a partial chunk. Size accounting and the LRU order are rebuilt at start by
one directory scan (file mtimes order the LRU: approximate, and cheap). Chunks of mounted
(pinned) layers are never evicted; when only pinned chunks are left and the bound is reached,
new chunks are served but not kept.

Thread safety: every public method may be called from the trio thread or a worker thread; one
lock guards the accounting and the open-file cache. ``read`` is one dict lookup plus one
``os.pread`` on an already open file in the common case and never checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fusefs.config import CacheConfig
from fusefs.errors import FormatError

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_KEY_RE = re.compile(r"[0-9a-zA-Z_-]{1,128}")
_MAX_OPEN_FILES = 64
_FULL_LOG_INTERVAL = 60.0


def layer_dirname(layer_digest: str) -> str:
    """The directory name of a layer in the cache; refuses anything but ``sha256:<64 hex>``."""
    m = _DIGEST_RE.fullmatch(layer_digest)
    if m is None:
        raise FormatError(f"not a sha256 layer digest: {layer_digest[:100]!r}")
    return m.group(1)


@dataclass(frozen=True)
class CacheStatistics:
    """A snapshot of the cache counters."""

    bytes_cached: int
    chunks_cached: int
    max_bytes: int
    hits: int
    misses: int
    stored: int
    not_kept: int
    evicted: int


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` dropped."""

    chunks: int
    bytes: int


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found: chunks re-hashed, and the corrupt ones dropped (``layer/key``)."""

    checked: int
    corrupt: tuple[str, ...]


def _sha256_file(path: os.PathLike[str] | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class StagedChunk:
    """A verified chunk in a file the cache does not serve yet (:meth:`ChunkCache.stage`).

    Its bytes are read back with :meth:`pread` until :meth:`close`; after that, from the cache
    by ``key`` if :meth:`ChunkCache.commit` kept it. Close it on the thread that reads it: a
    read racing a close elsewhere could meet another file that took over the descriptor.
    """

    __slots__ = ("_fd", "key", "layer", "settled", "size", "tmp")

    def __init__(self, layer: str, key: str, size: int, tmp: Path, fd: int) -> None:
        self.layer = layer
        self.key = key
        self.size = size
        self.tmp = tmp
        self.settled = False  # committed or discarded: the reservation is no longer this file's
        self._fd = fd

    def __len__(self) -> int:
        return self.size

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("staged chunk is closed")
        return self._fd

    def pread(self, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of the chunk; None once closed or unreadable."""
        if self._fd < 0:
            return None
        try:
            data = os.pread(self._fd, length, offset)
        except OSError:
            return None
        return data if len(data) == min(length, self.size - offset) else None

    def close(self) -> None:
        """Release the descriptor. The file stays in the cache if committed; one that will not
        be committed is given up with :meth:`ChunkCache.discard`, which closes it too."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view):]


class ChunkCache:
    """Verified chunk files on disk with LRU eviction of unpinned layers (see module docstring)."""

    def __init__(self, config: CacheConfig) -> None:
        self._config = config
        self._chunks_dir = config.dir / "chunks"
        self._indexes_dir = config.dir / "indexes"
        self._chunks_dir.mkdir(parents=True, exist_ok=True)
        self._indexes_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._layers: dict[str, dict[str, int]] = {}  # layer hex -> key -> size
        self._lru: OrderedDict[tuple[str, str], None] = OrderedDict()  # unpinned entries only
        self._pins: dict[str, int] = {}
        self._fds: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._total = 0
        self._hits = self._misses = self._stored = self._not_kept = self._evicted = 0
        self._last_full_log = 0.0
        # layers released for good: a fetch of theirs still running (speculation, read-ahead)
        # must not store chunks after the delete; mounting the layer again takes it off
        self._forgotten: set[str] = set()
        self._scan()

    # -- pinning --------------------------------------------------------------------------

    def pin(self, layer_digest: str) -> None:
        """Protect a layer's chunks from eviction while it is mounted (counted)."""
        layer = layer_dirname(layer_digest)
        with self._lock:
            self._forgotten.discard(layer)
            self._pins[layer] = self._pins.get(layer, 0) + 1
            if self._pins[layer] == 1:
                for key in self._layers.get(layer, {}):
                    self._lru.pop((layer, key), None)

    def unpin(self, layer_digest: str) -> None:
        """Undo one ``pin``; at zero the layer's chunks become evictable again."""
        layer = layer_dirname(layer_digest)
        with self._lock:
            count = self._pins.get(layer, 0) - 1
            if count > 0:
                self._pins[layer] = count
                return
            self._pins.pop(layer, None)
            for key in self._layers.get(layer, {}):
                self._lru[(layer, key)] = None
            self._evict_locked(0)

    # -- chunks ---------------------------------------------------------------------------

    def contains(self, layer_digest: str, key: str) -> bool:
        layer = layer_dirname(layer_digest)
        with self._lock:
            return key in self._layers.get(layer, {})

    def read(self, layer_digest: str, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of a cached chunk, or None on a miss."""
        layer = layer_digest[7:]  # hot path: the digest was validated when the layer was pinned
        with self._lock:
            size = self._layers.get(layer, {}).get(key)
            if size is None:
                self._misses += 1
                return None
            ident = (layer, key)
            try:
                fd = self._fds.get(ident)
                if fd is None:
                    fd = os.open(self._chunks_dir / layer / key, os.O_RDONLY | os.O_CLOEXEC)
                    self._fds[ident] = fd
                    if len(self._fds) > _MAX_OPEN_FILES:
                        os.close(self._fds.popitem(last=False)[1])
                else:
                    self._fds.move_to_end(ident)
                want = size - offset if length is None else min(length, size - offset)
                data = os.pread(fd, want, offset)
            except OSError as exc:
                log.warning("cache file %s/%s unreadable, dropping it: %s", layer, key, exc)
                self._drop_locked(layer, key)
                self._misses += 1
                return None
            if len(data) != want:
                log.warning("cache file %s/%s is short, dropping it", layer, key)
                self._drop_locked(layer, key)
                self._misses += 1
                return None
            if ident in self._lru:
                self._lru.move_to_end(ident)
            self._hits += 1
            return data

    def put(self, layer_digest: str, key: str, data: bytes | bytearray) -> bool:
        """Store verified chunk bytes; False when they were not kept (full, or a disk error).

        Blocks on disk I/O (and fsync when configured): call it from a worker thread for large
        chunks. Never raises for I/O failures: the caller still has the bytes to serve.
        """
        return self.put_pieces(layer_digest, key, len(data), (data,))

    def put_pieces(self, layer_digest: str, key: str, size: int, pieces: Iterable[bytes | bytearray]) -> bool:
        """Store a chunk of ``size`` bytes written piece by piece, as :meth:`put`.

        The chunk becomes visible only once ``pieces`` is exhausted: an exception it raises (a
        verifying decoder's, at its end) propagates and leaves nothing behind. False also when
        the pieces do not add up to ``size``.
        """
        if self.contains(layer_digest, key):
            return True
        staged = self.stage(layer_digest, key, size, pieces)
        if staged is None:
            return False
        try:
            return self.commit(staged)
        finally:
            staged.close()

    def stage(self, layer_digest: str, key: str, size: int,
              pieces: Iterable[bytes | bytearray]) -> StagedChunk | None:
        """Write a chunk's pieces to a file of its own that the cache does not serve yet.

        The first half of :meth:`put_pieces`, for a caller that serves the chunk from the
        file (:meth:`StagedChunk.pread`) while :meth:`commit` makes it durable and visible.
        Its size is reserved against the bound from now on. None when it is not kept (the
        cache is full, a disk error, pieces that do not add up to ``size``); an exception
        ``pieces`` raises propagates and leaves nothing behind. Close the result when done.
        """
        layer = layer_dirname(layer_digest)
        if _KEY_RE.fullmatch(key) is None:
            raise ValueError(f"invalid cache key {key!r}")
        with self._lock:
            if layer in self._forgotten:
                return None
            if not self._evict_locked(size):
                self._not_kept += 1
                now = time.monotonic()
                if now - self._last_full_log > _FULL_LOG_INTERVAL:
                    self._last_full_log = now
                    log.warning("chunk cache full of mounted layers (%d of %d bytes): serving "
                                "chunks without keeping them", self._total, self._config.max_bytes)
                return None
            self._total += size  # reserve now so concurrent puts respect the bound
        path = self._chunks_dir / layer / key
        tmp = path.with_name(f".tmp-{key}-{secrets.token_hex(4)}")
        fd = -1
        written = 0
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            for piece in pieces:
                written += len(piece)
                if written > size:
                    break
                _write_all(fd, piece)
            if written != size:
                raise OSError(errno.EINVAL, f"chunk pieces do not add up to {size} bytes")
        except BaseException as exc:
            self._unreserve(size, tmp, fd)
            if not isinstance(exc, OSError):
                raise
            log.warning("could not cache chunk %s of layer %s: %s", key, layer, exc)
            return None
        return StagedChunk(layer, key, size, tmp, fd)

    def commit(self, staged: StagedChunk) -> bool:
        """Make a staged chunk part of the cache: fsync (when configured), rename into place.

        False when it is not kept (a disk error, or its layer was forgotten meanwhile); its
        reservation is given back then. Blocks on disk I/O: call it from a worker thread. The
        staged file stays readable through ``staged`` until it is closed, either way.
        """
        layer, key, size = staged.layer, staged.key, staged.size
        if staged.settled:
            raise ValueError(f"staged chunk {key} was already committed or discarded")
        staged.settled = True
        path = self._chunks_dir / layer / key
        try:
            if self._config.fsync:
                os.fsync(staged.fd)
            os.rename(staged.tmp, path)
        except OSError as exc:
            self._unreserve(size, staged.tmp, -1)
            log.warning("could not cache chunk %s of layer %s: %s", key, layer, exc)
            return False
        with self._lock:
            if layer in self._forgotten:  # forgotten while we wrote: the delete missed this file
                self._total -= size
                with contextlib.suppress(OSError):
                    path.unlink()
                return False
            entries = self._layers.setdefault(layer, {})
            if key in entries:  # the same chunk was stored concurrently: undo our reservation
                self._total -= size
                return True
            entries[key] = size
            if layer not in self._pins:
                self._lru[(layer, key)] = None
            self._stored += 1
        return True

    def discard(self, staged: StagedChunk) -> None:
        """Give up a staged chunk that will not be committed: its file and its reservation."""
        staged.close()
        if not staged.settled:
            staged.settled = True
            self._unreserve(staged.size, staged.tmp, -1)

    def _unreserve(self, size: int, tmp: Path, fd: int) -> None:
        with self._lock:
            self._total -= size
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()

    def forget_layer(self, layer_digest: str) -> None:
        """Delete everything cached for a layer that is released for good."""
        layer = layer_dirname(layer_digest)
        with self._lock:
            self._forgotten.add(layer)
            for key in list(self._layers.get(layer, {})):
                self._drop_locked(layer, key, unlink=False)
            self._layers.pop(layer, None)
        shutil.rmtree(self._chunks_dir / layer, ignore_errors=True)
        (self._indexes_dir / layer).unlink(missing_ok=True)

    # -- layer indexes --------------------------------------------------------------------

    def save_index(self, layer_digest: str, data: bytes) -> None:
        """Persist what is needed to rebuild a layer's index without its source (best effort)."""
        path = self._indexes_dir / layer_dirname(layer_digest)
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self._config.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, path)
        except OSError as exc:
            log.warning("could not persist the index of %s: %s", layer_digest, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load_index(self, layer_digest: str) -> bytes | None:
        try:
            return (self._indexes_dir / layer_dirname(layer_digest)).read_bytes()
        except FileNotFoundError:
            return None

    # -- accounting -----------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                bytes_cached=self._total, chunks_cached=sum(len(v) for v in self._layers.values()),
                max_bytes=self._config.max_bytes, hits=self._hits, misses=self._misses,
                stored=self._stored, not_kept=self._not_kept, evicted=self._evicted,
            )

    def layer_usage(self) -> dict[str, tuple[int, int]]:
        """``{layer digest: (chunks, bytes)}`` of every layer with cached chunks."""
        with self._lock:
            return {f"sha256:{layer}": (len(entries), sum(entries.values()))
                    for layer, entries in self._layers.items() if entries}

    def pinned_layers(self) -> set[str]:
        """Digests of the layers currently pinned (mounted)."""
        with self._lock:
            return {f"sha256:{layer}" for layer in self._pins}

    def prune(self, to_bytes: int = 0, *, include_pinned: bool = False) -> PruneResult:
        """Drop chunks until at most ``to_bytes`` are cached; returns what was dropped.

        Unpinned chunks go first, least recently used first. With ``include_pinned``, chunks of
        mounted layers follow: safe, since a read of a dropped chunk fetches it again. Blocks on
        file deletions: call it from a worker thread.
        """
        chunks = freed = 0
        with self._lock:
            while self._total > to_bytes and self._lru:
                layer, key = next(iter(self._lru))
                freed += self._layers.get(layer, {}).get(key, 0)
                self._drop_locked(layer, key)
                chunks += 1
            if include_pinned:
                for layer in list(self._layers):
                    for key in list(self._layers[layer]):
                        if self._total <= to_bytes:
                            break
                        freed += self._layers[layer][key]
                        self._drop_locked(layer, key)
                        chunks += 1
            self._evicted += chunks
        return PruneResult(chunks, freed)

    def verify(self) -> VerifyResult:
        """Re-hash every cached chunk against its key (its sha256); drop the ones that differ.

        Blocks on reading every chunk: call it from a worker thread. Chunks stored or dropped
        meanwhile are skipped.
        """
        with self._lock:
            todo = [(layer, key) for layer, entries in self._layers.items() for key in entries]
        checked = 0
        bad: list[str] = []
        for layer, key in todo:
            try:
                digest = _sha256_file(self._chunks_dir / layer / key)
            except FileNotFoundError:
                continue  # dropped meanwhile
            except OSError as exc:
                log.warning("cache verify: %s/%s unreadable: %s", layer, key, exc)
                digest = ""
            checked += 1
            if digest != key:
                with self._lock:
                    if key in self._layers.get(layer, {}):
                        log.warning("cache verify: chunk %s of layer sha256:%s is corrupt: dropped",
                                    key, layer)
                        self._drop_locked(layer, key)
                        bad.append(f"sha256:{layer}/{key}")
        return VerifyResult(checked, tuple(bad))

    def close(self) -> None:
        """Close cached file descriptors."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _evict_locked(self, incoming: int) -> bool:
        limit = self._config.max_bytes
        while self._total + incoming > limit and self._lru:
            layer, key = next(iter(self._lru))
            self._drop_locked(layer, key)
            self._evicted += 1
        return self._total + incoming <= limit

    def _drop_locked(self, layer: str, key: str, unlink: bool = True) -> None:
        entries = self._layers.get(layer, {})
        size = entries.pop(key, None)
        if size is not None:
            self._total -= size
        self._lru.pop((layer, key), None)
        fd = self._fds.pop((layer, key), None)
        if fd is not None:
            os.close(fd)
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self._chunks_dir / layer / key)

    def _scan(self) -> None:
        found: list[tuple[float, str, str, int]] = []
        for layer_entry in os.scandir(self._chunks_dir):
            if not layer_entry.is_dir(follow_symlinks=False) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                                  layer_entry.name):
                continue
            for entry in os.scandir(layer_entry.path):
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)  # an interrupted write
                    continue
                if not entry.is_file(follow_symlinks=False) or _KEY_RE.fullmatch(entry.name) is None:
                    continue
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, layer_entry.name, entry.name, st.st_size))
        found.sort()
        for _, layer, key, size in found:
            self._layers.setdefault(layer, {})[key] = size
            self._lru[(layer, key)] = None
            self._total += size
        if found:
            log.info("chunk cache: %d chunks, %d bytes found at start", len(found), self._total)
        self._evict_locked(0)
