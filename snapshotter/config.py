"""lazysnapd's TOML configuration: one frozen dataclass per section, loaded by one generic loader.

Every field carries its documentation (``help``, ``unit``) and optional checks (``min``, ``max``,
``choices``) in its metadata; the loader derives types from the annotations (bool, int, float,
str, Path, bytes, ``X | None``, ``tuple[X, ...]`` and nested dataclasses as tables; a field
without default is a required key). Adding a setting is
adding a field; adding a section is adding a dataclass and a field of that type on
:class:`Config`. Unknown keys, wrong types and out-of-range values raise
:class:`~snapshotter.errors.ConfigError` naming the key (``grpc.max_workers``).

Example::

    root = "/var/lib/lazysnap"
    address = "/run/lazysnap/lazysnap.sock"
    log_level = "info"

    [grpc]
    max_workers = 16

    [fuse]
    enable = true

    [registry]
    insecure_hosts = ["127.0.0.1:5000"]

``docs/config.md`` is generated from the fields' metadata by ``scripts/gen-config-doc.py``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from snapshotter.errors import ConfigError

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error")


def setting(default: Any, help: str, unit: str = "", **checks: Any) -> Any:
    """A documented config field; ``checks`` may hold ``min``, ``max`` and ``choices``."""
    return field(default=default, metadata={"help": help, "unit": unit, **checks})


@dataclass(frozen=True)
class GrpcConfig:
    """``[grpc]``: the Snapshots API server."""

    max_workers: int = setting(16, "threads serving RPCs at once", "threads", min=1, max=1024)
    max_message_bytes: int = setting(16 << 20, "largest request or response accepted", "bytes",
                                     min=4096, max=1 << 30)
    shutdown_grace: float = setting(5.0, "time in-flight RPCs get to finish on SIGTERM", "seconds",
                                    min=0.0, max=600.0)


@dataclass(frozen=True)
class FuseConfig:
    """``[fuse]``: the one FUSE session that serves lazily fetched layers."""

    enable: bool = setting(True, "serve eStargz layers lazily; false: every layer is unpacked normally")
    mountpoint: str | None = setting(None, "where the FUSE session is mounted; unset: <root>/fuse", "path")
    attr_timeout: float = setting(86400.0, "how long the kernel may cache file attributes (layers never "
                                  "change)", "seconds", min=0.0, max=1e9)
    entry_timeout: float = setting(86400.0, "how long the kernel may cache name lookups", "seconds",
                                   min=0.0, max=1e9)
    allow_other: bool = setting(True, "let every user (container processes) read the layers")


@dataclass(frozen=True)
class CacheConfig:
    """``[cache]``: the on-disk cache of verified chunks and layer indexes."""

    dir: str | None = setting(None, "cache directory; unset: <root>/cache", "path")
    max_bytes: int = setting(10 << 30, "bound on cached chunk bytes; chunks of unmounted layers are "
                             "evicted first", "bytes", min=1 << 20, max=1 << 50)
    fsync: bool = setting(True, "fsync each chunk before it enters the cache (safe after a power loss)")
    memory_bytes: int = setting(32 << 20, "per layer, verified chunks the disk cache could not keep are "
                                "held in memory up to this", "bytes", min=0, max=1 << 34)


@dataclass(frozen=True)
class FetchConfig:
    """``[fetch]``: how missing chunks are fetched and verified."""

    allow_no_verification: bool = setting(False, "mount layers without a TOC digest label (unverified TOC, "
                                          "logged); false: they are unpacked normally")
    valid_interval: float = setting(60.0, "a successful reachability check of a layer's blob is not "
                                    "repeated for this long", "seconds", min=0.0, max=86400.0)
    max_range_bytes: int = setting(16 << 20, "most compressed bytes asked in one coalesced range", "bytes",
                                   min=4096, max=1 << 30)
    max_ranges_per_read: int = setting(32, "most ranges fetched for one read", "ranges", min=1, max=4096)
    thread_threshold: int = setting(64 << 10, "chunks at least this large decode and hash in a worker "
                                    "thread", "bytes", min=0, max=1 << 30)
    failure_ttl: float = setting(2.0, "a chunk that failed to fetch fails fast for this long", "seconds",
                                 min=0.0, max=3600.0)
    neighbour_bytes: int = setting(32 << 10, "a miss also takes the uncached chunks right after it in the "
                                   "blob, up to this many bytes, in the same request", "bytes",
                                   min=0, max=1 << 30)
    speculate_file_bytes: int = setting(4 << 20, "a file's first miss also fetches the rest of the file "
                                        "alongside (not waited for) when it is at most this many "
                                        "compressed bytes; 0 = off", "bytes", min=0, max=1 << 30)
    speculate_dir_bytes: int = setting(0, "a small file's first miss also fetches the small files of its "
                                       "directory alongside, up to this many compressed bytes; 0 = off "
                                       "(`speculate_scan_bytes` does better for most workloads)",
                                       "bytes", min=0, max=1 << 30)
    small_file_bytes: int = setting(64 << 10, "the largest file `speculate_dir_bytes` counts as small",
                                    "bytes", min=0, max=1 << 30)
    speculate_scan_bytes: int = setting(4 << 20, "the second file of a kind (name suffix) missed in a "
                                        "directory also fetches the first chunk of the directory's other "
                                        "files of that kind, up to this many compressed bytes; 0 = off",
                                        "bytes", min=0, max=1 << 30)
    speculate_scan_files: int = setting(40, "... unless the directory holds more than this many files of "
                                        "the kind (a collection a program takes a few from, such as "
                                        "Python's standard library)", "files", min=0, max=1 << 20)
    speculate_import_bytes: int = setting(8 << 20, "a Python module's first miss also fetches the modules "
                                          "of its layer that it imports, and theirs in turn (names read "
                                          "from its bytes), up to this many compressed bytes; 0 = off",
                                          "bytes", min=0, max=1 << 30)
    speculate_library_bytes: int = setting(16 << 20, "an ELF file's first miss at its start also fetches "
                                           "what the dynamic loader reads next (dynamic section, "
                                           "writable segment) and the libraries of its layer it "
                                           "needs, down the chain, up to this many compressed "
                                           "bytes; 0 = off", "bytes", min=0, max=1 << 30)


@dataclass(frozen=True)
class PrefetchConfig:
    """``[prefetch]``: work done when a layer is mounted, and in the background."""

    noprefetch: bool = setting(False, "do not fetch the landmark prefix (prioritized files) at mount")
    no_background_fetch: bool = setting(False, "do not fetch the rest of each layer in the background")
    background_rate: int = setting(0, "bandwidth the background fetch may use, 0 = unlimited",
                                   "bytes/second", min=0, max=1 << 40)
    background_step_bytes: int = setting(4 << 20, "compressed bytes per background request", "bytes",
                                         min=4096, max=1 << 30)
    background_silence: float = setting(
        5.0, "quiet time after the last on-demand fetch (or mount) before background fetch sends",
        "seconds", min=0.0, max=3600.0)


@dataclass(frozen=True)
class RegistryConfig:
    """``[registry]``: how layer blobs are read from registries (mirrors, credentials, retries)."""

    hosts_dir: str = setting("/etc/containerd/certs.d", "containerd certs.d directory with "
                             "<host>/hosts.toml mirrors and certificates", "path")
    docker_config: str | None = setting(None, "docker config.json with credentials; unset: "
                                        "$DOCKER_CONFIG/config.json, then ~/.docker/config.json", "path")
    insecure_hosts: tuple[str, ...] = setting((), "host[:port] names reached over plain HTTP without "
                                              "trying HTTPS")
    localhost_plain_http: bool = setting(True, "fall back to plain HTTP for loopback registries when "
                                         "HTTPS fails, as containerd does")
    connect_timeout: float = setting(10.0, "time to establish a connection (TCP and TLS)", "seconds",
                                     min=0.1, max=3600.0)
    read_timeout: float = setting(30.0, "time without receiving a byte before a read is abandoned",
                                  "seconds", min=0.1, max=3600.0)
    fetching_timeout_sec: float = setting(120.0, "time one whole request (headers and body) may take",
                                          "seconds", min=0.1, max=86400.0)
    max_retries: int = setting(4, "attempts per request before a transient failure is reported",
                               "attempts", min=1, max=100)
    min_wait_msec: int = setting(200, "first retry delay; doubles per attempt, with full jitter",
                                 "milliseconds", min=0, max=600_000)
    max_wait_msec: int = setting(5000, "cap on one retry delay (also on an honoured Retry-After)",
                                 "milliseconds", min=0, max=600_000)
    force_single_range_mode: bool = setting(False, "never send multi-range requests")
    max_ranges_per_request: int = setting(16, "ranges sent in one multi-range request", "ranges",
                                          min=1, max=1024)
    mirror_cooldown: float = setting(30.0, "a mirror that failed transiently is skipped this long "
                                     "(0: never skipped)", "seconds", min=0.0, max=86400.0)


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (names in docs/metrics.md)."""

    address: str | None = setting(None, "where GET /metrics is served: 127.0.0.1:PORT (TCP), "
                                  "unix:/path or /path (mode 0600); unset: no endpoint")


@dataclass(frozen=True)
class Config:
    """The whole configuration; every field has a default, so an empty file is valid."""

    root: str = setting("/var/lib/lazysnap", "state directory: metadata.db and snapshots/", "path")
    address: str = setting("/run/lazysnap/lazysnap.sock", "unix socket the Snapshots API listens on", "path")
    log_level: str = setting("info", "least severe log level written to stderr", choices=LOG_LEVELS)
    control_address: str | None = setting(None, "unix socket of the control API snapctl uses (root only, "
                                          "mode 0600); unset: <root>/control.sock", "path")
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load(path: str | None) -> Config:
    """Read and validate the config file at ``path`` (defaults only when ``None``)."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return from_mapping(Config, data)


def from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a parsed TOML table, validating every key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = prefix + key
        if key not in fields:
            raise ConfigError(f"{name}: unknown key")
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{name}: must be a table ([{name}])")
            values[key] = from_mapping(ftype, raw, name + ".")  # type: ignore[arg-type]
        else:
            values[key] = _check(name, _coerce(name, ftype, raw), fields[key].metadata)
    missing = [f.name for f in fields.values() if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key missing")
    return cls(**values)


def _coerce(name: str, ftype: Any, raw: Any) -> Any:
    origin = typing.get_origin(ftype)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(ftype) if a is not type(None)]
        return _coerce(name, args[0], raw)
    if origin is tuple:
        if not isinstance(raw, list):
            raise ConfigError(f"{name}: must be a list")
        item = typing.get_args(ftype)[0]
        return tuple(_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(raw))
    if ftype is bool:
        ok = isinstance(raw, bool)
    elif ftype is int:
        ok = isinstance(raw, int) and not isinstance(raw, bool)
    elif ftype is float:
        ok = isinstance(raw, int | float) and not isinstance(raw, bool)
        raw = float(raw) if ok else raw
    elif ftype is str:
        ok = isinstance(raw, str)
    elif ftype is Path:
        ok = isinstance(raw, str) and bool(raw) and "\x00" not in raw
        raw = Path(raw) if ok else raw
    elif ftype is bytes:
        ok = isinstance(raw, str)
        raw = raw.encode() if ok else raw
    else:
        raise ConfigError(f"{name}: unsupported setting type {ftype!r}")
    if not ok:
        raise ConfigError(f"{name}: must be {getattr(ftype, '__name__', ftype)}, not {type(raw).__name__}")
    return raw


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> Any:
    unit = f" {meta['unit']}" if meta.get("unit") and meta["unit"] != "path" else ""
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{name}: {value}{unit} is below the minimum {meta['min']}{unit}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{name}: {value}{unit} is above the maximum {meta['max']}{unit}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("unit") == "path" and (not value or "\x00" in value):
        raise ConfigError(f"{name}: not a usable path: {value!r}")
    return value
