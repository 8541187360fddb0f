"""The read path of one layer: cache hit → bytes; miss → coalesced fetch → decode → verify → cache.

Invariants (all state lives on the trio thread; worker threads only decode, hash and write files):

* bytes reach a caller or the cache only after their chunk digest matched;
* one in-flight fetch per chunk: concurrent readers of a missing chunk wait on its ``_Flight``;
* each run of blob-adjacent missing chunks is one ``(offset, length)`` range, and the ranges of
  one read go to the source in one ``stream_ranges`` call (bounded by ``FetchConfig``);
* a chunk is completed (verified, cached, its waiters woken) as soon as its bytes arrived, not
  when the whole request has: a fetch holds the chunks being completed, not its body;
* a chunk that failed keeps failing fast for ``failure_ttl`` seconds, then is tried again;
* background work waits at the :class:`PriorityGate` while any on-demand fetch is in flight.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeAlias

import trio

from fusefs import codecs, elf
from fusefs.cache import ChunkCache, StagedChunk
from fusefs.codecs import ChunkBytes
from fusefs.config import FetchConfig
from fusefs.errors import FormatError, IntegrityError, LayerError, SourceError
from fusefs.imports import Module, ModuleResolver, compiled_names, source_names
from fusefs.index import ROOT, Chunk, LayerIndex, NodeId
from fusefs.libraries import LibraryFinder
from fusefs.sources.base import BlobSource, stream_ranges
from fusefs.sources.replay import RecordingSource
from fusefs.writer import CacheWriter

log = logging.getLogger(__name__)

Buffer: TypeAlias = bytes | memoryview  # fetched bytes, or a view of a coalesced run
Held: TypeAlias = ChunkBytes | StagedChunk  # a verified chunk not read from the cache
_Run: TypeAlias = tuple[int, int, list[int]]  # blob start, blob end, chunk ids
SEQUENTIAL_AHEAD_BYTES = 8 << 20  # file bytes fetched ahead of a sequential reader
STEP_BYTES = 4 << 20  # compressed bytes per request of a fetch nobody waits on (``collect=False``)
# A chunk at least this large that a reader waits for is decoded into a file of the cache and
# served from there, not from a buffer of its size (see ``_complete_staged``)
STAGE_BYTES = 1 << 20
_READ_ATTEMPTS = 3
_MODULE_BYTES = 1 << 20  # a Python module larger than this is not scanned for its imports
_ELF_HEAD_BYTES = 64 << 10  # where an ELF file's program headers are looked for
_STRTAB_BYTES = 1 << 20  # most of a dynamic string table read for the needed libraries' names
_LD_SO_CACHE_BYTES = 4 << 20


class PriorityGate:
    """Lets background fetches run only while on-demand fetching is quiet (all layers).

    Quiet means no on-demand fetch in flight *and* none for ``silence`` seconds (and none since
    a layer was last mounted, see :meth:`touch`): a starting container reads in bursts with
    gaps between them, and a background request that slips into a gap sits in front of the
    next on-demand read on a slow link. Background steps also take turns (``background_turn``):
    one at a time process-wide, so prefetching several layers at once holds one step's buffers,
    not one per layer; a single stream of multi-MiB requests already fills the link. Speculative
    fetches (``speculation``) run two at a time, with on-demand priority.
    """

    def __init__(self, silence: float = 0.0) -> None:
        self._silence = silence
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._last_busy = -math.inf
        self.background_turn = trio.Lock()
        # speculative fetches of all layers, two at a time: each holds a step's buffers, and
        # more would only split the link further between guesses and the reads they serve
        self.speculation = trio.CapacityLimiter(2)

    def touch(self) -> None:
        """Count now as on-demand activity (a layer was just mounted: its reads are coming)."""
        # time.monotonic, not trio's clock: a gate may outlive one trio.run (tests), and each
        # run's clock has its own offset
        self._last_busy = time.monotonic()

    @contextmanager
    def on_demand(self) -> Iterator[None]:
        """Mark an on-demand fetch in flight for the duration of the block."""
        if self._active == 0:
            self._idle = trio.Event()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._last_busy = time.monotonic()
            if self._active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once on-demand fetching has been quiet for the silence period (checkpoints)."""
        while True:
            while self._active:
                await self._idle.wait()
            remaining = self._last_busy + self._silence - time.monotonic()
            if remaining <= 0:
                break
            await trio.sleep(remaining)
        await trio.lowlevel.checkpoint()


class _NotHeld(Exception):
    pass


class _NoSource:
    """A BlobSource that has nothing: RecordingSource over it serves only what it recorded."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    async def size(self) -> int:
        raise _NotHeld

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        raise _NotHeld

    async def read_tail(self, length: int) -> bytes:
        raise _NotHeld

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def _held_from(held: RecordingSource, start: int, end: int) -> int:
    """The lowest ``x`` in ``[start, end]`` such that ``held`` holds ``[x, end)`` (bisection)."""
    lo, hi = start, end
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            await held.read_ranges([(mid, end - mid)])
        except _NotHeld:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _again(exc: LayerError) -> LayerError:
    """A fresh copy of a remembered error (re-raising one object would pile up tracebacks)."""
    try:
        return type(exc)(*exc.args)
    except Exception:  # a subclass with another constructor: keep the message and the family
        return LayerError(str(exc))


@dataclass(eq=False)
class _Flight:
    event: trio.Event
    data: Held | None = None
    error: LayerError | None = None


@dataclass(frozen=True)
class FetchStatistics:
    on_demand_fetches: int
    background_fetches: int
    chunks_fetched: int
    bytes_fetched: int
    integrity_failures: int
    source_failures: int
    reads: int = 0  # file reads served (FUSE read calls that reached the layer)
    bytes_served: int = 0


class ChunkFetcher:
    """Serves file reads of one mounted layer (see the module docstring for the invariants)."""

    def __init__(
        self,
        layer_digest: str,
        index: LayerIndex,
        source: BlobSource,
        cache: ChunkCache,
        config: FetchConfig,
        gate: PriorityGate,
        writer: CacheWriter | None = None,
        image_layers: Callable[[], Sequence[ChunkFetcher]] | None = None,
    ) -> None:
        self.layer_digest = layer_digest
        self.index = index
        self.source = source
        self._cache = cache
        self._config = config
        self._gate = gate
        self._inflight: dict[int, _Flight] = {}
        self._failures: dict[int, tuple[float, LayerError]] = {}
        self._writer = writer if writer is not None else CacheWriter(cache)
        self._writing: dict[int, Held] = {}  # verified, served, and on their way to the cache
        self._recent: OrderedDict[int, ChunkBytes] = OrderedDict()
        self._recent_bytes = 0
        self._on_demand = self._background = self._chunks = self._bytes = 0
        self._integrity_failures = self._source_failures = 0
        self._reads = self._served = 0
        self._ahead_running = False
        self._tree_links: tuple[array[int], array[int]] | None = None  # each node's directory, entry
        self._speculated: set[int] = set()  # files and directories whose speculation started
        # directory → name suffixes of its missed files; None once it was scanned
        self._kinds: dict[int, set[bytes] | None] = {}
        self._followed: set[int] = set()  # Python modules and libraries whose imports were looked for
        self._ld_so_cache: dict[bytes, bytes] | None = None
        self._ld_so_cache_read: trio.Event | None = None  # set once _ld_so_cache is
        # the fetchers of the other mounted layers of this layer's image, for the walks
        self._image_layers: Callable[[], Sequence[ChunkFetcher]] = image_layers or tuple
        self.not_kept = 0  # verified chunks the cache did not keep (full, or a disk error)
        self._order: tuple[array[int], array[int]] | None = None

    def statistics(self) -> FetchStatistics:
        return FetchStatistics(self._on_demand, self._background, self._chunks, self._bytes,
                               self._integrity_failures, self._source_failures, self._reads, self._served)

    def is_cached(self, cid: int) -> bool:
        """Verified and held: on disk, or queued for it (never fetched again either way)."""
        return cid in self._writing or self._cache.contains(self.layer_digest, self.index.chunk_key(cid))

    async def flush(self) -> None:
        """Wait until the chunks fetched so far are written to the cache (or refused)."""
        await self._writer.flush()

    def _held(self, cid: int) -> Held | None:
        """A verified chunk's bytes that are not (yet) in the disk cache, if still held."""
        data = self._writing.get(cid)
        return data if data is not None else self._recent.get(cid)

    def _cached(self, cid: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of a chunk from the disk cache; None if it is not there."""
        return self._cache.read(self.layer_digest, self.index.chunk_key(cid), lo, hi - lo)

    def _piece(self, data: Held | None, lo: int, hi: int) -> Buffer | None:
        """Bytes ``[lo, hi)`` of a chunk held in memory or staged; None if no longer held."""
        if data is None:
            return None
        if isinstance(data, StagedChunk):
            piece = data.pread(lo, hi - lo)
            # closed once committed: the cache has it now, unless it was evicted since
            return piece if piece is not None else self._cache.read(self.layer_digest, data.key, lo, hi - lo)
        return memoryview(data)[lo:hi]

    # -- reads ----------------------------------------------------------------------------

    async def read(self, node: NodeId, offset: int, length: int, *, sequential: bool = False) -> bytes:
        """Bytes ``[offset, offset+length)`` of regular file ``node``, short at end of file.

        ``sequential``: the caller read the bytes just before; the chunks of the next
        ``SEQUENTIAL_AHEAD_BYTES`` of the file that are neither cached nor in flight are then
        fetched in the background (one request), so a streaming reader rarely waits for one.

        Raises:
            IntegrityError, SourceError: the bytes could not be fetched or did not verify.
        """
        size = self.index.size(node)
        end = min(offset + length, size)
        if offset >= end:
            return b""
        if sequential and end < size and not self._ahead_running:
            self._start_ahead(node, end, size)
        data = await self._gather(node, offset, end)
        self._reads += 1
        self._served += len(data)
        return data

    async def _gather(self, node: NodeId, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)`` of ``node``, fetching (and speculating on) what is missing."""
        cids = self.index.chunks_in(node, offset, end - offset)
        parts: list[Buffer | None] = []
        missing: list[int] = []
        for cid in cids:
            lo, hi = self._slice(cid, offset, end)
            data: Buffer | None = self._cached(cid, lo, hi)
            if data is None and (self._writing or self._recent):
                data = self._piece(self._held(cid), lo, hi)
            parts.append(data)
            if data is None:
                missing.append(cid)
        if missing:
            wanted = missing + self._neighbours(missing[-1], missing[0])
            self._speculate(node, wanted)
            for _ in range(_READ_ATTEMPTS):
                fetched = await self.ensure(wanted)
                for i, cid in enumerate(cids):
                    if parts[i] is None:
                        lo, hi = self._slice(cid, offset, end)
                        got = fetched.get(cid)
                        # copied once, by the join; a chunk cached meanwhile is read in part
                        parts[i] = self._piece(got, lo, hi) if got is not None else self._cached(cid, lo, hi)
                # a chunk evicted between its commit and this read: fetch it again
                wanted = [cid for cid, part in zip(cids, parts, strict=True) if part is None]
                if not wanted:
                    break
            else:
                raise SourceError(f"layer {self.layer_digest}: chunks of node {node} were evicted "
                                  f"{_READ_ATTEMPTS} times before they could be read")
        return b"".join(p for p in parts if p is not None)

    def _neighbours(self, last: int, first: int) -> list[int]:
        """Uncached chunks right after ``last`` in the blob, within ``neighbour_bytes`` of ``first``.

        Files read together sit together in a layer (tar order, or the prioritized order of an
        optimized image), so the small files after a missed one are likely next: taking them in
        the same request trades a few KiB for a round trip each.
        """
        window = self._config.neighbour_bytes
        if window <= 0:
            return []
        order, position = self._blob_order()
        start, end = self.index.chunk_blob_range(first)
        limit = start + window
        out: list[int] = []
        for i in range(position[last] + 1, len(order)):
            cid = order[i]
            lo, hi = self.index.chunk_blob_range(cid)
            if lo < end or hi > limit:  # not next in the blob, or past the window
                break
            if cid in self._inflight or cid in self._failures or self.is_cached(cid):
                break
            out.append(cid)
            end = hi
        return out

    def _speculate(self, node: NodeId, wanted: list[int]) -> None:
        """On a file's first miss, start fetching what its reader is about to ask for too.

        A program that reads part of a file mostly reads the rest soon (an mmapped library
        faults its pages in one round trip each), and one that reads files of a kind from a
        directory (Python importing a package) reads their siblings next (:meth:`_scan`; or,
        with ``speculate_dir_bytes``, a small file's small siblings). What is chosen goes out in
        requests of its own, alongside the miss and not waited for: a round trip each that the
        reader then saves. Bounded by the ``speculate_*`` settings; each file and directory is
        speculated on once. A file of the layer's prefetch prefix starts no scan and no walk.
        """
        config = self._config
        if node in self._speculated:
            return
        self._speculated.add(node)
        index = self.index
        taken = set(wanted)
        todo: list[int] = []
        if config.speculate_file_bytes > 0:
            rest = self._fetchable(index.chunk_ids(node), taken)
            if rest and self._compressed(rest) <= config.speculate_file_bytes:
                todo += rest
        # only a small file speaks for its siblings: a library's first page is read from
        # directories (/usr/lib) whose other small files mostly stay unread
        if config.speculate_dir_bytes > 0 and index.size(node) <= config.small_file_bytes:
            directory = self._directory(node)
            if directory not in self._speculated:
                self._speculated.add(directory)
                budget = config.speculate_dir_bytes
                for _, _, child in index.children(directory):
                    if child == node or not 0 < index.size(child) <= config.small_file_bytes:
                        continue
                    cids = self._fetchable(index.chunk_ids(child), taken)
                    size = self._compressed(cids)
                    if cids and size <= budget:
                        todo += cids
                        budget -= size
        # a file of the layer's prefetch prefix was read as its producer recorded the workload:
        # what it imports or links is in the prefix too (and coming) or likely never read
        profiled = self._in_prefetch_prefix(node)
        if config.speculate_scan_bytes > 0 and not profiled:
            todo += self._scan(node, taken | set(todo))
        if todo:
            trio.lowlevel.spawn_system_task(self._fetch_speculatively, todo)
        if node not in self._followed and not profiled:
            # only a module's name can make it one: no task for any other file
            if config.speculate_import_bytes > 0 and self._name(node).endswith((b".py", b".pyc")):
                self._spawn("an import walk", partial(self._follow_imports, node))
            head = index.chunk_ids(node)[:1]
            if config.speculate_library_bytes > 0 and head and head[0] in taken:
                self._spawn("a library walk", partial(self._follow_libraries, node))

    def _in_prefetch_prefix(self, node: NodeId) -> bool:
        """Whether ``node`` starts in the blob before the ``.prefetch.landmark``."""
        end = self.index.prefetch_end
        head = self.index.chunk_ids(node)[:1]
        return end is not None and bool(head) and self.index.chunk_blob_range(head[0])[0] < end

    def _spawn(self, what: str, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` as a system task nobody waits on (see :meth:`_guarded`)."""
        trio.lowlevel.spawn_system_task(self._guarded, what, job)

    async def _guarded(self, what: str, job: Callable[[], Awaitable[object]]) -> None:
        # nothing may escape a system task: an exception would end the whole trio run
        try:
            await job()
        except LayerError:
            pass  # a reader that needs these bytes fetches them again and reports the error
        except Exception:
            log.exception("layer %s: unexpected error in %s", self.layer_digest, what)

    async def _follow_imports(self, node: NodeId) -> None:
        """If ``node`` is a Python module, fetch the modules it imports from this layer, level
        by level of the import tree (see :mod:`fusefs.imports`), once its own bytes are here;
        the names it imports go to the image's other layers too (:meth:`follow_names`).

        Only modules not yet cached are followed further: one already cached was read before or
        prefetched, and a miss on one of its imports starts a walk of its own. Bounded by
        ``speculate_import_bytes`` per walk; each module is looked at once.
        """
        resolver = ModuleResolver(self.index, self._directory, self._name)
        first = resolver.module(node)
        if first is not None:
            self._followed.add(node)
            await self._walk_imports(resolver, [first], {})

    def follow_names(self, tag: bytes, names: frozenset[str]) -> None:
        """Start fetching the modules named ``names`` that this layer's ``sys.path`` roots for
        cache tag ``tag`` hold (its standard library, ``lib-dynload``, site directories) and
        what they import: another layer of the image has a module importing them."""
        if self._config.speculate_import_bytes > 0:
            self._spawn("an import walk from another layer", partial(self._follow_names, tag, names))

    async def _follow_names(self, tag: bytes, names: frozenset[str]) -> None:
        resolver = ModuleResolver(self.index, self._directory, self._name)
        found = resolver.resolve_absolute(tag, names)
        if found:
            await self._walk_imports(resolver, [], found)

    async def _walk_imports(self, resolver: ModuleResolver, level: list[Module],
                            found: dict[NodeId, Module | None]) -> None:
        """Scan ``level``'s modules for what they import, fetch that (and ``found``), and go on
        with what was fetched, one level of the import tree per round."""
        budget = self._config.speculate_import_bytes
        while (level or found) and budget > 0:
            shared: set[str] = set()
            tag = None
            for module in level:
                size = self.index.size(module.node)
                if 0 < size <= _MODULE_BYTES:
                    data = await self._gather(module.node, 0, size)
                    names = compiled_names(data) if module.tag is not None else source_names(data)
                    del data
                    found.update(resolver.resolve(module, names))
                    if module.tag is not None:
                        shared |= names
                        tag = module.tag
            if shared and tag is not None:
                for layer in self._image_layers():
                    layer.follow_names(tag, frozenset(shared))
            todo: list[int] = []
            libraries: list[NodeId] = []
            level = []
            for target, module_or_none in found.items():
                chunks = self.index.chunk_ids(target)
                if target in self._followed or all(self.is_cached(cid) for cid in chunks):
                    continue
                self._followed.add(target)
                cids = self._fetchable(chunks, set())  # none if another fetch has them in flight
                if len(cids) > 1 and self._compressed(cids) > self._config.speculate_file_bytes:
                    cids = cids[:1]  # a large library: its first chunk is read at once
                size = self._compressed(cids)
                if size > budget:
                    continue
                budget -= size
                todo += cids
                if module_or_none is not None:
                    level.append(module_or_none)
                else:
                    libraries.append(target)
            found = {}
            if todo:
                await self._fetch_speculatively(todo)
            if self._config.speculate_library_bytes > 0:
                for library in libraries:  # an extension module: the loader comes next
                    self._spawn("a library walk", partial(self._follow_libraries, library))

    async def _follow_libraries(self, node: NodeId) -> None:
        """If ``node`` is an ELF file, fetch what the dynamic loader reads of it next (its
        dynamic section and writable segment) and the first chunk of each library it needs
        from this layer, then the same for those, level by level (see :mod:`fusefs.elf`).
        Bounded by ``speculate_library_bytes`` per walk; each file is looked at once."""
        self._followed.add(node)
        budget = self._config.speculate_library_bytes
        level = [node]
        while level and budget > 0:
            found: list[NodeId] = []
            for library in level:
                budget, needed = await self._load(library, budget)
                for target in needed:
                    if target not in self._followed:
                        self._followed.add(target)
                        found.append(target)
            todo: list[int] = []
            for target in found:
                head = self._fetchable(self.index.chunk_ids(target)[:1], set())
                size = self._compressed(head)
                if size <= budget:
                    budget -= size
                    todo += head
            if todo:
                await self._fetch_speculatively(todo)
            level = found

    async def _load(self, node: NodeId, budget: int) -> tuple[int, list[NodeId]]:
        """What loading ELF file ``node`` reads next: fetched (within ``budget``, which is
        returned less what that took) and, from its dynamic section, the libraries it needs.
        Reads only its first chunk (fetched already) beyond what the budget pays for."""
        index = self.index
        size = index.size(node)
        first = index.chunk_ids(node)[:1]
        if not first:
            return budget, []
        head = await self._gather(node, 0, min(size, _ELF_HEAD_BYTES, index.chunk_size(first[0])))
        layout = elf.layout(head, size)
        if layout is None or layout.dynamic is None:
            return budget, []
        budget = await self._fetch_within(node, layout.touched(), budget)
        offset, length = layout.dynamic
        if budget < 0:
            return 0, []
        dynamic = elf.dynamic_entries(await self._gather(node, offset, offset + length), layout)
        if dynamic is None or not dynamic.needed or dynamic.strtab >= size:
            return budget, []
        strtab_end = min(size, dynamic.strtab + dynamic.strsz, dynamic.strtab + _STRTAB_BYTES)
        budget = await self._fetch_within(node, [(dynamic.strtab, strtab_end - dynamic.strtab)], budget)
        if budget < 0:
            return 0, []
        strtab = await self._gather(node, dynamic.strtab, strtab_end)
        search = [path for offset in dynamic.search
                  for path in (elf.string_at(strtab, offset) or b"").split(b":") if path]
        finder = LibraryFinder(index, self._directory, self._name, await self._ld_so_cache_map())
        names = [elf.string_at(strtab, offset) or b"" for offset in dynamic.needed]
        needed = [finder.find(node, name, search) for name in names]
        elsewhere = [name for name, library in zip(names, needed, strict=True) if library is None and name]
        if elsewhere:  # the image's other layers may have them ($ORIGIN means this layer)
            for layer in self._image_layers():
                layer.follow_libraries(elsewhere, [path for path in search if b"$" not in path])
        return budget, [library for library in needed if library is not None]

    def follow_libraries(self, sonames: Sequence[bytes], search: Sequence[bytes]) -> None:
        """Start a library walk from each of ``sonames`` this layer holds: a file of another
        layer of the image needs them (``search``: its RUNPATH)."""
        if self._config.speculate_library_bytes > 0:
            self._spawn("finding libraries another layer needs",
                        partial(self._follow_sonames, tuple(sonames), tuple(search)))

    async def _follow_sonames(self, sonames: tuple[bytes, ...], search: tuple[bytes, ...]) -> None:
        finder = LibraryFinder(self.index, self._directory, self._name, await self._ld_so_cache_map())
        for soname in sonames:
            node = finder.find(None, soname, search)
            if node is not None and node not in self._followed:
                self._followed.add(node)
                self._spawn("a library walk", partial(self._follow_libraries, node))

    async def _fetch_within(self, node: NodeId, ranges: Sequence[tuple[int, int]], budget: int) -> int:
        """Fetch the chunks of ``node`` under ``ranges`` (one request) if ``budget`` covers them;
        the budget left, negative if it did not."""
        cids: list[int] = []
        for offset, length in ranges:
            cids += self._fetchable(self.index.chunks_in(node, offset, length), set(cids))
        cost = self._compressed(cids)
        if cost > budget:
            return -1
        if cids:
            await self._fetch_speculatively(cids)
        return budget - cost

    async def _ld_so_cache_map(self) -> dict[bytes, bytes]:
        """The layer's ``/etc/ld.so.cache`` parsed (read once; empty if it has none or its read
        failed). Walks that ask while it is being read wait for it."""
        if self._ld_so_cache_read is not None:
            await self._ld_so_cache_read.wait()
            assert self._ld_so_cache is not None
            return self._ld_so_cache
        self._ld_so_cache_read = read = trio.Event()
        parsed: dict[bytes, bytes] = {}
        try:
            node = self.index.resolve(b"etc/ld.so.cache")
            if node is not None and 0 < self.index.size(node) <= _LD_SO_CACHE_BYTES:
                parsed = elf.ld_so_cache(await self._gather(node, 0, self.index.size(node)))
        finally:
            self._ld_so_cache = parsed
            read.set()
        return parsed

    def _scan(self, node: NodeId, taken: set[int]) -> list[int]:
        """When a second file of one kind is missed in a directory, the first chunk of its other
        files of that kind: a program working through a directory (Python importing a package's
        modules, a loader opening a package's extension libraries) reads one file after another,
        a round trip each. A kind is a name suffix (``.cpython-311.pyc``); files of different
        kinds, such as the libraries a program links from /usr/lib (``.so.6``, ``.so.1``), are not
        a pattern, and most of their siblings stay unread. Nor is a directory with more than
        ``speculate_scan_files`` files of the kind: that is a collection a program takes a few
        from (Python's standard library, 171 modules; its encodings, 122), where a package's
        directory (numpy's and scipy's hold up to 38) is mostly imported whole."""
        index = self.index
        directory = self._directory(node)
        kinds = self._kinds.setdefault(directory, set())
        if kinds is None:  # scanned already
            return []
        kind = _suffix(self._name(node))
        if not kind:
            return []
        if kind not in kinds:
            kinds.add(kind)
            return []
        self._kinds[directory] = None
        siblings = [child for _, sibling_name, child in index.children(directory)
                    if child != node and index.size(child) > 0 and sibling_name.endswith(kind)]
        if len(siblings) >= self._config.speculate_scan_files:
            return []
        todo: list[int] = []
        budget = self._config.speculate_scan_bytes
        for child in siblings:
            head = self._fetchable(index.chunk_ids(child)[:1], taken)
            size = self._compressed(head)
            if head and size <= budget:
                todo += head
                budget -= size
        return todo

    def _directory(self, node: NodeId) -> NodeId:
        return NodeId(self._links()[0][node])

    def _name(self, node: NodeId) -> bytes:
        """``node``'s name in :meth:`_directory` (a lookup, not a scan of the directory)."""
        return self.index.entry_name(self._links()[1][node]) if node != ROOT else b""

    def _links(self) -> tuple[array[int], array[int]]:
        if self._tree_links is None:  # built on the first speculation only
            self._tree_links = self.index.links()
        return self._tree_links

    def _fetchable(self, cids: Sequence[int], taken: set[int]) -> list[int]:
        """Those of ``cids`` not taken, cached, in flight or failing."""
        return [cid for cid in cids if cid not in taken and cid not in self._inflight
                and cid not in self._failures and not self.is_cached(cid)]

    def _compressed(self, cids: Sequence[int]) -> int:
        total = 0
        for cid in cids:
            start, end = self.index.chunk_blob_range(cid)
            total += end - start
        return total

    async def _fetch_speculatively(self, cids: list[int]) -> None:
        async with self._gate.speculation:
            await self._fetch_unwaited(cids, "speculative fetch")

    async def _fetch_unwaited(self, cids: list[int], what: str) -> None:
        """Fetch ``cids`` into the cache for nobody in particular (a system task's body)."""
        await self._guarded(what, partial(self.ensure, cids, collect=False))

    def chunks_in_blob_order(self) -> array[int]:
        """Every chunk id of the layer, in blob order (one shared array, built once)."""
        return self._blob_order()[0]

    def _blob_order(self) -> tuple[array[int], array[int]]:
        """Chunk ids sorted by blob offset, and each chunk's position in that order (built once:
        chunk ids follow the TOC, which an optimized image reorders)."""
        if self._order is None:
            count = self.index.chunk_count
            order = array("q", sorted(range(count), key=self.index.chunk_blob_range))
            position = array("q", bytes(8 * count))
            for i, cid in enumerate(order):
                position[cid] = i
            self._order = (order, position)
        return self._order

    async def adopt_index_reads(self, *, fetch_head: bool = True) -> int:
        """Cache the chunks whose bytes came with the index reads (the blob tail); return how many.

        The format reader's first request usually brings the last chunks before the TOC too;
        the manager persisted those ranges with the index, so taking the chunks from there
        saves fetching them a second time. The chunk straddling the start of those ranges is
        completed with a fetch of its missing head only (unless ``fetch_head`` is false: then
        no request at all is made). Each chunk is verified like a fetched
        one, under a flight so concurrent readers wait for it; a chunk that fails is left to
        the normal miss path.
        """
        persisted = await trio.to_thread.run_sync(self._cache.load_index, self.layer_digest)
        if persisted is None:
            return 0
        try:
            held = RecordingSource.load(_NoSource(self.layer_digest), persisted)
        except FormatError:
            return 0
        index = self.index
        adopted = 0
        # the recorded ranges are the tail: walk back from the last chunk until one is not held
        for cid in sorted(range(index.chunk_count), key=index.chunk_blob_range, reverse=True):
            start, end = index.chunk_blob_range(cid)
            head_end = await _held_from(held, start, end)
            if head_end == end:
                break  # nothing of this chunk was read with the index: neither of earlier ones
            if (self.is_cached(cid) or cid in self._inflight or cid in self._failures
                    or (head_end > start and not fetch_head)):
                if head_end > start:
                    break
                continue
            (tail,) = await held.read_ranges([(head_end, end - head_end)])
            if await self._adopt_one(cid, start, head_end, tail):
                adopted += 1
            if head_end > start:
                break
        return adopted

    async def _adopt_one(self, cid: int, start: int, head_end: int, tail: bytes) -> bool:
        if head_end > start:
            await self._gate.wait_idle()  # before claiming: the head is a background request
            if cid in self._inflight or self.is_cached(cid):
                return False
        flight = _Flight(trio.Event())
        self._inflight[cid] = flight
        try:
            if head_end > start:
                try:
                    (head,) = await self._read_ranges([(start, head_end - start)], background=True)
                except SourceError:
                    return False  # waiters fetch it themselves (flight.data stays None)
                tail = head + tail
            if await self._complete(cid, self.index.chunk(cid), tail, flight) is None:
                return True
            # bad bytes on disk say nothing of the source: let readers fetch it at once
            flight.error = None
            self._failures.pop(cid, None)
            return False
        finally:
            if self._inflight.get(cid) is flight:
                del self._inflight[cid]
            flight.event.set()

    def _start_ahead(self, node: NodeId, end: int, size: int) -> None:
        wanted = self.index.chunks_in(node, end, min(SEQUENTIAL_AHEAD_BYTES, size - end))
        # walk back from the far end of the window and stop at the first chunk cached or in
        # flight: a streaming reader then costs one check per read once it is ahead
        todo: list[int] = []
        for cid in reversed(wanted):
            if cid in self._inflight or self.is_cached(cid):
                break
            if cid not in self._failures:
                todo.append(cid)
        if todo:
            todo.reverse()
            self._ahead_running = True
            trio.lowlevel.spawn_system_task(self._fetch_ahead, todo)

    async def _fetch_ahead(self, cids: list[int]) -> None:
        try:
            await self._fetch_unwaited(cids, "sequential read-ahead")
        finally:
            self._ahead_running = False

    def _slice(self, cid: int, offset: int, end: int) -> tuple[int, int]:
        start = self.index.chunk_file_offset(cid)
        size = self.index.chunk_size(cid)
        return max(offset, start) - start, min(end, start + size) - start

    async def ensure(self, cids: Sequence[int], *, background: bool = False,
                     collect: bool = True) -> dict[int, Held]:
        """Fetch (or join the fetch of) each chunk not cached; return the bytes of each chunk
        fetched or held in memory (a large chunk fetched here comes as a :class:`StagedChunk` to
        read from). Chunks already in the cache are left out: the caller reads the part it
        needs from there (a whole 4 MiB chunk read for a 4 KiB read set the peak RSS of an
        optimized image's start, whose prefetch caches chunks while readers wait for them).

        ``background``: yield to on-demand fetches, and wait for the gate's background turn.
        ``collect=False``: return nothing and hold no bytes beyond one request's (prefetch,
        speculation: the chunks are wanted in the cache, not here).
        Cancellation: waiters whose leader was cancelled fetch again themselves.
        """
        if background:
            async with self._gate.background_turn:
                # wait before claiming the chunks: a reader must never wait on a background
                # fetch that is itself waiting out the gate's silence
                await self._gate.wait_idle()
                return await self._ensure(cids, True, collect)
        return await self._ensure(cids, False, collect)

    async def _ensure(self, cids: Sequence[int], background: bool, collect: bool) -> dict[int, Held]:
        result: dict[int, Held] = {}
        pending = list(dict.fromkeys(cids))
        while pending:
            mine: list[int] = []
            theirs: list[tuple[int, _Flight]] = []
            now = time.monotonic()
            for cid in pending:
                failed = self._failures.get(cid)
                if failed is not None:
                    if now < failed[0]:
                        raise _again(failed[1])
                    del self._failures[cid]
                flight = self._inflight.get(cid)
                if flight is not None:
                    theirs.append((cid, flight))
                    continue
                if not collect:
                    if not (self.is_cached(cid) or cid in self._recent):
                        mine.append(cid)
                    continue
                held = self._held(cid)
                if held is not None:
                    result[cid] = held
                elif not self.is_cached(cid):
                    mine.append(cid)
                # else on disk: the caller reads the part it needs from there
            pending = []
            if mine and collect:
                result.update(await self._lead(mine, background, True))
            elif mine:
                await self._lead_in_steps(mine, background)
            for cid, flight in theirs:
                await flight.event.wait()
                if flight.error is not None:
                    raise _again(flight.error)
                if flight.data is None:  # the leader was cancelled: try again
                    pending.append(cid)
                elif collect:
                    result[cid] = flight.data
        return result

    async def _lead_in_steps(self, cids: list[int], background: bool) -> None:
        """Fetch ``cids`` (in blob order) one request of ``STEP_BYTES`` after another.

        Only the current step's chunks are in flight: a reader who needs a chunk of a later
        step fetches it at once rather than waiting behind the steps before it, and the step
        that would have held it skips it. The bounded steps also bound the compressed bytes
        held at once, however many chunks the call covers.
        """
        ordered = sorted(cids, key=self.index.chunk_blob_range)
        joined: list[_Flight] = []  # chunks a reader took over: waited for at the end

        async def fetch(step: list[int]) -> None:
            todo: list[int] = []
            for cid in step:
                flight = self._inflight.get(cid)
                if flight is not None:
                    joined.append(flight)
                elif cid not in self._failures and not self.is_cached(cid) and cid not in self._recent:
                    todo.append(cid)
            if todo:
                await self._lead(todo, background, False)

        step: list[int] = []
        size = 0
        for cid in ordered:
            start, end = self.index.chunk_blob_range(cid)
            if step and size + end - start > STEP_BYTES:
                await fetch(step)
                step, size = [], 0
            step.append(cid)
            size += end - start
        if step:
            await fetch(step)
        for flight in joined:
            await flight.event.wait()

    async def _lead(self, cids: list[int], background: bool, collect: bool) -> dict[int, Held]:
        flights = {cid: _Flight(trio.Event()) for cid in cids}
        self._inflight.update(flights)
        result: dict[int, Held] = {}
        try:
            chunks = {cid: self.index.chunk(cid) for cid in cids}
            runs = self._runs(sorted(cids, key=lambda c: (chunks[c].blob_offset, c)), chunks)
            first_error: LayerError | None = None
            for batch in self._batches(runs):
                error = await self._stream_batch(batch, chunks, flights, background,
                                                 result if collect else None)
                first_error = first_error or error
            if first_error is not None:
                raise first_error
            return result
        finally:
            for cid, flight in flights.items():
                self._land(cid, flight)

    async def _stream_batch(self, batch: list[_Run], chunks: dict[int, Chunk], flights: dict[int, _Flight],
                            background: bool, collected: dict[int, Held] | None) -> LayerError | None:
        """Fetch one request's runs, completing each chunk as soon as its bytes are in.

        Each chunk's waiters go on when it has arrived, not when the whole request (up to
        ``STEP_BYTES`` or ``max_range_bytes``) has, and what is held at once is the chunks
        being completed and a piece of the body, not the body. ``collected`` takes each
        chunk's bytes; None: they are stored only (see :meth:`_complete_stored`). Returns the
        first error; every flight of the batch is landed.
        """
        runs = [_Assembly(start, end, members) for start, end, members in batch]
        first_error: LayerError | None = None

        async def sink(offset: int, data: bytes) -> None:
            nonlocal first_error
            for run in runs:
                ready = run.feed(offset, data, chunks)
                if ready is None:
                    continue
                start, whole, members = ready
                if collected is None:
                    error = await self._complete_stored(start, whole, members, chunks, flights)
                else:
                    error = await self._complete_collected(start, whole, members, chunks, flights, collected)
                first_error = first_error or error

        ranges = [(start, end - start) for start, end, _ in batch]
        error: LayerError | None = None
        try:
            with self._request(ranges, background):
                await stream_ranges(self.source, ranges, sink)
        except SourceError as exc:
            self._source_failures += 1
            error = exc
        for run in runs:
            for cid in run.pending:
                if error is None:  # the source returned without handing all the bytes over
                    error = SourceError(f"blob {self.layer_digest}: the source ended before all of "
                                        f"{len(ranges)} ranges arrived")
                flight = flights.pop(cid)
                self._fail(cid, flight, error)
                self._land(cid, flight)
                first_error = first_error or error
        return first_error

    async def _complete_collected(self, start: int, whole: Buffer, members: list[int],
                                  chunks: dict[int, Chunk], flights: dict[int, _Flight],
                                  collected: dict[int, Held]) -> LayerError | None:
        """Decode, verify and cache chunks a caller wants the bytes of; return the first error."""
        first_error: LayerError | None = None
        for cid in members:
            c = chunks[cid]
            flight = flights.pop(cid)
            compressed = whole[c.blob_offset - start:c.blob_end - start]
            if c.size >= STAGE_BYTES:
                error = await self._complete_staged(cid, c, compressed, flight)
            else:
                error = await self._complete(cid, c, compressed, flight)
            del compressed
            first_error = first_error or error
            if flight.data is not None:
                collected[cid] = flight.data
            self._land(cid, flight)
        return first_error

    def _land(self, cid: int, flight: _Flight) -> None:
        """End a flight: its waiters take its bytes, its error, or (neither) fetch again."""
        if self._inflight.get(cid) is flight:
            del self._inflight[cid]
        flight.event.set()

    async def _complete(self, cid: int, c: Chunk, compressed: Buffer, flight: _Flight, *,
                        store: bool = True) -> LayerError | None:
        """Decode, verify and cache one fetched chunk into its flight; return its error if any.
        ``store=False``: the cache already refused it, hold it in memory only."""
        try:
            data = await self._decode(c, compressed)
        except LayerError as exc:
            self._failed(cid, c, flight, exc)
            return exc
        flight.data = data
        self._chunks += 1
        if store:
            await self._store(cid, data)
        else:
            self.not_kept += 1
            self._hold(cid, data)
        return None

    async def _complete_staged(self, cid: int, c: Chunk, compressed: Buffer,
                               flight: _Flight) -> LayerError | None:
        """As :meth:`_complete`, for a large chunk: decoded a piece at a time into a staged cache
        file and served from it while the writer commits it, so a 4 MiB chunk a reader waits for
        costs a piece of memory, not 4 MiB until the writer is done with it."""
        key = self.index.chunk_key(cid)
        try:
            staged = await trio.to_thread.run_sync(self._cache.stage, self.layer_digest, key, c.size,
                                                   codecs.decoded_pieces(c, compressed))
        except LayerError as exc:
            self._failed(cid, c, flight, exc)
            return exc
        if staged is None:  # the cache cannot keep it (full, a disk error): held in memory
            return await self._complete(cid, c, compressed, flight, store=False)
        flight.data = staged
        self._chunks += 1
        self._writing[cid] = staged

        def done(kept: bool) -> None:
            if self._writing.get(cid) is staged:
                del self._writing[cid]
            if not kept:
                self.not_kept += 1
            staged.close()  # here, on the thread that reads it (see StagedChunk)

        self._writer.submit_staged(staged, done)
        return None

    async def _complete_stored(self, start: int, whole: Buffer, members: list[int], chunks: dict[int, Chunk],
                               flights: dict[int, _Flight]) -> LayerError | None:
        """Decode, verify and store a run of chunks nobody waits on, in one worker thread.

        Each decoded chunk is written and dropped before the next is decoded: such fetches
        (prefetch, speculation) hold one chunk's bytes at a time, not a queue of them at the
        writer. Their waiters, if any, find the chunks in the cache. Returns the first error.
        """
        key = self.index.chunk_key
        work = [(chunks[cid], key(cid), whole[chunks[cid].blob_offset - start:chunks[cid].blob_end - start])
                for cid in members]
        outcomes = await trio.to_thread.run_sync(_decode_and_store, self._cache, self.layer_digest, work)
        first_error: LayerError | None = None
        for cid, outcome in zip(members, outcomes, strict=True):
            flight = flights.pop(cid)
            if isinstance(outcome, LayerError):
                self._failed(cid, chunks[cid], flight, outcome)
                first_error = first_error or outcome
            else:
                self._chunks += 1
                if outcome is not None:  # verified, but the cache did not keep it
                    self.not_kept += 1
                    self._hold(cid, outcome)
                    flight.data = outcome
            self._land(cid, flight)
        return first_error

    def _failed(self, cid: int, c: Chunk, flight: _Flight, exc: LayerError) -> None:
        if isinstance(exc, IntegrityError):
            self._integrity_failures += 1
            log.warning("layer %s: chunk at blob offset %d (file offset %d, sha256:%s) failed "
                        "verification: %s", self.layer_digest, c.blob_offset, c.file_offset,
                        c.digest_hex, exc)
        self._fail(cid, flight, exc)

    async def _store(self, cid: int, data: ChunkBytes) -> None:
        self._writing[cid] = data

        def done(kept: bool) -> None:
            if self._writing.pop(cid, None) is not None and not kept:
                self.not_kept += 1
                self._hold(cid, data)

        await self._writer.submit(self.layer_digest, self.index.chunk_key(cid), data, done)

    def _fail(self, cid: int, flight: _Flight, exc: LayerError) -> None:
        flight.error = exc
        self._failures[cid] = (time.monotonic() + self._config.failure_ttl, exc)

    def _batches(self, runs: list[_Run]) -> Iterator[list[_Run]]:
        """Runs in requests of at most ``max_ranges_per_read`` ranges."""
        step = self._config.max_ranges_per_read
        for i in range(0, len(runs), step):
            yield runs[i:i + step]

    def _runs(self, ordered: list[int], chunks: dict[int, Chunk]) -> list[_Run]:
        """Group chunks into ``(blob start, blob end, chunk ids)`` runs of adjacent blob ranges."""
        runs: list[_Run] = []
        limit = self._config.max_range_bytes
        for cid in ordered:
            c = chunks[cid]
            if runs:
                start, end, members = runs[-1]
                if c.blob_offset <= end and max(end, c.blob_end) - start <= limit:
                    runs[-1] = (start, max(end, c.blob_end), [*members, cid])
                    continue
            runs.append((c.blob_offset, c.blob_end, [cid]))
        return runs

    async def _read_ranges(self, ranges: list[tuple[int, int]], background: bool) -> list[bytes]:
        with self._request(ranges, background):
            return await self.source.read_ranges(ranges)

    @contextmanager
    def _request(self, ranges: list[tuple[int, int]], background: bool) -> Iterator[None]:
        """Count one request to the source; an on-demand one holds background work back."""
        self._bytes += sum(length for _, length in ranges)
        if background:  # the caller waited at the gate before claiming its chunks
            self._background += 1
            yield
            return
        self._on_demand += 1
        with self._gate.on_demand():
            yield

    def _hold(self, cid: int, data: ChunkBytes) -> None:
        # The cache did not keep this chunk (full of pinned layers, or a disk error). Keep the
        # latest few in memory: the kernel reads a chunk in many small pieces, and refetching
        # the whole chunk for each would multiply the traffic.
        old = self._recent.pop(cid, None)
        if old is not None:
            self._recent_bytes -= len(old)
        self._recent[cid] = data
        self._recent_bytes += len(data)
        while self._recent_bytes > self._config.memory_bytes and self._recent:
            self._recent_bytes -= len(self._recent.popitem(last=False)[1])

    async def _decode(self, chunk: Chunk, compressed: Buffer) -> ChunkBytes:
        if len(compressed) >= self._config.thread_threshold:
            return await trio.to_thread.run_sync(codecs.decode, chunk, compressed)
        return codecs.decode(chunk, compressed)


class _Assembly:
    """One run's bytes as a streamed read hands them over, and its chunks not yet complete.

    Holds the bytes from the first pending chunk on: those of completed chunks go out with them.
    """

    def __init__(self, start: int, end: int, members: list[int]) -> None:
        self.end = end
        self.pending = deque(members)  # in blob order, as ``_runs`` made them
        self._buf = bytearray()
        self._buf_start = start

    def feed(self, offset: int, data: bytes, chunks: dict[int, Chunk]
             ) -> tuple[int, Buffer, list[int]] | None:
        """Take a piece; return ``(blob start, bytes, chunk ids)`` of the chunks it completed."""
        have = self._buf_start + len(self._buf)
        lo, hi = max(offset, have), min(offset + len(data), self.end)
        if offset > have or lo >= hi:  # not this run's, already had, or past a gap
            return None
        src: bytes | bytearray
        if self._buf:  # a chunk's head came in an earlier piece: join the two
            self._buf += memoryview(data)[lo - offset:hi - offset]
            src, src_start = self._buf, self._buf_start
        else:  # nothing held: what completes is served from the piece itself, uncopied
            src, src_start = data, offset
        ready: list[int] = []
        while self.pending and chunks[self.pending[0]].blob_end <= hi:
            ready.append(self.pending.popleft())
        keep = chunks[self.pending[0]].blob_offset if self.pending else hi
        if not ready:
            if src is data:
                self._buf = bytearray(memoryview(data)[keep - offset:hi - offset])
                self._buf_start = keep
            return None
        first = chunks[ready[0]].blob_offset
        last = max(chunks[cid].blob_end for cid in ready)
        # the chunks go out as a view of what holds them, not a copy (a large chunk's bytes
        # would be held twice); only the head of the next chunk is copied into a new buffer
        out = memoryview(src)[first - src_start:last - src_start]
        self._buf = bytearray(memoryview(src)[keep - src_start:hi - src_start])
        self._buf_start = keep
        return first, out, ready


def _decode_and_store(cache: ChunkCache, layer_digest: str,
                      work: list[tuple[Chunk, str, Buffer]]) -> list[LayerError | ChunkBytes | None]:
    """Worker thread: decode, verify and store each chunk; per chunk, None (stored), its bytes
    (verified, not kept) or the error."""
    outcomes: list[LayerError | ChunkBytes | None] = []
    for chunk, key, compressed in work:
        try:
            # decoded straight into the cache file, a piece at a time: no chunk-sized buffer
            if cache.put_pieces(layer_digest, key, chunk.size, codecs.decoded_pieces(chunk, compressed)):
                outcomes.append(None)
                continue
            outcomes.append(codecs.decode(chunk, compressed))  # not kept: the caller holds it
        except LayerError as exc:
            outcomes.append(exc)
    return outcomes


def _suffix(name: bytes) -> bytes:
    """What a file name ends with from its first dot on (not a leading one): its kind."""
    dot = name.find(b".", 1)
    return name[dot:] if dot > 0 else b""
