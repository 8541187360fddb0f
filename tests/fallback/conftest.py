"""Fallback and fault e2e fixtures: real registry, containerd, runc, lazysnapd (tests/harness/fixtures.py)."""

from __future__ import annotations

from tests.harness.fixtures import (
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
    "estargz_image",
    "lazysnapd",
    "make_containerd",
    "make_lazysnapd",
    "pytest_runtest_makereport",
    "ranged_registry",
    "registry",
    "test_image",
]
