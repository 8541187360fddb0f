"""Where the harness keeps its state: one persistent root and one per-run directory."""

from __future__ import annotations

import os
from pathlib import Path

#: Persistent state: cached images, registry data, built binaries, results.
BENCH_ROOT = Path(os.environ.get("LAZYSNAP_BENCH_ROOT", "/var/lib/lazysnap-bench"))
#: Short-lived state (sockets) of the runs; every run gets its own subdirectory.
BENCH_RUN = Path(os.environ.get("LAZYSNAP_BENCH_RUN", "/run/lazysnap-bench"))

BIN_DIR = BENCH_ROOT / "bin"
CACHE_DIR = BENCH_ROOT / "cache"
IMAGES_DIR = BENCH_ROOT / "images"
OCI_LAYOUT = IMAGES_DIR / "oci"
REGISTRY_DATA = BENCH_ROOT / "registry"
RESULTS_DIR = BENCH_ROOT / "results"
LOGS_DIR = BENCH_ROOT / "logs"

#: The harness source directory (scripts/bench).
HERE = Path(__file__).resolve().parent.parent
#: The repository root (for docs/benchmarks.md).
REPO = HERE.parent.parent
