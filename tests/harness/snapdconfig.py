"""lazysnapd config files for tests that tune the layer filesystem (no background fetch, ...).

    make_lazysnapd(config=lazysnapd_config(background=False, failure_ttl=1.0))

Only the settings a test names are written (see ``snapshotter/config.py`` for their meaning);
everything else keeps the daemon's defaults.
"""

from __future__ import annotations

__all__ = ["lazysnapd_config"]


def _toml(value: bool | float) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def lazysnapd_config(*, background: bool | None = None, prefetch: bool | None = None,
                     failure_ttl: float | None = None) -> str:
    """The TOML text of a config with these layer-filesystem settings (None: the default).

    ``background=False`` stops fetching the rest of each layer after mount, ``prefetch=False``
    the landmark prefix at mount; ``failure_ttl`` is how long a failed chunk fails fast (seconds).
    """
    tables: dict[str, dict[str, bool | float]] = {}
    if background is not None:
        tables.setdefault("prefetch", {})["no_background_fetch"] = not background
    if prefetch is not None:
        tables.setdefault("prefetch", {})["noprefetch"] = not prefetch
    if failure_ttl is not None:
        tables.setdefault("fetch", {})["failure_ttl"] = float(failure_ttl)
    out = []
    for table, values in tables.items():
        out.append(f"[{table}]")
        out += [f"{key} = {_toml(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"
