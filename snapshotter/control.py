"""The daemon's control API: JSON over HTTP on a root-only unix socket, what ``snapctl`` talks to.

Routes (all answers are JSON; errors are ``{"error": message}`` with a 4xx/5xx status)::

    GET  /v1/status                       version, uptime, config, sockets, layers, cache, fetch rates
    GET  /v1/layers                       every served layer (sizes, fetched, cached, state, mounts)
    GET  /v1/layers/<digest>[?path=P]     one layer and its tree below P with per-file residency
    POST /v1/layers/<digest>/fetch        start fetching the whole layer (202); poll the layer
    GET  /v1/cache                        cache usage per layer
    POST /v1/cache/prune                  body {"unused": bool, "to": bytes}
    POST /v1/cache/verify                 re-hash cached chunks, drop corrupt ones
    GET  /v1/config                       the effective config, defaults included

Everything runs on the trio thread (the LayerManager's thread); blocking cache work (prune,
verify) goes to a worker thread. Without a layer filesystem the layer and cache routes answer
503. Request bodies are bounded by ``control_http``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from fusefs import residency
from fusefs.errors import FormatError, LayerError
from fusefs.manager import LayerManager, ServedLayer
from snapshotter import control_http
from snapshotter.config import Config
from snapshotter.control_http import Request, Response, error_response, json_response
from snapshotter.store import Store

log = logging.getLogger(__name__)

_LAYER_ROUTE = re.compile(r"/v1/layers/(sha256:[0-9a-f]{64})(/fetch)?")
RATE_WINDOW = 60.0
RATE_SAMPLE = 5.0


def control_address(cfg: Config) -> str:
    """Where the control socket is: ``control_address`` if set, else ``<root>/control.sock``."""
    if cfg.control_address is not None:
        return os.path.abspath(cfg.control_address)
    return os.path.join(os.path.abspath(cfg.root), "control.sock")


def effective_config(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain JSON values (paths and bytes as strings), every default included."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    result: dict[str, Any] = plain(dataclasses.asdict(cfg))
    return result


def version() -> str:
    try:
        return metadata.version("lazysnap")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class DaemonInfo:
    """Static facts about the running daemon that ``status`` reports."""

    config: Config
    config_path: str | None
    control_address: str
    metrics_address: str | None = None
    store: Store | None = None  # to name the snapshots a layer is mounted for


class _Rates:
    """Bytes fetched per second over the last ``RATE_WINDOW`` seconds, from periodic samples."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, total: int) -> None:
        now = time.monotonic()
        self._samples.append((now, total))
        while self._samples and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()

    def rate(self, total: int) -> float:
        if not self._samples:
            return 0.0
        then, old = self._samples[0]
        elapsed = time.monotonic() - then
        # a released layer takes its bytes out of the total: never report a negative rate
        return max(0.0, (total - old) / elapsed) if elapsed > 0 else 0.0


class ControlAPI:
    """Answers control requests from the daemon's state (see the module docstring)."""

    def __init__(self, info: DaemonInfo, manager: LayerManager | None, nursery: trio.Nursery) -> None:
        self._info = info
        self._manager = manager
        self._nursery = nursery
        self._started = time.time()
        self._rates = _Rates()
        self._warming: dict[str, dict[str, Any]] = {}

    async def sample_rates(self) -> None:
        """Sample the fetch counters forever (run in a nursery)."""
        while True:
            self._rates.sample(self._fetched_total())
            await trio.sleep(RATE_SAMPLE)

    async def handle(self, req: Request) -> Response:
        """Route one request."""
        route = (req.method, req.path.rstrip("/") or "/")
        if route == ("GET", "/v1/status"):
            return json_response(self.status())
        if route == ("GET", "/v1/config"):
            return json_response(effective_config(self._info.config))
        if self._manager is None:
            return error_response(503, "lazysnapd runs without a layer filesystem (no lazy layers)")
        manager = self._manager
        if route == ("GET", "/v1/layers"):
            served = manager.served_layers()
            names = await self._snapshot_names([m for s in served for m in s.mountpoints])
            return json_response({"layers": [await self._layer_json(s, names) for s in served]})
        m = _LAYER_ROUTE.fullmatch(route[1])
        if m is not None:
            return await self._layer_route(req, manager, m.group(1), bool(m.group(2)))
        if route[1].startswith("/v1/layers/"):
            return error_response(400, "layer digests look like sha256:<64 hex digits>")
        if route == ("GET", "/v1/cache"):
            return json_response(self._cache_json(manager))
        if route == ("POST", "/v1/cache/prune"):
            return await self._prune(req, manager)
        if route == ("POST", "/v1/cache/verify"):
            result = await trio.to_thread.run_sync(manager.cache.verify)
            return json_response({"checked": result.checked, "corrupt": list(result.corrupt)})
        return error_response(404, f"no route {req.method} {req.path}")

    # -- status -------------------------------------------------------------------------

    def _fetched_total(self) -> int:
        if self._manager is None:
            return 0
        return sum(f.bytes_fetched for f in self._manager.statistics().fetch.values())

    def status(self) -> dict[str, Any]:
        cfg = self._info.config
        out: dict[str, Any] = {
            "version": version(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self._started, 3),
            "config_file": self._info.config_path,
            "root": os.path.abspath(cfg.root),
            "sockets": {"grpc": cfg.address, "control": self._info.control_address,
                        "metrics": self._info.metrics_address},
            "layer_filesystem": self._manager is not None,
        }
        if self._manager is None:
            return out
        stats = self._manager.statistics()
        fetched = sum(f.bytes_fetched for f in stats.fetch.values())
        out.update({
            "layers": stats.layers,
            "mounts": stats.mounts,
            "cache": dataclasses.asdict(stats.cache),
            "fetch": {
                "bytes_fetched": fetched,
                "requests": sum(f.on_demand_fetches + f.background_fetches for f in stats.fetch.values()),
                "bytes_per_second_1m": round(self._rates.rate(fetched), 1),
            },
            "errors": {
                "integrity": sum(f.integrity_failures for f in stats.fetch.values()),
                "source": sum(f.source_failures for f in stats.fetch.values()),
            },
        })
        return out

    # -- layers -------------------------------------------------------------------------

    def _find(self, manager: LayerManager, digest: str) -> ServedLayer | None:
        return next((s for s in manager.served_layers() if s.spec.digest == digest), None)

    async def _snapshot_names(self, mountpoints: list[str]) -> dict[str, str]:
        """The snapshot key behind each ``<root>/snapshots/<id>/fs`` mountpoint (store lookups)."""
        store = self._info.store
        if store is None or not mountpoints:
            return {}
        snapshots = os.path.join(os.path.abspath(self._info.config.root), "snapshots")

        def lookup() -> dict[str, str]:
            out: dict[str, str] = {}
            with store.read() as tx:
                for mp in mountpoints:
                    sid = os.path.basename(os.path.dirname(mp))
                    if os.path.dirname(os.path.dirname(mp)) == snapshots and sid.isdigit():
                        rec = tx.by_id(int(sid))
                        if rec is not None:
                            out[mp] = rec.key
            return out

        return await trio.to_thread.run_sync(lookup)

    async def _layer_json(self, served: ServedLayer, names: dict[str, str] | None = None) -> dict[str, Any]:
        # one cache lookup per chunk: off the trio thread, which also serves FUSE
        res = await trio.to_thread.run_sync(residency.layer_residency, served.fetcher)
        stats = served.fetcher.statistics()
        spec = served.spec
        return {
            "digest": spec.digest,
            "ref": spec.ref,
            "format": _format_name(spec.media_type),
            "media_type": spec.media_type,
            "compressed_size": served.fetcher.index.blob_size,
            "uncompressed_size": res.uncompressed,
            "fetched_bytes": stats.bytes_fetched,
            "cached_bytes": res.cached,
            "resident_percent": _percent(res.cached, res.uncompressed),
            "chunks": res.chunks,
            "chunks_cached": res.chunks_cached,
            "background": served.background,
            "warm": self._warming.get(spec.digest),
            "errors": {"integrity": stats.integrity_failures, "source": stats.source_failures},
            "mountpoints": list(served.mountpoints),
            "snapshots": [names[m] for m in served.mountpoints if m in names] if names else [],
        }

    async def _layer_route(self, req: Request, manager: LayerManager, digest: str, fetch: bool) -> Response:
        served = self._find(manager, digest)
        if served is None:
            return error_response(404, f"layer {digest} is not mounted")
        if fetch:
            if req.method != "POST":
                return error_response(405, "use POST to start a fetch")
            served_now = {s.spec.digest for s in manager.served_layers()}
            for gone in set(self._warming) - served_now:  # keep the table bounded
                del self._warming[gone]
            state = self._warming.get(digest)
            if state is None or state["state"] != "running":
                self._warming[digest] = {"state": "running", "error": None}
                self._nursery.start_soon(self._warm, manager, digest)
            return json_response(await self._layer_json(served), status=202)
        if req.method != "GET":
            return error_response(405, f"use GET on {req.path}")
        body = await self._layer_json(served, await self._snapshot_names(list(served.mountpoints)))
        path = req.query.get("path", "/")
        try:
            entries = await trio.to_thread.run_sync(residency.tree, served.fetcher, path, _tree_limit(req))
        except KeyError:
            return error_response(404, f"no {path!r} in layer {digest}")
        except FormatError as exc:
            return error_response(400, str(exc))
        body["tree"] = [dataclasses.asdict(e) for e in entries]
        return json_response(body)

    async def _warm(self, manager: LayerManager, digest: str) -> None:
        try:
            await manager.warm(digest)
        except LayerError as exc:
            log.warning("fetching layer %s fully failed: %s", digest, exc)
            self._warming[digest] = {"state": "failed", "error": str(exc)}
        else:
            self._warming[digest] = {"state": "done", "error": None}

    # -- cache --------------------------------------------------------------------------

    def _cache_json(self, manager: LayerManager) -> dict[str, Any]:
        stats = manager.cache.statistics()
        pinned = manager.cache.pinned_layers()
        return {
            "dir": str(manager.cache_dir),
            "bytes": stats.bytes_cached,
            "max_bytes": stats.max_bytes,
            "chunks": stats.chunks_cached,
            "layers": [{"digest": d, "chunks": c, "bytes": b, "mounted": d in pinned}
                       for d, (c, b) in sorted(manager.cache.layer_usage().items())],
        }

    async def _prune(self, req: Request, manager: LayerManager) -> Response:
        try:
            args = json.loads(req.body or b"{}")
        except ValueError:
            return error_response(400, "body must be a JSON object")
        if not isinstance(args, dict) or set(args) - {"unused", "to"}:
            return error_response(400, 'body must be {"unused": bool, "to": bytes}')
        unused, to = args.get("unused", False), args.get("to", 0)
        if not isinstance(unused, bool) or not isinstance(to, int) or isinstance(to, bool) or to < 0:
            return error_response(400, '"unused" must be a bool and "to" a byte count >= 0')
        before = manager.cache.statistics().bytes_cached
        result = await trio.to_thread.run_sync(
            lambda: manager.cache.prune(to, include_pinned=not unused))
        return json_response({"chunks": result.chunks, "freed_bytes": result.bytes,
                              "before_bytes": before,
                              "after_bytes": manager.cache.statistics().bytes_cached})


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 100.0


def _format_name(media_type: str | None) -> str:
    if media_type and "zstd" in media_type:
        return "estargz-zstd"
    return "estargz"


def _tree_limit(req: Request) -> int:
    raw = req.query.get("limit", "")
    if raw.isdigit():
        return max(1, min(int(raw), residency.MAX_TREE_ENTRIES))
    return residency.MAX_TREE_ENTRIES


@asynccontextmanager
async def open_control_server(info: DaemonInfo, manager: LayerManager | None) -> AsyncIterator[ControlAPI]:
    """Serve the control API on ``info.control_address`` (mode 0600) for the block's duration.

    Raises:
        control_http.ListenError: the socket cannot be created.
    """
    listener = await control_http.open_unix_listener(info.control_address, mode=0o600)
    try:
        async with trio.open_nursery() as nursery:
            api = ControlAPI(info, manager, nursery)
            nursery.start_soon(control_http.serve, listener, api.handle)
            nursery.start_soon(api.sample_rates)
            log.info("control API on %s", info.control_address)
            try:
                yield api
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(info.control_address)
