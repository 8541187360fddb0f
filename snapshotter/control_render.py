"""Human output of ``snapctl``: rich tables built from the control API's JSON answers."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from snapshotter.control_client import human_size


def console() -> Console:
    """A console that never wraps lines for pipes (scripts grep our output)."""
    c = Console()
    return c if c.is_terminal else Console(width=200, soft_wrap=True)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def daemon_table(st: dict[str, Any]) -> Table:
    t = Table(title="lazysnapd", show_header=False, box=None)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("version", f"{st['version']} (pid {st['pid']})")
    t.add_row("uptime", f"{st['uptime_seconds']:.0f} s")
    t.add_row("config", st.get("config_file") or "(built-in defaults)")
    for name, addr in st["sockets"].items():
        t.add_row(f"{name} socket", addr or "-")
    if not st.get("layer_filesystem"):
        t.add_row("lazy layers", "disabled (every layer is unpacked)")
        return t
    cache = st["cache"]
    t.add_row("layers", f"{st['layers']} served, {st['mounts']} mounts")
    t.add_row("cache", f"{human_size(cache['bytes_cached'])} of {human_size(cache['max_bytes'])} "
              f"({cache['chunks_cached']} chunks; hits {cache['hits']}, misses {cache['misses']})")
    fetch = st["fetch"]
    t.add_row("fetched", f"{human_size(fetch['bytes_fetched'])} in {fetch['requests']} requests, "
              f"{human_size(fetch['bytes_per_second_1m'])}/s over the last minute")
    errors = st["errors"]
    t.add_row("errors", f"integrity {errors['integrity']}, source {errors['source']}")
    return t


def layers_table(layers: list[dict[str, Any]]) -> Table:
    t = Table(title=f"{len(layers)} served layers")
    for col in ("digest", "image", "format", "compressed", "uncompressed", "fetched", "cached",
                "background", "snapshots"):
        t.add_column(col, justify="right" if col in ("compressed", "uncompressed", "fetched", "cached")
                     else "left")
    for layer in layers:
        fetched, compressed = layer["fetched_bytes"], layer["compressed_size"]
        t.add_row(layer["digest"][:19], layer["ref"], layer["format"], human_size(compressed),
                  human_size(layer["uncompressed_size"]),
                  f"{human_size(fetched)} ({_pct(fetched, compressed)})",
                  f"{human_size(layer['cached_bytes'])} ({layer['resident_percent']:.1f}%)",
                  (layer.get("warm") or {}).get("state") or layer["background"],
                  "\n".join(layer["snapshots"]) or str(len(layer["mountpoints"])))
    return t


def tree_table(layer: dict[str, Any]) -> Table:
    t = Table(title=f"{layer['digest']} ({layer['ref']})")
    t.add_column("path")
    t.add_column("type")
    t.add_column("size", justify="right")
    t.add_column("local", justify="right")
    for e in layer["tree"]:
        local = f"{_pct(e['cached'], e['size'])}" if e["type"] == "file" else ""
        t.add_row(e["path"], e["type"], human_size(e["size"]) if e["type"] == "file" else "", local)
    return t


def cache_table(du: dict[str, Any]) -> Table:
    t = Table(title=f"chunk cache {du['dir']}: {human_size(du['bytes'])} of {human_size(du['max_bytes'])}")
    t.add_column("layer")
    t.add_column("chunks", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("mounted")
    for layer in du["layers"]:
        t.add_row(layer["digest"], str(layer["chunks"]), human_size(layer["bytes"]),
                  "yes" if layer["mounted"] else "no")
    return t


def config_toml(cfg: dict[str, Any]) -> str:
    """The effective config as TOML text (unset values as comments)."""
    top: list[str] = []
    sections: list[str] = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            sections.append(f"\n[{key}]")
            sections.extend(_toml_line(k, v) for k, v in value.items())
        else:
            top.append(_toml_line(key, value))
    return "\n".join(top + sections)


def _toml_line(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} = (unset)"
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    return f"{key} = {json.dumps(value)}"
