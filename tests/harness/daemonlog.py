"""lazysnapd's JSON log (one object per line on stderr) read back by tests.

    mark = daemon_log_mark(snapd.log_path)
    ...                                               # pull something
    remote_prepared(snapd.log_path, since=mark)       # the handshake outcomes, in order
    fallbacks(snapd.log_path, since=mark)             # only the ones that fell back (with "reason")

The key ``remote-snapshot-prepared`` is the daemon's fixed log field for the outcome of a Prepare
that had a remote candidate (``true``: mounted lazily and committed, ``false``: normal unpack).
It is spelled out here rather than imported, because operators grep for it: renaming it in the
daemon must fail these tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import wait_until

__all__ = ["REMOTE_PREPARED", "daemon_log_mark", "fallbacks", "log_records", "remote_prepared",
           "wait_for_record"]

REMOTE_PREPARED = "remote-snapshot-prepared"

Record = dict[str, Any]


def daemon_log_mark(path: Path) -> int:
    """The current end of the log, to read only what comes after."""
    return path.stat().st_size if path.exists() else 0


def log_records(path: Path, since: int = 0) -> list[Record]:
    """Every JSON object logged after byte ``since``; other lines (and a partial last one) skipped."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(since)
        lines = f.read().splitlines()
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def remote_prepared(path: Path, since: int = 0) -> list[Record]:
    """Records carrying the remote-snapshot-prepared outcome, in log order."""
    return [r for r in log_records(path, since) if REMOTE_PREPARED in r]


def fallbacks(path: Path, since: int = 0) -> list[Record]:
    """Prepares that had a remote candidate but fell back to a normal unpack."""
    return [r for r in remote_prepared(path, since) if r[REMOTE_PREPARED] is False]


def wait_for_record(path: Path, match: Callable[[Record], bool], timeout: float, what: str,
                    since: int = 0) -> Record:
    """The first record after ``since`` that ``match`` accepts; HarnessError after ``timeout`` s."""
    found: list[Record] = []

    def seen() -> bool:
        found[:] = [r for r in log_records(path, since) if match(r)]
        return bool(found)

    wait_until(seen, timeout, what, interval=0.1)
    return found[0]
