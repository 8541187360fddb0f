"""Shared pytest setup: markers that skip cleanly when the machine lacks root, FUSE or overlayfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real-parts fixtures (registry, containerd, lazysnapd, test images) for every e2e directory.
pytest_plugins = ("tests.harness.fixtures",)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _is_root():
        return
    skip = pytest.mark.skip(reason="needs root (mounts overlayfs/FUSE)")
    for item in items:
        if "root" in item.keywords or "e2e" in item.keywords:
            item.add_marker(skip)
