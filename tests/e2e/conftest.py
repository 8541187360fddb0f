"""e2e fixtures: real registry, containerd, runc and lazysnapd (see tests/harness/fixtures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

# `python3 -m pytest` puts the repo root on sys.path; plain `pytest` does not.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.harness.fixtures import (  # noqa: E402
    containerd,
    estargz_image,
    lazysnapd,
    make_containerd,
    make_lazysnapd,
    pytest_runtest_makereport,
    ranged_registry,
    registry,
    test_image,
)

__all__ = [
    "containerd",
    "estargz_image",
    "lazysnapd",
    "make_containerd",
    "make_lazysnapd",
    "pytest_runtest_makereport",
    "ranged_registry",
    "registry",
    "test_image",
]
