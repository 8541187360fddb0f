"""Prometheus metrics of lazysnapd (prefix ``lazysnap_``; every name is listed in docs/metrics.md).

Three kinds of sources feed one :class:`Metrics` registry:

* events measured where they happen: gRPC calls (the server's observer, on the trio thread) and
  layer mounts (:class:`TimedLayerFilesystem`, trio thread);
* counters fusefs keeps (``LayerManager.statistics()``, FUSE operation counts, registry request
  outcomes), read at scrape time by a collector on the trio thread — the endpoint is served
  there, so no lock is needed;
* per-layer totals that vanish with their layer are also folded into process-wide counters, so
  the ``_total`` series never go backwards when a layer is released.

``open_metrics_server`` serves ``GET /metrics`` on TCP ``host:port`` or a unix socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import asynccontextmanager

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from fusefs.fetch import ChunkFetcher, FetchStatistics
from fusefs.index import LayerIndex
from fusefs.manager import LayerManager
from fusefs.spec import LayerSpec
from snapshotter import control_http
from snapshotter.control_http import Request, Response, error_response
from snapshotter.remote import LayerFilesystem
from snapshotter.rpc import StatusCode

log = logging.getLogger(__name__)

PREFIX = "lazysnap"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
_FETCH_FIELDS = ("on_demand_fetches", "background_fetches", "chunks_fetched", "bytes_fetched",
                 "integrity_failures", "source_failures", "reads", "bytes_served")


class Metrics:
    """The daemon's metric registry and the instruments fed by events."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide; *_created doubles scrapes
        self.registry = CollectorRegistry(auto_describe=True)
        self.grpc_requests = Counter(f"{PREFIX}_grpc_requests",
                                     "Snapshots API calls by method and status code",
                                     ["method", "code"], registry=self.registry)
        self.grpc_seconds = Histogram(f"{PREFIX}_grpc_request_duration_seconds",
                                      "Snapshots API call latency by method", ["method"],
                                      buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.mount_seconds = Histogram(f"{PREFIX}_layer_mount_duration_seconds",
                                       "Time a Prepare waits to mount a layer lazily, by result (ok, error)",
                                       ["result"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.unmounts = Counter(f"{PREFIX}_layer_unmounts", "Layer unmounts by result", ["result"],
                                registry=self.registry)
        self.start_time = Gauge(f"{PREFIX}_start_time_seconds", "Unix time the daemon started",
                                registry=self.registry)
        self.start_time.set(time.time())

    def attach(self, manager: LayerManager) -> None:
        """Collect fusefs's counters from ``manager`` at every scrape (trio thread)."""
        self.registry.register(_FusefsCollector(manager))

    def observe_rpc(self, method: str, code: StatusCode, seconds: float) -> None:
        """Count and time one finished gRPC call (the server's observer, trio thread)."""
        self.grpc_requests.labels(method, code.name).inc()
        self.grpc_seconds.labels(method).observe(seconds)

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


class TimedLayerFilesystem:
    """A :class:`LayerFilesystem` that times ``mount`` and counts ``unmount`` of another one."""

    def __init__(self, inner: LayerFilesystem, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def mount(self, spec: LayerSpec, mountpoint: str) -> None:
        await self._timed(self._inner.mount(spec, mountpoint))

    async def start_mount(self, spec: LayerSpec, mountpoint: str) -> None:
        """Timed up to its return: what a Prepare waits for."""
        await self._timed(self._inner.start_mount(spec, mountpoint))

    async def _timed(self, mounting: Awaitable[None]) -> None:
        start = time.perf_counter()
        result = "error"
        try:
            await mounting
            result = "ok"
        finally:
            self._metrics.mount_seconds.labels(result).observe(time.perf_counter() - start)

    async def check(self, mountpoint: str, *, wait: bool = True) -> None:
        await self._inner.check(mountpoint, wait=wait)

    async def unmount(self, mountpoint: str) -> None:
        result = "error"
        try:
            await self._inner.unmount(mountpoint)
            result = "ok"
        finally:
            self._metrics.unmounts.labels(result).inc()

    async def forget_layer(self, digest: str) -> None:
        """Pass on to the inner filesystem when it forgets layers (fusefs does); else nothing."""
        forget = getattr(self._inner, "forget_layer", None)
        if forget is not None:
            await forget(digest)


class _FusefsCollector(Collector):
    """Reads a LayerManager's counters at scrape time (see the module docstring)."""

    def __init__(self, manager: LayerManager) -> None:
        self._manager = manager
        self._retired: dict[str, int] = dict.fromkeys(_FETCH_FIELDS, 0)
        # keyed by fetcher, not digest: a layer released and served again gets a new fetcher
        # whose counters start at zero, possibly between two scrapes
        self._last: dict[ChunkFetcher, FetchStatistics] = {}
        self._sizes: dict[str, int] = {}  # layer digest → uncompressed bytes (indexes never change)

    def _fetch_totals(self, current: dict[ChunkFetcher, FetchStatistics]) -> dict[str, int]:
        # A layer that stopped being served takes its counters along: keep its last values.
        for fetcher, stats in self._last.items():
            if fetcher not in current:
                for name in _FETCH_FIELDS:
                    self._retired[name] += getattr(stats, name)
        self._last = dict(current)
        return {name: self._retired[name] + sum(getattr(s, name) for s in current.values())
                for name in _FETCH_FIELDS}

    def collect(self) -> Iterable[Metric]:
        m = self._manager
        stats = m.statistics()
        yield _gauge("layers_served", "Layers the FUSE session serves", stats.layers)
        yield _gauge("layer_mounts", "Snapshot mountpoints bound to served layers", stats.mounts)
        c = stats.cache
        yield _gauge("cache_bytes", "Bytes of verified chunks in the disk cache", c.bytes_cached)
        yield _gauge("cache_max_bytes", "Configured bound of the disk cache", c.max_bytes)
        yield _gauge("cache_chunks", "Chunks in the disk cache", c.chunks_cached)
        for name, value, doc in (("cache_hits", c.hits, "Chunk reads answered by the disk cache"),
                                 ("cache_misses", c.misses, "Chunk reads the disk cache could not answer"),
                                 ("cache_stored", c.stored, "Chunks written to the disk cache"),
                                 ("cache_not_kept", c.not_kept, "Chunks served but not kept (cache full)"),
                                 ("cache_evicted", c.evicted, "Chunks evicted or pruned from the cache")):
            yield _counter(name, doc, value)

        totals = self._fetch_totals({s.fetcher: s.fetcher.statistics() for s in m.served_layers()})
        yield _counter("fetched_bytes", "Compressed blob bytes requested from registries",
                       totals["bytes_fetched"])
        yield _counter("served_bytes", "File bytes returned to FUSE reads", totals["bytes_served"])
        yield _counter("chunks_fetched", "Chunks fetched, verified and decoded", totals["chunks_fetched"])
        req = CounterMetricFamily(f"{PREFIX}_fetch_requests", "Blob range fetches by priority",
                                  labels=["priority"])
        req.add_metric(["on_demand"], totals["on_demand_fetches"])
        req.add_metric(["background"], totals["background_fetches"])
        yield req
        err = CounterMetricFamily(f"{PREFIX}_fetch_errors", "Failed fetches by kind", labels=["kind"])
        err.add_metric(["integrity"], totals["integrity_failures"])
        err.add_metric(["source"], totals["source_failures"])
        yield err

        yield from self._per_layer(m)
        yield from self._fuse_ops(m)
        yield from self._registry(m)

    def _per_layer(self, m: LayerManager) -> Iterator[Metric]:
        labels = ["layer", "ref"]
        fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "fetched": CounterMetricFamily(f"{PREFIX}_layer_fetched_bytes",
                                           "Compressed bytes fetched for a served layer", labels=labels),
            "served": CounterMetricFamily(f"{PREFIX}_layer_served_bytes",
                                          "File bytes read from a served layer", labels=labels),
            "reads": CounterMetricFamily(f"{PREFIX}_layer_reads", "FUSE reads of a served layer",
                                         labels=labels),
            "cached": GaugeMetricFamily(f"{PREFIX}_layer_cached_bytes",
                                        "Uncompressed bytes of a served layer held in the cache",
                                        labels=labels),
            "size": GaugeMetricFamily(f"{PREFIX}_layer_uncompressed_bytes",
                                      "Uncompressed file bytes of a served layer", labels=labels),
            "done": GaugeMetricFamily(f"{PREFIX}_layer_background_done",
                                      "1 once a layer's prefetch and background fetch pass ended",
                                      labels=labels),
        }
        usage = m.cache.layer_usage()  # one pass over the cache's accounting, no per-chunk lookups
        served_layers = m.served_layers()
        self._sizes = {s.spec.digest: self._sizes.get(s.spec.digest) or _uncompressed(s.fetcher.index)
                       for s in served_layers}
        for served in served_layers:
            digest = served.spec.digest
            key = [digest, served.spec.ref]
            stats = served.fetcher.statistics()
            fams["fetched"].add_metric(key, stats.bytes_fetched)
            fams["served"].add_metric(key, stats.bytes_served)
            fams["reads"].add_metric(key, stats.reads)
            fams["cached"].add_metric(key, usage.get(digest, (0, 0))[1])
            fams["size"].add_metric(key, self._sizes[digest])
            fams["done"].add_metric(key, 1 if served.background == "done" else 0)
        yield from fams.values()

    def _fuse_ops(self, m: LayerManager) -> Iterator[Metric]:
        calls = CounterMetricFamily(f"{PREFIX}_fuse_operations", "FUSE operations by name",
                                    labels=["op"])
        fails = CounterMetricFamily(f"{PREFIX}_fuse_operation_errors",
                                    "FUSE operations answered with an error (EIO, EROFS...)", labels=["op"])
        secs = CounterMetricFamily(f"{PREFIX}_fuse_operation_seconds",
                                   "Time spent in FUSE handlers by operation (fetch waits included)",
                                   labels=["op"])
        for op, (n, failed, seconds) in sorted(m.fuse_op_counts().items()):
            calls.add_metric([op], n)
            fails.add_metric([op], failed)
            secs.add_metric([op], seconds)
        yield calls
        yield fails
        yield secs

    def _registry(self, m: LayerManager) -> Iterator[Metric]:
        outcomes = getattr(m.source_factory, "request_outcomes", None)
        count = CounterMetricFamily(f"{PREFIX}_registry_requests",
                                    "Blob requests to registries by HTTP status (timeout, error: none)",
                                    labels=["status"])
        secs = CounterMetricFamily(f"{PREFIX}_registry_request_seconds",
                                   "Total time of blob requests by HTTP status", labels=["status"])
        if outcomes is not None:
            for status, o in sorted(outcomes().items()):
                count.add_metric([status], o.count)
                secs.add_metric([status], o.seconds)
        yield count
        yield secs


def _uncompressed(index: LayerIndex) -> int:
    return sum(index.chunk_size(cid) for cid in range(index.chunk_count))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


@asynccontextmanager
async def open_metrics_server(address: str, metrics: Metrics) -> AsyncIterator[str]:
    """Serve ``GET /metrics`` on ``address`` for the block; yields the bound address.

    Raises:
        control_http.ListenError: the address is malformed or cannot be listened on.
    """
    listener = await control_http.open_listener(address)
    bound = control_http.bound_address(listener)

    async def handle(req: Request) -> Response:
        if req.method != "GET" or req.path != "/metrics":
            return error_response(404, "metrics are at GET /metrics")
        return Response(200, metrics.render(), CONTENT_TYPE_LATEST)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control_http.serve, listener, handle)
            log.info("metrics on %s", bound)
            try:
                yield bound
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()
        kind, path, _ = control_http.parse_address(address)
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
