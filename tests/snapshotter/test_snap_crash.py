"""kill -9 at random moments between (and during) Prepare/Commit/Remove calls: after a restart,
everything lazysnapd acknowledged is still there, and the store matches the directories."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from snapshotter.api import snapshots_pb2 as pb
from tests.snapshotter.conftest import Client, Snapd

pytestmark = [pytest.mark.root]

ROUNDS = 20


@dataclass
class Model:
    """What the daemon acknowledged: committed name -> parent, active key -> parent."""

    committed: dict[str, str] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)  # active keys whose test file is written
    pending: tuple[str, ...] | None = None  # the call in flight when the daemon died
    counter: int = 0
    errors: list[BaseException] = field(default_factory=list)

    def leaves(self) -> list[str]:
        parents = set(self.committed.values()) | set(self.active.values())
        return [n for n in self.committed if n not in parents]


def _upper(client: Client, key: str) -> Path:
    m = client.Mounts(key=key).mounts[0]
    if m.type == "bind":
        return Path(m.source)
    return Path(next(o for o in m.options if o.startswith("upperdir="))[len("upperdir="):])


def _work(client: Client, model: Model, rng: random.Random, stop: threading.Event) -> None:
    """Drive random operations until the daemon dies; record only acknowledged results."""
    try:
        while not stop.is_set():
            op = rng.random()
            ready = sorted(model.written & set(model.active))
            if op < 0.5 or not ready:
                model.counter += 1
                key = f"/w/active-{model.counter}"
                parent = rng.choice(["", *model.committed])
                model.pending = ("prepare", key, parent)
                client.Prepare(key=key, parent=parent)
                model.active[key] = parent
                model.pending = None
                (_upper(client, key) / "data").write_text(key)
                model.written.add(key)
            elif op < 0.85:
                key = rng.choice(ready)
                name = key.replace("active", "committed")
                model.pending = ("commit", key, name)
                client.Commit(name=name, key=key)
                model.committed[name] = model.active.pop(key)
                model.pending = None
            else:
                victim = rng.choice(list(model.active) + model.leaves())
                model.pending = ("remove", victim)
                client.Remove(key=victim)
                model.active.pop(victim, None)
                model.committed.pop(victim, None)
                model.pending = None
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            model.errors.append(exc)
    except BaseException as exc:
        model.errors.append(exc)


def _resolve_pending(model: Model, infos: dict[str, pb.Info]) -> None:
    """The call in flight at the kill may or may not have happened; take what the store says."""
    if model.pending is None:
        return
    op, *args = model.pending
    if op == "prepare" and args[0] in infos:
        model.active[args[0]] = args[1]
    elif op == "commit" and args[1] in infos:
        model.committed[args[1]] = model.active.pop(args[0])
    elif op == "remove" and args[0] not in infos:
        model.active.pop(args[0], None)
        model.committed.pop(args[0], None)
    model.pending = None


def _verify(snapd: Snapd, client: Client, model: Model) -> None:
    infos = client.infos()
    _resolve_pending(model, infos)
    kinds = {n: i.kind for n, i in infos.items()}
    want = {n: pb.COMMITTED for n in model.committed} | {k: pb.ACTIVE for k in model.active}
    assert kinds == want, "store differs from what was acknowledged"
    for name, parent in {**model.committed, **model.active}.items():
        assert infos[name].parent == parent

    db = sqlite3.connect(f"file:{snapd.root / 'metadata.db'}?mode=ro", uri=True)
    try:
        ids = dict(db.execute("SELECT key, id FROM snapshots").fetchall())
    finally:
        db.close()
    dirs = {p.name for p in (snapd.root / "snapshots").iterdir()}
    assert dirs == {str(i) for i in ids.values()}, "directories and rows differ after recovery"
    for name in model.committed:
        data = snapd.root / "snapshots" / str(ids[name]) / "fs" / "data"
        # Written before Commit was called (the test commits only snapshots it has written to).
        assert data.read_text() == name.replace("committed", "active")


def test_kill9_never_loses_acknowledged_snapshots(workdir: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    snapd = Snapd(workdir)
    model = Model()
    try:
        for rnd in range(ROUNDS):
            snapd.start()
            client = snapd.client()
            try:
                _verify(snapd, client, model)
                stop = threading.Event()
                worker = threading.Thread(target=_work, args=(client, model, rng, stop))
                worker.start()
                time.sleep(rng.uniform(0.02, 0.4))
                snapd.kill9()
                stop.set()
                worker.join(timeout=60)
                assert not worker.is_alive()
                assert not model.errors, model.errors
            finally:
                client.close()
            print(f"round {rnd}: {len(model.committed)} committed, {len(model.active)} active (seed {seed})")
        snapd.start()
        client = snapd.client()
        try:
            _verify(snapd, client, model)
        finally:
            client.close()
        assert len(model.committed) > 0, f"no Commit was ever acknowledged (seed {seed})"
        assert snapd.stop() == 0
    finally:
        if snapd.daemon is not None:
            snapd.daemon.stop()
