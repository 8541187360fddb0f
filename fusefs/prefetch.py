"""Mount-time prefetch of the landmark prefix and low-priority background fetch of the rest.

Each blob byte is fetched at most once: chunks that came with the index reads are taken from
them first, and every later step skips chunks already cached or in flight.

``run`` is started per mounted layer in the manager's nursery and cancelled when the layer is
released. The prefix is fetched with on-demand priority in as few requests as the coalescing
limits allow; the background pass then walks the remaining chunks in blob order, one step of
``background_step_bytes`` at a time, each step waiting at the :class:`PriorityGate` so on-demand
reads go first, and optionally paced to ``background_rate`` bytes per second. Failures are
logged and stop the pass: background fetching is an optimisation, reads still fetch on demand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import trio

from fusefs.config import PrefetchConfig
from fusefs.errors import LayerError
from fusefs.fetch import ChunkFetcher

log = logging.getLogger(__name__)


def _uncached_in_blob_order(fetcher: ChunkFetcher, below: int | None) -> Iterator[int]:
    """The chunks not cached yet, in blob order, up to blob offset ``below`` (None: all), each
    looked at when the caller gets there: nothing is held for the chunks still to come (30k
    chunks: ~1 MiB of Python ints while the background pass waits out the on-demand reads)."""
    index = fetcher.index
    for cid in fetcher.chunks_in_blob_order():
        if below is not None and index.chunk_blob_range(cid)[0] >= below:
            return
        if not fetcher.is_cached(cid):
            yield cid


async def run(fetcher: ChunkFetcher, config: PrefetchConfig, prefetch_size: int | None) -> None:
    """Prefetch then background-fetch one layer; returns when done, never raises LayerError.

    The prefix follows the layer's landmarks, as upstream: up to ``.prefetch.landmark``, nothing
    for ``.no.prefetch.landmark``; only a layer with neither prefetches ``prefetch_size`` bytes
    (the ``remote/stargz.prefetch`` label).
    """
    landmark_end = fetcher.index.prefetch_end
    boundary = landmark_end if landmark_end is not None else prefetch_size
    try:
        # free (no request) even with prefetch and background fetch off; the head of the chunk
        # straddling the index reads is a background request, asked for only after the prefix:
        # waiting for the gate's silence first held the landmark prefetch back by seconds
        adopted = await fetcher.adopt_index_reads(fetch_head=False)
        if adopted:
            log.info("layer %s: %d chunks taken from the index reads", fetcher.layer_digest, adopted)
        if config.prefetch and boundary:
            cids = list(_uncached_in_blob_order(fetcher, boundary))
            if cids:
                await fetcher.ensure(cids, collect=False)
                log.info("layer %s: prefetched %d chunks below blob offset %d",
                         fetcher.layer_digest, len(cids), boundary)
        if config.background:
            await fetcher.adopt_index_reads(fetch_head=True)
            await _background(fetcher, config)
    except LayerError as exc:
        log.info("layer %s: prefetch/background fetch stopped: %s", fetcher.layer_digest, exc)


class _CacheFull(Exception):
    pass


async def _background(fetcher: ChunkFetcher, config: PrefetchConfig) -> None:
    try:
        await _background_pass(fetcher, config)
    except _CacheFull:
        log.info("layer %s: background fetch stopped: the cache does not keep more chunks",
                 fetcher.layer_digest)


async def _background_pass(fetcher: ChunkFetcher, config: PrefetchConfig) -> None:
    index = fetcher.index
    step: list[int] = []
    step_bytes = 0
    done = 0
    for cid in _uncached_in_blob_order(fetcher, None):
        start, end = index.chunk_blob_range(cid)
        step.append(cid)
        step_bytes += end - start
        if step_bytes >= config.background_step_bytes:
            await _one_step(fetcher, config, step, step_bytes)
            done += len(step)
            step, step_bytes = [], 0
    if step:
        await _one_step(fetcher, config, step, step_bytes)
        done += len(step)
    log.info("layer %s: background fetch complete (%d chunks)", fetcher.layer_digest, done)


async def _one_step(fetcher: ChunkFetcher, config: PrefetchConfig, cids: list[int], nbytes: int) -> None:
    cids = [cid for cid in cids if not fetcher.is_cached(cid)]
    if cids:
        await fetcher.ensure(cids, background=True, collect=False)
        # this step's chunks are stored by now; those a reader fetched meanwhile may still be
        # queued at the cache writer: wait for them too, to tell what the cache kept
        await fetcher.flush()
        if not all(fetcher.is_cached(cid) for cid in cids):
            raise _CacheFull
    if config.background_rate > 0:
        await trio.sleep(nbytes / config.background_rate)
    else:
        await trio.lowlevel.checkpoint()
