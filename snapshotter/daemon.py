"""lazysnapd, the composition root: builds every object, owns the trio loop, serves until a signal.

    lazysnapd --root DIR --address SOCKET [--config FILE] [--log-level L]

Threading: trio runs the main thread from the start, and the gRPC server (:mod:`snapshotter.rpc`)
on it; each call's servicer method runs in a worker thread and blocks there (sqlite, directory
walks, mount syscalls), reaching the trio loop with ``trio.from_thread.run`` only for
layer-filesystem calls. Components that live on the loop (the fusefs FUSE session) are entered as
async context managers on one exit stack inside the daemon's nursery, so they stop in reverse
order after the gRPC server has stopped.

Lazy layers: with ``[fuse] enable`` (the default) :func:`open_lazy_layers` serves remote snapshots
through fusefs (a :class:`~fusefs.manager.LayerManager` reading blobs through a
:class:`~fusefs.sources.registry.RegistrySourceFactory`); ``run`` takes any other
:data:`LayerFilesystemFactory` (tests pass bind-mount fakes) or none (every layer is unpacked).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import trio

from fusefs import config as fusefs_config_mod
from fusefs.allocator import bound_large_allocations
from fusefs.manager import LayerManager, open_layer_manager
from fusefs.sources.config import RegistryConfig as SourceRegistryConfig
from fusefs.sources.registry import RegistrySourceFactory
from snapshotter import config as config_mod
from snapshotter import control_http, logs, rpc, systemd
from snapshotter.api import snapshots_pb2
from snapshotter.config import Config
from snapshotter.control import DaemonInfo, control_address, open_control_server
from snapshotter.errors import ConfigError
from snapshotter.metrics import Metrics, TimedLayerFilesystem, open_metrics_server
from snapshotter.mounts import Layout, detect_overlay_options
from snapshotter.remote import LayerFilesystem
from snapshotter.service import SnapshotsService
from snapshotter.snapshots import Snapshots
from snapshotter.sockets import SocketInUse, remove_stale_socket
from snapshotter.store import Store

log = logging.getLogger(__name__)

LayerFilesystemFactory = Callable[[Config], AbstractAsyncContextManager[LayerFilesystem]]
"""Opens the layer filesystem (e.g. fusefs's FUSE session) for the daemon's lifetime."""

EXIT_CONFIG = 2
EXIT_STARTUP = 1


class StartupError(Exception):
    """The daemon cannot start: socket already served, root locked, bind failed."""


OPAQUE_XATTR_TRUSTED = b"trusted.overlay.opaque"
OPAQUE_XATTR_USER = b"user.overlay.opaque"


def fusefs_config(cfg: Config, userxattr: bool) -> fusefs_config_mod.FusefsConfig:
    """fusefs's settings from lazysnapd's; paths left unset default to ``<root>/fuse`` and ``<root>/cache``.

    ``userxattr``: the overlay mounts use ``user.*`` xattrs, so layers must show opaque
    directories as ``user.overlay.opaque`` rather than ``trusted.overlay.opaque``.
    """
    root = Path(os.path.abspath(cfg.root))
    fuse, cache, fetch, prefetch = cfg.fuse, cfg.cache, cfg.fetch, cfg.prefetch
    cache_dir = Path(os.path.abspath(cache.dir)) if cache.dir is not None else root / "cache"
    mountpoint = Path(os.path.abspath(fuse.mountpoint)) if fuse.mountpoint is not None else root / "fuse"
    return fusefs_config_mod.FusefsConfig(
        cache=fusefs_config_mod.CacheConfig(dir=cache_dir, max_bytes=cache.max_bytes, fsync=cache.fsync),
        fuse=fusefs_config_mod.FuseConfig(
            mountpoint=mountpoint,
            attr_timeout=fuse.attr_timeout, entry_timeout=fuse.entry_timeout, allow_other=fuse.allow_other,
            opaque_xattr=OPAQUE_XATTR_USER if userxattr else OPAQUE_XATTR_TRUSTED),
        fetch=fusefs_config_mod.FetchConfig(
            max_range_bytes=fetch.max_range_bytes, max_ranges_per_read=fetch.max_ranges_per_read,
            thread_threshold=fetch.thread_threshold, failure_ttl=fetch.failure_ttl,
            neighbour_bytes=fetch.neighbour_bytes, speculate_file_bytes=fetch.speculate_file_bytes,
            speculate_dir_bytes=fetch.speculate_dir_bytes, small_file_bytes=fetch.small_file_bytes,
            speculate_scan_bytes=fetch.speculate_scan_bytes, speculate_scan_files=fetch.speculate_scan_files,
            speculate_import_bytes=fetch.speculate_import_bytes,
            speculate_library_bytes=fetch.speculate_library_bytes, memory_bytes=cache.memory_bytes),
        prefetch=fusefs_config_mod.PrefetchConfig(
            prefetch=not prefetch.noprefetch, background=not prefetch.no_background_fetch,
            background_rate=prefetch.background_rate, background_step_bytes=prefetch.background_step_bytes,
            background_silence=prefetch.background_silence),
        allow_unverified_toc=fetch.allow_no_verification,
        check_interval=fetch.valid_interval,
    )


def registry_config(cfg: Config) -> SourceRegistryConfig:
    """The registry blob source's settings from lazysnapd's ``[registry]`` and ``[fetch]``."""
    reg = cfg.registry
    return SourceRegistryConfig(
        hosts_dir=Path(reg.hosts_dir),
        docker_config=Path(reg.docker_config) if reg.docker_config is not None else None,
        insecure_hosts=reg.insecure_hosts,
        localhost_plain_http=reg.localhost_plain_http, connect_timeout=reg.connect_timeout,
        read_timeout=reg.read_timeout, request_timeout=reg.fetching_timeout_sec, retries=reg.max_retries,
        backoff_base=reg.min_wait_msec / 1000, backoff_max=reg.max_wait_msec / 1000,
        max_ranges_per_request=1 if reg.force_single_range_mode else reg.max_ranges_per_request,
        mirror_cooldown=reg.mirror_cooldown, check_interval=cfg.fetch.valid_interval,
    )


@asynccontextmanager
async def open_lazy_layers(cfg: Config) -> AsyncIterator[LayerManager]:
    """Serve layers lazily through fusefs for the block (the daemon's default layer filesystem).

    Mounts the FUSE session at start; on exit unmounts every layer, stops FUSE and closes the
    registry connections.
    """
    root = os.path.abspath(cfg.root)
    overlay = await trio.to_thread.run_sync(detect_overlay_options, root)
    sources = RegistrySourceFactory(registry_config(cfg))
    try:
        async with open_layer_manager(fusefs_config(cfg, overlay.userxattr), sources) as manager:
            yield manager
    finally:
        with trio.CancelScope(shield=True):
            await sources.aclose()


def default_layerfs_factory(cfg: Config) -> LayerFilesystemFactory | None:
    """The layer filesystem ``main`` runs with: fusefs unless ``[fuse] enable = false``."""
    return open_lazy_layers if cfg.fuse.enable else None


def check_socket_free(address: str) -> None:
    """Refuse a socket path another live process serves; remove a stale socket file.

    Raises:
        StartupError: something answers on ``address``, or the path is not a socket.
    """
    try:
        remove_stale_socket(address)
    except SocketInUse as exc:
        raise StartupError(str(exc)) from exc


def lock_root(root: str) -> int:
    """Take ``<root>/lock`` so two daemons never share one root; returns the held descriptor."""
    fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"{root} is in use by another lazysnapd") from None
    return fd


def _grpc_listener(cfg: Config, activated: socket.socket | None) -> trio.SocketListener:
    """Where the gRPC server accepts: systemd's socket as it is, or ``cfg.address`` bound here
    (mode 0660, root's group; ``check_socket_free`` has cleared the path)."""
    try:
        sock = systemd.listen_unix(cfg.address, listener=activated)
    except OSError as exc:
        raise StartupError(f"cannot listen on {cfg.address}: {exc}") from exc
    if activated is None and os.geteuid() == 0:
        os.chown(cfg.address, 0, 0)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _feed_watchdog(interval: float) -> None:
    """Ping systemd's watchdog while the trio loop is healthy (half its timeout)."""
    while True:
        systemd.notify_watchdog()
        await trio.sleep(interval / 2)


async def run(cfg: Config, stop: trio.Event, layerfs_factory: LayerFilesystemFactory | None = None,
              listener: socket.socket | None = None,
              *, config_path: str | None = None,
              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until ``stop`` is set, then shut down cleanly. Reports started once it accepts RPCs.

    ``listener`` is a socket-activated listener (systemd) to serve instead of binding
    ``cfg.address``.

    Raises:
        StartupError: the daemon could not start; nothing is left running.
    """
    root = os.path.abspath(cfg.root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.address)), mode=0o711, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        lock_fd = lock_root(root)
        stack.callback(os.close, lock_fd)
        if listener is None:
            check_socket_free(cfg.address)
        store = await trio.to_thread.run_sync(Store.open, os.path.join(root, "metadata.db"))
        stack.callback(store.close)
        layout = Layout(root)
        overlay = await trio.to_thread.run_sync(detect_overlay_options, root)
        snaps = Snapshots(store, layout, overlay)
        await trio.to_thread.run_sync(snaps.recover)
        metrics = Metrics()
        manager: LayerManager | None = None
        if layerfs_factory is not None:
            layerfs = await stack.enter_async_context(layerfs_factory(cfg))
            if isinstance(layerfs, LayerManager):
                manager = layerfs
                metrics.attach(manager)
            snaps.attach_layer_filesystem(TimedLayerFilesystem(layerfs, metrics),
                                          trio.lowlevel.current_trio_token())
            await snaps.restore_remote()
        metrics_address = await _open_operator_servers(stack, cfg, config_path, metrics, manager, store)
        methods = rpc.service_methods(snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"],
                                      SnapshotsService(snaps))
        server = rpc.Server(methods, max_message_bytes=cfg.grpc.max_message_bytes,
                            max_workers=cfg.grpc.max_workers, observe=metrics.observe_rpc)
        grpc_listener = _grpc_listener(cfg, listener)
        serving = await stack.enter_async_context(trio.open_nursery())
        await serving.start(server.serve, grpc_listener)

        async def stop_grpc() -> None:
            await server.aclose(cfg.grpc.shutdown_grace)
            if listener is None:  # a socket systemd holds is never unlinked
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cfg.address)

        stack.push_async_callback(stop_grpc)
        log.info("serving", extra={"address": cfg.address, "root": root, "metrics": metrics_address,
                                   "index_off": overlay.index_off,
                                   "userxattr": overlay.userxattr, "activated": listener is not None,
                                   "pid": os.getpid()})
        systemd.notify_ready(f"serving on {cfg.address}")
        task_status.started()
        async with trio.open_nursery() as nursery:
            interval = systemd.watchdog_interval()
            if interval is not None:
                nursery.start_soon(_feed_watchdog, interval)
            await stop.wait()
            nursery.cancel_scope.cancel()
        log.info("shutting down")
        systemd.notify_stopping()
    log.info("stopped")


async def _open_operator_servers(stack: contextlib.AsyncExitStack, cfg: Config, config_path: str | None,
                                 metrics: Metrics, manager: LayerManager | None, store: Store) -> str | None:
    """Enter the metrics endpoint (if configured) and the control API on ``stack``.

    Returns the metrics endpoint's bound address. A default control socket that cannot be
    created (e.g. a root path too long for a socket) is logged and skipped; configured ones
    that fail stop the start.
    """
    bound = None
    try:
        if cfg.metrics.address is not None:
            bound = await stack.enter_async_context(open_metrics_server(cfg.metrics.address, metrics))
        info = DaemonInfo(cfg, config_path, control_address(cfg), bound, store)
        try:
            await stack.enter_async_context(open_control_server(info, manager))
        except control_http.ListenError as exc:
            if cfg.control_address is not None:
                raise
            log.warning("no control API (snapctl): %s", exc)
    except control_http.ListenError as exc:
        raise StartupError(str(exc)) from exc
    return bound


async def _main_async(cfg: Config, layerfs_factory: LayerFilesystemFactory | None,
                      listener: socket.socket | None, config_path: str | None = None) -> None:
    stop = trio.Event()

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("signal received", extra={"signal": signal.Signals(signum).name})
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        await run(cfg, stop, layerfs_factory, listener, config_path=config_path)
        nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lazysnapd", description="lazysnap containerd proxy snapshotter")
    p.add_argument("--root", help="state directory (config: root)")
    p.add_argument("--address", help="unix socket to serve on (config: address)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--log-level", choices=config_mod.LOG_LEVELS, help="config: log_level")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config file's values with command-line overrides applied (ConfigError if invalid)."""
    cfg = config_mod.load(args.config)
    overrides = {k: v for k, v in (("root", args.root), ("address", args.address),
                                   ("log_level", args.log_level)) if v is not None}
    config_mod.from_mapping(Config, overrides)  # validates the overriding values
    return replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lazysnapd``; returns the exit status."""
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"lazysnapd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level)
    bound_large_allocations()
    listener = systemd.pick_listener(systemd.listen_fds_with_names(), cfg.address)
    try:
        trio.run(_main_async, cfg, default_layerfs_factory(cfg), listener,
                 os.path.abspath(args.config) if args.config else None)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
