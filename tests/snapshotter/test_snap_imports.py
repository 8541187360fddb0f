"""What lazysnapd loads: every imported module stays resident for the daemon's lifetime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Terminal rendering and CLI parsing (snapctl's and httpx's command lines), test-only libraries,
# and grpcio (snapctl's client; the daemon serves with snapshotter.rpc: grpcio is 12 MiB of RSS).
NOT_IN_DAEMON = ("rich", "click", "pygments", "hypothesis", "pytest", "grpc", "snapshotter.snapctl",
                 "snapshotter.control_render", "snapshotter.control_client",
                 "snapshotter.api.snapshots_pb2_grpc")


def _loaded_after(code: str) -> dict[str, object]:
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps({{'mods': sorted(sys.modules), 'httpx_main': callable(httpx.main)}}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120, check=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_daemon_does_not_import_cli_or_test_libraries() -> None:
    loaded = _loaded_after("import snapshotter.daemon, httpx")
    mods = loaded["mods"]
    assert isinstance(mods, list)
    assert "fusefs.sources.registry" in mods and "httpx" in mods  # the probe imported the daemon
    unwanted = sorted(m for m in mods if m.split(".")[0] in NOT_IN_DAEMON or m in NOT_IN_DAEMON)
    assert unwanted == []
    assert loaded["httpx_main"]  # httpx keeps its (stub) CLI entry point


def test_httpx_cli_still_loads_when_imported_first() -> None:
    # the guard only acts before httpx is imported: a process that imported httpx itself keeps
    # httpx's real command line
    loaded = _loaded_after("import httpx, fusefs.sources.registry")
    mods = loaded["mods"]
    assert isinstance(mods, list)
    assert "httpx._main" in mods
