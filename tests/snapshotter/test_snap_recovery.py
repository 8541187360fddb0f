"""Start-up recovery of half-done work, on states a crash can leave (built by hand here; the
kill -9 test reaches them at random)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from snapshotter.mounts import Layout, OverlayOptions
from snapshotter.snapshots import Snapshots
from snapshotter.store import Kind, Store


def _open(root: Path) -> Snapshots:
    root.mkdir(exist_ok=True)
    return Snapshots(Store.open(str(root / "metadata.db")), Layout(str(root)), OverlayOptions())


def test_recover_removes_orphans_and_drops_rows_without_directories(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    snaps = _open(tmp_path)
    snaps.prepare("base-tmp", "", {})
    snaps.commit("base", "base-tmp", {})
    snaps.prepare("active", "base", {})
    snaps.view("view", "base", {})
    snaps.prepare("lost-active", "", {})
    with snaps.store.read() as tx:
        ids = {r.key: r.id for r in tx.all()}
    d = Path(snaps.layout.snapshots)
    (d / "new-crashed" / "fs").mkdir(parents=True)  # crash while building a directory
    (d / str(max(ids.values()) + 1) / "fs").mkdir(parents=True)  # crash after rename, before commit
    (d / str(ids["lost-active"]) / "fs").rmdir()  # a row whose directory vanished
    os.rmdir(d / str(ids["lost-active"]) / "work")
    os.rmdir(d / str(ids["lost-active"]))
    snaps.store.close()

    snaps = _open(tmp_path)
    caplog.set_level(logging.INFO)
    snaps.recover()
    assert {r.key for r in snaps.walk([])} == {"base", "active", "view"}
    assert sorted(p.name for p in d.iterdir()) == sorted(str(ids[k]) for k in ("base", "active", "view"))
    assert snaps.stat("base").kind == Kind.COMMITTED
    snaps.store.close()


def test_a_committed_snapshot_without_directory_is_kept_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    snaps = _open(tmp_path)
    snaps.prepare("c-tmp", "", {})
    snaps.commit("c", "c-tmp", {})
    with snaps.store.read() as tx:
        sid = tx.get("c").id
    os.rename(snaps.layout.dir(sid), str(tmp_path / "moved-away"))
    caplog.set_level(logging.ERROR)
    snaps.recover()
    assert snaps.stat("c").kind == Kind.COMMITTED  # never silently forgotten
    assert any("committed snapshot has no directory" in r.getMessage() for r in caplog.records)
    snaps.store.close()


def test_ids_are_never_reused(tmp_path: Path) -> None:
    snaps = _open(tmp_path)
    snaps.prepare("a", "", {})
    first = Path(snaps.mounts("a")[0].source).parent.name
    snaps.remove("a")
    snaps.prepare("b", "", {})
    assert Path(snaps.mounts("b")[0].source).parent.name != first
    snaps.store.close()
