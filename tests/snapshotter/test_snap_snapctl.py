"""snapctl status against a running lazysnapd."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.snapshotter.conftest import Client, Snapd

pytestmark = [pytest.mark.root]


def _snapctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("snapctl")
    assert exe, "snapctl is not on PATH (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_status_counts_kinds_and_sums_usage(snapd: Snapd, client: Client) -> None:
    fs = Path(client.Prepare(key="a").mounts[0].source)
    (fs / "f").write_bytes(b"x" * 100_000)
    client.Commit(name="c", key="a")
    client.Prepare(key="b", parent="c")
    client.View(key="v", parent="c")
    total = sum(client.Usage(key=k).size for k in ("c", "b", "v"))

    res = _snapctl("status", "--address", str(snapd.address), "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["snapshots"] == 3 and status["remote"] == 0
    assert status["by_kind"] == {"active": 1, "view": 1, "committed": 1}
    assert status["size_bytes"] == total and total >= 100_000

    text = _snapctl("status", "--address", str(snapd.address))
    assert text.returncode == 0 and "snapshots: 3 (active 1, view 1, committed 1; remote 0)" in text.stdout


def test_status_reports_an_unreachable_daemon_without_traceback(workdir: Path) -> None:
    res = _snapctl("status", "--address", str(workdir / "nobody.sock"))
    assert res.returncode == 1
    assert "cannot query lazysnapd" in res.stderr and "Traceback" not in res.stderr
