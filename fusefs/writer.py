"""Write-behind for the chunk cache: verified chunks reach the disk off the read path.

A chunk that was fetched and verified is served at once; storing it (a file write, and an fsync
with ``CacheConfig.fsync``) happens in one worker thread, in batches. Stored inline on the trio
thread, the fsyncs of small chunks held the event loop for ~2.6 s of a 10 s numpy cold start
(py-spy, docs/benchmarks.md "read path"), delaying every other read and request meanwhile.

The caller keeps the bytes reachable until its ``done`` callback says whether the cache kept
them, so a chunk is never fetched twice while it waits here. Memory is bounded: ``submit``
waits while more than ``budget`` bytes are queued. A large chunk can come already written to a
file of its own (``submit_staged``, :meth:`ChunkCache.stage`): then only its fsync and rename
are left, and it costs no memory while it waits.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from fusefs.cache import ChunkCache, StagedChunk
from fusefs.codecs import ChunkBytes

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 8 << 20
_BATCH_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class _Write:
    layer_digest: str
    key: str
    data: ChunkBytes | StagedChunk
    done: Callable[[bool], None]

    @property
    def held(self) -> int:
        """Bytes of memory the queued item holds (a staged chunk's are on disk)."""
        return 0 if isinstance(self.data, StagedChunk) else len(self.data)


class CacheWriter:
    """Stores chunks in a :class:`ChunkCache` from one worker thread (see the module docstring).

    The worker is a trio system task started by the first ``submit``: it lives as long as the
    trio run, whoever created the writer (what a finished run left queued is dropped: it is a
    cache). Call everything from the trio thread.
    """

    def __init__(self, cache: ChunkCache, budget: int = DEFAULT_BUDGET) -> None:
        self._cache = cache
        self._budget = budget
        self._queue: deque[_Write] = deque()
        self._queued_bytes = 0  # queued or being written: what the writer holds alive
        self._writing = 0  # items taken by the worker and not yet done
        self._wake = trio.Event()
        self._changed = trio.lowlevel.ParkingLot()  # room freed, or everything written
        self._worker_run: trio.lowlevel.TrioToken | None = None  # the trio run the worker lives in

    @property
    def pending(self) -> int:
        """Chunks queued or being written."""
        return len(self._queue) + self._writing

    async def submit(self, layer_digest: str, key: str, data: ChunkBytes,
                     done: Callable[[bool], None]) -> None:
        """Queue a verified chunk; ``done(kept)`` is called on the trio thread once it is stored
        (or not kept: cache full, or a disk error). Waits while the writer is over budget."""
        self._start()
        while self._queued_bytes and self._queued_bytes + len(data) > self._budget:
            await self._changed.park()
        self._queue.append(_Write(layer_digest, key, data, done))
        self._queued_bytes += len(data)
        self._wake.set()

    def submit_staged(self, staged: StagedChunk, done: Callable[[bool], None]) -> None:
        """Queue a staged chunk for :meth:`ChunkCache.commit`; ``done(kept)`` as for ``submit``.
        Never waits: the chunk's bytes are already on disk."""
        self._start()
        self._queue.append(_Write(staged.layer, staged.key, staged, done))
        self._wake.set()

    def _start(self) -> None:
        run = trio.lowlevel.current_trio_token()
        if self._worker_run is not run:  # first use, or a new trio run (tests): the old worker is gone
            self._worker_run = run
            for item in self._queue:
                if isinstance(item.data, StagedChunk):
                    self._cache.discard(item.data)
            self._queue.clear()
            self._queued_bytes = self._writing = 0
            trio.lowlevel.spawn_system_task(self._run, name="lazysnap cache writer")

    async def flush(self) -> None:
        """Return once everything submitted so far is stored (or refused)."""
        if self._worker_run is not trio.lowlevel.current_trio_token():
            return  # nothing was submitted in this run
        while self._queue or self._writing:
            await self._changed.park()

    async def _run(self) -> None:
        # a system task: an exception escaping it would end the whole trio run
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                batch = self._take_batch()
                try:
                    kept = await trio.to_thread.run_sync(_store, self._cache, batch)
                except Exception:
                    log.exception("cache writer: unexpected error storing %d chunks", len(batch))
                    kept = [False] * len(batch)
                self._writing = 0
                self._queued_bytes -= sum(item.held for item in batch)
                for item, ok in zip(batch, kept, strict=True):
                    try:
                        item.done(ok)
                    except Exception:
                        log.exception("cache writer: a completion callback failed")
                self._changed.unpark_all()

    def _take_batch(self) -> list[_Write]:
        batch: list[_Write] = []
        size = 0
        while self._queue and (not batch or size < _BATCH_BYTES):
            item = self._queue.popleft()
            batch.append(item)
            size += len(item.data)  # a staged chunk's fsync costs about its size too
        self._writing = len(batch)
        return batch


def _store(cache: ChunkCache, batch: list[_Write]) -> list[bool]:
    return [cache.commit(item.data) if isinstance(item.data, StagedChunk)
            else cache.put(item.layer_digest, item.key, item.data) for item in batch]
