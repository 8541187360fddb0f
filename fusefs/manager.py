"""LayerManager: what the snapshotter uses to mount, check and release lazily fetched layers.

API (satisfies the snapshotter's ``LayerFilesystem`` Protocol structurally)::

    async with open_layer_manager(config, source_factory) as manager: ...   # for the daemon
    manager = await LayerManager.create(config: FusefsConfig, nursery, source_factory)
    await manager.mount(spec: LayerSpec, mountpoint: str)   # bind-mounts the layer tree
    await manager.start_mount(spec, mountpoint)             # the same, returns once the TOC verifies
    await manager.check(mountpoint, wait=True)              # LayerError if not served
    await manager.unmount(mountpoint)                       # the layer stays cached
    await manager.forget_layer(digest)                      # released for good: drop its cache
    await manager.aclose()                                  # unmount everything, stop FUSE
    manager.statistics()                                    # frozen counters for metrics
    manager.served_layers()                                 # per-layer view (snapctl, metrics)
    await manager.warm(digest)                              # fetch a served layer fully

All methods run on the trio thread that called ``create`` (the gRPC calls' worker threads use
``trio.from_thread.run``). ``create`` mounts the one pyfuse3 session of the process at
``config.fuse.mountpoint`` and serves it in ``nursery``; each mounted layer is a top-level
directory there (``<digest hex[:16]>``), which ``mount`` bind-mounts onto ``mountpoint``.

``mount`` reads the layer's index through the first reader of ``config.formats`` that accepts
the blob, verifies it against ``spec.toc_digest`` (no digest: refused unless
``allow_unverified_toc``), and persists the ranges it read in the cache so a restart mounts the
layer again without a registry round trip. It raises ``LayerError`` (``UnsupportedFormat``,
``IntegrityError``, ``FormatError``, ``SourceError``) for anything that prevents serving the
layer lazily — the snapshotter then falls back to a normal pull — and leaves ``mountpoint``
untouched in that case. ``start_mount`` returns as soon as the reader has the TOC's digests
and they match (before the index is built, the slow part of a large layer): the rest of the
mount runs in the background, ``check`` and ``unmount`` wait for it, and a failure after that
point is reported by ``check`` (and the digest is not mounted lazily again by this process, as
the same bytes would fail the same way). Mounting the same digest at several mountpoints shares
one tree.
``spec.neighbours`` are resolved in the background: their indexes are fetched and persisted so
their own mounts need no round trip.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from fusefs.allocator import release_while_busy
from fusefs.cache import CacheStatistics, ChunkCache, layer_dirname
from fusefs.config import FusefsConfig
from fusefs.errors import FormatError, IntegrityError, LayerError, UnsupportedFormat
from fusefs.fetch import ChunkFetcher, FetchStatistics, PriorityGate
from fusefs.formats import READERS
from fusefs.index import LayerIndex, UnverifiedIndex, digest_accepted
from fusefs.layers import ROOT_INODE, LayerTable, MountedLayer
from fusefs.ops import LayerOperations
from fusefs.prefetch import run as run_prefetch
from fusefs.sources.base import BlobSource, SourceFactory
from fusefs.sources.replay import RecordingSource
from fusefs.spec import LayerSpec
from fusefs.writer import CacheWriter

log = logging.getLogger(__name__)

_MS_BIND = 4096
_MNT_DETACH = 2
_MAX_NEIGHBOURS = 128
_RESOLUTION_HOLD = 120.0  # seconds a neighbour's index read ahead waits in memory for its mount
_RELEASE_INTERVAL = 0.25  # seconds between trims of the heap while chunks are fetched
_libc = ctypes.CDLL(None, use_errno=True)
_session_active = False


def _bind_mount(source: str, target: str) -> None:
    _detach_if_dead(target)
    if _libc.mount(source.encode(), target.encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount {source} on {target}: {os.strerror(err)}")


def _unmount(target: str) -> None:
    if _libc.umount2(target.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and _libc.umount2(target.encode(), _MNT_DETACH) == 0:
        log.info("%s was busy: detached lazily", target)
        return
    err = ctypes.get_errno() or err
    raise OSError(err, f"unmount {target}: {os.strerror(err)}")


@dataclass(eq=False)
class _Resolution:
    """One read of a layer's (unverified) index, shared by everyone who needs it meanwhile."""

    done: trio.Event = field(default_factory=trio.Event)
    index: UnverifiedIndex | None = None
    size: int | None = None
    fresh: bool = False  # read from the source by this process, not from the persisted copy
    expires: float = math.inf
    # the digests the index will accept, known once its TOC is read (before it is built)
    toc_digests: tuple[str, ...] | None = None
    _toc_listeners: list[Callable[[tuple[str, ...]], None]] = field(default_factory=list)

    def toc_read(self, digests: tuple[str, ...]) -> None:
        """The reader's ``on_toc``: tell whoever waits for the TOC's digests."""
        self.toc_digests = digests
        listeners, self._toc_listeners = self._toc_listeners, []
        for listener in listeners:
            listener(digests)

    def when_toc_read(self, listener: Callable[[tuple[str, ...]], None]) -> None:
        """Call ``listener`` with the TOC's digests when they are known (now, if they are)."""
        if self.toc_digests is not None:
            listener(self.toc_digests)
        else:
            self._toc_listeners.append(listener)


@dataclass(eq=False)
class _PendingMount:
    """A ``start_mount`` whose layer was accepted (its TOC verified) or is about to be, while
    its index is built and its tree bound. Kept after a failure, for ``check`` to report."""

    digest: str
    accepted: trio.Event = field(default_factory=trio.Event)  # also set when the mount ends
    done: trio.Event = field(default_factory=trio.Event)
    error: LayerError | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(frozen=True)
class ServedLayer:
    """One served layer as operators see it (``served_layers``).

    ``background`` is ``running`` while the mount-time prefetch/background pass runs, ``done``
    once it returned (complete, stopped by a failure or a full cache), ``off`` when disabled.
    """

    spec: LayerSpec
    fetcher: ChunkFetcher
    mountpoints: tuple[str, ...]
    background: str


@dataclass(frozen=True)
class ManagerStatistics:
    """What metrics read: served layers, layer mountpoints, cache and per-layer fetch counters."""

    layers: int
    mounts: int
    cache: CacheStatistics
    fetch: dict[str, FetchStatistics]


class LayerManager:
    """Mounts layers into the process's one FUSE session (see the module docstring)."""

    def __init__(self, config: FusefsConfig, nursery: trio.Nursery, source_factory: SourceFactory,
                 cache: ChunkCache) -> None:
        self._config = config
        self._nursery = nursery
        self._factory = source_factory
        self.cache = cache
        self._writer = CacheWriter(cache)
        self._table = LayerTable()
        self._gate = PriorityGate(config.prefetch.background_silence)
        self._ops = LayerOperations(self._table, config.fuse)
        self._mounts: dict[str, MountedLayer] = {}
        self._pending: dict[str, _PendingMount] = {}
        self._refused: dict[str, str] = {}  # digest → why it failed to index after being accepted
        self._prefetch_scopes: dict[str, trio.CancelScope] = {}
        self._specs: dict[str, LayerSpec] = {}
        self._background_done: set[str] = set()
        self._checked: dict[str, float] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._resolutions: dict[str, _Resolution] = {}
        self._stopped = trio.Event()
        self._fuse_root = str(config.fuse.mountpoint)
        self._closing = False

    @classmethod
    async def create(cls, config: FusefsConfig, nursery: trio.Nursery,
                     source_factory: SourceFactory) -> LayerManager:
        """Mount the FUSE session and start serving it in ``nursery``.

        Raises:
            RuntimeError: a session already runs in this process (pyfuse3 allows one).
            OSError: the FUSE mount failed.
        """
        global _session_active
        if _session_active:
            raise RuntimeError("one FUSE session per process: a LayerManager already runs")
        cache = await trio.to_thread.run_sync(ChunkCache, config.cache)
        self = cls(config, nursery, source_factory, cache)
        mountpoint = config.fuse.mountpoint
        await trio.to_thread.run_sync(_prepare_mountpoint, mountpoint)
        options = set(pyfuse3.default_options) | {f"fsname={config.fuse.fsname}", "ro", "subtype=lazysnap"}
        if config.fuse.allow_other:
            options.add("allow_other")
        pyfuse3.init(self._ops, str(mountpoint), options)
        _session_active = True
        nursery.start_soon(self._serve)
        return self

    async def _serve(self) -> None:
        # decode pieces and reply buffers are freed in every thread's malloc arena, where glibc
        # keeps them resident: numpy start peak RSS ~3 MiB lower with this
        self._nursery.start_soon(release_while_busy, self._chunks_fetched, self._stopped, _RELEASE_INTERVAL)
        try:
            await pyfuse3.main()
        finally:
            self._stopped.set()

    def _chunks_fetched(self) -> int:
        return sum(layer.fetcher.statistics().chunks_fetched for layer in self._mounts.values())

    @property
    def fuse_root(self) -> str:
        return self._fuse_root

    @property
    def source_factory(self) -> SourceFactory:
        return self._factory

    def fuse_op_counts(self) -> dict[str, tuple[int, int, float]]:
        """``{FUSE operation: (calls, failures, seconds)}`` since the session started."""
        return self._ops.op_counts()

    @property
    def cache_dir(self) -> Path:
        return self._config.cache.dir

    def layer_path(self, digest: str) -> str | None:
        """Where a mounted layer's tree is inside the FUSE session, or None."""
        for layer in self._mounts.values():
            if layer.digest == digest:
                return os.path.join(self._fuse_root, layer.name.decode())
        return None

    def statistics(self) -> ManagerStatistics:
        served = {layer.digest: layer for layer in self._mounts.values()}
        return ManagerStatistics(len(served), len(self._mounts), self.cache.statistics(),
                                 {d: layer.fetcher.statistics() for d, layer in served.items()})

    def served_layers(self) -> list[ServedLayer]:
        """Every served layer with its spec, fetcher, mountpoints and background state."""
        out = []
        prefetching = self._config.prefetch.prefetch or self._config.prefetch.background
        for digest, spec in self._specs.items():
            layer = self._served(digest)
            if layer is None:
                continue
            state = ("done" if digest in self._background_done else "running") if prefetching else "off"
            out.append(ServedLayer(spec, layer.fetcher, tuple(sorted(layer.mountpoints)), state))
        return out

    async def warm(self, digest: str, step_bytes: int = 4 << 20) -> None:
        """Fetch every chunk of served layer ``digest`` not cached yet, in blob order.

        Each step of about ``step_bytes`` compressed bytes yields to on-demand reads.

        Raises:
            LayerError: the layer is not served, or a chunk could not be fetched or verified.
        """
        layer = self._served(digest)
        if layer is None:
            raise LayerError(f"layer {digest} is not served")
        fetcher = layer.fetcher
        index = fetcher.index
        step: list[int] = []
        size = 0
        for cid in sorted(range(index.chunk_count), key=index.chunk_blob_range):
            if fetcher.is_cached(cid):
                continue
            start, end = index.chunk_blob_range(cid)
            step.append(cid)
            size += end - start
            if size >= step_bytes:
                await fetcher.ensure(step, background=True, collect=False)
                step, size = [], 0
        if step:
            await fetcher.ensure(step, background=True, collect=False)

    def fetcher(self, digest: str) -> ChunkFetcher | None:
        """The fetcher of a mounted layer (statistics, tests)."""
        for layer in self._mounts.values():
            if layer.digest == digest:
                return layer.fetcher
        return None

    # -- the LayerFilesystem protocol ----------------------------------------------------

    async def mount(self, spec: LayerSpec, mountpoint: str) -> None:
        """Serve ``spec``'s layer and bind-mount its tree onto ``mountpoint`` (see module doc)."""
        mountpoint = os.path.abspath(mountpoint)
        self._refuse_taken(mountpoint)
        await self._mount(spec, mountpoint, None)

    async def start_mount(self, spec: LayerSpec, mountpoint: str) -> None:
        """``mount``, returning as soon as the layer's TOC is read and matches ``spec.toc_digest``.

        The index is built and the tree bound in the background: ``check`` and ``unmount`` of
        ``mountpoint`` wait for that, and ``check`` raises if it failed (a TOC that matches its
        digest but does not index). A failure known before this returns is raised here, as by
        ``mount``. A layer with no TOC digest to check (``allow_unverified_toc``) is mounted in
        full before this returns.
        """
        mountpoint = os.path.abspath(mountpoint)
        self._refuse_taken(mountpoint)
        pending = _PendingMount(spec.digest)
        self._pending[mountpoint] = pending
        self._nursery.start_soon(self._finish_mount, spec, mountpoint, pending)
        await pending.accepted.wait()
        if pending.error is not None:  # known before we answer: let the snapshotter fall back
            if self._pending.get(mountpoint) is pending:
                del self._pending[mountpoint]
            raise pending.error

    async def _finish_mount(self, spec: LayerSpec, mountpoint: str, pending: _PendingMount) -> None:
        try:
            with pending.scope:
                await self._mount(spec, mountpoint, pending.accepted.set)
            if pending.scope.cancelled_caught:
                pending.error = LayerError(f"mounting layer {spec.digest} stopped: lazysnap is stopping")
        except LayerError as exc:
            pending.error = exc
        except Exception as exc:  # a bug: it must not end the session's nursery
            log.exception("unexpected error mounting layer %s", spec.digest)
            pending.error = LayerError(f"internal error mounting layer {spec.digest}: {exc!r}")
        finally:
            late = pending.accepted.is_set()
            pending.done.set()
            pending.accepted.set()
        if pending.error is None:
            del self._pending[mountpoint]
        elif late:
            log.error("layer %s was accepted (its TOC matches its digest) but cannot be served: %s; "
                      "snapshots on it answer Unavailable", spec.digest, pending.error)
            if isinstance(pending.error, (FormatError, UnsupportedFormat)):
                # the same bytes will fail the same way: the next pull of it is unpacked instead
                self._refused[spec.digest] = str(pending.error)

    def _refuse_taken(self, mountpoint: str) -> None:
        if mountpoint in self._mounts or mountpoint in self._pending:
            raise LayerError(f"{mountpoint} already holds a lazysnap layer")

    async def _mount(self, spec: LayerSpec, mountpoint: str, on_accept: Callable[[], None] | None) -> None:
        refused = self._refused.get(spec.digest)
        if refused is not None:
            raise LayerError(f"layer {spec.digest} failed to index before ({refused}): not mounted lazily")
        layer_dirname(spec.digest)  # refuse malformed digests before using them in paths
        if spec.neighbours:
            self._nursery.start_soon(self.resolve_neighbours, spec)
        lock = self._opening.setdefault(spec.digest, trio.Lock())
        async with lock:
            layer = self._served(spec.digest)
            if layer is None:
                try:
                    layer = await self._open_layer(spec, on_accept)
                except LayerError:
                    raise
                except Exception as exc:  # a bug: log it loudly, but let the snapshotter fall back
                    log.exception("unexpected error opening layer %s", spec.digest)
                    raise LayerError(f"internal error opening layer {spec.digest}: {exc!r}") from exc
        src = os.path.join(self._fuse_root, layer.name.decode())
        layer.binding += 1
        try:
            await trio.to_thread.run_sync(_bind_mount, src, mountpoint)
        except BaseException as exc:  # including cancellation: never leave a layer half mounted
            layer.binding -= 1
            if not layer.mountpoints and not layer.binding:
                with trio.CancelScope(shield=True):
                    await self._close_layer(layer)
            if isinstance(exc, OSError):
                raise LayerError(f"cannot mount layer {spec.digest} on {mountpoint}: {exc}") from exc
            raise
        layer.binding -= 1
        layer.mountpoints.add(mountpoint)
        self._mounts[mountpoint] = layer
        log.info("mounted layer %s (%d nodes) on %s", spec.digest, layer.index.node_count, mountpoint)

    async def check(self, mountpoint: str, *, wait: bool = True) -> None:
        """Raise ``LayerError`` unless the layer is served and its source reachable (throttled).

        Waits for a ``start_mount`` of ``mountpoint`` to end, and raises if it failed; with
        ``wait=False`` one still under way passes.
        """
        mountpoint = os.path.abspath(mountpoint)
        pending = self._pending.get(mountpoint)
        if pending is not None:
            if not wait and not pending.done.is_set():
                return
            await pending.done.wait()
            if pending.error is not None:
                raise LayerError(f"layer {pending.digest} cannot be served: {pending.error}")
        layer = self._mounts.get(mountpoint)
        if layer is None or self._table.by_name(layer.name) is not layer:
            raise LayerError(f"{mountpoint} is not served by lazysnap")
        if self._stopped.is_set():
            raise LayerError("the FUSE session has ended")
        now = time.monotonic()
        if now - self._checked.get(layer.digest, -1e18) < self._config.check_interval:
            return
        await layer.fetcher.source.check()
        self._checked[layer.digest] = now

    async def unmount(self, mountpoint: str) -> None:
        """Unmount ``mountpoint``; the layer stops being served once no mountpoint uses it.

        Raises:
            LayerError: ``mountpoint`` is not a layer mount of this manager, or unmounting failed.
        """
        mountpoint = os.path.abspath(mountpoint)
        pending = self._pending.get(mountpoint)
        if pending is not None:
            await pending.done.wait()
            if pending.error is not None:  # never bound: nothing to release
                if self._pending.get(mountpoint) is pending:
                    del self._pending[mountpoint]
                return
        layer = self._mounts.get(mountpoint)
        if layer is None:
            raise LayerError(f"{mountpoint} is not a lazysnap layer mount")
        try:
            await trio.to_thread.run_sync(_unmount, mountpoint)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: no longer a mount point; forget it anyway
                raise LayerError(str(exc)) from exc
        del self._mounts[mountpoint]
        layer.mountpoints.discard(mountpoint)
        if not layer.mountpoints and not layer.binding:
            await self._close_layer(layer)

    async def forget_layer(self, digest: str) -> None:
        """Drop everything cached for a layer released for good (no-op while it is mounted)."""
        if self._served(digest) is None:
            await self._writer.flush()  # chunks of it still queued would land after the delete
            if self._served(digest) is None:
                await trio.to_thread.run_sync(self.cache.forget_layer, digest)

    async def aclose(self) -> None:
        """Unmount every layer, stop the FUSE session and wait for it to end."""
        global _session_active
        self._closing = True
        for pending in list(self._pending.values()):  # before the unmounts: none may bind after them
            pending.scope.cancel()
            await pending.done.wait()
        for mountpoint in list(self._mounts):
            try:
                await self.unmount(mountpoint)
            except LayerError as exc:
                log.warning("at shutdown: %s", exc)
        pyfuse3.terminate()
        await self._stopped.wait()
        pyfuse3.close(unmount=True)
        _session_active = False
        await self._writer.flush()  # what was fetched is kept for the next start
        self.cache.close()

    # -- neighbours ------------------------------------------------------------------------

    async def resolve_neighbours(self, spec: LayerSpec) -> None:
        """Read the indexes of ``spec.neighbours`` in parallel (best effort), ahead of their mounts.

        Each index is read once (persisted, and held in memory for a while): the neighbour's own
        mount, usually a moment later, takes it from there with no request and no second parse.
        Nothing is trusted here: each index is verified when its layer is mounted.
        """
        self._prune_resolutions()
        todo = [d for d in spec.neighbours[:_MAX_NEIGHBOURS]
                if d != spec.digest and d not in self._resolutions and self._served(d) is None]
        limiter = trio.CapacityLimiter(4)
        async with trio.open_nursery() as nursery:
            for digest in todo:
                neighbour = LayerSpec(ref=spec.ref, digest=digest, urls=(), format_hints=spec.format_hints)
                nursery.start_soon(self._resolve_one, neighbour, spec.digest, limiter)

    async def _resolve_one(self, spec: LayerSpec, of: str, limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                resolution = await self._resolution(spec)
            resolution.expires = time.monotonic() + _RESOLUTION_HOLD
        except LayerError as exc:
            log.debug("neighbour %s of %s not resolved: %s", spec.digest, of, exc)
        except Exception:  # a bug; this best-effort task runs in the session's nursery: don't end it
            log.exception("unexpected error resolving neighbour %s of %s", spec.digest, of)

    def _prune_resolutions(self) -> None:
        now = time.monotonic()
        for digest, resolution in list(self._resolutions.items()):
            if resolution.done.is_set() and resolution.expires < now:
                del self._resolutions[digest]

    async def _resolution(self, spec: LayerSpec, *, use_persisted: bool = True,
                          on_toc: Callable[[tuple[str, ...]], None] | None = None) -> _Resolution:
        """The layer's unverified index, read once however many callers want it at the same time.

        A finished resolution stays in ``_resolutions`` until its layer is mounted (or it
        expires); a failed one is dropped, and its waiters read the index themselves.
        ``on_toc`` gets the TOC's digests as soon as they are known, before the index is built.
        """
        waited = self._resolutions.get(spec.digest)
        if waited is not None and use_persisted:
            if on_toc is not None:
                waited.when_toc_read(on_toc)
            await waited.done.wait()
            if waited.index is not None:
                return waited
        resolution = _Resolution()
        if on_toc is not None:
            resolution.when_toc_read(on_toc)
        self._resolutions[spec.digest] = resolution
        try:
            await self._resolve_into(spec, resolution, use_persisted)
        except BaseException:
            if self._resolutions.get(spec.digest) is resolution:
                del self._resolutions[spec.digest]
            raise
        finally:
            resolution.done.set()
        return resolution

    async def _resolve_into(self, spec: LayerSpec, resolution: _Resolution, use_persisted: bool) -> None:
        persisted = None
        if use_persisted:
            persisted = await trio.to_thread.run_sync(self.cache.load_index, spec.digest)
        source = await self._factory.open(spec)
        try:
            if persisted is not None:
                try:
                    recorder = RecordingSource.load(source, persisted)
                    resolution.index = await self._read_index(recorder, resolution.toc_read)
                    resolution.size = await recorder.size()
                    if recorder.source_reads:
                        await trio.to_thread.run_sync(self.cache.save_index, spec.digest, recorder.dump())
                    return
                except (FormatError, IntegrityError, UnsupportedFormat) as exc:
                    log.warning("persisted index of %s unusable (%s): reading it from the source",
                                spec.digest, exc)
            recorder = RecordingSource(source, spec.size)
            resolution.index = await self._read_index(recorder, resolution.toc_read)
            resolution.size = await recorder.size()
            resolution.fresh = True
            await trio.to_thread.run_sync(self.cache.save_index, spec.digest, recorder.dump())
        finally:
            await source.aclose()

    # -- internals --------------------------------------------------------------------------

    def _image_layers(self, spec: LayerSpec) -> list[ChunkFetcher]:
        """The fetchers of the mounted layers of ``spec``'s image but its own: the layers below
        it first, nearest first, then those its labels name."""
        out: list[ChunkFetcher] = []
        seen = {spec.digest}
        for digest in (*spec.lower[:_MAX_NEIGHBOURS], *spec.neighbours[:_MAX_NEIGHBOURS]):
            if digest in seen:
                continue
            seen.add(digest)
            layer = self._served(digest)
            if layer is not None:
                out.append(layer.fetcher)
        return out

    def _served(self, digest: str) -> MountedLayer | None:
        hexpart = digest.partition(":")[2]
        for name in (hexpart[:16].encode(), hexpart.encode()):
            layer = self._table.by_name(name)
            if layer is not None and layer.digest == digest:
                return layer
        return None

    async def _open_layer(self, spec: LayerSpec, on_accept: Callable[[], None] | None = None
                          ) -> MountedLayer:
        try:
            index, resolution = await self._verified_index(spec, on_accept)
        finally:
            self._resolutions.pop(spec.digest, None)  # the mounted layer holds the index now
        # the size learnt with the index: the fetcher's source needs no HEAD for it
        if spec.size is None:
            spec = replace(spec, size=resolution.size)
        source = await self._factory.open(spec)
        if resolution.fresh:  # the registry just served this blob: no need to ask it again yet
            self._checked[spec.digest] = time.monotonic()
        try:
            hexpart = layer_dirname(spec.digest)
            name = hexpart[:16].encode()
            if self._table.by_name(name) is not None:
                name = hexpart.encode()  # a prefix collision: use the full digest
            fetcher = ChunkFetcher(spec.digest, index, source, self.cache, self._config.fetch, self._gate,
                                   self._writer, image_layers=partial(self._image_layers, spec))
            layer = self._table.add(name, spec.digest, index, fetcher)
        except BaseException:
            await source.aclose()
            raise
        self.cache.pin(spec.digest)
        self._specs[spec.digest] = spec
        self._background_done.discard(spec.digest)
        scope = trio.CancelScope()
        self._prefetch_scopes[spec.digest] = scope
        self._nursery.start_soon(self._prefetch, fetcher, spec.prefetch_size, scope)
        return layer

    async def _prefetch(self, fetcher: ChunkFetcher, prefetch_size: int | None,
                        scope: trio.CancelScope) -> None:
        with scope:
            self._gate.touch()
            await run_prefetch(fetcher, self._config.prefetch, prefetch_size)
            self._background_done.add(fetcher.layer_digest)

    async def _verified_index(self, spec: LayerSpec, on_accept: Callable[[], None] | None = None
                              ) -> tuple[LayerIndex, _Resolution]:
        on_toc = None
        if on_accept is not None and spec.toc_digest:
            expected = spec.toc_digest

            def on_toc(digests: tuple[str, ...]) -> None:
                if digest_accepted(expected, digests):
                    on_accept()

        resolution = await self._resolution(spec, on_toc=on_toc)
        assert resolution.index is not None
        try:
            return self._verify(spec, resolution.index), resolution
        except IntegrityError as exc:
            if resolution.fresh:
                raise
            # the persisted copy may be stale or damaged: only the source's bytes decide
            log.warning("persisted index of %s does not verify (%s): reading it from the source",
                        spec.digest, exc)
        resolution = await self._resolution(spec, use_persisted=False, on_toc=on_toc)
        assert resolution.index is not None
        return self._verify(spec, resolution.index), resolution

    async def _read_index(self, source: BlobSource, on_toc: Callable[[tuple[str, ...]], None]
                          ) -> UnverifiedIndex:
        for name in self._config.formats:
            reader = READERS.get(name)
            if reader is None:
                raise UnsupportedFormat(f"unknown format reader {name!r} in config")
            try:
                return await reader(source, opaque_xattr=self._config.fuse.opaque_xattr, on_toc=on_toc)
            except UnsupportedFormat:
                continue
        formats = ", ".join(self._config.formats)
        raise UnsupportedFormat(f"{source.digest} is in none of the formats {formats}")

    def _verify(self, spec: LayerSpec, unverified: UnverifiedIndex) -> LayerIndex:
        if spec.toc_digest:
            return unverified.verify(spec.toc_digest)
        if self._config.allow_unverified_toc:
            return unverified.skip_verification(f"layer {spec.digest} has no TOC digest label; "
                                                "allow_unverified_toc is set")
        raise IntegrityError(f"layer {spec.digest} has no expected TOC digest: refusing to mount it lazily")

    async def _close_layer(self, layer: MountedLayer) -> None:
        self._table.remove(layer.name)
        scope = self._prefetch_scopes.pop(layer.digest, None)
        if scope is not None:
            scope.cancel()
        self.cache.unpin(layer.digest)
        self._specs.pop(layer.digest, None)
        self._background_done.discard(layer.digest)
        self._checked.pop(layer.digest, None)
        self._opening.pop(layer.digest, None)
        if not self._closing:  # the session is about to end: nothing left to invalidate
            pyfuse3.invalidate_entry_async(ROOT_INODE, layer.name, ignore_enoent=True)
        await layer.fetcher.source.aclose()
        log.info("layer %s no longer served", layer.digest)


@asynccontextmanager
async def open_layer_manager(config: FusefsConfig, source_factory: SourceFactory
                             ) -> AsyncIterator[LayerManager]:
    """Run a LayerManager for the duration of the block; on exit unmount all and stop FUSE."""
    async with trio.open_nursery() as nursery:
        manager = await LayerManager.create(config, nursery, source_factory)
        try:
            yield manager
        finally:
            with trio.CancelScope(shield=True):
                await manager.aclose()
            nursery.cancel_scope.cancel()


def _detach_if_dead(path: str) -> None:
    """Lazily unmount ``path`` if it is a mount of a FUSE session that died (a crashed daemon)."""
    try:
        os.statvfs(path)  # never answered from the kernel's attribute cache
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("%s is a dead FUSE mount from an earlier run: detaching it", path)
        _libc.umount2(path.encode(), _MNT_DETACH)


def _prepare_mountpoint(mountpoint: Path) -> None:
    _detach_if_dead(str(mountpoint))
    mountpoint.mkdir(parents=True, exist_ok=True)
