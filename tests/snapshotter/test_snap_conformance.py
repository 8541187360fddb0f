"""containerd's own snapshotter conformance suite (snapshots/testsuite, containerd 1.6) against lazysnapd."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = REPO.parent / "shared" / "conformance"
# ../shared is read-only in CI: build into a writable cache instead of next to the scripts.
BIN_DIR = Path(os.environ.get("CONFORMANCE_BIN_DIR", "/var/cache/lazysnap/conformance"))
EXPECTED = "conformance: 20 passed, 0 failed, 1 skipped"


def test_containerd_snapshotter_suite(tmp_path: Path) -> None:
    if not (CONFORMANCE / "run.sh").exists():
        pytest.skip(f"{CONFORMANCE} is absent: the conformance harness lives in ../shared")
    env = {**os.environ, "CONFORMANCE_BIN_DIR": str(BIN_DIR)}
    if not (BIN_DIR / "conformance.test").exists():
        build = subprocess.run([str(CONFORMANCE / "build.sh")], env=env, capture_output=True, text=True,
                               timeout=1200)
        assert build.returncode == 0, f"build.sh failed:\n{build.stderr[-3000:]}"
    run = subprocess.run(
        [str(CONFORMANCE / "run.sh"), "-l", str(tmp_path / "logs"),
         "lazysnapd --root {root} --address {socket}"],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    lines = run.stdout.strip().splitlines()
    assert lines, f"run.sh printed nothing; stderr:\n{run.stderr[-3000:]}"
    assert lines[-1] == EXPECTED, f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    assert run.returncode == 0
