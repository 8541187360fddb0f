"""`scripts/demo`'s Python part (the README's main job) runs to the end and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import find_lazysnapd

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_demo_pulls_runs_and_stops_everything() -> None:
    find_lazysnapd()  # fail with the reason when lazysnapd is missing
    res = subprocess.run([sys.executable, "-m", "tests.harness.demo"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "motd from layer 3\nhello from layer 1\nhello from layer 2\nhello from layer 3\n" in out
    assert "big.bin: 2097152 bytes, sha256 a815654a3ebf6dde" in out
    assert out.count(" Committed") == 3
    assert "done: everything the demo started is stopped" in out
    work = Path(out.split("work dir ", 1)[1].split()[0])
    assert not work.exists()
    pids = [int(p) for p in re.findall(r" pid (\d+)", out)]
    assert len(pids) == 3  # registry, lazysnapd, containerd
    assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in pids)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True
