"""RPCs the conformance suite leaves out (Mounts, Usage, Cleanup, error codes), through a real
gRPC client against a running lazysnapd, with the mounts it returns performed for real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter import syscalls
from snapshotter.api import mount_pb2
from snapshotter.api import snapshots_pb2 as pb
from tests.snapshotter.conftest import Client, Snapd, status_of

pytestmark = [pytest.mark.root]

INDEX_OFF = os.path.exists("/sys/module/overlay/parameters/index")


def _sid(snapd: Snapd, key: str, client: Client) -> str:
    """The numeric id of ``key``, read from the directory its mounts point at."""
    m = client.Mounts(key=key).mounts[0]
    path = m.source if m.type == "bind" else next(o for o in m.options if o.startswith("upperdir="))[9:]
    return Path(path).parent.name


def _mount(m: mount_pb2.Mount, target: Path) -> None:
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def test_mounts_match_containerd_overlay_layout(snapd: Snapd, client: Client, workdir: Path) -> None:
    snaps = snapd.root / "snapshots"
    base = client.Prepare(key="/k/base", labels={}).mounts
    assert len(base) == 1 and base[0].type == "bind" and list(base[0].options) == ["rw", "rbind"]
    base_fs = Path(base[0].source)
    assert base_fs.parent.parent == snaps and base_fs.name == "fs"
    assert oct(base_fs.stat().st_mode & 0o7777) == "0o755"
    (base_fs / "a").write_text("from base")
    client.Commit(name="/c/base", key="/k/base")

    one = client.View(key="/v/one", parent="/c/base").mounts
    assert [(m.type, m.source, list(m.options)) for m in one] == [("bind", str(base_fs), ["ro", "rbind"])]

    top = client.Prepare(key="/k/top", parent="/c/base").mounts
    assert len(top) == 1 and top[0].type == "overlay" and top[0].source == "overlay"
    top_dir = snaps / _sid(snapd, "/k/top", client)
    expected = ([] if not INDEX_OFF else ["index=off"]) + [
        f"workdir={top_dir / 'work'}", f"upperdir={top_dir / 'fs'}", f"lowerdir={base_fs}"]
    assert list(top[0].options) == expected
    assert list(client.Mounts(key="/k/top").mounts[0].options) == expected

    target = workdir / "mnt"
    target.mkdir()
    _mount(top[0], target)
    try:
        assert (target / "a").read_text() == "from base"
        (target / "b").write_text("from top")
    finally:
        _umount(target)
    assert (top_dir / "fs" / "b").read_text() == "from top"
    client.Commit(name="/c/top", key="/k/top")

    two = client.View(key="/v/two", parent="/c/top").mounts
    lower = f"lowerdir={top_dir / 'fs'}:{base_fs}"  # nearest parent first
    assert two[0].type == "overlay"
    assert list(two[0].options) == ([] if not INDEX_OFF else ["index=off"]) + [lower]
    _mount(two[0], target)
    try:
        assert (target / "a").read_text() == "from base" and (target / "b").read_text() == "from top"
        with pytest.raises(OSError):
            (target / "c").write_text("views are read-only")
    finally:
        _umount(target)

    with pytest.raises(grpc.RpcError) as exc:
        client.Mounts(key="/c/top")
    assert status_of(exc) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as exc:
        client.Mounts(key="/nope")
    assert status_of(exc) == grpc.StatusCode.NOT_FOUND


def _expected_usage(root: Path) -> tuple[int, int]:
    seen: set[tuple[int, int]] = set()
    size = 0
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
    return size, len(seen)


def test_usage_active_measured_committed_stored(snapd: Snapd, client: Client) -> None:
    fs = Path(client.Prepare(key="/k/u").mounts[0].source)
    (fs / "big").write_bytes(os.urandom(1 << 20))
    os.link(fs / "big", fs / "hardlink")  # counted once, like containerd's fs.DiskUsage
    (fs / "d").mkdir()
    (fs / "d" / "small").write_text("x")
    os.symlink("big", fs / "sym")
    usage = client.Usage(key="/k/u")
    assert (usage.size, usage.inodes) == _expected_usage(fs)
    assert usage.inodes == 5 and usage.size >= 1 << 20

    (fs / "more").write_bytes(os.urandom(1 << 16))
    grown = client.Usage(key="/k/u")
    assert grown.size > usage.size and grown.inodes == 6

    client.Commit(name="/c/u", key="/k/u")
    committed = client.Usage(key="/c/u")
    assert (committed.size, committed.inodes) == (grown.size, grown.inodes)
    (fs / "after-commit").write_bytes(b"y" * 8192)  # nobody should, but usage is what Commit saw
    assert client.Usage(key="/c/u") == committed

    client.View(key="/v/u", parent="/c/u")
    assert client.Usage(key="/v/u").size == 0

    with pytest.raises(grpc.RpcError) as exc:
        client.Usage(key="/missing")
    assert status_of(exc) == grpc.StatusCode.NOT_FOUND


def test_remove_and_cleanup_directories(snapd: Snapd, client: Client, workdir: Path) -> None:
    snaps = snapd.root / "snapshots"
    client.Prepare(key="/k/keep")
    gone = Path(client.Prepare(key="/k/gone").mounts[0].source).parent
    client.Remove(key="/k/gone")
    assert not gone.exists()  # removal is synchronous, as containerd's default overlay does it

    # Leftovers Cleanup must remove: an unknown id, a temp dir, stray entries, and one with a
    # mount inside it (the mounted directory's own files must survive: nothing is deleted
    # through a mount, and a symlink is unlinked, never followed to mounts it leads to).
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (snaps / "987654" / "fs").mkdir(parents=True)
    (snaps / "new-123abc" / "fs").mkdir(parents=True)
    (snaps / "stray-file").write_text("x")
    link_target = workdir / "link-target"
    (link_target / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(outside), str(link_target / "mnt")], check=True)
    (snaps / "stray-link").symlink_to(link_target)
    (snaps / "987655" / "fs").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(outside), str(snaps / "987655" / "fs")], check=True)

    leftovers = {"987654", "new-123abc", "987655", "stray-file", "stray-link"}
    kept = {p.name for p in snaps.iterdir()} - leftovers
    client.Cleanup()
    assert {p.name for p in snaps.iterdir()} == kept and len(kept) == 1
    assert (outside / "precious").read_text() == "keep me"
    assert syscalls.is_mountpoint(str(link_target / "mnt"))
    subprocess.run(["umount", str(link_target / "mnt")], check=True)
    assert client.Stat(key="/k/keep").info.kind == pb.ACTIVE


def _code(fn: object, **kw: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        fn(**kw)  # type: ignore[operator]
    return status_of(exc)


def test_error_codes(client: Client) -> None:
    client.Prepare(key="a")
    client.Prepare(key="c-tmp")
    client.Commit(name="c", key="c-tmp")
    client.Prepare(key="child", parent="c")
    client.View(key="v", parent="c")
    NF, AE, FP, IA = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)

    assert _code(client.Stat, key="nope") == NF
    assert _code(client.Prepare, key="a") == AE
    assert _code(client.Prepare, key="b", parent="nope") == NF
    assert _code(client.Prepare, key="b", parent="a") == IA  # parent must be committed
    assert _code(client.View, key="v") == AE
    assert _code(client.Prepare, key="") == IA
    assert _code(client.Prepare, key="big", labels={"k": "v" * 5000}) == IA
    assert _code(client.Commit, name="c", key="a") == AE
    assert _code(client.Commit, name="c2", key="v") == FP
    assert _code(client.Commit, name="c3", key="nope") == NF
    assert _code(client.Commit, name="c4", key="c") == FP
    assert _code(client.Remove, key="nope") == NF
    assert _code(client.Usage, key="nope") == NF
    assert _code(client.Mounts, key="c") == FP
    mask = field_mask_pb2.FieldMask(paths=["parent"])
    assert _code(client.Update, info=pb.Info(name="a", parent="x"), update_mask=mask) == IA
    assert _code(client.Update, info=pb.Info(name="nope")) == NF
    assert _code(client.List, filters=["name=="]) == IA
    assert _code(client.List, filters=["labels.==x"]) == IA

    with pytest.raises(grpc.RpcError) as exc:
        client.Remove(key="c")
    assert status_of(exc) == FP and "remove" in exc.value.details()  # type: ignore[attr-defined]
    client.Remove(key="child")
    client.Remove(key="v")
    client.Remove(key="c")  # no children left


def test_stat_and_list_agree_and_filters_quote_like_containerd(client: Client) -> None:
    key = '/ns/1/extract-"quoted" key'
    client.Prepare(key=key + "-tmp", labels={"containerd.io/snapshot.ref": "sha256:abc"})
    client.Commit(name=key, key=key + "-tmp", labels={"containerd.io/snapshot.ref": "sha256:abc", "x": "1"})
    client.Prepare(key="/child", parent=key)
    stat = client.Stat(key=key).info
    listed = client.infos()[key]
    assert stat == listed and stat.created_at == stat.updated_at and stat.kind == pb.COMMITTED
    assert stat.labels == {"containerd.io/snapshot.ref": "sha256:abc", "x": "1"}

    # containerd's metadata store looks a remote snapshot up exactly like this (Go %q quoting).
    go_quoted = '"' + key.replace('"', '\\"') + '"'
    assert set(client.infos('labels."containerd.io/snapshot.ref"==sha256:abc,parent==""')) == {key}
    assert set(client.infos(f"parent=={go_quoted}")) == {"/child"}
    assert set(client.infos("kind==active", "labels.x")) == {"/child", key}
    assert set(client.infos('labels.x~=/^[0-9]$/')) == {key}
    assert set(client.infos('name!="/child",kind==committed')) == {key}
    with pytest.raises(grpc.RpcError) as exc:  # as in containerd, a leading / quotes a regexp
        client.infos("name!=/child")
    assert status_of(exc) == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_errors_are_internal_and_logged(snapd: Snapd, client: Client) -> None:
    fs = Path(client.Prepare(key="/k/broken").mounts[0].source)
    fs.rmdir()  # someone deleted the snapshot's directory behind our back
    with pytest.raises(grpc.RpcError) as exc:
        client.Usage(key="/k/broken")
    assert status_of(exc) == grpc.StatusCode.INTERNAL
    assert "FileNotFoundError" in exc.value.details()  # type: ignore[attr-defined]
    log = snapd.log()
    assert '"msg": "unexpected error in Usage"' in log and '"exc": "Traceback' in log
    assert client.Stat(key="/k/broken").info.kind == pb.ACTIVE  # and the daemon serves on
