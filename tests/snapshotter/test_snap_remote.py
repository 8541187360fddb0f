"""The remote-snapshot seam, driven through gRPC against an in-process daemon whose
LayerFilesystem bind-mounts prepared directories (read-only) instead of FUSE layers."""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import trio

from fusefs.spec import LayerSpec
from snapshotter import daemon, syscalls
from snapshotter.api import snapshots_pb2 as pb
from snapshotter.config import Config
from snapshotter.remote import REMOTE_LABEL, REMOTE_LABEL_VALUE, REMOTE_PREPARED_LOG_KEY
from tests.snapshotter.conftest import Client, status_of

pytestmark = [pytest.mark.root]

REF = "containerd.io/snapshot.ref"
D1, D2, D_MISSING = ("sha256:" + c * 64 for c in "12f")


class BindLayerFilesystem:
    """A real LayerFilesystem: serves layer <digest> by a ro bind mount of ``layers/<hex>``."""

    def __init__(self, layers: Path) -> None:
        self.layers = layers
        self.mounted: dict[str, str] = {}  # mountpoint -> digest
        self.broken: set[str] = set()  # digests whose "source" is gone: check fails
        self.mount_calls: list[LayerSpec] = []
        self.mount_delay = 0.0  # seconds, to let concurrent Prepares overlap

    async def mount(self, spec: LayerSpec, mountpoint: str) -> None:
        self.mount_calls.append(spec)
        await trio.sleep(self.mount_delay)
        src = self.layers / spec.digest.split(":", 1)[1]
        if not src.is_dir():
            raise FileNotFoundError(f"no such layer {spec.digest}")
        await trio.to_thread.run_sync(syscalls.bind_mount, str(src), mountpoint, True)
        self.mounted[mountpoint] = spec.digest

    start_mount = mount  # ends before it returns, as the contract allows

    async def check(self, mountpoint: str, *, wait: bool = True) -> None:
        digest = self.mounted.get(mountpoint)
        if digest is None or digest in self.broken:
            raise ConnectionError(f"layer at {mountpoint} is not served")
        if not await trio.to_thread.run_sync(syscalls.is_mountpoint, mountpoint):
            raise ConnectionError(f"{mountpoint} is not mounted")

    async def unmount(self, mountpoint: str) -> None:
        await trio.to_thread.run_sync(syscalls.unmount, mountpoint)
        self.mounted.pop(mountpoint, None)


class InProcessDaemon:
    """daemon.run on its own trio loop in a thread, with a given LayerFilesystem."""

    def __init__(self, cfg: Config, layerfs: BindLayerFilesystem, release_on_exit: bool = True) -> None:
        self.cfg = cfg
        self.layerfs = layerfs
        self.release_on_exit = release_on_exit  # False: leave mounts behind, like a crashed process
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._thread, daemon=True)

    @asynccontextmanager
    async def _factory(self, cfg: Config) -> AsyncIterator[BindLayerFilesystem]:
        try:
            yield self.layerfs
        finally:
            if self.release_on_exit:
                for mp in list(self.layerfs.mounted):
                    await self.layerfs.unmount(mp)

    def _thread(self) -> None:
        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self.stop_event = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run, self.cfg, self.stop_event, self._factory)
                self.ready.set()

        try:
            trio.run(main)
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def __enter__(self) -> Client:
        self.thread.start()
        assert self.ready.wait(60), "daemon did not start"
        if self.error is not None:
            raise self.error
        self.client = Client(self.cfg.address)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        trio.from_thread.run_sync(self.stop_event.set, trio_token=self.token)
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def _labels(chain: str, digest: str, layers: str = "") -> dict[str, str]:
    return {
        REF: chain,
        "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/test/app:v1",
        "containerd.io/snapshot/cri.layer-digest": digest,
        "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "9" * 64,
        "containerd.io/snapshot/cri.image-layers": layers or digest,
    }


@pytest.fixture
def env(workdir: Path) -> tuple[Config, BindLayerFilesystem]:
    layers = workdir / "layers"
    for digest, name in ((D1, "a"), (D2, "b")):
        d = layers / digest.split(":")[1]
        d.mkdir(parents=True)
        (d / name).write_text(f"file {name} of {digest[:12]}")
    cfg = Config(root=str(workdir / "root"), address=str(workdir / "s.sock"))
    return cfg, BindLayerFilesystem(layers)


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return status_of(excinfo)


def _prepared_logs(caplog: pytest.LogCaptureFixture) -> list[object]:
    key = REMOTE_PREPARED_LOG_KEY
    return [getattr(r, key) for r in caplog.records if hasattr(r, key)]


def test_remote_layers_commit_serve_check_restore_and_remove(
        env: tuple[Config, BindLayerFilesystem], workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg, layerfs = env
    snaps = Path(cfg.root) / "snapshots"
    with InProcessDaemon(cfg, layerfs) as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.Prepare(key="default/1/extract-1", labels=_labels("chain-1", D1, f"{D1},{D2}"))
        assert _code(exc) == grpc.StatusCode.ALREADY_EXISTS
        # What containerd's metadata store does next: find the target by label and parent.
        found = client.infos(f'labels."{REF}"==chain-1,parent==""')
        assert list(found) == ["chain-1"] and found["chain-1"].kind == pb.COMMITTED
        assert found["chain-1"].labels[REMOTE_LABEL] == REMOTE_LABEL_VALUE
        assert found["chain-1"].labels[REF] == "chain-1"
        assert layerfs.mount_calls[0].neighbours == (D1, D2)
        with pytest.raises(grpc.RpcError) as exc:
            client.Stat(key="default/1/extract-1")
        assert _code(exc) == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.RpcError) as exc:
            client.Prepare(key="default/2/extract-2", parent="chain-1", labels=_labels("chain-2", D2))
        assert _code(exc) == grpc.StatusCode.ALREADY_EXISTS
        assert list(client.infos(f'labels."{REF}"==chain-2,parent=="chain-1"')) == ["chain-2"]
        assert _prepared_logs(caplog) == [True, True]
        # containerd's labels name a layer and those above it; the layers below come from the chain
        assert [(c.digest, c.neighbours, c.lower) for c in layerfs.mount_calls] == [
            (D1, (D1, D2), ()), (D2, (D2,), (D1,))]

        # A container on top: overlay over both remote layers, mounted for real.
        mounts = client.Prepare(key="container", parent="chain-2").mounts
        target = workdir / "rootfs"
        target.mkdir()
        m = mounts[0]
        subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)
        try:
            assert (target / "a").read_text().startswith("file a")
            assert (target / "b").read_text().startswith("file b")
            (target / "c").write_text("container write")
        finally:
            subprocess.run(["umount", str(target)], check=True)

        layerfs.broken.add(D1)  # the bottom layer's source went away
        for call, kw in ((client.Mounts, {"key": "container"}),
                         (client.Prepare, {"key": "c2", "parent": "chain-2"}),
                         (client.View, {"key": "v", "parent": "chain-1"})):
            with pytest.raises(grpc.RpcError) as exc:
                call(**kw)
            assert _code(exc) == grpc.StatusCode.UNAVAILABLE, call
        layerfs.broken.clear()
        assert set(client.infos()) == {"chain-1", "chain-2", "container"}  # failed calls left nothing
        assert client.Mounts(key="container").mounts == mounts

    # Stopped: the layer filesystem released its mounts. A restart mounts them again.
    remote_dirs = [d / "fs" for d in snaps.iterdir() if syscalls.is_mountpoint(str(d / "fs"))]
    assert remote_dirs == []
    calls = len(layerfs.mount_calls)
    with InProcessDaemon(cfg, layerfs, release_on_exit=False) as client:
        mounted = sorted(layerfs.mounted)
        assert len(mounted) == 2 and all(syscalls.is_mountpoint(mp) for mp in mounted)
        restored = {c.digest: c.lower for c in layerfs.mount_calls[calls:]}
        assert restored == {D1: (), D2: (D1,)}  # a restored layer knows the layers below it too
        assert client.Mounts(key="container").mounts == mounts
    # That daemon "crashed" with its layers mounted; the next one replaces the stale mounts.
    with InProcessDaemon(cfg, layerfs) as client:
        for mp in mounted:
            assert syscalls.mount_points().count(mp) == 1
        client.Remove(key="container")
        with pytest.raises(grpc.RpcError) as exc:
            client.Remove(key="chain-1")
        assert _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
        client.Remove(key="chain-2")
        client.Remove(key="chain-1")
        assert client.infos() == {}
        assert layerfs.mounted == {} and list(snaps.iterdir()) == []
    for digest, name in ((D1, "a"), (D2, "b")):  # removal never deleted through a mount
        assert (layerfs.layers / digest.split(":")[1] / name).exists()


def test_mount_failure_falls_back_to_a_normal_unpack(
        env: tuple[Config, BindLayerFilesystem], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg, layerfs = env
    with InProcessDaemon(cfg, layerfs) as client:
        mounts = client.Prepare(key="extract", labels=_labels("chain-x", D_MISSING)).mounts
        assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rw", "rbind"])]
        assert len(layerfs.mount_calls) == 1 and layerfs.mounted == {}
        assert not syscalls.is_mountpoint(mounts[0].source)
        Path(mounts[0].source, "unpacked").write_text("by containerd")
        client.Commit(name="chain-x", key="extract", labels={REF: "chain-x"})
        info = client.Stat(key="chain-x").info
        assert info.kind == pb.COMMITTED and REMOTE_LABEL not in info.labels
    records = [r for r in caplog.records if getattr(r, REMOTE_PREPARED_LOG_KEY, None) is False]
    assert len(records) == 1 and "FileNotFoundError" in records[0].reason  # type: ignore[attr-defined]


def test_labels_that_are_not_a_usable_remote_layer_take_the_normal_path(
        env: tuple[Config, BindLayerFilesystem], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg, layerfs = env
    with InProcessDaemon(cfg, layerfs) as client:
        bad = _labels("chain-bad", "sha256:not-hex")
        assert client.Prepare(key="k1", labels=bad).mounts[0].type == "bind"
        no_ref = {k: v for k, v in _labels("chain-1", D1).items() if k != REF}
        assert client.Prepare(key="k2", labels=no_ref).mounts[0].type == "bind"
        assert client.Prepare(key="k3", labels={REF: "chain-3"}).mounts[0].type == "bind"
        assert layerfs.mount_calls == []
    assert _prepared_logs(caplog) == [False]


def test_existing_target_answers_already_exists_without_mounting(
        env: tuple[Config, BindLayerFilesystem]) -> None:
    cfg, layerfs = env
    with InProcessDaemon(cfg, layerfs) as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.Prepare(key="e1", labels=_labels("chain-1", D1))
        assert _code(exc) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as exc:  # a second pull of the same layer
            client.Prepare(key="e2", labels=_labels("chain-1", D1))
        assert _code(exc) == grpc.StatusCode.ALREADY_EXISTS
        assert len(layerfs.mount_calls) == 1
        assert set(client.infos()) == {"chain-1"}


def test_concurrent_prepares_of_one_layer_leave_one_snapshot(env: tuple[Config, BindLayerFilesystem]) -> None:
    cfg, layerfs = env
    layerfs.mount_delay = 0.5
    codes: list[grpc.StatusCode] = []
    with InProcessDaemon(cfg, layerfs) as client:
        def pull(key: str) -> None:
            with pytest.raises(grpc.RpcError) as exc:
                client.Prepare(key=key, labels=_labels("chain-1", D1))
            codes.append(_code(exc))

        threads = [threading.Thread(target=pull, args=(f"extract-{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 2
        assert len(layerfs.mount_calls) == 2  # both raced past the existence check
        assert set(client.infos()) == {"chain-1"}  # the loser's active snapshot is gone
        assert len(layerfs.mounted) == 1
        assert len(list((Path(cfg.root) / "snapshots").iterdir())) == 1
