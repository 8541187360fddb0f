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
    """``[fuse]``: the FUSE session serving remote layers (fields come with fusefs)."""


@dataclass(frozen=True)
class CacheConfig:
    """``[cache]``: the chunk cache (fields come with fusefs)."""


@dataclass(frozen=True)
class RegistryConfig:
    """``[registry]``: registry access, mirrors, credentials (fields come with fusefs)."""


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (fields come with the metrics module)."""


@dataclass(frozen=True)
class Config:
    """The whole configuration; every field has a default, so an empty file is valid."""

    root: str = setting("/var/lib/lazysnap", "state directory: metadata.db and snapshots/", "path")
    address: str = setting("/run/lazysnap/lazysnap.sock", "unix socket the Snapshots API listens on", "path")
    log_level: str = setting("info", "least severe log level written to stderr", choices=LOG_LEVELS)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
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
