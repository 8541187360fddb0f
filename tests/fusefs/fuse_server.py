"""Runs one LayerManager (one FUSE session) in its own process for the mount tests.

Usage: ``python3 fuse_server.py '<json config>'``. Config keys: ``fuse`` (session mountpoint),
``cache`` (cache dir), ``cache_max`` (bytes), ``roots`` (blob dirs for FileSourceFactory),
``prefetch``/``background`` (bools), ``failure_ttl`` (seconds), ``registry_hosts`` (plain-HTTP
registry hosts: use the real registry source instead of files). Once the session is mounted it
prints ``READY`` and then answers one JSON line per command line read on stdin:

    mount <json {"digest", "toc_digest", "mountpoint", "size"?, "neighbours"?}>
                            → {"ok": true, "path": ...} or {"error": <class>, "message": ...}
    start_mount <json>      → as mount, by ``start_mount``: {"ok": true} once the TOC verified
    hold-builds / release-builds    take and give back the lock index builds run under
    later <command>         → {"ok": true} at once; the command runs in the background and its
                              reply is logged as ``later <cmd>: <json>``
    check <mountpoint>      (check-nowait: ``wait=False``)
    unmount <mountpoint>
    stats <digest>          → source counters, fetch and cache statistics
    quit                    → unmounts everything, stops the session, exits 0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import trio

from fusefs.config import CacheConfig, FetchConfig, FuseConfig, FusefsConfig, PrefetchConfig
from fusefs.errors import LayerError
from fusefs.formats.estargz import _BUILD_LOCK
from fusefs.manager import LayerManager, open_layer_manager
from fusefs.sources.base import SourceFactory
from fusefs.sources.config import RegistryConfig
from fusefs.sources.file import FileSource, FileSourceFactory
from fusefs.sources.registry import RegistrySourceFactory
from fusefs.spec import LayerSpec


class _CountingFactory(FileSourceFactory):
    """FileSourceFactory that keeps its sources, so ``stats`` can report what they read."""

    def __init__(self, roots: list[Path]) -> None:
        super().__init__(roots)
        self.sources: dict[str, list[FileSource]] = {}

    async def open(self, spec: LayerSpec) -> FileSource:
        source = await super().open(spec)
        self.sources.setdefault(spec.digest, []).append(source)
        return source


async def _serve(cfg: dict[str, Any]) -> None:
    config = FusefsConfig(
        cache=CacheConfig(Path(cfg["cache"]), max_bytes=int(cfg.get("cache_max", 1 << 30)), fsync=False),
        fuse=FuseConfig(Path(cfg["fuse"])),
        fetch=FetchConfig(failure_ttl=float(cfg.get("failure_ttl", 2.0))),
        prefetch=PrefetchConfig(prefetch=bool(cfg.get("prefetch", False)),
                                background=bool(cfg.get("background", False))),
    )
    factory = _CountingFactory([Path(r) for r in cfg["roots"]])
    source_factory: SourceFactory = factory
    registry: RegistrySourceFactory | None = None
    if cfg.get("registry_hosts"):
        registry = RegistrySourceFactory(RegistryConfig(
            hosts_dir=None, docker_config=Path(cfg["cache"]) / "no-docker-config.json",
            insecure_hosts=tuple(cfg["registry_hosts"])))
        source_factory = registry
    try:
        await _run(config, source_factory, factory)
    finally:
        if registry is not None:
            await registry.aclose()


async def _run(config: FusefsConfig, source_factory: SourceFactory, factory: _CountingFactory) -> None:
    async with open_layer_manager(config, source_factory) as manager, trio.open_nursery() as later:
        print("READY", flush=True)
        stdin = trio.wrap_file(sys.stdin)
        while True:
            line = (await stdin.readline()).strip()
            if not line or line == "quit":
                break
            cmd, _, arg = line.partition(" ")
            if cmd == "later":  # run the command in the background; its reply goes to the log
                later.start_soon(_reply_later, manager, factory, arg)
                print(json.dumps({"ok": True}), flush=True)
                continue
            print(json.dumps(await _reply(manager, factory, cmd, arg)), flush=True)


async def _reply(manager: LayerManager, factory: _CountingFactory, cmd: str, arg: str) -> dict[str, Any]:
    try:
        return await _command(manager, factory, cmd, arg)
    except LayerError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


async def _reply_later(manager: LayerManager, factory: _CountingFactory, line: str) -> None:
    cmd, _, arg = line.partition(" ")
    reply = await _reply(manager, factory, cmd, arg)
    logging.getLogger("fuse_server").info("later %s: %s", cmd, json.dumps(reply))


async def _command(manager: LayerManager, factory: _CountingFactory, cmd: str, arg: str) -> dict[str, Any]:
    if cmd in ("mount", "start_mount"):
        req = json.loads(arg)
        spec = LayerSpec(ref=req.get("ref", "test.local/fixture:latest"), digest=req["digest"],
                         size=req.get("size"), toc_digest=req.get("toc_digest"),
                         prefetch_size=req.get("prefetch_size"),
                         neighbours=tuple(req.get("neighbours", ())))
        if cmd == "start_mount":
            await manager.start_mount(spec, req["mountpoint"])
            return {"ok": True}
        await manager.mount(spec, req["mountpoint"])
        return {"ok": True, "path": manager.layer_path(req["digest"])}
    if cmd == "hold-builds":
        return {"ok": _BUILD_LOCK.acquire(blocking=False)}
    if cmd == "release-builds":
        _BUILD_LOCK.release()
        return {"ok": True}
    if cmd in ("check", "check-nowait"):
        await manager.check(arg, wait=cmd == "check")
        return {"ok": True}
    if cmd == "unmount":
        await manager.unmount(arg)
        return {"ok": True}
    if cmd == "stats":
        sources = factory.sources.get(arg, [])
        stats = manager.statistics()
        fetch = stats.fetch.get(arg)
        return {
            "source_calls": sum(s.counters.calls for s in sources),
            "source_ranges": sum(s.counters.ranges for s in sources),
            "history": [list(h) for s in sources for h in s.history],
            "fetch": dataclasses.asdict(fetch) if fetch else None,
            "cache": dataclasses.asdict(stats.cache),
        }
    return {"error": "unknown command", "message": cmd}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(_serve, json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
